"""Scoring many parameter vectors on one network: batched, exact, and timed.

Generated networks differ only in the parameters of the layout, so the frozen stages before the
first generated parameter are run once per image batch (and kept for a whole report), and only the
remaining stages are run per network: a pooled classifier head in closed form for all networks at
once (`heads.py`), anything else with `torch.func.vmap` over `functional_call`, a chunk of networks at
a time. Accuracies are exact counts, the same as when each network is built and run on its own
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
from ..runtime import free_memory, resolve_device, synchronize
from ..tasks import Task
from ..tasks.data import Split
from ..tasks.networks import StagedNetwork
from .cache import ScoreCache, cache_root, context_digest
from .heads import PooledLinearHead
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
    networks_per_chunk: int | None  # None: sized from free memory
    total_seconds: float | None = None
    networks_from_cache: int = 0  # of networks_evaluated, read from the score cache (`cache.py`), not scored: not in networks_per_s


class _Stages(nn.Module):
    """Stages [start, stop) of a staged network, as a module `functional_call` can swap parameters in."""

    def __init__(self, net: StagedNetwork, start: int, stop: int):
        super().__init__()
        self.net, self.start, self.stop = net, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stages(x, self.start, self.stop)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, self.net.get_submodule(name)) for name in self.net.stage_names[self.start : self.stop]]


class SuffixScorer:
    """Logits of many parameter vectors of one layout on one network, sharing everything frozen.

    The stages before the first generated parameter (the prefix) run once per image batch
    (`features`); only the rest (the suffix) runs per network. A suffix that is a pooled classifier
    head (`heads.PooledLinearHead`) is computed in closed form for all networks at once, with every
    (network, image) pair whose hit the rounding could change recomputed the network's own way; any
    other suffix runs through `torch.func.vmap` over `functional_call`.
    """

    def __init__(self, network: nn.Module, layout: ParameterLayout):
        layout.check_module(network)
        network.eval()
        self.layout = layout
        if isinstance(network, StagedNetwork):
            cut = network.first_stage_holding(layout.names)
            self.prefix, self.suffix, self.key = _Stages(network, 0, cut), _Stages(network, cut, len(network.stage_names)), "net."
            self.head = PooledLinearHead.find(self.suffix.named_stages())
        else:  # unknown architecture: no shared prefix, vmap over the whole network
            self.prefix, self.suffix, self.key, self.head = nn.Identity(), network, "", None
        self.batched = vmap(self._suffix_logits, in_dims=(0, None))
        self.generates_convolutions = any(isinstance(module, nn.modules.conv._ConvNd) for module in _owners(network, layout.names))
        self._activation: int | None = None

    def features(self, split: Split, prepare: Callable[[torch.Tensor], torch.Tensor], batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prefix output, labels) for every image batch of `split`: what all networks share."""
        batches = []
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device)
            batches.append((self.prefix(prepare(images)), split.labels[start : start + batch_size].to(device)))
        return batches

    def logits(self, vectors: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits [n, batch, classes] of the n networks given by `vectors` [n, D]; which ones hit
        their label is exactly as in each network's own forward pass."""
        chunk = self.layout.unflatten(vectors)
        if self.head is not None:
            return self.head.logits(features, chunk, labels)
        params = {self.key + name: value for name, value in chunk.items()}
        if self.generates_convolutions and features.device.type == "cpu":
            # vmap turns convolutions whose weights differ per network into one grouped convolution,
            # which oneDNN runs ~3x slower per network than plain ones (whole Fashion-MNIST SmallCNNs:
            # 9-11k vs 29k network-images/s on 2 cores), so on the CPU each network runs on its own.
            return torch.stack([self._suffix_logits({k: v[i] for k, v in params.items()}, features) for i in range(len(vectors))])
        return self.batched(params, features)

    def _suffix_logits(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return functional_call(self.suffix, params, (features,))

    def networks_per_chunk(self, features: torch.Tensor, device: torch.device) -> int:
        """As many networks per chunk as keep the chunk's temporaries within `chunk_budget`."""
        if self.head is not None:  # the closed form keeps a few [channels, batch, networks] arrays
            per_network = 6 * 4 * features.shape[1] * len(features)
        else:  # vmap materialises a few copies of the suffix's largest activation per network
            per_network = 4 * 4 * len(features) * self._largest_activation(features)
        return max(1, min(1024, chunk_budget(device) // per_network))

    def _largest_activation(self, features: torch.Tensor) -> int:
        """Numbers in the largest output one image produces inside the suffix (measured once, on one image):
        a whole network's first convolutions are far larger than its input."""
        if self._activation is None:
            sizes = [features[0].numel()]

            def record(module, inputs, output):
                if isinstance(output, torch.Tensor):
                    sizes.append(output[0].numel())

            hooks = [m.register_forward_hook(record) for m in self.suffix.modules() if not list(m.children())]
            try:
                self.suffix(features[:1])
            finally:
                for hook in hooks:
                    hook.remove()
            self._activation = max(sizes)
        return self._activation


@torch.no_grad()
def evaluate_vectors(
    network: nn.Module,
    layout: ParameterLayout,
    vectors: torch.Tensor,
    split: Split,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 1000,
    networks_per_chunk: int | None = None,
    return_wrong: bool = False,
    scorer: SuffixScorer | None = None,
    features: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Scores:
    """Accuracy and loss of `network` with each row of `vectors` [B, D] put into its layout's parameters.

    `network` holds the frozen (base) weights and sits on the device to compute on. A caller scoring
    many sets passes its `scorer` and the split's `features` so the prefix runs once per split.
    `networks_per_chunk=None` sizes chunks from free memory.
    """
    layout.check_vectors(vectors)
    scorer = scorer or SuffixScorer(network, layout)
    device = next(network.parameters()).device
    vectors = vectors.to(device=device, dtype=torch.float32).reshape(-1, layout.dim)
    num_networks, n = vectors.shape[0], len(split)
    features = features if features is not None else scorer.features(split, prepare, batch_size, device)
    correct = torch.zeros(num_networks, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(num_networks, dtype=torch.float64, device=device)
    wrong = torch.zeros(num_networks, n, dtype=torch.bool) if return_wrong else None

    start = 0
    for feats, labels in features:
        step = networks_per_chunk or scorer.networks_per_chunk(feats, device)
        for lo in range(0, num_networks, step):
            logits = scorer.logits(vectors[lo : lo + step], feats, labels)  # [b, batch, classes]
            hits = logits.argmax(-1) == labels
            correct[lo : lo + len(hits)] += hits.sum(-1)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(len(hits)), reduction="none")
            loss_sum[lo : lo + len(hits)] += losses.view(len(hits), -1).double().sum(-1)
            if wrong is not None:
                wrong[lo : lo + len(hits), start : start + len(labels)] = ~hits.cpu()
        start += len(labels)

    return Scores(correct.cpu().double() / n, loss_sum.cpu() / n, wrong)


def score_columns(network: nn.Module, layout: ParameterLayout, vectors: torch.Tensor, task: Task, keep: bool = False) -> dict[str, list[float]]:
    """A parameter dataset's score columns (`val_accuracy`, `val_loss`, `test_accuracy`, `test_loss`) for
    `vectors` in `network`, which holds the base weights. `keep`: these are a dataset's originals, which
    every report against it scores again, so their scores go to the score cache (`cache.py`)."""
    evaluator, columns = NetworkEvaluator(task, network.state_dict(), layout, device=next(network.parameters()).device), {}
    for split in SPLITS:
        scores = evaluator.score(vectors, split, reuse=keep)
        columns[f"{split}_accuracy"], columns[f"{split}_loss"] = scores.accuracy.tolist(), scores.loss.tolist()
    return columns


def _owners(network: nn.Module, param_names) -> list[nn.Module]:
    """The modules that own the named parameters."""
    return [network.get_submodule(name.rpartition(".")[0]) for name in param_names]


def chunk_budget(device: torch.device) -> int:
    """Bytes one chunk of networks may use: a quarter of free accelerator memory, or on CPU a size
    that keeps the allocator reusing memory instead of faulting in fresh pages."""
    if device.type == "cuda":
        return free_memory(device) // 4
    return min(256 * 2**20, free_memory(device) // 8)


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

    The base network and the splits are moved to the device once, and each split's prefix features
    are computed once and kept while they fit in a quarter of free memory. Vectors are sent in
    slices of `max_networks_per_pass` (so N x D never has to fit on the device), `networks_per_chunk`
    (default: sized from free memory) at a time; on a CUDA out-of-memory error that chunk size is
    halved and the pass retried. The smaller size is kept for the passes that follow.
    """

    def __init__(
        self,
        task: Task,
        base_state: Mapping[str, torch.Tensor],
        layout: ParameterLayout,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        networks_per_chunk: int | None = None,
        max_networks_per_pass: int = 2048,
    ):
        self.task, self.layout = task, layout
        self.device = resolve_device(device)
        self.batch_size = int(batch_size or task.eval_batch_size)
        if self.batch_size < 1 or (networks_per_chunk is not None and networks_per_chunk < 1) or max_networks_per_pass < 1:
            raise ValueError("batch_size, networks_per_chunk and max_networks_per_pass must be positive")
        self.networks_per_chunk = networks_per_chunk
        self.max_networks_per_pass = int(max_networks_per_pass)
        self.network = task.build_network(base_state).to(self.device)
        self.scorer = SuffixScorer(self.network, layout)
        self.prepare = task.data.prepare
        self.splits = {name: task.data.split(name).to(self.device) for name in SPLITS}
        self._features: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._caches: dict[str, ScoreCache] = {}
        self.seconds = 0.0
        self.networks_scored = 0  # networks evaluated on one split each
        self.networks_reused = 0  # networks read from the score cache, on one split each

    def score(self, vectors: torch.Tensor, split: str, return_wrong: bool = False, reuse: bool = False) -> Scores:
        """Accuracy/loss (and wrong masks) of every row of `vectors`; non-finite rows get every example wrong.
        `reuse`: read rows scored by an earlier report from the score cache, and keep the new ones there."""
        self.layout.check_vectors(vectors)
        if reuse and cache_root() is not None:
            return self._score_reusing(vectors.reshape(-1, self.layout.dim), split, return_wrong)
        vectors = vectors.reshape(-1, self.layout.dim)
        finite = torch.isfinite(vectors).all(1)
        safe = torch.where(finite[:, None], vectors, torch.zeros((), dtype=vectors.dtype))
        started = time.perf_counter()
        step = self.max_networks_per_pass
        parts = [self._score_pass(safe[lo : lo + step], split, return_wrong) for lo in range(0, len(safe), step)]
        synchronize(self.device)
        self.seconds += time.perf_counter() - started
        self.networks_scored += len(vectors)
        scores = _concat(parts, len(self.splits[split]), return_wrong)
        scores.accuracy[~finite], scores.loss[~finite] = 0.0, math.nan
        if scores.wrong is not None:
            scores.wrong[~finite] = True
        return scores

    def _score_reusing(self, vectors: torch.Tensor, split: str, return_wrong: bool) -> Scores:
        cache = self._cache(split)
        keys = cache.keys(vectors)
        found = [self._cached_row(cache, key, split) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            fresh = self.score(vectors[missing], split, return_wrong=True)
            for j, i in enumerate(missing):
                found[i] = {"accuracy": fresh.accuracy[j : j + 1], "loss": fresh.loss[j : j + 1], "wrong": fresh.wrong[j : j + 1]}
                cache.store(keys[i], found[i])
        self.networks_reused += len(vectors) - len(missing)
        return _concat([Scores(**row) for row in found], len(self.splits[split]), return_wrong)

    def _cache(self, split: str) -> ScoreCache:
        if split not in self._caches:
            data = self.task.data.split(split)
            context = context_digest(self.task.config, self.network, data.images, data.labels, batch_size=self.batch_size, device=self.device)
            self._caches[split] = ScoreCache(cache_root(), context)
        return self._caches[split]

    def _cached_row(self, cache: ScoreCache, key: str, split: str) -> dict[str, torch.Tensor] | None:
        row = cache.load(key)
        expected = {"accuracy": (1,), "loss": (1,), "wrong": (1, len(self.splits[split]))}
        if row is None or {k: tuple(v.shape) for k, v in row.items()} != expected:
            return None
        return row

    def timing(self) -> Timing:
        """Throughput so far; `total_seconds` is left for the caller, who knows when its work started."""
        networks = self.networks_scored / len(SPLITS)
        return Timing(
            device=str(self.device), networks_evaluated=(self.networks_scored + self.networks_reused) // len(SPLITS), evaluation_seconds=round(self.seconds, 4),
            networks_per_s=round(networks / self.seconds, 2) if self.seconds > 0 else None, networks_per_chunk=self.networks_per_chunk,
            networks_from_cache=self.networks_reused // len(SPLITS),
        )

    def features(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split's prefix features, computed once and kept when they fit."""
        if split in self._features:
            return self._features[split]
        batches = self.scorer.features(self.splits[split], self.prepare, self.batch_size, self.device)
        size = sum(f.numel() * f.element_size() for f, _ in batches)
        if size <= free_memory(self.device) // 4:
            self._features[split] = batches
        return batches

    def _score_pass(self, vectors: torch.Tensor, split: str, return_wrong: bool) -> Scores:
        # Not accelerate's find_executable_batch_size: it empties the CUDA cache and runs gc.collect()
        # on every call (~0.2 s each, 18 calls per report), which would dominate a fast evaluation.
        features = self.features(split)
        while True:
            try:
                return evaluate_vectors(
                    self.network, self.layout, vectors, self.splits[split], self.prepare, batch_size=self.batch_size,
                    networks_per_chunk=self.networks_per_chunk, return_wrong=return_wrong, scorer=self.scorer, features=features,
                )
            except torch.cuda.OutOfMemoryError:
                chunk = self.networks_per_chunk or self.scorer.networks_per_chunk(features[0][0], self.device)
                if chunk == 1:
                    raise
                self.networks_per_chunk = max(1, chunk // 2)
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
