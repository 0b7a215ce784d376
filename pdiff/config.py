"""Configuration: Hydra composes `configs/config.yaml` with `key=value` overrides; one typed schema checks it.

pdiff uses Hydra's compose API rather than `@hydra.main`, so that every entry point (`pdiff ...`,
`accelerate launch pdiff/train.py ...`, tests) composes configs the same way, without changing the
working directory or writing a run folder per process.

The YAML files hold the values; the dataclasses below (`Config` and its parts) hold the rules: each
key's type, range and allowed values. `load_config` checks the composed config against them before
any work starts, so `task.param.k=abc` or `train.log_every=0` is one line naming the key, not a
traceback minutes later.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("PDIFF_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


class ConfigError(ValueError):
    """A config key, value or override that pdiff cannot use."""


def rule(*, ge: float | None = None, gt: float | None = None, lt: float | None = None, choices: Sequence[Any] | None = None, nonempty: bool = False,
         default: Any = dataclasses.MISSING):
    """A schema field: its bounds (ge/gt/lt), allowed values and whether a list may be empty live in the field's metadata."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "lt": lt, "choices": None if choices is None else tuple(choices), "nonempty": nonempty})


OPTIONAL = {"default": None}  # a key a YAML file may leave out


# -- the schema ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataSchema:
    source: str = rule(choices=("digits", "torchvision", "hub", "fake"))
    val_size: float = rule(gt=0)  # a count of training images, or a fraction of them when below 1
    split_seed: int = rule(default=0)
    name: Optional[str] = rule(**OPTIONAL)
    root: Optional[str] = rule(**OPTIONAL)
    download: Union[bool, str, None] = rule(default="auto", choices=("auto", "never", True, False))
    test_size: Optional[int] = rule(ge=1, **OPTIONAL)
    train_size: Optional[int] = rule(ge=1, **OPTIONAL)
    image_shape: Optional[list[int]] = rule(**OPTIONAL)
    num_classes: Optional[int] = rule(ge=2, **OPTIONAL)
    noise: Optional[float] = rule(ge=0, **OPTIONAL)
    seed: Optional[int] = rule(**OPTIONAL)
    revision: Optional[str] = rule(**OPTIONAL)
    data_dir: Optional[str] = rule(**OPTIONAL)
    image_column: Optional[str] = rule(**OPTIONAL)
    label_column: Optional[str] = rule(**OPTIONAL)
    train_split: Optional[str] = rule(**OPTIONAL)
    test_split: Optional[str] = rule(**OPTIONAL)
    image_size: Optional[int] = rule(ge=1, **OPTIONAL)


@dataclass(kw_only=True)
class BaseTrainingSchema:
    epochs: int = rule(ge=0)
    batch_size: int = rule(ge=1)
    lr: float = rule(gt=0)
    weight_decay: float = rule(ge=0)
    augment: bool = rule(default=False)


@dataclass(kw_only=True)
class ParamSchema:
    patterns: Union[str, list[str]] = rule()
    k: int = rule(ge=1)
    lr: float = rule(gt=0)
    weight_decay: float = rule(ge=0)
    batch_size: int = rule(ge=1)
    warmup_steps: int = rule(ge=0, default=0)
    save_every: int = rule(ge=1, default=1)
    trajectories: Optional[int] = rule(ge=1, **OPTIONAL)  # independent fine-tuning runs sharing the K checkpoints (null: one per process)


@dataclass(kw_only=True)
class EvalSchema:
    batch_size: int = rule(ge=1)
    noise_scales: Optional[list[float]] = rule(ge=0, **OPTIONAL)  # the noise baseline's scales (null: 1 2 4 8 16 32)
    average_noise_scales: Optional[list[float]] = rule(ge=0, **OPTIONAL)  # the weight average plus noise, its scales (null: 1 2 4)
    num_noise_models: Optional[int] = rule(ge=1, **OPTIONAL)  # networks per noise scale (null: as many as generated)


@dataclass(kw_only=True)
class TaskSchema:
    name: str = rule()
    data: DataSchema = rule()
    network: dict = rule()  # `name` (pdiff's own) or `_target_` (an import path), plus keyword arguments
    base: BaseTrainingSchema = rule()
    param: ParamSchema = rule()
    eval: EvalSchema = rule()


@dataclass(kw_only=True)
class AutoencoderSchema:
    type: str = rule(choices=("conv", "tokens"), default="conv")  # see pdiff.models.AUTOENCODERS
    latent_channels: int = rule(ge=1)
    input_noise: float = rule(ge=0)
    latent_noise: float = rule(ge=0)
    normalization: str = rule(choices=("residual", "tensor"))
    channels: Optional[list[int]] = rule(ge=1, nonempty=True, **OPTIONAL)  # conv: encoder widths
    norm_groups: Optional[int] = rule(ge=1, **OPTIONAL)  # conv
    chunk_size: Optional[int] = rule(ge=1, **OPTIONAL)  # tokens: numbers per token
    hidden: Optional[int] = rule(ge=1, **OPTIONAL)  # tokens: MLP width


@dataclass(kw_only=True)
class UNetSchema:
    block_out_channels: list[int] = rule(ge=1, nonempty=True)
    layers_per_block: int = rule(ge=1)
    norm_num_groups: int = rule(ge=1)


@dataclass(kw_only=True)
class NoiseScheduleSchema:
    num_train_timesteps: int = rule(ge=2)
    beta_schedule: str = rule(choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = rule(gt=0, lt=1)
    beta_end: float = rule(gt=0, lt=1)


@dataclass(kw_only=True)
class GeneratorSchema:
    autoencoder: AutoencoderSchema = rule()
    unet: UNetSchema = rule()
    scheduler: NoiseScheduleSchema = rule()
    sampler: str = rule(choices=("ddim", "ddpm"))
    num_inference_steps: int = rule(ge=1)
    temperature: float = rule(gt=0)  # the starting noise's scale when sampling (1: as trained)


LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(kw_only=True)
class TrainSchema:
    phase: str = rule(choices=("all", "autoencoder", "diffusion"))
    autoencoder_path: Optional[str] = rule(**OPTIONAL)
    ae_steps: int = rule(ge=0)
    diffusion_steps: int = rule(ge=0)
    batch_size: int = rule(ge=1)
    ae_lr: float = rule(gt=0)
    diffusion_lr: float = rule(gt=0)
    weight_decay: float = rule(ge=0)
    lr_scheduler: str = rule(choices=LR_SCHEDULES)
    lr_warmup_steps: int = rule(ge=0)
    gradient_accumulation_steps: int = rule(ge=1)
    max_grad_norm: float = rule(gt=0)
    mixed_precision: Optional[str] = rule(choices=(None, "auto", "no", "bf16", "fp16"), **OPTIONAL)
    ema_decay: Optional[float] = rule(ge=0, lt=1, **OPTIONAL)
    checkpointing_steps: int = rule(ge=0)  # 0: no checkpoints
    checkpoints_total_limit: Optional[int] = rule(ge=1, **OPTIONAL)
    resume_from_checkpoint: Optional[str] = rule(**OPTIONAL)
    log_every: int = rule(ge=1)
    eval_every: int = rule(ge=0)  # 0: no evaluation during training
    eval_num_models: int = rule(ge=1)
    num_final_models: int = rule(ge=1)
    curve_temperatures: list[float] = rule(gt=0)  # the final report's other sampling temperatures (the generator's curve)
    curve_num_models: int = rule(ge=1)
    select_temperature: bool = rule()  # the final report samples at the temperature chosen on validation
    report_to: str = rule(choices=("none", "wandb"))
    wandb_project: str = rule()
    run_name: Optional[str] = rule(**OPTIONAL)


@dataclass(kw_only=True)
class HubSchema:
    push_to_hub: bool = rule()
    dataset_id: Optional[str] = rule(**OPTIONAL)
    model_id: Optional[str] = rule(**OPTIONAL)
    private: bool = rule()


@dataclass(kw_only=True)
class Config:
    task: TaskSchema = rule()
    generator: GeneratorSchema = rule()
    train: TrainSchema = rule()
    hub: HubSchema = rule()
    seed: int = rule(ge=0, lt=2**32)  # numpy's and torch's seeds are 32-bit
    output_dir: str = rule(nonempty=True)
    dataset_dir: str = rule(nonempty=True)
    generator_dir: str = rule(nonempty=True)
    overwrite: bool = rule()
    cpu: bool = rule()


# -- checking a config against the schema ------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}


def validate(cfg: Any, schema: type = Config, prefix: str = "") -> None:
    """Raise ConfigError for the first key whose value breaks the schema's type, range or choices."""
    if not isinstance(cfg, (dict, DictConfig)):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping of keys to values")
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for name in cfg:  # `+key=...` adds keys Hydra's struct mode would refuse: the schema refuses them too
        if name not in known:
            raise ConfigError(_unknown_key(f"{prefix}{name}", prefix.rstrip("."), name, known))
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name not in cfg:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"`{key}` is missing: set it in the YAML file or as `{key}=...`")
            continue
        _check_value(cfg[f.name], hints[f.name], f.metadata, key)


def _check_value(value: Any, tp: Any, meta: typing.Mapping, key: str) -> None:
    if dataclasses.is_dataclass(tp):
        validate(value, tp, key + ".")
        return
    if value is None and _allows_none(tp):
        return
    if not _matches(value, tp):
        raise ConfigError(f"{key}={_show(value)}: expected {_describe(tp)}")
    if meta.get("nonempty") and len(value) == 0:
        raise ConfigError(f"{key} is empty: give a folder" if isinstance(value, str) else f"{key}=[]: give at least one value")
    if any(isinstance(number, float) and not math.isfinite(number) for number in _numbers(value)):
        raise ConfigError(f"{key}={_show(value)}: must be a finite number")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={_show(value)}: choose one of {', '.join(_show(c) for c in choices)}")
    bounds = ((meta.get("ge"), lambda v, b: v >= b, ">="), (meta.get("gt"), lambda v, b: v > b, ">"), (meta.get("lt"), lambda v, b: v < b, "<"))
    for bound, ok, sign in bounds:
        for number in _numbers(value):
            if bound is not None and not ok(number, bound):
                shown = bound if isinstance(bound, int) else f"{bound:g}"
                raise ConfigError(f"{key}={_show(value)}: must be {sign} {shown}" + (" each" if number is not value else ""))


def _numbers(value: Any) -> list:
    """What a bound applies to: a number, or each number of a list."""
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [v for v in value if isinstance(v, (int, float))]
    return []


def _allows_none(tp: Any) -> bool:
    return tp is Any or type(None) in typing.get_args(tp)


def _matches(value: Any, tp: Any) -> bool:
    """Whether a composed value has the schema's type (an int is a valid float; a bool is no number)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp) if arg is not type(None))
    if origin is list or tp is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, ListConfig)) and all(_matches(v, item) for v in value)
    if tp is dict:
        return isinstance(value, (dict, DictConfig))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        names = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" (or null)" if type(None) in typing.get_args(tp) else "")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s, e.g. [1,2]"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# -- composing --------------------------------------------------------------------------------------


def load_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | Path | None = None) -> DictConfig:
    """The composed, checked, struct-mode config: unknown keys are errors, not silently new settings."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or CONFIG_DIR).resolve()
    if not (config_dir / f"{config_name}.yaml").exists():
        raise ConfigError(
            f"no {config_name}.yaml in {config_dir}. Install pdiff from its repository (`pip install -e .`) "
            "or point PDIFF_CONFIG_DIR at a copy of its configs/ folder."
        )
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[_open_network_key(o) for o in overrides])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, config_dir, config_name)) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"these config values must be set: {', '.join(missing)} (e.g. `{missing[0]}=...`)")
    if config_name == "config":
        validate(cfg)
        check_combinations(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def check_combinations(cfg: DictConfig) -> None:
    """Rules between keys that each pass the schema alone."""
    schedule, generator = cfg.generator.scheduler, cfg.generator
    if schedule.beta_start >= schedule.beta_end:
        raise ConfigError(f"generator.scheduler.beta_start={schedule.beta_start} must be below generator.scheduler.beta_end={schedule.beta_end}: "
                          "the noise grows along the chain")
    if generator.num_inference_steps > schedule.num_train_timesteps:
        raise ConfigError(f"generator.num_inference_steps={generator.num_inference_steps}: at most generator.scheduler.num_train_timesteps="
                          f"{schedule.num_train_timesteps}, the steps the denoiser is trained on")


def task_of_dataset(stored: dict, overrides: Sequence[str], source: str) -> dict:
    """The task a parameter dataset was made for, with the command line's `task.*` overrides applied.

    A dataset carries its resolved task, so the stages after collection need no `task...` overrides,
    only those that change something (say, where the data lives now). One that changes the network or
    the generated parameters contradicts the checkpoints and is an error.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.create(stored)
    for override in OverridesParser.create().parse_overrides([o for o in overrides if o.lstrip("+~").startswith("task")]):
        key, value = override.key_or_group, override.value()
        if key == "task":
            if value != task.name:
                raise ConfigError(f"{source} was collected for task {task.name!r}, not {value!r}: leave task= out, the dataset carries its task")
            continue
        path = key.removeprefix("task.")
        current = OmegaConf.select(task, path, default=None)
        current = OmegaConf.to_container(current) if OmegaConf.is_config(current) else current
        if path.startswith(("network", "param.patterns")) and current != value:
            raise ConfigError(f"{key}={value} contradicts {source}: its checkpoints come from {key}={current}, "
                              "and a generator learns the network they were taken from")
        OmegaConf.update(task, path, value, force_add=True)
    task = OmegaConf.to_container(task)
    validate(task, TaskSchema, prefix="task.")
    return task


def _open_network_key(override: str) -> str:
    """`task.network.<key>=v` adds or sets a keyword argument of the network: its keys are the network's
    own constructor's, so they cannot all be known in advance (Hydra would need `++` for a new one)."""
    return "++" + override if override.startswith("task.network.") else override


def _explain(err: Exception, config_dir: Path, config_name: str) -> str:
    """Hydra's message in one line, with the keys that do exist where an unknown one was given (and
    without its advice to append a new key with `+`, which would only hide the typo)."""
    import re

    from hydra import compose, initialize_config_dir

    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("To append to your config"))
    match = re.search(r"Could not override '([^']+)'", text)
    if not match:
        return f"{text}. Pick a file of a group with e.g. `task=fashion_mnist`; `pdiff config` prints the composed config."
    key = match.group(1)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        node = compose(config_name=config_name)
    parts = key.split(".")
    depth = 0  # walk down to the first part that does not exist
    while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), DictConfig):
        node, depth = node[parts[depth]], depth + 1
    return _unknown_key(key, ".".join(parts[:depth]), parts[depth], node.keys())


def _unknown_key(key: str, parent: str, missing: str, known) -> str:
    where = f"under `{parent}`" if parent else "at the top level"
    return f"unknown config key `{key}`: {where} there is no `{missing}`. Known keys {where}: {', '.join(sorted(map(str, known)))}."


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for comparing configs key by key and logging them."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
