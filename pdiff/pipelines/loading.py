"""The checks that make loading a generator safe and its errors precise.

A generator folder is read only after these pass: `model_index.json` names only pdiff's and diffusers'
own classes (diffusers would otherwise import whatever a repository names), every component has
safetensors weights that hold exactly the tensors its config builds, and the components fit together.
Pickle files are never read; their presence is reported.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import torch

from .. import hub
from ..io import read_json
from ..models import AUTOENCODER_CLASSES, ParameterCodec, TargetNetwork, UNet1DModel
from ..params import LayoutMismatchError
from ..tasks.networks import NetworkImportError, check_network_trust


class InvalidGeneratorError(ValueError):
    """A generator folder or repository whose files are damaged or do not fit together."""


REQUIRED_COMPONENTS = ("autoencoder", "unet", "scheduler", "target")
WEIGHT_COMPONENTS = ("autoencoder", "unet", "target")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# The classes a generator's model_index.json may name: anything else would make diffusers import and
# call arbitrary installed code on behalf of the repository.
ALLOWED_CLASSES = {
    "autoencoder": {("pdiff.models.autoencoder", "ParameterAutoencoder"), ("pdiff.models", "ParameterAutoencoder"),
                    ("pdiff.models.token_autoencoder", "TokenAutoencoder"), ("pdiff.models", "TokenAutoencoder")},
    "unet": {("pdiff.models.unet", "UNet1DModel"), ("diffusers", "UNet1DModel")},  # the second: generators saved by earlier pdiff versions
    "target": {("pdiff.models.target", "TargetNetwork"), ("pdiff.models", "TargetNetwork")},
}


def resolve_folder(name: str, revision: str | None = None, **hub_kwargs) -> Path:
    """A local generator folder, or the Hugging Face cache snapshot of a Hub repo (downloaded if needed)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; a pdiff generator is a folder (model_index.json, autoencoder/, unet/, scheduler/, target/)")
    return hub.download(name, repo_type="model", revision=revision, allow_patterns=hub.GENERATOR_DOWNLOAD_PATTERNS, **hub_kwargs)


def check_folder(path: Path) -> None:
    """Say precisely what is wrong with a generator folder before diffusers tries to load it."""
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} is not a pdiff generator: model_index.json is missing (save one with PDiffPipeline.save_pretrained or train.py)")
    try:
        listed = read_json(index)
    except ValueError as err:
        raise InvalidGeneratorError(str(err)) from err
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
        warnings.warn(f"ignoring pickle files in {path} (pdiff loads safetensors only): {pickles}", stacklevel=3)


def check_network_code(path: Path, source: str, trusted: bool) -> None:
    """The target network's `_target_`, if any, may be imported (see `check_network_trust`)."""
    network = read_json(path / "target" / "config.json").get("network") or {}
    check_network_trust(network, f"the generator {source}", trusted)


def _stored_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in a safetensors file; reading the header validates it against the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
        raise InvalidGeneratorError(f"{file} is not a valid safetensors file (truncated, tampered with or not safetensors): {err}") from err


def check_weights(folder: Path) -> None:
    """Every component's safetensors must hold exactly the tensors its config.json builds (see `check_component_weights`)."""
    autoencoder = AUTOENCODER_CLASSES[read_json(folder / "model_index.json")["autoencoder"][1]]  # one of ALLOWED_CLASSES: checked
    classes = {"autoencoder": autoencoder, "unet": UNet1DModel, "target": TargetNetwork}
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
    except NetworkImportError as err:  # says what to install; wrapping it would bury that
        raise NetworkImportError(f"{component_dir / 'config.json'}: {err}") from None
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


def check_components(autoencoder: ParameterCodec, unet: UNet1DModel, target: TargetNetwork) -> None:
    """The components must fit together: the layout's size is the autoencoder's, the UNet sees its latent."""
    if autoencoder.config.param_dim != target.layout.dim:
        raise LayoutMismatchError(f"the autoencoder generates {autoencoder.config.param_dim} numbers but the target layout has {target.layout.dim}")
    sizes = getattr(autoencoder.config, "tensor_sizes", None)
    if sizes is not None and list(sizes) != [slot.numel for slot in target.layout.slots]:
        raise LayoutMismatchError(f"the autoencoder's tokens follow tensors of sizes {list(sizes)[:6]}..., the target layout's are "
                                  f"{[slot.numel for slot in target.layout.slots][:6]}...: it was built for another layout")
    channels, length = autoencoder.latent_shape
    if (unet.config.in_channels, unet.config.out_channels) != (channels, channels):
        raise InvalidGeneratorError(f"the UNet maps {unet.config.in_channels} -> {unet.config.out_channels} channels but the latent has {channels}")
    if length % 2 ** (len(unet.config.block_out_channels) - 1):
        raise InvalidGeneratorError(f"latent length {length} is not divisible by 2^(UNet down blocks - 1)")


def own_memory(module: torch.nn.Module) -> None:
    """Copy CPU tensors that are not 64-byte aligned (views into a memory-mapped safetensors file) to fresh memory.

    Loaded weights point into the file at 8-byte offsets; CPU kernels take other code paths for such
    unaligned inputs and round differently, so a loaded generator would sample networks that differ from
    the saved one's in the last bits. Fresh tensors are 64-byte aligned, which makes save -> load
    bit-exact. Tensors of a model built or trained in memory are aligned already and stay untouched.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
