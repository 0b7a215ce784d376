"""Argument definitions the commands share: Hydra `key=value` overrides, positive counts."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. task=digits task.param.k=200 (`pdiff config` prints the keys)")


def positive_int(text: str) -> int:
    """An argparse type: counts and steps must be at least 1 (0 or -1 would silently mean nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_empty_path(text: str) -> str:
    """An argparse type: a path that is not empty ('' would mean the current folder, silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder name")
    return text


def seed(text: str) -> int:
    """An argparse type: a seed from 0 to 2**32 - 1, the range numpy and the config's `seed` take."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is not a seed from 0 to 4294967295")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a temperature, a scale)."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number from 0 up (a noise scale; 0 keeps the networks it perturbs)."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} is not a finite number >= 0")
    return value


def unit_interval(text: str) -> float:
    """An argparse type: a number from 0 to 1 (DDIM's eta)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1")
    return value


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-network-code", action="store_true",
                        help="allow a Hub generator or dataset whose network is user code (task.network._target_) to import that module")
