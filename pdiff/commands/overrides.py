"""The `key=value` Hydra overrides that config-composing commands take."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. task=digits task.param.k=200 (`pdiff config` prints the keys)")
