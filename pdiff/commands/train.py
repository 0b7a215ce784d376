"""`pdiff train [key=value ...]`: stage 2 in this process (`accelerate launch pdiff/train.py` for many)."""

from __future__ import annotations

import argparse

from .arguments import add_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_overrides(parser)


def run(args: argparse.Namespace) -> None:
    from ..evaluation.render import format_summary
    from ..train import main

    report = main(args.overrides)
    if report is not None:  # the main process: say what came out and where it went
        from ..config import load_config

        cfg = load_config(args.overrides)
        print(format_summary(report))
        print(f"generator: {cfg.generator_dir}  report and plots: {cfg.output_dir}/report/")
