"""`pdiff collect [key=value ...]`: stage 1 in this process (`accelerate launch -m pdiff.collect` for many)."""

from __future__ import annotations

import argparse

from .arguments import add_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_overrides(parser)


def run(args: argparse.Namespace) -> None:
    from ..collect import main

    main(args.overrides)
