"""Stage 3: `PDiffPipeline`, a diffusers pipeline that samples new parameter vectors.

    pipe = PDiffPipeline.from_pretrained("you/pdiff-digits")       # or a local folder
    params = pipe(num_models=100, generator=torch.Generator().manual_seed(0)).params   # [100, D]
    nets = pipe.networks(params)                                    # ready nn.Modules

Components: `autoencoder` (ParameterAutoencoder: latent <-> parameters, with normalisation),
`unet` (UNet1DModel denoiser), `scheduler` (DDPM or DDIM) and `target` (TargetNetwork: base weights,
layout and task spec). All networks of a call are sampled in one batched chain.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet1DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .models import ParameterAutoencoder, TargetNetwork

# Everything a generator repository may contain; weights only ever as safetensors.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md", "*.png"]
REPORT_FILE = "report.json"


@dataclass
class PDiffPipelineOutput(BaseOutput):
    """`params`: generated parameter vectors [num_models, D], float32, on the CPU."""

    params: torch.Tensor


class PDiffPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->autoencoder"

    def __init__(self, autoencoder: ParameterAutoencoder, unet: UNet1DModel, scheduler: DDPMScheduler | DDIMScheduler, target: TargetNetwork):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, unet=unet, scheduler=scheduler, target=target)

    @property
    def layout(self):
        return self.target.layout

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PDiffPipeline":
        """Load from a folder or the Hub. Only safetensors weights are accepted; no code from the repo runs."""
        kwargs.setdefault("use_safetensors", True)
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            _check_folder(path)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:  # diffusers reports Hub and cache misses as OSError/EnvironmentError
            offline = os.environ.get("HF_HUB_OFFLINE", "0")
            raise FileNotFoundError(
                f"could not load the generator {str(pretrained_model_name_or_path)!r} (revision {kwargs.get('revision') or 'main'}, "
                f"HF_HUB_OFFLINE={offline}): {err}. "
                + ("Offline, only generators downloaded before are in the cache: download it once online or pass a local folder." if offline not in ("0", "", "false") else "Check the repo id and revision.")
            ) from err

    @torch.no_grad()
    def __call__(
        self,
        num_models: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PDiffPipelineOutput | tuple:
        """Sample `num_models` parameter vectors in one denoising chain.

        `num_inference_steps` defaults to the scheduler's training steps for DDPM and to 50 for DDIM.
        """
        if num_models < 1:
            raise ValueError(f"num_models must be positive, got {num_models}")
        if num_inference_steps is None:
            num_inference_steps = 50 if isinstance(self.scheduler, DDIMScheduler) else self.scheduler.config.num_train_timesteps
        shape = (num_models, *self.autoencoder.latent_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self._execution_device, self.unet.dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            noise_pred = self.unet(latents, t).sample
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample

        params = self.autoencoder.latents_to_params(latents.to(self.autoencoder.dtype)).float().cpu()
        self.maybe_free_model_hooks()
        if not torch.isfinite(params).all():
            raise FloatingPointError("the generator produced NaN/Inf parameters; it is broken or was loaded in too low a precision")
        return PDiffPipelineOutput(params=params) if return_dict else (params,)

    # -- from vectors to networks ----------------------------------------------------------
    def state_dicts(self, params: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.target.state_dicts(params)

    def networks(self, params: torch.Tensor) -> list[torch.nn.Module]:
        return self.target.networks(params)

    # -- sharing ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, report: dict | None = None, plots: list[str | os.PathLike] | None = None, **kwargs) -> None:
        """Save the components (safetensors + JSON), plus a model card, the evaluation report and plots."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        if report is not None:
            (save_directory / REPORT_FILE).write_text(json.dumps(report, indent=2))
        for plot in plots or []:
            shutil.copy(plot, save_directory / Path(plot).name)
        report = report or _read_json(save_directory / REPORT_FILE)
        self.model_card(report, [Path(p).name for p in plots or []]).save(save_directory / "README.md")

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload pdiff generator", private: bool | None = None, token: str | None = None, report: dict | None = None, plots: list[str | os.PathLike] | None = None, **kwargs) -> str:
        """Create the repo and upload the generator in one commit; returns the commit URL.

        Only safetensors, JSON, the model card and PNG plots are uploaded (training checkpoints never).
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, report=report, plots=plots)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, allow_patterns=HUB_ALLOW_PATTERNS)
        return str(info)

    def model_card(self, report: dict | None = None, plots: list[str] | None = None):
        from .card import generator_model_card

        return generator_model_card(self, report, plots or [])


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


REQUIRED_COMPONENTS = ("autoencoder", "unet", "scheduler", "target")


def _check_folder(path: Path) -> None:
    """Say precisely what is wrong with a generator folder before diffusers tries to load it."""
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} is not a pdiff generator: model_index.json is missing (save one with PDiffPipeline.save_pretrained or train.py)")
    listed = json.loads(index.read_text())
    missing = [c for c in REQUIRED_COMPONENTS if c not in listed or not (path / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks the component(s) {missing}; a pdiff generator needs {list(REQUIRED_COMPONENTS)}")
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"})
    if pickles:
        # Never unpickled; mention them so a user knows why they are ignored.
        import warnings

        warnings.warn(f"ignoring pickle files in {path} (pdiff loads safetensors only): {pickles}", stacklevel=3)

