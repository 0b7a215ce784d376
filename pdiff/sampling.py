"""From a saved generator to networks on disk: load it for sampling, write what it generates.

A sample is written either as one full state dict per network (`network-00000.safetensors`, ready for
`load_state_dict`) or as a parameter dataset in the schema `pdiff collect` writes, scored on the task's
validation and test splits, so generated sets can be evaluated, compared or trained on like collected ones.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .data import ParameterDataset
from .evaluation.inputs import NETWORKS_FILE
from .evaluation.scoring import score_columns
from .io import atomic_directory, nearest_existing, write_json
from .pipelines import PDiffPipeline, sampler_scheduler
from .runtime import free_memory, resolve_device
from .tasks import Task


def load_generator(model: str, device: str = "auto", dtype: str = "fp32", sampler: str | None = None, revision: str | None = None,
                   trust_network_code: bool = False) -> PDiffPipeline:
    device = resolve_device(device)
    pipe = PDiffPipeline.from_pretrained(model, revision=revision, trust_network_code=trust_network_code)
    if sampler:
        pipe.scheduler = sampler_scheduler(sampler, pipe.scheduler.config)
    pipe.to(device)
    if dtype == "bf16":  # the denoiser runs in bf16; the autoencoder, the target network and the output stay float32
        pipe.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task_of(pipe: PDiffPipeline, data: str | None = None) -> Task:
    """The generator's task; `data` says where its data is on this machine (an image folder or Hub id
    for image-folder tasks, the data root for torchvision ones)."""
    if not pipe.target.config.task:
        raise ValueError("this generator stores no task spec, so its networks cannot be evaluated; evaluate them in your own code")
    task = copy.deepcopy(dict(pipe.target.config.task))
    source = task["data"].get("source")
    if data and source not in ("hub", "torchvision"):
        raise ValueError(f"--data {data}: this generator's task reads its data from {source!r}, not from a folder or Hub id; drop --data")
    if data:
        task["data"]["name" if source == "hub" else "root"] = data
    return Task(task)


def generated_dataset(pipe: PDiffPipeline, params: torch.Tensor, seed: int, task: Task, temperature: float | None = None,
                      eta: float = 0.0) -> ParameterDataset:
    """The generated vectors as a parameter dataset, scored on validation and test like collected ones; the
    sampling temperature is recorded (`info["temperature"]`) for the report's curve, and DDIM's eta beside it."""
    net = pipe.target.net
    columns = {"step": list(range(len(params))), "seed": [seed] * len(params), **score_columns(net, pipe.layout, params, task)}
    base = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    info = {"generated": True, "in_channels": pipe.target.config.in_channels, "num_classes": pipe.target.config.num_classes, "temperature": temperature,
            "eta": eta}
    return ParameterDataset.from_vectors(params, columns, pipe.layout, task.config, base, info)


def write_networks(pipe: PDiffPipeline, params: torch.Tensor, out: Path, overwrite: bool) -> None:
    """One full state dict per network as `network-00000.safetensors`, plus the layout and task."""
    with atomic_directory(out, overwrite) as tmp:
        for i, state in enumerate(pipe.state_dicts(params)):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"network-{i:05d}.safetensors"))
        target = pipe.target.config
        write_json(tmp / NETWORKS_FILE, {"layout": pipe.layout.to_dict(), "task": target.task, "network": target.network,
                                         "in_channels": target.in_channels, "num_classes": target.num_classes})


CHUNK = 1024  # networks per denoising chain: bounds the UNet's activations, whatever --num-models is


def sample_networks(pipe: PDiffPipeline, num_models: int, num_inference_steps: int | None, seed: int, temperature: float | None = None,
                    eta: float = 0.0) -> torch.Tensor:
    """`num_models` parameter vectors, in chains of at most CHUNK networks; chain i is seeded with seed + i,
    so up to CHUNK networks are exactly `pipe(num_models, generator=manual_seed(seed))`."""
    parts = [pipe(num_models=min(CHUNK, num_models - lo), num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed + i),
                  temperature=temperature, eta=eta).params
             for i, lo in enumerate(range(0, num_models, CHUNK))]
    return torch.cat(parts)


def check_sample_fits(pipe: PDiffPipeline, num_models: int, out: Path, per_network_files: bool) -> None:
    """Refuse now, with the numbers, a sample whose parameters cannot fit in memory or its files on disk."""
    memory = num_models * pipe.layout.dim * 4 * 2  # the vectors, and one copy on the way out
    free = free_memory(torch.device("cpu"))  # the vectors come back to the CPU
    if memory > 0.8 * free:
        fit = int(0.8 * free // (pipe.layout.dim * 4 * 2))
        raise ValueError(f"--num-models {num_models}: their parameters alone need {memory / 1e9:.3g} GB and {free / 1e9:.3g} GB of memory "
                         f"are free here; at most about {fit} fit. Sample in several runs with different --seed")
    per_network = sum(t.numel() * t.element_size() for t in pipe.target.net.state_dict().values()) if per_network_files else pipe.layout.dim * 4
    folder = nearest_existing(out)
    disk, free_disk = num_models * per_network, shutil.disk_usage(folder).free
    if disk > free_disk:
        raise ValueError(f"--num-models {num_models}: the files would take {disk / 1e9:.3g} GB and {folder} has "
                         f"{free_disk / 1e9:.3g} GB free; at most about {free_disk // per_network} fit")
