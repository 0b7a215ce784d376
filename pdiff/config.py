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
        raise ConfigError(_explain(err, config_dir, config_name)) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"these config values must be set: {', '.join(missing)} (e.g. `{missing[0]}=...`)")
    OmegaConf.set_struct(cfg, True)
    return cfg


def _explain(err: Exception, config_dir: Path, config_name: str) -> str:
    """Hydra's message, with the keys that do exist where an unknown one was given (and without its
    advice to append a new key with `+`, which would only hide the typo)."""
    import re

    from hydra import compose, initialize_config_dir

    text = "\n".join(line for line in str(err).splitlines() if not line.startswith("To append to your config"))
    match = re.search(r"Could not override '([^']+)'", text)
    if not match:
        return f"{text}\nPick a file of a group with e.g. `task=fashion_mnist`; `pdiff config` prints the composed config."
    key = match.group(1)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        node = compose(config_name=config_name)
    parts = key.split(".")
    depth = 0  # walk down to the first part that does not exist
    while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), DictConfig):
        node, depth = node[parts[depth]], depth + 1
    parent = ".".join(parts[:depth])
    where = f"under `{parent}`" if parent else "at the top level"
    known = ", ".join(sorted(map(str, node.keys())))
    return f"unknown config key `{key}`: {where} there is no `{parts[depth]}`. Known keys {where}: {known}."


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
