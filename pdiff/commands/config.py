"""`pdiff config [key=value ...]`: print the composed, checked config."""

from __future__ import annotations

import argparse

from .arguments import add_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_overrides(parser)


def run(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from ..config import load_config

    print(OmegaConf.to_yaml(load_config(args.overrides)))
