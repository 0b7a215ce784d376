"""Hydra configuration: compose `configs/config.yaml` with `key=value` overrides.

pdiff uses Hydra's compose API rather than `@hydra.main`, so that every entry point (`pdiff ...`,
`accelerate launch pdiff/train.py ...`, tests) composes configs the same way, without changing the
working directory or writing a run folder per process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("PDIFF_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


class ConfigError(ValueError):
    """A config key, value or override that pdiff cannot use."""


def load_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | Path | None = None) -> DictConfig:
    """The composed, struct-mode config: unknown keys are errors, not silently new settings."""
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
            cfg = compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"{err}\nOverrides must name existing keys (see configs/ or `pdiff config`); "
            "pick a file of a group with e.g. `task=fashion_mnist`."
        ) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"these config values must be set: {', '.join(missing)} (e.g. `{missing[0]}=...`)")
    OmegaConf.set_struct(cfg, True)
    return cfg


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


def dumps(cfg: DictConfig | dict) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
