"""Stage 3: `PDiffPipeline`, a diffusers pipeline that samples new parameter vectors.

    pipe = PDiffPipeline.from_pretrained("you/pdiff-digits")       # or a local folder
    params = pipe(num_models=100, generator=torch.Generator().manual_seed(0)).params   # [100, D]
    nets = pipe.networks(params)                                    # ready nn.Modules

Components: `autoencoder` (ParameterAutoencoder: latent <-> parameters, with normalisation),
`unet` (UNet1DModel denoiser), `scheduler` (DDPM or DDIM) and `target` (TargetNetwork: base weights,
layout and task spec). All networks of a call are sampled in one batched chain.

Loading: `PDiffPipeline.from_pretrained` is the checked path (folders and Hub repo ids, the HF cache,
offline mode; safetensors only, strict weights, no code from the repository). After `import pdiff`,
diffusers' own `DiffusionPipeline.from_pretrained(folder)` loads a generator folder too; for a Hub repo
id diffusers would expect the components' code in the repository (remote code), so use this class.
"""

from __future__ import annotations

import itertools
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
from .params import LayoutMismatchError

# Everything a generator repository may contain; weights only ever as safetensors.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md", "*.png"]
# What loading downloads from a repository: configs and safetensors weights, never pickles or code.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors"]
REPORT_FILE = "report.json"


SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def sampler_scheduler(name: str, config) -> DDPMScheduler | DDIMScheduler:
    """The scheduler that samples with `name` (ddim or ddpm), built from a (training) scheduler's config."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_config(config)


class InvalidGeneratorError(ValueError):
    """A generator folder or repository whose files are damaged or do not fit together."""


@dataclass
class PDiffPipelineOutput(BaseOutput):
    """`params`: generated parameter vectors [num_models, D], float32, on the CPU."""

    params: torch.Tensor


class PDiffPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->autoencoder"

    def __init__(self, autoencoder: ParameterAutoencoder, unet: UNet1DModel, scheduler: DDPMScheduler | DDIMScheduler, target: TargetNetwork, default_num_inference_steps: int | None = None):
        super().__init__()
        _check_components(autoencoder, unet, target)
        for module in (autoencoder, unet, target):
            _own_memory(module)
        self.register_modules(autoencoder=autoencoder, unet=unet, scheduler=scheduler, target=target)
        # The steps the generator was validated with (saved in model_index.json), used when a call names none.
        self.register_to_config(default_num_inference_steps=default_num_inference_steps)

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
        diffusers' loader.
        """
        for unsafe in ("custom_pipeline", "trust_remote_code", "custom_revision"):
            if kwargs.pop(unsafe, None):
                raise ValueError(f"PDiffPipeline.from_pretrained does not take {unsafe}=: a pdiff generator never runs code from its repository")
        if kwargs.pop("use_safetensors", True) is False:
            raise ValueError("pdiff generators load from safetensors only (use_safetensors=False would unpickle weights)")
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies") if k in kwargs}
        folder = _resolve_folder(str(pretrained_model_name_or_path), **hub)
        _check_folder(folder)
        _check_weights(folder)
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
    ) -> PDiffPipelineOutput | tuple:
        """Sample `num_models` parameter vectors in one denoising chain.

        `num_inference_steps` defaults to all training steps for DDPM and, for DDIM, to the steps the generator
        was trained with (`default_num_inference_steps`, else 50).
        The same `generator` seed gives the same networks. The denoiser runs in its own dtype (see `to`);
        the latents, the scheduler's arithmetic and the decoding stay float32, so a bf16 run starts from
        the same noise as a float32 one and only the UNet's outputs are rounded.
        """
        if num_models < 1:
            raise ValueError(f"num_models must be positive, got {num_models}")
        if num_inference_steps is None and isinstance(self.scheduler, DDIMScheduler):
            num_inference_steps = self.config.get("default_num_inference_steps") or 50
        elif num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_train_timesteps
        shape = (num_models, *self.autoencoder.latent_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self._execution_device, torch.float32) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            noise_pred = self.unet(latents.to(self.unet.dtype), t).sample.float()
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample

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
    def save_pretrained(self, save_directory: str | os.PathLike, report: dict | None = None, plots: list[str | os.PathLike] | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """Save the components (safetensors + JSON), plus a model card, the evaluation report and plots.

        With `push_to_hub=True` (and `repo_id=`, default: the folder's name) the folder is then uploaded
        like `push_to_hub` does: only safetensors, JSON, README.md and PNG files, whatever else it holds.
        """
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr") if k in kwargs}
        if not kwargs.setdefault("safe_serialization", True):
            raise ValueError("pdiff generators are saved as safetensors only (safe_serialization=False would pickle them)")
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        if report is not None:
            (save_directory / REPORT_FILE).write_text(json.dumps(report, indent=2))
        for plot in plots or []:
            shutil.copy(plot, save_directory / Path(plot).name)
        report = report or _read_json(save_directory / REPORT_FILE)
        self.model_card(report, [Path(p).name for p in plots or []]).save(save_directory / "README.md")
        if push_to_hub:
            _upload(save_directory, hub.pop("repo_id", save_directory.resolve().name), **hub)

    def push_to_hub(
        self, repo_id: str, commit_message: str = "Upload pdiff generator", private: bool | None = None, token: str | None = None,
        report: dict | None = None, plots: list[str | os.PathLike] | None = None, create_pr: bool = False, revision: str | None = None,
    ) -> str:
        """Create the repo (if needed) and upload the generator in one commit; returns the commit URL.

        Only safetensors, JSON, the model card and PNG plots are uploaded (training checkpoints never).
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, report=report, plots=plots)
            return _upload(Path(tmp), repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr, revision=revision)

    def model_card(self, report: dict | None = None, plots: list[str] | None = None):
        from .card import generator_model_card

        return generator_model_card(self, report, plots or [])


def _upload(folder: Path, repo_id: str, commit_message: str = "Upload pdiff generator", private: bool | None = None, token: str | None = None, create_pr: bool = False, revision: str | None = None) -> str:
    """Create the model repo if needed and upload the folder's shareable files (HUB_ALLOW_PATTERNS) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, allow_patterns=HUB_ALLOW_PATTERNS, create_pr=create_pr, revision=revision)
    return str(info)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


REQUIRED_COMPONENTS = ("autoencoder", "unet", "scheduler", "target")
WEIGHT_COMPONENTS = ("autoencoder", "unet", "target")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# The classes a generator's model_index.json may name: anything else would make diffusers import and
# call arbitrary installed code on behalf of the repository.
ALLOWED_CLASSES = {
    "autoencoder": {("pdiff.models.autoencoder", "ParameterAutoencoder"), ("pdiff.models", "ParameterAutoencoder")},
    "unet": {("diffusers", "UNet1DModel")},
    "target": {("pdiff.models.target", "TargetNetwork"), ("pdiff.models", "TargetNetwork")},
}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1 or Path(name).is_absolute()


def _resolve_folder(name: str, revision: str | None = None, **hub_kwargs) -> Path:
    """A local generator folder, or the Hugging Face cache snapshot of a Hub repo (downloaded if needed)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; a pdiff generator is a folder (model_index.json, autoencoder/, unet/, scheduler/, target/)")
    if _looks_like_path(name):
        raise FileNotFoundError(f"no generator folder at {name}")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise FileNotFoundError(f"{name!r} is neither a generator folder nor a valid Hub repo id ({err})") from err
    where = f"the generator repo {name!r} (revision {revision or 'main'})"
    offline = constants.is_offline_mode() or bool(hub_kwargs.get("local_files_only"))
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, **hub_kwargs))
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: the revision does not exist on {constants.ENDPOINT}; pass an existing branch, tag or commit") from err
    except GatedRepoError as err:
        raise FileNotFoundError(f"{where} is gated: request access on the Hub and log in (`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{where} was not found on {constants.ENDPOINT} (if it is private, log in with `hf auth login` or pass token=)") from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise FileNotFoundError(
                f"{where} is not in the Hugging Face cache ({hub_kwargs.get('cache_dir') or constants.HF_HUB_CACHE}) and "
                f"offline mode is on (HF_HUB_OFFLINE=1{' / local_files_only=True' if hub_kwargs.get('local_files_only') else ''}): "
                "download it once online, or pass a local folder"
            ) from err
        raise FileNotFoundError(f"{where} could not be downloaded from {constants.ENDPOINT} and is not in the cache: {err}") from err
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{where} could not be downloaded from {constants.ENDPOINT}: {err}") from err


def _check_folder(path: Path) -> None:
    """Say precisely what is wrong with a generator folder before diffusers tries to load it."""
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} is not a pdiff generator: model_index.json is missing (save one with PDiffPipeline.save_pretrained or train.py)")
    try:
        listed = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise InvalidGeneratorError(f"{index} is not valid JSON: {err}") from err
    missing = [c for c in REQUIRED_COMPONENTS if c not in listed or not (path / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks the component(s) {missing}; a pdiff generator needs {list(REQUIRED_COMPONENTS)}")
    if listed.get("_class_name") != "PDiffPipeline":
        raise InvalidGeneratorError(f"{index}: _class_name is {listed.get('_class_name')!r}, not 'PDiffPipeline'")
    for name, allowed in ALLOWED_CLASSES.items():
        if tuple(listed[name]) not in allowed:
            raise InvalidGeneratorError(f"{index}: component {name!r} is {listed[name]}; a pdiff generator's {name} must be one of {sorted(allowed)}")
    library, scheduler = listed["scheduler"]
    if library != "diffusers" or not scheduler.endswith("Scheduler"):
        raise InvalidGeneratorError(f"{index}: the scheduler must be a diffusers scheduler, not {listed['scheduler']}")
    for name in WEIGHT_COMPONENTS:
        files = sorted((path / name).glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in (path / name).iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise FileNotFoundError(
                f"{path / name} has no safetensors weights (diffusion_pytorch_model.safetensors)"
                + (f"; pickled weights {pickled} are never loaded by pdiff" if pickled else "")
            )
        for file in files:
            _stored_shapes(file)  # raises a clear error for a truncated or tampered file
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        # Never unpickled; mention them so a user knows why they are ignored.
        import warnings

        warnings.warn(f"ignoring pickle files in {path} (pdiff loads safetensors only): {pickles}", stacklevel=3)


def _stored_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in a safetensors file; reading the header validates it against the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
        raise InvalidGeneratorError(f"{file} is not a valid safetensors file (truncated, tampered with or not safetensors): {err}") from err


def _check_weights(folder: Path) -> None:
    """Every component's safetensors must hold exactly the tensors its config.json builds (see `check_component_weights`)."""
    classes = {"autoencoder": ParameterAutoencoder, "unet": UNet1DModel, "target": TargetNetwork}
    for name in WEIGHT_COMPONENTS:
        check_component_weights(folder / name, classes[name])


def check_component_weights(component_dir: Path, cls) -> None:
    """A saved model's safetensors must hold exactly the tensors its config.json builds, in the same shapes.

    Checked before loading, on a weightless (meta) instance: diffusers only warns about missing tensors
    and initialises them randomly, which would silently generate garbage networks, and reports a wrong
    shape without saying which file holds it.
    """
    from accelerate import init_empty_weights

    component_dir = Path(component_dir)
    name = component_dir.name
    files = sorted(component_dir.glob("*.safetensors"))
    try:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(component_dir))
    except LayoutMismatchError as err:
        raise LayoutMismatchError(f"{component_dir / 'config.json'}: {err}") from err
    except Exception as err:  # a config that does not build its class
        raise InvalidGeneratorError(f"{component_dir / 'config.json'} does not describe a valid {cls.__name__}: {err}") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: v for f in files for k, v in _stored_shapes(f).items()}
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    wrong = [f"{k}: {stored[k]} in the file, {expected[k]} in the config" for k in sorted(expected.keys() & stored.keys()) if stored[k] != expected[k]]
    if missing or unexpected or wrong:
        raise InvalidGeneratorError(
            f"{', '.join(str(f) for f in files) or component_dir}: the weights do not match {name}/config.json"
            + (f"; missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + (f"; unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
            + (f"; wrong shapes: {wrong[:4]}{' ...' if len(wrong) > 4 else ''}" if wrong else "")
        )


def _check_components(autoencoder: ParameterAutoencoder, unet: UNet1DModel, target: TargetNetwork) -> None:
    """The components must fit together: the layout's size is the autoencoder's, the UNet sees its latent."""
    if autoencoder.config.param_dim != target.layout.dim:
        raise LayoutMismatchError(f"the autoencoder generates {autoencoder.config.param_dim} numbers but the target layout has {target.layout.dim}")
    channels, length = autoencoder.latent_shape
    if (unet.config.in_channels, unet.config.out_channels) != (channels, channels):
        raise InvalidGeneratorError(f"the UNet maps {unet.config.in_channels} -> {unet.config.out_channels} channels but the latent has {channels}")
    if length % 2 ** (len(unet.config.block_out_channels) - 1):
        raise InvalidGeneratorError(f"latent length {length} is not divisible by 2^(UNet down blocks - 1)")


def _own_memory(module: torch.nn.Module) -> None:
    """Copy CPU tensors that are not 64-byte aligned (views into a memory-mapped safetensors file) to fresh memory.

    Loaded weights point into the file at 8-byte offsets; CPU kernels take other code paths for such
    unaligned inputs and round differently, so a loaded generator would sample networks that differ from
    the saved one's in the last bits. Fresh tensors are 64-byte aligned, which makes save -> load
    bit-exact. Tensors of a model built or trained in memory are aligned already and stay untouched.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
