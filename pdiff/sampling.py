"""From a saved generator to networks on disk: load it for sampling, write what it generates.

A sample is written either as one full state dict per network (`network-00000.safetensors`, ready for
`load_state_dict`) or as a parameter dataset in the schema `pdiff collect` writes, scored on the task's
validation and test splits, so generated sets can be evaluated, compared or trained on like collected ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .data import ParameterDataset
from .evaluation.inputs import NETWORKS_FILE
from .evaluation.scoring import evaluate_vectors
from .io import atomic_directory, write_json
from .pipelines import PDiffPipeline, sampler_scheduler
from .runtime import resolve_device
from .tasks import Task


def load_generator(model: str, device: str = "auto", dtype: str = "fp32", sampler: str | None = None, revision: str | None = None) -> PDiffPipeline:
    device = resolve_device(device)
    pipe = PDiffPipeline.from_pretrained(model, revision=revision)
    if sampler:
        pipe.scheduler = sampler_scheduler(sampler, pipe.scheduler.config)
    pipe.to(device)
    if dtype == "bf16":  # the denoiser runs in bf16; the autoencoder, the target network and the output stay float32
        pipe.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task_of(pipe: PDiffPipeline) -> Task:
    if not pipe.target.config.task:
        raise ValueError("this generator stores no task spec, so its networks cannot be evaluated; evaluate them in your own code")
    return Task(pipe.target.config.task)


def generated_dataset(pipe: PDiffPipeline, params: torch.Tensor, seed: int, task: Task) -> ParameterDataset:
    """The generated vectors as a parameter dataset, scored on validation and test like collected ones."""
    net = pipe.target.net
    columns: dict = {"step": list(range(len(params))), "seed": [seed] * len(params)}
    for split in ("val", "test"):
        s = evaluate_vectors(net, pipe.layout, params, task.data.split(split), task.data.prepare, batch_size=task.eval_batch_size)
        columns[f"{split}_accuracy"], columns[f"{split}_loss"] = s.accuracy.tolist(), s.loss.tolist()
    base = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    info = {"generated": True, "in_channels": pipe.target.config.in_channels, "num_classes": pipe.target.config.num_classes}
    return ParameterDataset.from_vectors(params, columns, pipe.layout, task.config, base, info)


def write_networks(pipe: PDiffPipeline, params: torch.Tensor, out: Path, overwrite: bool) -> None:
    """One full state dict per network as `network-00000.safetensors`, plus the layout and task."""
    with atomic_directory(out, overwrite) as tmp:
        for i, state in enumerate(pipe.state_dicts(params)):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"network-{i:05d}.safetensors"))
        target = pipe.target.config
        write_json(tmp / NETWORKS_FILE, {"layout": pipe.layout.to_dict(), "task": target.task, "network": target.network,
                                         "in_channels": target.in_channels, "num_classes": target.num_classes})
