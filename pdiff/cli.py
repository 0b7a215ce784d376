"""`pdiff <command>`: a thin layer that parses arguments, calls a stage and prints what it did.

    pdiff collect task=digits task.param.k=200      # stage 1 (Hydra overrides)
    pdiff train task=digits                         # stage 2 in this process (`accelerate launch pdiff/train.py` for many)
    pdiff config task=fashion_mnist                 # print the composed config
    pdiff sweep configs/sweeps/noise_grid.yaml --local   # a W&B sweep, trials run here (no server)
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


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import main

    main(args.sweep_file, local=args.local, count=args.count, overrides=args.overrides, dry_run=args.dry_run,
         state_path=args.state, metrics_file=args.metrics_file, seed=args.seed)


def _sweep_options(p: argparse.ArgumentParser) -> None:
    from .sweep import DEFAULT_METRICS_FILE

    p.add_argument("sweep_file", help="a W&B sweep config, e.g. configs/sweeps/generator_bayes.yaml")
    p.add_argument("--local", action="store_true", help="run trials here with the `sweeps` engine (no W&B server)")
    p.add_argument("--count", type=int, default=None, help="trials to run (default: a grid's every point)")
    p.add_argument("--dry-run", action="store_true", help="print the trials' commands without running them")
    p.add_argument("--state", default=None, help="local sweep state file (default outputs/sweeps/local/<name>.json)")
    p.add_argument("--metrics-file", default=DEFAULT_METRICS_FILE, help="a trial's JSON report; {key} = its config's top-level keys")
    p.add_argument("--seed", type=int, default=0, help="seed of the local engine's proposals")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "collect": (_collect, "train a network and collect K checkpoints of its chosen parameters"),
    "train": (_train, "train the generator (autoencoder + latent diffusion) in this process"),
    "config": (_config, "print the composed config for the given overrides"),
    "sweep": (_sweep, "run a W&B sweep file: print the W&B commands, or run trials here with --local"),
}
# Commands with options of their own, added before the positional overrides.
OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"sweep": _sweep_options}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiff", description="Generate neural-network weights with latent diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in OPTIONS:
            OPTIONS[name](p)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=digits task.param.k=200")
        p.set_defaults(fn=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow a command's options (`pdiff sweep X.yaml --local k=v`); argparse hands back
    # positionals that come after options as unrecognised, so take them as overrides; flags stay errors.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    try:
        args.fn(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        # Bad input: say what is wrong and how to fix it, without a traceback to dig through.
        print(f"pdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
