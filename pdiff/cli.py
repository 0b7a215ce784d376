"""`pdiff <command>`: a thin layer that parses arguments, calls a stage and prints what it did.

    pdiff collect task=digits task.param.k=200      # stage 1 (Hydra overrides)
    pdiff train task=digits                         # stage 2 in this process (`accelerate launch pdiff/train.py` for many)
    pdiff config task=fashion_mnist                 # print the composed config
    pdiff sample --model outputs/digits/generator --num-models 100 --out samples/
    pdiff bench --task digits --out bench.json      # speed, memory, accuracy and novelty of every stage
    pdiff sweep configs/sweeps/noise_grid.yaml --local   # a W&B sweep, trials run here (no server)
    pdiff evaluate --dataset outputs/digits/params --generated samples/ --out outputs/digits/eval
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


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import main

    main(args)


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    # Defined here rather than in pdiff.evaluate so that building the parser does not import torch.
    p.add_argument("--dataset", required=True, help="the original parameter dataset: folder or Hub dataset id")
    p.add_argument("--generated", required=True, help="generated parameters: a parameter dataset (folder or Hub id) or a .pt/.safetensors/.npy [N, D] tensor")
    p.add_argument("--out", required=True, help="folder for report.json and the PNG plots")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    p.add_argument("--noise-scales", type=float, nargs="*", default=None, help="noise baseline scales (default 1 2 4 8 16 32; none given: no noise baseline)")
    p.add_argument("--noise-mode", choices=("spread", "absolute"), default="spread", help="spread: scale x each tensor's std across the checkpoints; absolute: the scale is the std")
    p.add_argument("--num-noise-models", type=int, default=None, help="networks per noise scale (default: as many as generated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise baseline")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the task's eval.batch_size)")
    p.add_argument("--networks-per-chunk", type=int, default=100, help="networks run together through vmap")
    p.add_argument("--no-plots", action="store_true", help="write only report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")


def _sample(args: argparse.Namespace) -> None:
    from .sample import main

    main(args)


def _sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a generator: folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--num-models", type=int, default=100, help="networks to generate (one batched chain)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("safetensors", "dataset"), default="safetensors", help="one safetensors state dict per network, or a parameter dataset like `pdiff collect` writes")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the generator's saved DDIM steps, else 50; all for DDPM)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="override the generator's scheduler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--evaluate", action="store_true", help="report accuracy on the task's validation and test splits")
    p.add_argument("--dataset", default=None, help="with --evaluate: the original parameter dataset, for the full report (baselines, novelty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _bench(args: argparse.Namespace) -> None:
    from .bench import main

    main(args)


def _bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="task to run the whole pipeline on (default digits; fashion_mnist, ...)")
    p.add_argument("--model", default=None, help="measure only sampling + evaluation of a saved generator (folder or Hub id)")
    p.add_argument("--dataset", default=None, help="with --model: the original parameter dataset, to evaluate against")
    p.add_argument("--num-models", type=int, default=200, help="networks to sample and evaluate")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50); DDPM always runs all its steps")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--workdir", default=None, help="keep the run's dataset and generator here (default: a temporary folder)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "collect": (_collect, "train a network and collect K checkpoints of its chosen parameters"),
    "train": (_train, "train the generator (autoencoder + latent diffusion) in this process"),
    "config": (_config, "print the composed config for the given overrides"),
    "sweep": (_sweep, "run a W&B sweep file: print the W&B commands, or run trials here with --local"),
    "sample": (_sample, "generate networks with a trained generator (folder or Hub) and write them out"),
    "bench": (_bench, "time collect/train/sample/evaluate (or a saved generator) and print JSON"),
    "evaluate": (_evaluate, "evaluate generated networks against the originals, baselines and novelty; write report.json + plots"),
}
# Commands with options of their own, added before the positional overrides.
OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"sweep": _sweep_options, "evaluate": _evaluate_options, "sample": _sample_options, "bench": _bench_options}
# Commands that compose the Hydra config and so take `key=value` overrides; the others take options only.
TAKES_OVERRIDES = {"collect", "train", "config", "sweep", "bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiff", description="Generate neural-network weights with latent diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in OPTIONS:
            OPTIONS[name](p)
        if name in TAKES_OVERRIDES:
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
    if extra and args.command not in TAKES_OVERRIDES:
        parser.error(f"pdiff {args.command} takes options, not overrides: {' '.join(extra)}")
    if extra:
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
