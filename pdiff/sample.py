"""`pdiff sample`: generate networks from a trained generator and write them out.

    pdiff sample --model outputs/digits/generator --num-models 100 --out samples/        # one safetensors per network
    pdiff sample --model you/pdiff-digits --num-models 200 --out gen/ --format dataset --evaluate

`--format dataset` writes a parameter dataset in the schema of `pdiff collect` (with validation/test
accuracy filled in), so generated sets can be evaluated, compared or trained on like collected ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .batched import evaluate_vectors
from .dataset import ParameterDataset, atomic_directory
from .evaluate import resolve_device
from .pipeline import PDiffPipeline, sampler_scheduler
from .tasks import Task

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_generator(model: str, device: str = "auto", dtype: str = "fp32", sampler: str | None = None, revision: str | None = None) -> PDiffPipeline:
    pipe = PDiffPipeline.from_pretrained(model, revision=revision)
    if sampler:
        pipe.scheduler = sampler_scheduler(sampler, pipe.scheduler.config)
    pipe.to(resolve_device(device))
    if dtype != "fp32":  # the denoiser runs in bf16; the autoencoder, the target network and the output stay float32
        pipe.to(DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task_of(pipe: PDiffPipeline) -> Task:
    if not pipe.target.config.task:
        raise ValueError("this generator stores no task spec, so its networks cannot be evaluated; evaluate them in your own code")
    return Task(pipe.target.config.task)


def generated_dataset(pipe: PDiffPipeline, params: torch.Tensor, seed: int, task: Task) -> ParameterDataset:
    """The generated vectors as a parameter dataset, scored on validation and test like collected ones."""
    net = pipe.target.net
    columns: dict[str, Any] = {"step": list(range(len(params))), "seed": [seed] * len(params)}
    batch = int(task.config.get("eval", {}).get("batch_size", 1000))
    for split in ("val", "test"):
        s = evaluate_vectors(net, pipe.layout, params, task.data.split(split), task.data.prepare, batch_size=batch)
        columns[f"{split}_accuracy"], columns[f"{split}_loss"] = s.accuracy.tolist(), s.loss.tolist()
    base = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    info = {"generated": True, "in_channels": pipe.target.config.in_channels, "num_classes": pipe.target.config.num_classes}
    return ParameterDataset.from_vectors(params, columns, pipe.layout, task.config, base, info)


def write_networks(pipe: PDiffPipeline, params: torch.Tensor, out: Path, overwrite: bool) -> None:
    """One full state dict per network as `network-00000.safetensors`, plus the layout and task."""
    with atomic_directory(out, overwrite) as tmp:
        for i, state in enumerate(pipe.state_dicts(params)):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"network-{i:05d}.safetensors"))
        spec = {"layout": pipe.layout.to_dict(), "task": pipe.target.config.task, "network": pipe.target.config.network,
                "in_channels": pipe.target.config.in_channels, "num_classes": pipe.target.config.num_classes}
        (tmp / "pdiff_networks.json").write_text(json.dumps(spec, indent=2))


def main(args) -> None:
    """`pdiff sample` (options in `pdiff.cli`)."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:  # refuse before any work
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it, or choose another --out")
    started = time.perf_counter()
    pipe = load_generator(args.model, args.device, args.dtype, args.sampler, args.revision)
    params = pipe(num_models=args.num_models, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).params
    seconds = time.perf_counter() - started
    if args.format == "dataset" or args.evaluate:
        task = task_of(pipe)
        generated = generated_dataset(pipe, params, args.seed, task)
    if args.format == "dataset":
        generated.save_to_disk(out, overwrite=args.overwrite)
    else:
        write_networks(pipe, params, out, args.overwrite)
    print(f"sampled {len(params)} networks in {seconds:.2f} s -> {out}")
    if args.evaluate:
        _report(generated, args, out)


def _report(generated: ParameterDataset, args, out: Path) -> None:
    """Accuracy of the generated networks; against the originals too when `--dataset` is given."""
    if args.dataset:
        from .evaluate import evaluate_and_write, format_summary

        originals = ParameterDataset.from_pretrained(args.dataset)
        report, _ = evaluate_and_write(originals, generated.vectors, out.with_name(out.name + "-report"), seed=args.seed, device=args.device if args.device != "auto" else None)
        print(format_summary(report))
        return
    for split in ("val", "test"):
        acc = torch.tensor(generated.column(f"{split}_accuracy"))
        print(f"{split:>4} accuracy  best {acc.max():.4f}  mean {acc.mean():.4f}  median {acc.median():.4f}  min {acc.min():.4f}")
