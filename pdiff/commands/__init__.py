"""`pdiff <command>`: one module per command, each owning its arguments and a `run(args)`.

    pdiff run task=digits                           # every stage below, resumable: run it again after a stop
    pdiff collect task=digits task.param.k=200      # stage 1 (Hydra overrides)
    pdiff import-checkpoints --from 'runs/*.safetensors' task=...   # stage 1 from checkpoints you already have
    pdiff train task=digits                         # stage 2 in this process (`accelerate launch pdiff/train.py` for many)
    pdiff config task=fashion_mnist                 # print the composed config
    pdiff sample --model outputs/digits/generator --num-models 100 --out samples/
    pdiff evaluate --dataset outputs/digits/params --generated samples/ --out outputs/digits/eval
    pdiff bench --task digits --out bench.json      # speed, memory, accuracy and novelty of every stage
    pdiff sweep configs/sweeps/noise_grid.yaml --local   # a W&B sweep, trials run here (no server)

Only the chosen command's module is imported, and command modules import torch inside `run`, so
`pdiff --help` and `pdiff <command> --help` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

COMMANDS = {
    "run": "the whole method, collect -> train -> sample -> evaluate; run it again to continue where it stopped",
    "collect": "train a network and collect K checkpoints of its chosen parameters",
    "import-checkpoints": "make a parameter dataset from existing checkpoints (files, globs or Hub repos)",
    "train": "train the generator (autoencoder + latent diffusion) in this process",
    "config": "print the composed config for the given overrides",
    "sample": "generate networks with a trained generator (folder or Hub) and write them out",
    "evaluate": "evaluate generated networks against the originals, baselines and novelty; write report.json + plots",
    "bench": "time collect/train/sample/evaluate (or a saved generator) and print JSON",
    "sweep": "run a W&B sweep file: print the W&B commands, or run trials here with --local",
}

# Commands that compute in this process with torch (train and collect set their own thread policy).
NUMERIC = {"sample", "evaluate", "bench", "import-checkpoints"}

# What a command may raise for bad input (a key, a value, a file) or a machine that cannot take the output
# (a full disk, a read-only or busy folder): reported as one line, exit status 2, no traceback.
BAD_INPUT = (ValueError, ArithmeticError, OSError)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only`, of that command alone (the others are listed, unimported)."""
    parser = argparse.ArgumentParser(prog="pdiff", description="Generate neural-network weights with latent diffusion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        if only is None or name == only:
            module = importlib.import_module(f"pdiff.commands.{name.replace('-', '_')}")
            p = sub.add_parser(name, help=help_text, description=help_text)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in COMMANDS else "")
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow a command's options (`pdiff sweep X.yaml --local k=v`); argparse hands
    # back positionals that come after options as unrecognised: take them as overrides, flags stay errors.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if args.command in NUMERIC:
        from ..runtime import ThreadPolicy, retain_freed_memory

        ThreadPolicy()  # the CPU threads nobody else uses (OMP_NUM_THREADS, when set, wins)
        retain_freed_memory()
    return report_failures(args.command, lambda: args.run(args))


def report_failures(command: str, work: Callable[[], object]) -> int:
    """Run `work`; bad input, a full disk or Ctrl-C become one line on stderr and an exit status, not a traceback."""
    try:
        work()
    except KeyboardInterrupt:
        print(f"pdiff {command}: interrupted" + _resume_hint(command), file=sys.stderr)
        return 130
    except BAD_INPUT as err:
        print(f"pdiff {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _resume_hint(command: str) -> str:
    if command == "train":
        if any(a.startswith("train.resume_from_checkpoint=") and not a.endswith("=null") for a in sys.argv):  # e.g. `pdiff run`'s
            return "; run the same command again to continue from the latest checkpoint"
        return "; continue with the same command plus train.resume_from_checkpoint=latest"
    if command == "run":
        return "; run the same command again to continue where it stopped"
    if command in ("collect", "sample", "evaluate"):
        return "; nothing was written under the output name, run the command again"
    return ""
