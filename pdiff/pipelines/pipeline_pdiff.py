"""Stage 3: `PDiffPipeline`, a diffusers pipeline that samples new parameter vectors.

    pipe = PDiffPipeline.from_pretrained("you/pdiff-digits")       # or a local folder
    params = pipe(num_models=100, generator=torch.Generator().manual_seed(0)).params   # [100, D]
    nets = pipe.networks(params)                                    # ready nn.Modules

Components: `autoencoder` (a ParameterCodec, conv or token: latent <-> parameters, with normalisation),
`unet` (UNet1DModel denoiser), `scheduler` (DDPM or DDIM) and `target` (TargetNetwork: base weights,
layout and task spec). All networks of a call are sampled in one batched chain.

Loading: `PDiffPipeline.from_pretrained` is the checked path (folders and Hub repo ids, the HF cache,
offline mode; safetensors only, strict weights, no code from the repository; see `loading.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet1DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import hub
from ..models import ParameterCodec, TargetNetwork
from ..params import LayoutMismatchError
from .loading import InvalidGeneratorError, check_components, check_folder, check_network_code, check_weights, own_memory, resolve_folder

if TYPE_CHECKING:
    from ..evaluation import Report

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def sampler_scheduler(name: str, config) -> DDPMScheduler | DDIMScheduler:
    """The scheduler that samples with `name` (ddim or ddpm), built from a (training) scheduler's config."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_config(config)


@dataclass
class PDiffPipelineOutput(BaseOutput):
    """`params`: generated parameter vectors [num_models, D], float32, on the CPU."""

    params: torch.Tensor


class PDiffPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->autoencoder"

    def __init__(self, autoencoder: ParameterCodec, unet: UNet1DModel, scheduler: DDPMScheduler | DDIMScheduler, target: TargetNetwork,
                 default_num_inference_steps: int | None = None, default_temperature: float | None = None):
        super().__init__()
        check_components(autoencoder, unet, target)
        for module in (autoencoder, unet, target):
            own_memory(module)
        self.register_modules(autoencoder=autoencoder, unet=unet, scheduler=scheduler, target=target)
        # The steps and temperature the generator was validated with (saved in model_index.json), used when a call names none.
        self.register_to_config(default_num_inference_steps=default_num_inference_steps, default_temperature=default_temperature)

    @property
    def default_temperature(self) -> float:
        return float(self.config.get("default_temperature") or 1.0)

    @property
    def layout(self):
        return self.target.layout

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PDiffPipeline":
        """Load from a folder or a Hub repo id (through the Hugging Face cache; `HF_HUB_OFFLINE=1` uses the cache only).

        Only JSON and safetensors files are downloaded and read: pickled weights (`*.bin`, `*.pt`, ...) are
        ignored, and no code from the repository runs. Every component's weights must match its config
        exactly (no silently re-initialised tensors). `revision`, `cache_dir`, `token`, `local_files_only`
        and `force_download` select what to download; other keyword arguments (e.g. `torch_dtype`) go to
        diffusers' loader. A Hub generator whose network is user code (`_target_` outside pdiff and
        torchvision) loads only with `trust_network_code=True`, since that imports the module it names.
        """
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)) or not str(pretrained_model_name_or_path).strip():
            raise ValueError(f"pretrained_model_name_or_path={pretrained_model_name_or_path!r}: give a generator folder or a Hub repo id")
        for unsafe in ("custom_pipeline", "trust_remote_code", "custom_revision"):
            if kwargs.pop(unsafe, None):
                raise ValueError(f"PDiffPipeline.from_pretrained does not take {unsafe}=: a pdiff generator never runs code from its repository")
        if kwargs.pop("use_safetensors", True) is False:
            raise ValueError("pdiff generators load from safetensors only (use_safetensors=False would unpickle weights)")
        trust_network_code = bool(kwargs.pop("trust_network_code", False))
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies") if k in kwargs}
        name = str(pretrained_model_name_or_path)
        folder = resolve_folder(name, **hub_kwargs)
        check_folder(folder)
        check_network_code(folder, name, trusted=trust_network_code or Path(name).expanduser().is_dir())
        check_weights(folder)
        dtype = kwargs.pop("torch_dtype", None) if isinstance(kwargs.get("torch_dtype"), torch.dtype) else None
        try:
            pipe = super().from_pretrained(folder, use_safetensors=True, **kwargs)
        except (InvalidGeneratorError, LayoutMismatchError) as err:  # components that do not fit together
            raise type(err)(f"{folder}: {err}") from err
        except (OSError, RuntimeError, ValueError) as err:  # checked above; anything left is rare and worth context
            raise InvalidGeneratorError(f"could not load the generator in {folder}: {err}") from err
        return pipe.to(dtype) if dtype is not None else pipe  # a dtype applies to the UNet only (see `to`)

    @torch.no_grad()
    def __call__(
        self,
        num_models: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        temperature: float | None = None,
        eta: float = 0.0,
    ) -> PDiffPipelineOutput | tuple:
        """Sample `num_models` parameter vectors in one denoising chain.

        `num_inference_steps` defaults to the steps the generator was validated with during training
        (`default_num_inference_steps` in model_index.json), else to every training timestep.
        `temperature` scales the starting noise: below 1 the chain starts nearer the latent's centre and
        ends nearer the networks the generator saw most (less novel, usually more accurate), above 1 further
        out; with the default DDIM sampler (eta = 0) the chain is deterministic from there. It defaults to
        the generator's `default_temperature` (`generator.temperature` in training), else 1.
        `eta` is DDIM's: 0 samples deterministically from the starting noise, 1 adds fresh noise at every
        step as DDPM does (diffusers' `DDIMScheduler.step`).
        The same `generator` seed gives the same networks. The denoiser runs in its own dtype (see `to`);
        the latents, the scheduler's arithmetic and the decoding stay float32, so a bf16 run starts from
        the same noise as a float32 one and only the UNet's outputs are rounded.
        """
        if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
            raise ValueError(f"num_models must be a positive integer, got {num_models!r}")
        temperature = self.default_temperature if temperature is None else temperature
        if not (0 < temperature < float("inf")):
            raise ValueError(f"temperature={temperature}: use a positive number (1 samples as trained)")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta}: use 0 (deterministic DDIM) to 1 (as much fresh noise per step as DDPM)")
        step_kwargs = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
        if eta and not step_kwargs:
            raise ValueError(f"eta applies to the DDIM sampler; this pipeline samples with {type(self.scheduler).__name__}")
        steps = num_inference_steps if num_inference_steps is not None else self.config.get("default_num_inference_steps") or self.scheduler.config.num_train_timesteps
        if not 1 <= steps <= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={steps}: use 1 to {self.scheduler.config.num_train_timesteps} (the generator's training timesteps)")
        shape = (num_models, *self.autoencoder.latent_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self._execution_device, torch.float32) * (self.scheduler.init_noise_sigma * temperature)

        self.scheduler.set_timesteps(int(steps), device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            noise_pred = self.unet(latents.to(self.unet.dtype), t).sample.float()
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator, **step_kwargs).prev_sample

        params = self.autoencoder.latents_to_params(latents.to(self.autoencoder.dtype)).float().cpu()
        self.maybe_free_model_hooks()
        if not torch.isfinite(params).all():
            raise FloatingPointError("the generator produced NaN/Inf parameters; it is broken or was loaded in too low a precision")
        return PDiffPipelineOutput(params=params) if return_dict else (params,)

    def to(self, *args, **kwargs) -> "PDiffPipeline":
        """Move the pipeline like diffusers' `to`; a dtype (e.g. `torch.bfloat16`) applies to the UNet only.

        The autoencoder decodes once per call and holds the normalisation (the mean checkpoint and
        per-tensor scales): in bf16 its rounding alone moves parameters by about a quarter of the spread
        between checkpoints. The target network is what users load the vectors into. Both stay float32;
        the UNet, which runs `num_inference_steps` times, takes the dtype.
        """
        dtype = kwargs.pop("dtype", None)
        rest = []
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                rest.append(arg)
        if rest or kwargs:
            super().to(*rest, **kwargs)
        if dtype is not None:  # (ModelMixin.to would warn about fp32 modules on every cast, even with none)
            torch.nn.Module.to(self.unet, dtype=dtype)
        return self

    # -- from vectors to networks ----------------------------------------------------------
    def state_dicts(self, params: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.target.state_dicts(params)

    def networks(self, params: torch.Tensor) -> list[torch.nn.Module]:
        return self.target.networks(params)

    # -- sharing ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, report: "Report | None" = None, plots: list[str | os.PathLike] | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """Save the components (safetensors + JSON), plus a model card, the evaluation report and plots.

        With `push_to_hub=True` (and `repo_id=`, default: the folder's name) the folder is then uploaded
        like `push_to_hub` does: only safetensors, JSON, README.md and PNG files, whatever else it holds.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr") if k in kwargs}
        if not kwargs.setdefault("safe_serialization", True):
            raise ValueError("pdiff generators are saved as safetensors only (safe_serialization=False would pickle them)")
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        if report is not None:
            report.save(save_directory)
        for plot in plots or []:
            shutil.copy(plot, save_directory / Path(plot).name)
        if report is None:  # a report saved with the generator earlier still belongs in its card
            from ..evaluation.report import REPORT_FILE, Report

            report = Report.load(save_directory) if (save_directory / REPORT_FILE).exists() else None
        self.model_card(report, [Path(p).name for p in plots or []]).save(save_directory / "README.md")
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", save_directory.resolve().name)
            hub.upload(save_directory, repo_id, allow_patterns=hub.GENERATOR_UPLOAD_PATTERNS, commit_message=hub_kwargs.pop("commit_message", "Upload pdiff generator"), **hub_kwargs)

    def push_to_hub(
        self, repo_id: str, commit_message: str = "Upload pdiff generator", private: bool | None = None, token: str | None = None,
        report: "Report | None" = None, plots: list[str | os.PathLike] | None = None, create_pr: bool = False, revision: str | None = None,
    ) -> str:
        """Create the repo (if needed) and upload the generator in one commit; returns the commit URL.

        Only safetensors, JSON, the model card and PNG plots are uploaded (training checkpoints never).
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, report=report, plots=plots)
            return hub.upload(tmp, repo_id, allow_patterns=hub.GENERATOR_UPLOAD_PATTERNS, commit_message=commit_message, private=private, token=token,
                              create_pr=create_pr, revision=revision)

    def model_card(self, report: "Report | None" = None, plots: list[str] | None = None):
        return hub.generator_card(self, report, plots or [])
