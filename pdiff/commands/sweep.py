"""`pdiff sweep FILE`: print how to run a W&B sweep on a server, or run its trials here with `--local`."""

from __future__ import annotations

import argparse

from ..sweeps.files import DEFAULT_METRICS_FILE
from .arguments import add_overrides, positive_int, seed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", help="a W&B sweep config, e.g. configs/sweeps/generator_bayes.yaml")
    p.add_argument("--local", action="store_true", help="run trials here with the `sweeps` engine (no W&B server)")
    p.add_argument("--count", type=positive_int, default=None, help="trials to run (default: a grid's every point)")
    p.add_argument("--dry-run", action="store_true", help="print the trials' commands without running them")
    p.add_argument("--state", default=None, help="local sweep state file (default outputs/sweeps/local/<name>.json)")
    p.add_argument("--metrics-file", default=DEFAULT_METRICS_FILE, help="a trial's JSON report; {key} = its config's top-level keys")
    p.add_argument("--seed", type=seed, default=0, help="seed of the local engine's proposals")
    add_overrides(p)


def run(args: argparse.Namespace) -> None:
    from ..config import ConfigError
    from ..sweeps import SweepError, load_sweep_config, run_local, server_instructions

    if not args.local:
        if args.overrides:
            raise SweepError("overrides apply to --local sweeps only: on a W&B server, put constant values in the sweep file")
        print(server_instructions(args.sweep_file, load_sweep_config(args.sweep_file)))
        return
    try:
        run_local(args.sweep_file, args.count, args.overrides, args.dry_run, args.state, args.metrics_file, args.seed)
    except ConfigError as err:
        raise SweepError(f"a trial's overrides do not compose: {err}") from err
