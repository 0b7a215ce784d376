"""Scoring many parameter vectors on one network: batched, exact, and timed.

Generated networks differ only in the parameters of the layout, so the frozen stages before the
first generated parameter are run once per image batch and only the remaining stages are run, with
`torch.func.vmap` over `functional_call`, for a chunk of networks at a time. Accuracies are exact
counts, so the same network scores the same here as when it is built and run on its own
(`evaluate_network`, the one-by-one reference path; `benchmark_evaluation` compares the two).

Networks with NaN/Inf parameters count as getting every example wrong (accuracy 0, loss NaN), so a
generator that produces garbage is visible rather than skipped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..data import ParameterDataset
from ..params import ParameterLayout
from ..runtime import resolve_device, synchronize
from ..tasks import Task
from ..tasks.data import Split
from ..tasks.networks import StagedNetwork
from .inputs import as_vectors

SPLITS = ("val", "test")


@dataclass
class Scores:
    """Per-network results on one split."""

    accuracy: torch.Tensor  # [B] float64, correct / N
    loss: torch.Tensor  # [B] float64, mean cross-entropy
    wrong: torch.Tensor | None = None  # [B, N] bool: which examples each network gets wrong


@dataclass
class Timing:
    """How fast the networks of a report were scored (`networks_per_s` counts a network on both splits once)."""

    device: str
    networks_evaluated: int
    evaluation_seconds: float
    networks_per_s: float | None
    networks_per_chunk: int
    total_seconds: float | None = None


class _Stages(nn.Module):
    """Stages [start, stop) of a staged network, as a module `functional_call` can swap parameters in."""

    def __init__(self, net: StagedNetwork, start: int, stop: int):
        super().__init__()
        self.net, self.start, self.stop = net, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stages(x, self.start, self.stop)


def _split_at_layout(network: nn.Module, layout: ParameterLayout) -> tuple[nn.Module, nn.Module, str]:
    """(frozen prefix, suffix holding the layout, parameter-name prefix of the suffix)."""
    if isinstance(network, StagedNetwork):
        cut = network.first_stage_holding(layout.names)
        return _Stages(network, 0, cut), _Stages(network, cut, len(network.stage_names)), "net."
    return nn.Identity(), network, ""  # unknown architecture: no shared prefix, vmap over the whole network


@torch.no_grad()
def evaluate_vectors(
    network: nn.Module,
    layout: ParameterLayout,
    vectors: torch.Tensor,
    split: Split,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 1000,
    networks_per_chunk: int = 100,
    return_wrong: bool = False,
) -> Scores:
    """Accuracy and loss of `network` with each row of `vectors` [B, D] put into its layout's parameters.

    `network` holds the frozen (base) weights, is in eval mode and sits on the device to compute on.
    """
    layout.check_vectors(vectors)
    layout.check_module(network)
    network.eval()
    device = next(network.parameters()).device
    vectors = vectors.to(device=device, dtype=torch.float32).reshape(-1, layout.dim)
    num_networks, n = vectors.shape[0], len(split)
    prefix, suffix, prefix_key = _split_at_layout(network, layout)

    def logits_of(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return functional_call(suffix, params, (features,))

    batched_logits = vmap(logits_of, in_dims=(0, None))
    correct = torch.zeros(num_networks, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(num_networks, dtype=torch.float64, device=device)
    wrong = torch.zeros(num_networks, n, dtype=torch.bool) if return_wrong else None

    for start in range(0, n, batch_size):
        images = split.images[start : start + batch_size].to(device)
        labels = split.labels[start : start + batch_size].to(device)
        features = prefix(prepare(images))  # the frozen prefix runs once for all networks
        for lo in range(0, num_networks, networks_per_chunk):
            chunk = layout.unflatten(vectors[lo : lo + networks_per_chunk])
            params = {prefix_key + name: value for name, value in chunk.items()}
            logits = batched_logits(params, features)  # [b, batch, classes]
            hits = logits.argmax(-1) == labels
            correct[lo : lo + len(hits)] += hits.sum(-1)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(len(hits)), reduction="none")
            loss_sum[lo : lo + len(hits)] += losses.view(len(hits), -1).double().sum(-1)
            if wrong is not None:
                wrong[lo : lo + len(hits), start : start + len(labels)] = ~hits.cpu()

    return Scores(correct.cpu().double() / n, loss_sum.cpu() / n, wrong)


@torch.no_grad()
def evaluate_network(
    network: nn.Module, split: Split, prepare: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean loss) of one ready network: the plain, one-by-one reference path."""
    network.eval()
    device = next(network.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device)
        labels = split.labels[start : start + batch_size].to(device)
        logits = network(prepare(images))
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / len(split), loss_sum / len(split)


class NetworkEvaluator:
    """Scores many parameter vectors of one layout on a task's splits, in chunks, on one device.

    The base network and the splits are moved to the device once. Vectors are sent in slices of
    `max_networks_per_pass` (so N x D never has to fit on the device), and `evaluate_vectors` runs
    `networks_per_chunk` networks at a time through vmap; on a CUDA out-of-memory error that chunk
    size is halved and the pass retried. The smaller size is kept for the passes that follow.
    """

    def __init__(
        self,
        task: Task,
        base_state: Mapping[str, torch.Tensor],
        layout: ParameterLayout,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        networks_per_chunk: int = 100,
        max_networks_per_pass: int = 2048,
    ):
        self.task, self.layout = task, layout
        self.device = resolve_device(device)
        self.batch_size = int(batch_size or task.eval_batch_size)
        if self.batch_size < 1 or networks_per_chunk < 1 or max_networks_per_pass < 1:
            raise ValueError("batch_size, networks_per_chunk and max_networks_per_pass must be positive")
        self.networks_per_chunk = int(networks_per_chunk)
        self.max_networks_per_pass = int(max_networks_per_pass)
        self.network = task.build_network(base_state).to(self.device)
        layout.check_module(self.network)
        self.prepare = task.data.prepare
        self.splits = {name: task.data.split(name).to(self.device) for name in SPLITS}
        self.seconds = 0.0
        self.networks_scored = 0  # networks evaluated on one split each

    def score(self, vectors: torch.Tensor, split: str, return_wrong: bool = False) -> Scores:
        """Accuracy/loss (and wrong masks) of every row of `vectors`; non-finite rows get every example wrong."""
        self.layout.check_vectors(vectors)
        vectors = vectors.reshape(-1, self.layout.dim)
        target = self.splits[split]
        finite = torch.isfinite(vectors).all(1)
        safe = torch.where(finite[:, None], vectors, torch.zeros((), dtype=vectors.dtype))
        started = time.perf_counter()
        step = self.max_networks_per_pass
        parts = [self._score_pass(safe[lo : lo + step], target, return_wrong) for lo in range(0, len(safe), step)]
        synchronize(self.device)
        self.seconds += time.perf_counter() - started
        self.networks_scored += len(vectors)
        scores = _concat(parts, len(target), return_wrong)
        scores.accuracy[~finite], scores.loss[~finite] = 0.0, math.nan
        if scores.wrong is not None:
            scores.wrong[~finite] = True
        return scores

    def timing(self) -> Timing:
        """Throughput so far; `total_seconds` is left for the caller, who knows when its work started."""
        networks = self.networks_scored / len(SPLITS)
        return Timing(
            device=str(self.device), networks_evaluated=self.networks_scored // len(SPLITS), evaluation_seconds=round(self.seconds, 4),
            networks_per_s=round(networks / self.seconds, 2) if self.seconds > 0 else None, networks_per_chunk=self.networks_per_chunk,
        )

    def _score_pass(self, vectors: torch.Tensor, split: Split, return_wrong: bool) -> Scores:
        # Not accelerate's find_executable_batch_size: it empties the CUDA cache and runs gc.collect()
        # on every call (~0.2 s each, 18 calls per report), which would dominate a fast evaluation.
        while True:
            try:
                return evaluate_vectors(
                    self.network, self.layout, vectors, split, self.prepare,
                    batch_size=self.batch_size, networks_per_chunk=self.networks_per_chunk, return_wrong=return_wrong,
                )
            except torch.cuda.OutOfMemoryError:
                if self.networks_per_chunk == 1:
                    raise
                self.networks_per_chunk = max(1, self.networks_per_chunk // 2)
                torch.cuda.empty_cache()


def _concat(parts: list[Scores], num_examples: int, return_wrong: bool) -> Scores:
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64)
        return Scores(empty, empty.clone(), torch.zeros(0, num_examples, dtype=torch.bool) if return_wrong else None)
    wrong = torch.cat([p.wrong for p in parts]) if return_wrong else None
    return Scores(torch.cat([p.accuracy for p in parts]), torch.cat([p.loss for p in parts]), wrong)


def benchmark_evaluation(
    originals: ParameterDataset,
    vectors: torch.Tensor | None = None,
    split: str = "test",
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    networks_per_chunk: int = 100,
    max_one_by_one: int | None = 50,
) -> dict[str, Any]:
    """Networks evaluated per second on one split: batched (vmap) vs one by one (build + evaluate each).

    The one-by-one path builds every network from the base weights and its vector, moves it to the
    device and runs `evaluate_network`, as a user without pdiff would. It is timed on the first
    `max_one_by_one` vectors (it is slow; the rate does not depend on how many). Both paths are warmed
    up once, and `identical` says whether they gave the same accuracies on the shared networks.
    """
    task = task or originals.task
    vectors = originals.vectors if vectors is None else as_vectors(vectors, originals)
    device = resolve_device(device)
    target = task.data.split(split).to(device)
    batch_size = int(batch_size or task.eval_batch_size)
    network = task.build_network(originals.base_state).to(device)

    def batched(v):
        return evaluate_vectors(network, originals.layout, v, target, task.data.prepare, batch_size=batch_size, networks_per_chunk=networks_per_chunk)

    def one(v):
        net = task.build_network(originals.base_state, originals.layout, v).to(device)
        return evaluate_network(net, target, task.data.prepare, batch_size=batch_size)[0]

    batched(vectors[:1]), one(vectors[0])  # warm-up: first-call allocations, kernel selection
    synchronize(device)
    started = time.perf_counter()
    batched_acc = batched(vectors).accuracy
    synchronize(device)
    batched_s = time.perf_counter() - started

    subset = vectors[: max_one_by_one or len(vectors)]
    started = time.perf_counter()
    single_acc = [one(v) for v in subset]
    synchronize(device)
    single_s = time.perf_counter() - started
    return {
        "split": split,
        "examples": len(target),
        "device": str(device),
        "batched_networks": len(vectors),
        "batched_seconds": batched_s,
        "batched_networks_per_s": len(vectors) / batched_s,
        "one_by_one_networks": len(subset),
        "one_by_one_seconds": single_s,
        "one_by_one_networks_per_s": len(subset) / single_s,
        "speedup": (len(vectors) / batched_s) / (len(subset) / single_s),
        "identical": bool(torch.equal(batched_acc[: len(subset)], torch.tensor(single_acc, dtype=torch.float64))),
    }
