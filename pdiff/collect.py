"""Stage 1: train a network, then fine-tune only the chosen parameters and save K checkpoints.

usage: pdiff collect [key=value ...]      (or: accelerate launch -m pdiff.collect [key=value ...])

    pdiff collect task=digits task.param.k=200
    pdiff collect task=fashion_mnist task.param.trajectories=4     # K checkpoints from 4 fine-tuning runs
    accelerate launch -m pdiff.collect task=fashion_mnist     # every rank collects its own trajectory

Following p-diff, the base network is trained fully, then only the selected parameters (e.g. the last
BN layers) are trained further and one checkpoint is kept per `save_every` steps. The fine-tuning runs
with the network in eval mode: batch-norm running statistics stay those of the base network, so the
frozen base weights plus one parameter vector rebuild exactly the network that was evaluated.

`task.param.trajectories` splits the K checkpoints among that many fine-tuning runs from the same base
network, each with its own seed (its own batch order): checkpoints of one run are consecutive steps of
one walk, and several runs spread them wider. Its default, null, is one run per process.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # before importing torch: help is instant
        print(__doc__)
        sys.exit(0)
    if __package__ in (None, ""):  # `accelerate launch pdiff/collect.py` puts pdiff/ itself on sys.path
        sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, set_seed
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from pdiff.config import ConfigError, load_config, to_dict
from pdiff import hub
from pdiff.data import ParameterDataset
from pdiff.evaluation.scoring import score_columns
from pdiff.io import check_output_dir, output_lock
from pdiff.params import ParameterLayout, select_parameters
from pdiff.runtime import ThreadPolicy, check_memory, retain_freed_memory
from pdiff.tasks import Task
from pdiff.tasks.networks import import_network
from pdiff.tasks.data import Split


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a batch: random crop after zero padding, random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _batches(split: Split, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches (epoch after epoch) of a split that already sits on the device."""
    batch_size = min(batch_size, len(split))
    while True:
        order = torch.randperm(len(split), generator=generator).to(split.labels.device)
        for lo in range(0, len(split) - batch_size + 1, batch_size):  # the last partial batch is dropped
            idx = order[lo : lo + batch_size]
            yield split.images[idx], split.labels[idx]


def train_base_network(net: nn.Module, task: Task, device: torch.device, seed: int, show_progress: bool) -> None:
    """Train all parameters of `net` with the task's `base` recipe (AdamW + cosine schedule)."""
    cfg, data = task.config["base"], task.data
    train = data.train.to(device)
    steps_per_epoch = max(1, len(train) // int(cfg["batch_size"]))
    total = int(cfg["epochs"]) * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    schedule = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=total)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(train, int(cfg["batch_size"]), generator)
    net.train()
    for _ in tqdm(range(total), desc="base network", disable=not show_progress, leave=False):
        images, labels = next(batches)
        x = data.prepare(images)
        if cfg.get("augment"):
            x = random_crop_flip(x, generator)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    net.eval()


def collect_trajectory(net: nn.Module, layout: ParameterLayout, task: Task, k: int, seed: int, device: torch.device, show_progress: bool) -> tuple[torch.Tensor, list[int]]:
    """Fine-tune only the layout's parameters and return K snapshots [K, D] with their step numbers."""
    cfg, data = task.config["param"], task.data
    train = data.train.to(device)
    params = dict(net.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in layout.names)
    net.eval()  # frozen BN statistics: see the module docstring
    opt = torch.optim.AdamW([params[n] for n in layout.names], lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    warmup, every = int(cfg.get("warmup_steps", 0)), int(cfg.get("save_every", 1))
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(train, int(cfg["batch_size"]), generator)
    snapshots, steps = [], []
    total = warmup + k * every
    for step in tqdm(range(1, total + 1), desc=f"checkpoints (seed {seed})", disable=not show_progress, leave=False):
        images, labels = next(batches)
        x = data.prepare(images)
        if task.config["base"].get("augment"):
            x = random_crop_flip(x, generator)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step > warmup and (step - warmup) % every == 0:
            snapshots.append(layout.flatten(net).cpu())
            steps.append(step)
    for p in net.parameters():
        p.requires_grad_(True)
    return torch.stack(snapshots), steps


def _share(total: int, index: int, parts: int) -> int:
    """How many of `total` checkpoints part `index` of `parts` collects (the first parts take the remainder)."""
    return total // parts + (1 if index < total % parts else 0)


def trajectory_count(cfg: DictConfig, accelerator: Accelerator) -> int:
    """`task.param.trajectories`, or one per process when it is null (p-diff's single run, on one process)."""
    return int(cfg.task.param.get("trajectories") or accelerator.num_processes)


def collect(cfg: DictConfig, accelerator: Accelerator | None = None) -> ParameterDataset | None:
    """Run stage 1 for a composed config; returns the saved dataset on the main process, None elsewhere."""
    accelerator = accelerator or Accelerator(cpu=bool(cfg.cpu))
    check_request(cfg, accelerator)
    ThreadPolicy()
    retain_freed_memory()
    lock = output_lock(Path(cfg.dataset_dir).parent, "collect") if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        started = time.perf_counter()
        task = Task(cfg.task)
        net, layout, base_state = base_network(cfg, task, accelerator)
        base_seconds = time.perf_counter() - started
        k, count = int(cfg.task.param.k), trajectory_count(cfg, accelerator)
        mine = []
        # Trajectory i has seed seed + 1 + i and its own share of K wherever it runs, so the dataset does
        # not depend on how many processes collected it.
        for i in range(accelerator.process_index, count, accelerator.num_processes):
            net.load_state_dict(base_state)  # every trajectory fine-tunes the same base network
            seed = int(cfg.seed) + 1 + i
            vectors, steps = collect_trajectory(net, layout, task, _share(k, i, count), seed, accelerator.device, show_progress=accelerator.is_main_process)
            mine.append({"params": vectors, "step": steps, "seed": [seed] * len(steps)})
        net.load_state_dict(base_state)  # evaluate on the untouched base weights
        _add_scores(mine, net, layout, task)
        gathered = sorted(gather_object(mine), key=lambda rows: rows["seed"][0])  # every rank's trajectories, in seed order
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return None
        info = {"num_processes": accelerator.num_processes, "trajectories": count, "base_seconds": round(base_seconds, 3),
                "collect_seconds": round(time.perf_counter() - started, 3), "device": str(accelerator.device),
                "in_channels": task.data.image_shape[0], "num_classes": task.data.num_classes}
        dataset = save_dataset(cfg, gathered, layout, base_state, info)
    accelerator.wait_for_everyone()
    return dataset


def _add_scores(trajectories: list[dict], net: nn.Module, layout: ParameterLayout, task: Task) -> None:
    """Validation/test columns for every trajectory's rows, scored in one pass (the frozen prefix runs once)."""
    if not trajectories:
        return
    scores = score_columns(net, layout, torch.cat([rows["params"] for rows in trajectories]), task, keep=True)
    start = 0
    for rows in trajectories:
        end = start + len(rows["params"])
        rows.update({key: values[start:end] for key, values in scores.items()})
        start = end


def check_request(cfg: DictConfig, accelerator: Accelerator) -> None:
    """Everything that can be refused before training starts."""
    k, count = int(cfg.task.param.k), trajectory_count(cfg, accelerator)
    if k < count:  # checked on every rank alike, so none is left waiting for the others
        named = f"task.param.trajectories={count}" if cfg.task.param.get("trajectories") else f"the number of processes ({count})"
        raise ConfigError(f"task.param.k={k} is smaller than {named}: every trajectory needs at least one checkpoint")
    hub.check_push(cfg.hub, "dataset_id", "dataset")
    check_output_dir(cfg.dataset_dir, bool(cfg.overwrite), "parameter dataset")
    if cfg.task.network.get("_target_"):  # the user named it: import it now, before the data is loaded
        import_network(str(cfg.task.network._target_))


def base_network(cfg: DictConfig, task: Task, accelerator: Accelerator) -> tuple[nn.Module, ParameterLayout, dict[str, torch.Tensor]]:
    """The trained base network (identical on every rank), the layout of its generated part, its weights."""
    set_seed(int(cfg.seed))
    net = task.build_network().to(accelerator.device)
    # A list or one pattern (`task.param.patterns=fc.*` arrives as a string). Fail on a bad one before training.
    layout = ParameterLayout.from_module(net, select_parameters(net, task.config["param"]["patterns"]))
    k = int(cfg.task.param.k)
    check_memory(k * layout.dim * 4 * 2, f"task.param.k={k} checkpoints of {layout.dim} parameters", "lower task.param.k")
    train_base_network(net, task, accelerator.device, seed=int(cfg.seed), show_progress=accelerator.is_main_process)
    # Every rank trained the same base network; broadcasting makes it bit-identical even where
    # accelerator kernels are not deterministic.
    state = broadcast({n: t.detach().clone() for n, t in net.state_dict().items()}, from_process=0)
    net.load_state_dict(state)
    return net, layout, {n: t.detach().cpu().clone() for n, t in net.state_dict().items()}


def save_dataset(cfg: DictConfig, gathered: list[dict], layout: ParameterLayout, base_state: dict, info: dict) -> ParameterDataset:
    """Merge the trajectories' rows (in seed order) and write the dataset; checkpoints holding NaN/Inf are refused, not saved."""
    vectors = torch.cat([r["params"] for r in gathered])
    bad = (~torch.isfinite(vectors).all(1)).sum().item()
    if bad:
        raise ConfigError(f"{bad} of {len(vectors)} checkpoints hold NaN or Inf: fine-tuning diverged, so nothing was saved. "
                          f"Lower task.param.lr (now {cfg.task.param.lr}) or task.base.lr (now {cfg.task.base.lr})")
    columns = {key: [v for r in gathered for v in r[key]] for key in gathered[0] if key != "params"}
    dataset = ParameterDataset.from_vectors(vectors, columns, layout, to_dict(cfg.task), base_state, info)
    dataset.save_to_disk(cfg.dataset_dir, overwrite=bool(cfg.overwrite))
    if cfg.hub.push_to_hub:
        dataset.push_to_hub(cfg.hub.dataset_id, private=bool(cfg.hub.private))
    return dataset


def summarize(dataset: ParameterDataset) -> str:
    acc = torch.tensor(dataset.column("test_accuracy"))
    val = torch.tensor(dataset.column("val_accuracy"))
    return (
        f"{len(dataset)} checkpoints x {dataset.dim} parameters ({len(dataset.layout.names)} tensors), "
        + (f"from {dataset.info['trajectories']} fine-tuning run(s), " if "trajectories" in dataset.info else "")
        + f"collected in {dataset.info.get('collect_seconds', float('nan')):.1f} s on {dataset.info.get('num_processes', 1)} process(es)\n"
        f"val accuracy  min {val.min():.4f}  median {val.median():.4f}  max {val.max():.4f}\n"
        f"test accuracy min {acc.min():.4f}  median {acc.median():.4f}  max {acc.max():.4f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    dataset = collect(cfg)
    if dataset is not None:
        print(f"saved {cfg.dataset_dir}\n{summarize(dataset)}")


if __name__ == "__main__":  # `accelerate launch pdiff/collect.py`: bad input is one line here too, not a traceback per rank
    from pdiff.commands import report_failures

    sys.exit(report_failures("collect", main))
