"""`pdiff <command>`: a thin layer that parses arguments, calls a stage and prints what it did.

    pdiff collect task=digits task.param.k=200      # stage 1 (Hydra overrides)
    pdiff train task=digits                         # stage 2 in this process (`accelerate launch pdiff/train.py` for many)
    pdiff config task=fashion_mnist                 # print the composed config
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .config import ConfigError


def _collect(args: argparse.Namespace) -> None:
    from .collect import main

    main(args.overrides)


def _train(args: argparse.Namespace) -> None:
    from .train import main

    main(args.overrides)


def _config(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from .config import load_config

    print(OmegaConf.to_yaml(load_config(args.overrides)))


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "collect": (_collect, "train a network and collect K checkpoints of its chosen parameters"),
    "train": (_train, "train the generator (autoencoder + latent diffusion) in this process"),
    "config": (_config, "print the composed config for the given overrides"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiff", description="Generate neural-network weights with latent diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=digits task.param.k=200")
        p.set_defaults(fn=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        # Bad input: say what is wrong and how to fix it, without a traceback to dig through.
        print(f"pdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
