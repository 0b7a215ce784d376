"""`pdiff train [key=value ...]`: stage 2 in this process (`accelerate launch pdiff/train.py` for many)."""

from __future__ import annotations

import argparse

from .arguments import add_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_overrides(parser)


def run(args: argparse.Namespace) -> None:
    from ..train import cli

    cli(args.overrides)
