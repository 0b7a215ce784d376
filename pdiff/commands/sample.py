"""`pdiff sample`: generate networks from a trained generator and write them out.

    pdiff sample --model outputs/digits/generator --num-models 100 --out samples/        # one safetensors per network
    pdiff sample --model you/pdiff-digits --num-models 200 --out gen/ --format dataset --evaluate

`--format dataset` writes a parameter dataset in the schema of `pdiff collect` (see `pdiff.sampling`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import add_trust_flag, non_empty_path, positive_float, positive_int, seed, unit_interval

if TYPE_CHECKING:
    from ..data import ParameterDataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a generator: folder or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--num-models", type=positive_int, default=100, help="networks to generate (denoised together, in chains of up to 1,024)")
    p.add_argument("--out", type=non_empty_path, required=True, help="output folder")
    p.add_argument("--format", choices=("safetensors", "dataset"), default="safetensors", help="one safetensors state dict per network, or a parameter dataset like `pdiff collect` writes")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the steps the generator was validated with)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="override the generator's scheduler")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="scale of the starting noise (default: the generator's, from training): below 1 nearer the networks the generator saw most "
                        "(less novel), above 1 further out")
    p.add_argument("--eta", type=unit_interval, default=0.0,
                   help="DDIM's eta: 0 (default) denoises deterministically from the starting noise, 1 adds fresh noise at every step like DDPM")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--evaluate", action="store_true", help="report accuracy on the task's validation and test splits")
    p.add_argument("--dataset", default=None, help="with --evaluate: the original parameter dataset, for the full report (baselines, novelty)")
    p.add_argument("--data", default=None, help="where the task's data is here (an image folder or Hub id; the data root for torchvision tasks): "
                   "generators do not record the training machine's paths")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> None:
    from ..io import check_apart, check_output_dir, output_lock

    out = Path(args.out)
    if args.revision and Path(args.model).is_dir():
        raise ValueError(f"--revision {args.revision} picks a Hub revision; --model {args.model} is a local folder: drop --revision")
    if args.dataset and not args.evaluate:
        raise ValueError("--dataset is read by --evaluate only: add --evaluate for the full report, or drop --dataset")
    if args.eta and args.sampler == "ddpm":
        raise ValueError("--eta applies to the DDIM sampler: drop --eta, or use --sampler ddim")
    check_apart(out, {"--model": args.model, "--dataset": args.dataset})
    check_output_dir(out, args.overwrite, "sample", flag="--overwrite", elsewhere="--out")  # refuse before any work
    report_dir = out.with_name(out.name + "-report")
    if args.evaluate and args.dataset:
        check_apart(report_dir, {"--model": args.model, "--dataset": args.dataset}, flag="the report folder")
        check_output_dir(report_dir, args.overwrite, "report", flag="--overwrite", elsewhere="--out")
    with output_lock(out, "sample"):  # a second run into the same --out stops at once
        sample(args, out, report_dir)


def sample(args: argparse.Namespace, out: Path, report_dir: Path) -> None:
    from ..sampling import check_sample_fits, generated_dataset, load_generator, sample_networks, task_of, write_networks

    started = time.perf_counter()
    pipe = load_generator(args.model, args.device, args.dtype, args.sampler, args.revision, args.trust_network_code)
    if args.data:
        task_of(pipe, args.data)  # refuses --data for a task that reads no folder, before sampling
    timesteps = pipe.scheduler.config.num_train_timesteps
    if args.steps is not None and args.steps > timesteps:
        raise ValueError(f"--steps {args.steps}: use 1 to {timesteps}, the timesteps this generator was trained on")
    originals = against_originals(pipe, args.dataset, args.trust_network_code) if args.evaluate and args.dataset else None
    check_sample_fits(pipe, args.num_models, out, per_network_files=args.format == "safetensors")
    if args.temperature is None:
        args.temperature = pipe.default_temperature  # recorded in the report
    params = sample_networks(pipe, args.num_models, args.steps, args.seed, args.temperature, args.eta)
    seconds = time.perf_counter() - started
    if args.format == "dataset" or args.evaluate:
        generated = generated_dataset(pipe, params, args.seed, task_of(pipe, args.data), args.temperature, args.eta)
    if args.format == "dataset":
        generated.save_to_disk(out, overwrite=args.overwrite)
    else:
        write_networks(pipe, params, out, args.overwrite)
    print(f"sampled {len(params)} networks in {seconds:.2f} s -> {out}")
    if originals is not None:
        report_against_originals(originals, generated, args, report_dir)
    elif args.evaluate:
        print_accuracy(generated)


def against_originals(pipe, dataset: str, trust_network_code: bool) -> "ParameterDataset":
    """The original parameter dataset, refused now if the generator's network is not the one it holds."""
    from ..data import ParameterDataset
    from ..evaluation.inputs import check_base_network

    originals = ParameterDataset.from_pretrained(dataset, trust_network_code=trust_network_code)
    check_base_network(originals, pipe.layout, pipe.target.net.state_dict(), f"the generator {pipe.name_or_path or ''}".strip())
    return originals


def report_against_originals(originals: "ParameterDataset", generated: "ParameterDataset", args: argparse.Namespace, report_dir: Path) -> None:
    """The full report (baselines, novelty), when the original parameter dataset is given."""
    from ..evaluation import evaluate_and_write
    from ..evaluation.render import format_summary

    report, paths = evaluate_and_write(originals, generated, report_dir, seed=args.seed, device=args.device, generated_temperature=args.temperature)
    print(format_summary(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def print_accuracy(generated: "ParameterDataset") -> None:
    import torch

    for split in ("val", "test"):
        acc = torch.tensor(generated.column(f"{split}_accuracy"))
        print(f"{split:>4} accuracy  best {acc.max():.4f}  mean {acc.mean():.4f}  median {acc.median():.4f}  min {acc.min():.4f}")
