"""`pdiff bench`: time every stage of the method on one task and write the figures as JSON.

    pdiff bench                                   # digits: collect -> train -> sample -> evaluate
    pdiff bench --task fashion_mnist --out bench-fashion.json
    pdiff bench --model outputs/digits/generator --dataset outputs/digits/params --num-models 200
    pdiff bench train.ae_steps=50 train.diffusion_steps=50 task.param.k=20     # a tiny budget
    pdiff bench --model outputs/digits/generator --reference 10      # against the original procedure, scaled to 200
    pdiff bench --concurrent 4 train.ae_steps=300 train.diffusion_steps=300   # 1 training alone vs 4 at once
    pdiff bench --memory-by-dim 24000 100000 300000     # whole networks: memory and s/step by D, conv vs tokens

Speed and memory are measured here, never asserted in tests. Peak memory is the process's resident
set (and the CUDA allocator's peak on a GPU) at the end of each phase.
"""

from __future__ import annotations

import argparse

from .arguments import add_overrides, non_empty_path, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="task to run the whole pipeline on (default digits; fashion_mnist, ...)")
    p.add_argument("--model", default=None, help="measure only sampling + evaluation of a saved generator (folder or Hub id)")
    p.add_argument("--dataset", default=None, help="with --model: the original parameter dataset, to evaluate against")
    p.add_argument("--num-models", type=positive_int, default=200, help="networks to sample and evaluate")
    p.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the generator's own); DDPM always runs every training step")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--out", type=non_empty_path, default=None, help="also write the JSON here")
    p.add_argument("--reference", type=positive_int, default=None, metavar="N", help="also time the original procedure (batch-1 DDPM chains, one-by-one scoring) on N networks, scaled to --num-models")
    p.add_argument("--concurrent", type=positive_int, default=None, metavar="N", help="measure training alone, then N trainings at once (threads policy under contention)")
    p.add_argument("--memory-by-dim", type=positive_int, nargs="+", default=None, metavar="D",
                   help="peak memory and s/step of one autoencoder and one diffusion step at each D, conv vs token autoencoder (synthetic vectors)")
    p.add_argument("--batch", type=positive_int, default=50, help="with --memory-by-dim: the training batch (default 50, the paper's)")
    p.add_argument("--workdir", type=non_empty_path, default=None, help="keep the run's dataset and generator here (default: a temporary folder)")
    add_overrides(p)


def run(args: argparse.Namespace) -> dict:
    import json

    from ..benchmark import run_benchmark
    from ..io import write_text

    if args.dataset and not args.model:
        raise ValueError("--dataset goes with --model (the generator to measure against it): add --model, or drop --dataset")
    result = run_benchmark(args.task, args.overrides, model=args.model, dataset=args.dataset, device=args.device,
                           num_models=args.num_models, steps=args.steps, workdir=args.workdir, concurrent=args.concurrent, reference=args.reference,
                           memory_dims=args.memory_by_dim, batch=args.batch)
    text = json.dumps(result, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return result
