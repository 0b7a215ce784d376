"""Evaluation users can trust: are generated networks good, and are they more than copies of the originals?

    report = evaluate_generated(originals, generated_vectors)      # a JSON-able dict
    paths = write_report(report, "outputs/digits/eval")            # report.json + PNG plots
    log_report_to_wandb(report, paths)                             # when a W&B run is active
    print(format_summary(report))

    pdiff evaluate --dataset outputs/digits/params --generated samples/ --out outputs/digits/eval

What the report holds, and the choices behind it:

* **Accuracy** of the original checkpoints, the generated networks and every baseline on the validation and
  the test split: best (max), mean, median, min and sample std. A network is only ever *selected* on the
  validation split (highest validation accuracy, then lowest validation loss, then lowest index); the
  test accuracy of that network is what `best_on_val` reports. `test.best` is the oracle max over the
  set, kept for comparison with the paper, which selected on test.
* **Baselines** (arXiv 2506.07998 found that generators often do not beat them): the uniform weight
  average of the originals (one network), and the originals plus Gaussian noise at several scales.
  In the default ``noise_mode="spread"`` the noise on tensor t has std ``scale * sigma_t``, where
  ``sigma_t`` is the std of tensor t's entries across the original checkpoints (deviations from the
  per-entry mean, pooled over the tensor): scale 1 perturbs a checkpoint about as much as the checkpoints
  differ from each other, whatever the task. ``noise_mode="absolute"`` uses ``scale`` itself as the std.
  Noise model i perturbs original ``perm[i % K]`` (a seeded permutation, so every original is used
  evenly) with one seeded standard-normal draw that is shared by all scales: the scales differ only in
  magnitude, and the same seed always gives the same networks.
* **Novelty** (the paper's analysis): the similarity of two networks is the IoU of their sets of wrongly
  classified test examples, |W_a ∩ W_b| / |W_a ∪ W_b| (1.0 when both sets are empty), and, independently,
  the L2 distance of their parameter vectors. For each generated (and noise) network the report gives its
  nearest original by either measure; the summaries give, per network, the max IoU / min L2 to the
  nearest *other* original (original<->original), other generated network (generated<->generated) and
  original (generated->original, noise->original).
* **Verdict**, one line: the generated set is compared with the noise scale whose mean nearest-original
  IoU is closest to the generated set's (equal novelty). It *beats* that baseline when its mean test
  accuracy is higher by a margin of at least max(1 / N_test, 2 standard errors of the difference of
  the two means), *loses* when lower by as much, and *ties* otherwise. When no scale comes within 0.05
  IoU the line says so: add scales.

Networks with NaN/Inf parameters count as getting every example wrong (accuracy 0, loss null) and are
listed, so a generator that produces garbage is visible rather than skipped.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .batched import Scores, evaluate_network, evaluate_vectors
from .dataset import ParameterDataset
from .params import ParameterLayout
from .tasks import Task

REPORT_FILE = "report.json"
SCHEMA_VERSION = 1
SPLITS = ("val", "test")
DEFAULT_NOISE_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
NOISE_MODES = ("spread", "absolute")
EQUAL_NOVELTY_TOLERANCE = 0.05  # mean-IoU gap up to which a noise scale counts as "equal novelty"

SELECTION_RULE = "highest validation accuracy, then lowest validation loss, then lowest index; test is only reported"
VERDICT_RULE = (
    "compare with the noise scale whose mean nearest-original test-error IoU is closest to the generated set's; "
    "beats/loses when the mean test accuracies differ by at least max(1/N_test, 2 x the standard error of the "
    "difference of means, Welch), ties otherwise"
)


# -- similarity -------------------------------------------------------------------------------


def wrong_set_iou(a: torch.Tensor, b: torch.Tensor | None = None, *, chunk_size: int = 1024) -> torch.Tensor:
    """IoU of wrong-example sets: a [A, N] and b [B, N] boolean masks -> [A, B] float64.

    IoU(a, b) = |W_a ∩ W_b| / |W_a ∪ W_b|, defined as 1.0 when both sets are empty (two perfect networks
    make the same mistakes: none). Counts come from a float32 matmul, exact below 2^24 examples.
    """
    b = a if b is None else b
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"wrong-example masks must be [A, N] and [B, N] with the same N, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] >= 2**24:
        raise ValueError("more than 2^24 examples: counts would no longer be exact in float32")
    bf = b.to(torch.float32)
    b_sizes = bf.sum(1, dtype=torch.float64)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for lo in range(0, a.shape[0], chunk_size):
        af = a[lo : lo + chunk_size].to(device=bf.device, dtype=torch.float32)
        inter = (af @ bf.T).to(torch.float64)
        union = af.sum(1, dtype=torch.float64)[:, None] + b_sizes[None, :] - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
        out[lo : lo + len(af)] = iou.cpu()
    return out


def l2_distances(a: torch.Tensor, b: torch.Tensor | None = None, *, chunk_size: int = 256) -> torch.Tensor:
    """Euclidean distances between parameter vectors a [A, D] and b [B, D] -> [A, B] float64.

    Computed directly in float64, not with the |a|^2 + |b|^2 - 2ab shortcut, which cancels
    catastrophically for the near-copies this is meant to detect.
    """
    b = (a if b is None else b).to(torch.float64)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for lo in range(0, a.shape[0], chunk_size):
        out[lo : lo + chunk_size] = torch.cdist(
            a[lo : lo + chunk_size].to(torch.float64), b, compute_mode="donot_use_mm_for_euclid_dist"
        )
    return out


def _nearest(matrix: torch.Tensor, *, largest: bool, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, the best value and its column; `exclude_self` ignores the diagonal (a set against itself)."""
    if exclude_self:
        if matrix.shape[1] < 2:
            return None  # a single network has no other member to be near
        matrix = matrix.clone()
        matrix.fill_diagonal_(-math.inf if largest else math.inf)
    values, index = matrix.max(1) if largest else matrix.min(1)
    return values, index


def _summary(values: torch.Tensor | np.ndarray | None) -> dict[str, float] | None:
    if values is None or len(values) == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


# -- accuracy ---------------------------------------------------------------------------------


def accuracy_stats(accuracy: torch.Tensor | np.ndarray) -> dict[str, float]:
    """best (max), mean, median, min and sample std (0 for one network) of a set's accuracies."""
    a = np.asarray(accuracy, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no networks to summarise")
    return {
        "best": float(a.max()),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "min": float(a.min()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
    }


def select_on_val(val_accuracy: torch.Tensor, val_loss: torch.Tensor) -> int:
    """Index of the network chosen on the validation split (see SELECTION_RULE); never looks at test."""
    acc = np.asarray(val_accuracy, dtype=np.float64)
    loss = np.nan_to_num(np.asarray(val_loss, dtype=np.float64), nan=np.inf)
    order = np.lexsort((np.arange(len(acc)), loss, -acc))  # last key is the primary one
    return int(order[0])


# -- baselines --------------------------------------------------------------------------------


def weight_average(vectors: torch.Tensor) -> torch.Tensor:
    """The uniform average of the original checkpoints, as one vector [1, D] (model soup baseline)."""
    return vectors.to(torch.float64).mean(0, keepdim=True).to(torch.float32)


def noise_sigmas(vectors: torch.Tensor, layout: ParameterLayout, mode: str = "spread") -> torch.Tensor:
    """Per-tensor noise unit [len(layout.slots)]: the checkpoint spread of each tensor, or 1 (absolute)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise_mode={mode!r}: choose one of {NOISE_MODES}")
    if mode == "absolute":
        return torch.ones(len(layout.slots), dtype=torch.float64)
    if len(vectors) < 2:
        raise ValueError("noise_mode='spread' needs at least 2 original checkpoints to measure their spread; use 'absolute'")
    deviation = vectors.to(torch.float64) - vectors.to(torch.float64).mean(0, keepdim=True)
    return torch.stack([deviation[:, s.offset : s.end].pow(2).mean().sqrt() for s in layout.slots])


def noisy_copies(
    vectors: torch.Tensor,
    layout: ParameterLayout,
    scales: Sequence[float],
    num_models: int,
    *,
    seed: int = 0,
    mode: str = "spread",
) -> tuple[dict[float, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The noise baseline: {scale: [num_models, D]}, the original each copy came from, and the sigmas.

    Drawn on the CPU from a generator seeded with `seed` alone, so a seed gives the same networks on
    any device and for any list of scales (all scales share one standard-normal draw).
    """
    if num_models < 1:
        raise ValueError(f"num_noise_models={num_models} must be at least 1")
    if any((not math.isfinite(float(s))) or float(s) < 0 for s in scales):
        raise ValueError(f"noise scales must be finite and non-negative, got {list(scales)}")
    sigmas = noise_sigmas(vectors, layout, mode)
    per_entry = sigmas[layout.segment_ids()].to(torch.float32)  # [D]
    gen = torch.Generator().manual_seed(int(seed))
    base = torch.randperm(len(vectors), generator=gen)[torch.arange(num_models) % len(vectors)]
    z = torch.randn(num_models, layout.dim, generator=gen)
    originals = vectors[base].to(torch.float32)
    return {float(s): originals + float(s) * per_entry * z for s in scales}, base, sigmas


# -- evaluation -------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class NetworkEvaluator:
    """Scores many parameter vectors of one layout on a task's splits, in chunks, on one device.

    The base network and the splits are moved to the device once. Vectors are sent in slices of
    `max_networks_per_pass` (so N x D never has to fit on the device), and `evaluate_vectors` runs
    `networks_per_chunk` networks at a time through vmap; on a CUDA out-of-memory error that chunk
    size is halved and the pass retried.
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
        self.batch_size = int(batch_size or task.config.get("eval", {}).get("batch_size", 1000))
        if self.batch_size < 1 or networks_per_chunk < 1 or max_networks_per_pass < 1:
            raise ValueError("batch_size, networks_per_chunk and max_networks_per_pass must be positive")
        self.networks_per_chunk = int(networks_per_chunk)
        self.max_networks_per_pass = int(max_networks_per_pass)
        self.network = task.build_network(base_state).to(self.device)
        layout.check_module(self.network)
        data = task.data
        self.prepare = data.prepare
        self.splits = {name: data.split(name).to(self.device) for name in SPLITS}
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
        parts = [self._score_pass(safe[lo : lo + self.max_networks_per_pass], target, return_wrong) for lo in range(0, len(safe), self.max_networks_per_pass)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - started
        self.networks_scored += len(vectors)
        acc = torch.cat([p.accuracy for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        loss = torch.cat([p.loss for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        wrong = torch.cat([p.wrong for p in parts]) if return_wrong and parts else (torch.zeros(0, len(target), dtype=torch.bool) if return_wrong else None)
        acc[~finite], loss[~finite] = 0.0, math.nan
        if wrong is not None:
            wrong[~finite] = True
        return Scores(acc, loss, wrong)

    def _score_pass(self, vectors: torch.Tensor, split, return_wrong: bool) -> Scores:
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


def _as_vectors(generated: torch.Tensor | ParameterDataset, originals: ParameterDataset) -> torch.Tensor:
    if isinstance(generated, ParameterDataset):
        check_same_network(originals, generated)
        generated = generated.vectors
    generated = torch.as_tensor(generated)
    if generated.ndim == 1:
        generated = generated[None]
    originals.layout.check_vectors(generated)
    if len(generated) == 0:
        raise ValueError("no generated networks to evaluate")
    return generated.detach().cpu().to(torch.float32)


def check_same_network(originals: ParameterDataset, other: ParameterDataset) -> None:
    """Raise unless `other` holds vectors for the same layout and the same frozen base weights."""
    if other.layout != originals.layout:
        raise ValueError(f"the generated parameters have layout {other.layout} ({other.layout.names}), the originals {originals.layout} ({originals.layout.names})")
    keys = set(originals.base_state)
    if set(other.base_state) != keys or any(not torch.equal(originals.base_state[k], other.base_state[k]) for k in keys):
        raise ValueError(
            "the generated parameter dataset was built on different frozen base weights than the originals "
            "(e.g. collected with another seed), so its vectors do not belong to the originals' network"
        )


def _group(scores: dict[str, Scores]) -> dict[str, Any]:
    """Accuracy statistics on both splits plus the network selected on validation."""
    best = select_on_val(scores["val"].accuracy, scores["val"].loss)
    return {
        "count": len(scores["val"].accuracy),
        "val": accuracy_stats(scores["val"].accuracy),
        "test": accuracy_stats(scores["test"].accuracy),
        "best_on_val": {
            "index": best,
            "val_accuracy": float(scores["val"].accuracy[best]),
            "test_accuracy": float(scores["test"].accuracy[best]),
        },
    }


def _columns(scores: dict[str, Scores]) -> dict[str, list]:
    return {
        f"{split}_{metric}": getattr(scores[split], metric).tolist() for split in SPLITS for metric in ("accuracy", "loss")
    }


def _nearest_columns(iou: torch.Tensor, l2: torch.Tensor, other: str, exclude_self: bool = False) -> dict[str, list]:
    by_iou, by_l2 = _nearest(iou, largest=True, exclude_self=exclude_self), _nearest(l2, largest=False, exclude_self=exclude_self)
    if by_iou is None:
        return {}
    return {
        f"nearest_{other}_iou": by_iou[0].tolist(),
        f"nearest_{other}_iou_index": by_iou[1].tolist(),
        f"nearest_{other}_l2": by_l2[0].tolist(),
        f"nearest_{other}_l2_index": by_l2[1].tolist(),
    }


def _similarity(columns: Mapping[str, list], other: str) -> dict[str, Any] | None:
    if f"nearest_{other}_iou" not in columns:
        return None
    return {"iou": _summary(columns[f"nearest_{other}_iou"]), "l2": _summary(columns[f"nearest_{other}_l2"])}


def evaluate_generated(
    originals: ParameterDataset,
    generated: torch.Tensor | ParameterDataset,
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    noise_scales: Sequence[float] = DEFAULT_NOISE_SCALES,
    noise_mode: str = "spread",
    num_noise_models: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    networks_per_chunk: int = 100,
    max_networks_per_pass: int = 2048,
) -> dict[str, Any]:
    """Evaluate generated parameter vectors [N, D] against the originals they were learned from.

    Returns the JSON-able report described in the module docstring. `num_noise_models` defaults to the
    number of generated networks, so every noise scale is a set of the same size.
    """
    started = time.perf_counter()
    generated = _as_vectors(generated, originals)
    task = task or originals.task
    orig_vectors = originals.vectors
    num_noise_models = len(generated) if num_noise_models is None else int(num_noise_models)
    noise_scales = sorted({float(s) for s in noise_scales})
    noise, noise_base, sigmas = {}, torch.zeros(0, dtype=torch.long), None
    if noise_scales:
        noise, noise_base, sigmas = noisy_copies(orig_vectors, originals.layout, noise_scales, num_noise_models, seed=seed, mode=noise_mode)

    evaluator = NetworkEvaluator(
        task, originals.base_state, originals.layout, device=device, batch_size=batch_size,
        networks_per_chunk=networks_per_chunk, max_networks_per_pass=max_networks_per_pass,
    )

    def score(vectors: torch.Tensor) -> dict[str, Scores]:
        return {"val": evaluator.score(vectors, "val"), "test": evaluator.score(vectors, "test", return_wrong=True)}

    sets = {"originals": score(orig_vectors), "generated": score(generated), "weight_average": score(weight_average(orig_vectors))}
    noise_scores = {s: score(v) for s, v in noise.items()}

    # Similarities, all on the test split's wrong-example sets and on the parameter vectors.
    ow = sets["originals"]["test"].wrong
    orig = {**_group(sets["originals"]), "networks": _columns(sets["originals"])}
    orig["networks"].update(_nearest_columns(wrong_set_iou(ow), l2_distances(orig_vectors), "other_original", exclude_self=True))
    orig["stored_val_accuracy_matches"] = bool(np.allclose(originals.column("val_accuracy"), sets["originals"]["val"].accuracy.numpy(), atol=0.5 / len(evaluator.splits["val"])))

    gw = sets["generated"]["test"].wrong
    gen = {**_group(sets["generated"]), "networks": _columns(sets["generated"])}
    gen["networks"].update(_nearest_columns(wrong_set_iou(gw, ow), l2_distances(generated, orig_vectors), "original"))
    gen["networks"].update(_nearest_columns(wrong_set_iou(gw), l2_distances(generated), "other_generated", exclude_self=True))
    nonfinite = (~torch.isfinite(generated).all(1)).nonzero().flatten().tolist()
    gen["nonfinite_indices"] = nonfinite

    avg_scores = sets["weight_average"]
    avg_columns = _nearest_columns(wrong_set_iou(avg_scores["test"].wrong, ow), l2_distances(weight_average(orig_vectors), orig_vectors), "original")
    average = {
        "val_accuracy": float(avg_scores["val"].accuracy[0]),
        "test_accuracy": float(avg_scores["test"].accuracy[0]),
        "val_loss": float(avg_scores["val"].loss[0]),
        "test_loss": float(avg_scores["test"].loss[0]),
        "nearest_original_iou": avg_columns["nearest_original_iou"][0],
        "nearest_original_l2": avg_columns["nearest_original_l2"][0],
    }

    noise_entries = []
    for s, vectors in noise.items():
        entry = {"scale": s, **_group(noise_scores[s]), "networks": {"base_index": noise_base.tolist(), **_columns(noise_scores[s])}}
        entry["networks"].update(_nearest_columns(wrong_set_iou(noise_scores[s]["test"].wrong, ow), l2_distances(vectors, orig_vectors), "original"))
        entry["similarity_to_originals"] = _similarity(entry["networks"], "original")
        noise_entries.append(entry)

    similarity = {
        "measure": "per network: max IoU of test wrong-example sets / min parameter L2 distance to the nearest member of the other set",
        "original_original": _similarity(orig["networks"], "other_original"),
        "generated_generated": _similarity(gen["networks"], "other_generated"),
        "generated_original": _similarity(gen["networks"], "original"),
        "weight_average_original": {"iou": average["nearest_original_iou"], "l2": average["nearest_original_l2"]},
        "noise_original": {str(e["scale"]): e["similarity_to_originals"] for e in noise_entries},
    }
    eval_seconds = evaluator.seconds
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task.name,
        "dim": originals.dim,
        "parameters": originals.layout.names,
        "splits": {name: len(evaluator.splits[name]) for name in SPLITS},
        "selection_rule": SELECTION_RULE,
        "originals": orig,
        "generated": gen,
        "baselines": {
            "weight_average": average,
            "noise": {
                "mode": noise_mode,
                "seed": int(seed),
                "num_models": num_noise_models if noise_scales else 0,
                "sigma_per_tensor": {} if sigmas is None else {name: float(v) for name, v in zip(originals.layout.names, sigmas)},
                "scales": noise_entries,
            },
        },
        "similarity": similarity,
        "timing": {
            "device": str(evaluator.device),
            "networks_evaluated": evaluator.networks_scored // len(SPLITS),
            "evaluation_seconds": round(eval_seconds, 4),
            "networks_per_s": round(evaluator.networks_scored / len(SPLITS) / eval_seconds, 2) if eval_seconds > 0 else None,
            "networks_per_chunk": evaluator.networks_per_chunk,
            "total_seconds": None,
        },
    }
    report["verdict"] = verdict(report)
    report["timing"]["total_seconds"] = round(time.perf_counter() - started, 4)
    return _jsonable(report)


def verdict(report: Mapping[str, Any]) -> dict[str, Any]:
    """Does the generated set beat the noise baseline at equal novelty? (VERDICT_RULE, one line in `text`.)"""
    gen_sim = report["similarity"]["generated_original"]
    scales = report["baselines"]["noise"]["scales"]
    if not scales or gen_sim is None:
        return {"rule": VERDICT_RULE, "outcome": None, "text": "no noise baseline was evaluated: no verdict"}
    g = gen_sim["iou"]["mean"]
    match = min(scales, key=lambda e: (abs(e["similarity_to_originals"]["iou"]["mean"] - g), e["scale"]))
    n = match["similarity_to_originals"]["iou"]["mean"]
    gen, noise = report["generated"], match
    gen_acc, noise_acc = gen["test"]["mean"], noise["test"]["mean"]
    diff = gen_acc - noise_acc
    stderr = math.sqrt(gen["test"]["std"] ** 2 / gen["count"] + noise["test"]["std"] ** 2 / noise["count"])
    margin = max(1.0 / report["splits"]["test"], 2 * stderr)
    outcome = "beats" if diff >= margin else "loses to" if diff <= -margin else "ties with"
    text = (
        f"generated {outcome} noise at equal novelty: mean test accuracy {gen_acc:.4f} vs {noise_acc:.4f} "
        f"({diff:+.4f}, margin {margin:.4f}) "
        f"for noise scale {match['scale']:g} ({report['baselines']['noise']['mode']}), mean nearest-original IoU {g:.3f} vs {n:.3f}"
    )
    if abs(n - g) > EQUAL_NOVELTY_TOLERANCE:
        text += f"; no scale within {EQUAL_NOVELTY_TOLERANCE} IoU, add noise scales for a fair match"
    return {
        "rule": VERDICT_RULE,
        "outcome": outcome.split()[0],
        "matched_scale": match["scale"],
        "generated_mean_nearest_iou": g,
        "noise_mean_nearest_iou": n,
        "generated_test_mean": gen_acc,
        "noise_test_mean": noise_acc,
        "difference": diff,
        "standard_error": stderr,
        "margin": margin,
        "equal_novelty": abs(n - g) <= EQUAL_NOVELTY_TOLERANCE,
        "generated_best_on_val_test": report["generated"]["best_on_val"]["test_accuracy"],
        "noise_best_on_val_test": match["best_on_val"]["test_accuracy"],
        "text": text,
    }


def _jsonable(obj: Any) -> Any:
    """Plain Python with NaN/Inf as None, so the report is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- outputs ----------------------------------------------------------------------------------


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write `report.json` (atomically: a reader never sees half a report) and the PNG plots.

    Returns {"report": path, <plot name>: path, ...}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / REPORT_FILE}
    tmp = out / f".{REPORT_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"  # open() keeps the umask's mode
    try:
        with open(tmp, "x") as f:
            json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        os.replace(tmp, paths["report"])
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if plots:
        from .plots import plot_report

        paths.update(plot_report(report, out))
    return paths


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    return json.loads((path / REPORT_FILE if path.is_dir() else path).read_text())


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers as flat `group/metric` scalars (for trackers and model cards)."""
    out: dict[str, Any] = {}
    for group in ("originals", "generated"):
        for split in SPLITS:
            for stat, value in report[group][split].items():
                out[f"{group}/{split}_{stat}"] = value
        out[f"{group}/test_at_best_val"] = report[group]["best_on_val"]["test_accuracy"]
    avg = report["baselines"]["weight_average"]
    out["weight_average/val_accuracy"], out["weight_average/test_accuracy"] = avg["val_accuracy"], avg["test_accuracy"]
    for entry in report["baselines"]["noise"]["scales"]:
        out[f"noise_{entry['scale']:g}/test_mean"] = entry["test"]["mean"]
        out[f"noise_{entry['scale']:g}/nearest_original_iou_mean"] = entry["similarity_to_originals"]["iou"]["mean"]
    for name, sim in report["similarity"].items():
        if isinstance(sim, Mapping) and isinstance(sim.get("iou"), Mapping):
            out[f"similarity/{name}_iou_mean"] = sim["iou"]["mean"]
            out[f"similarity/{name}_l2_mean"] = sim["l2"]["mean"]
    out["timing/networks_per_s"] = report["timing"]["networks_per_s"]
    if report["verdict"].get("difference") is not None:
        out["verdict/generated_minus_noise_test_mean"] = report["verdict"]["difference"]
    return {k: v for k, v in out.items() if v is not None}


def network_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list]]:
    """One row per evaluated network (originals, generated, weight average, noise): columns and rows."""
    columns = ["kind", "noise_scale", "index", "val_accuracy", "test_accuracy", "nearest_original_iou", "nearest_original_l2"]
    rows: list[list] = []

    def add(kind, scale, nets, iou_key, l2_key):
        for i in range(len(nets["val_accuracy"])):
            rows.append([kind, scale, i, nets["val_accuracy"][i], nets["test_accuracy"][i], nets.get(iou_key, [None] * (i + 1))[i], nets.get(l2_key, [None] * (i + 1))[i]])

    add("original", None, report["originals"]["networks"], "nearest_other_original_iou", "nearest_other_original_l2")
    add("generated", None, report["generated"]["networks"], "nearest_original_iou", "nearest_original_l2")
    avg = report["baselines"]["weight_average"]
    rows.append(["weight_average", None, 0, avg["val_accuracy"], avg["test_accuracy"], avg["nearest_original_iou"], avg["nearest_original_l2"]])
    for entry in report["baselines"]["noise"]["scales"]:
        add("noise", entry["scale"], entry["networks"], "nearest_original_iou", "nearest_original_l2")
    return columns, rows


def log_report_to_wandb(report: Mapping[str, Any], plots: Mapping[str, os.PathLike] | None = None, *, step: int | None = None, run: Any = None, prefix: str = "eval") -> bool:
    """Log the headline numbers, a per-network `wandb.Table` and the plots to W&B; False when no run is active.

    `run` may be a wandb run, an `accelerate.Accelerator` (its "wandb" tracker; other ranks log nothing),
    or None for the active `wandb.run`.
    """
    if run is not None and hasattr(run, "get_tracker"):  # an Accelerator
        if not run.is_main_process or not any(t.name == "wandb" for t in run.trackers):
            return False
        run = run.get_tracker("wandb", unwrap=True)
    if run is None:
        import wandb

        run = wandb.run
    if run is None:
        return False
    import wandb

    columns, rows = network_rows(report)
    data: dict[str, Any] = {f"{prefix}/{k}": v for k, v in summary_metrics(report).items()}
    data[f"{prefix}/networks"] = wandb.Table(columns=columns, data=rows)
    for name, path in (plots or {}).items():
        if str(path).endswith(".png"):
            data[f"{prefix}/{name}"] = wandb.Image(str(path))
    run.log(data, step=step)
    run.summary[f"{prefix}/verdict"] = report["verdict"]["text"]
    return True


def format_summary(report: Mapping[str, Any]) -> str:
    """A compact table of the report for the terminal."""
    header = f"{'':<22}{'n':>5}{'val mean':>10}{'val best':>10}{'test@val':>10}{'test mean':>10}{'test min':>10}{'test std':>10}{'near IoU':>10}{'near L2':>10}"
    lines = [f"task {report['task']}: D={report['dim']}, val {report['splits']['val']}, test {report['splits']['test']} examples", header]

    def row(name, group, sim):
        iou = sim["iou"]["mean"] if sim else float("nan")
        l2 = sim["l2"]["mean"] if sim else float("nan")
        v, t = group["val"], group["test"]
        lines.append(
            f"{name:<22}{group['count']:>5}{v['mean']:>10.4f}{v['best']:>10.4f}{group['best_on_val']['test_accuracy']:>10.4f}"
            f"{t['mean']:>10.4f}{t['min']:>10.4f}{t['std']:>10.4f}{iou:>10.3f}{l2:>10.4g}"
        )

    sim = report["similarity"]
    row("originals (to other)", report["originals"], sim["original_original"])
    row("generated", report["generated"], sim["generated_original"])
    avg = report["baselines"]["weight_average"]
    lines.append(
        f"{'weight average':<22}{1:>5}{avg['val_accuracy']:>10.4f}{avg['val_accuracy']:>10.4f}{avg['test_accuracy']:>10.4f}"
        f"{avg['test_accuracy']:>10.4f}{avg['test_accuracy']:>10.4f}{0.0:>10.4f}{avg['nearest_original_iou']:>10.3f}{avg['nearest_original_l2']:>10.4g}"
    )
    for entry in report["baselines"]["noise"]["scales"]:
        row(f"noise x{entry['scale']:g} ({report['baselines']['noise']['mode']})", entry, entry["similarity_to_originals"])
    gg = sim["generated_generated"]
    lines.append(
        "near IoU/L2: mean over networks of the max IoU of test-error sets / min L2 to the nearest original; "
        f"generated<->generated IoU {gg['iou']['mean']:.3f}" if gg else "near IoU/L2: mean max IoU / min L2 to the nearest original"
    )
    if report["generated"]["nonfinite_indices"]:
        lines.append(f"WARNING: {len(report['generated']['nonfinite_indices'])} generated networks hold NaN/Inf (counted as all wrong)")
    lines.append("verdict: " + report["verdict"]["text"])
    t = report["timing"]
    lines.append(f"evaluated {t['networks_evaluated']} networks on val+test in {t['evaluation_seconds']:.2f} s on {t['device']} ({t['networks_per_s']} networks/s)")
    return "\n".join(lines)


# -- benchmark --------------------------------------------------------------------------------


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
    vectors = originals.vectors if vectors is None else _as_vectors(vectors, originals)
    device = resolve_device(device)
    data = task.data
    target = data.split(split).to(device)
    batch_size = int(batch_size or task.config.get("eval", {}).get("batch_size", 1000))
    network = task.build_network(originals.base_state).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batched(v):
        return evaluate_vectors(network, originals.layout, v, target, data.prepare, batch_size=batch_size, networks_per_chunk=networks_per_chunk)

    def one(v):
        net = task.build_network(originals.base_state, originals.layout, v).to(device)
        return evaluate_network(net, target, data.prepare, batch_size=batch_size)[0]

    batched(vectors[:1]), one(vectors[0])  # warm-up: first-call allocations, kernel selection
    sync()
    started = time.perf_counter()
    batched_acc = batched(vectors).accuracy
    sync()
    batched_s = time.perf_counter() - started

    subset = vectors[: max_one_by_one or len(vectors)]
    started = time.perf_counter()
    single_acc = [one(v) for v in subset]
    sync()
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


# -- command line -----------------------------------------------------------------------------


def load_generated(path: str | os.PathLike, originals: ParameterDataset) -> torch.Tensor:
    """Generated vectors from a parameter dataset (folder or Hub id) or a tensor file (.pt, .safetensors, .npy)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file() and suffix in (".pt", ".pth", ".safetensors", ".npy"):
        if suffix == ".npy":
            vectors = torch.from_numpy(np.load(p))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            if len(tensors) != 1:
                raise ValueError(f"{p} holds {len(tensors)} tensors ({sorted(tensors)}); expected one [N, D] tensor")
            vectors = next(iter(tensors.values()))
        else:
            vectors = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(vectors, torch.Tensor):
                raise ValueError(f"{p} does not hold a tensor (got {type(vectors).__name__}); save an [N, D] tensor with torch.save")
        return _as_vectors(vectors, originals)
    return _as_vectors(ParameterDataset.from_pretrained(path), originals)


def evaluate_and_write(
    originals: ParameterDataset,
    generated: torch.Tensor | ParameterDataset,
    out_dir: str | os.PathLike,
    *,
    plots: bool = True,
    wandb_run: Any = None,
    step: int | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """evaluate_generated + write_report + log_report_to_wandb (when a run is active): what every stage calls."""
    report = evaluate_generated(originals, generated, **kwargs)
    paths = write_report(report, out_dir, plots=plots)
    log_report_to_wandb(report, paths, step=step, run=wandb_run)
    return report, paths


def evaluation_kwargs(args) -> dict[str, Any]:
    return {
        "device": args.device,
        "noise_scales": DEFAULT_NOISE_SCALES if args.noise_scales is None else args.noise_scales,
        "noise_mode": args.noise_mode,
        "num_noise_models": args.num_noise_models, "seed": args.seed, "batch_size": args.batch_size,
        "networks_per_chunk": args.networks_per_chunk,
    }


def main(args) -> dict[str, Any]:
    """`pdiff evaluate` (options in `pdiff.cli`): load, evaluate, write, print the summary."""
    out = Path(args.out)
    if (out / REPORT_FILE).exists() and not args.overwrite:
        raise FileExistsError(f"{out / REPORT_FILE} already exists; pass --overwrite to replace it, or choose another --out")
    originals = ParameterDataset.from_pretrained(args.dataset)
    generated = load_generated(args.generated, originals)
    report, paths = evaluate_and_write(originals, generated, out, plots=not args.no_plots, **evaluation_kwargs(args))
    print(format_summary(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report
