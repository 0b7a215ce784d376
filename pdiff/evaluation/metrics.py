"""The numbers behind the report: similarity of networks, accuracy statistics and selection on validation.

Two networks are compared by the IoU of their sets of wrongly classified test examples and,
independently, by the L2 distance of their parameter vectors (the novelty analysis of arXiv 2402.13144).
Everything here is plain tensor/array maths: no task, no device handling, no report layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SELECTION_RULE = "highest validation accuracy, then lowest validation loss, then lowest index; test is only reported"


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


def nearest_other_l2(vectors: torch.Tensor) -> torch.Tensor:
    """Per vector [N, D], the L2 distance to the nearest other vector of the set -> [N] (inf for a lone vector, NaN for
    one holding NaN)."""
    found = nearest(l2_distances(vectors), largest=False, exclude_self=True)
    return torch.full((len(vectors),), math.inf, dtype=torch.float64) if found is None else found[0]


def nearest(matrix: torch.Tensor, *, largest: bool, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, the best value and its column; `exclude_self` ignores the diagonal (a set against itself).

    None when a set is compared with itself and has a single member: there is no other one to be near.
    """
    if exclude_self and matrix.shape[1] < 2:
        return None
    # min/max propagate NaN: one network with NaN parameters would make every other row's nearest distance
    # NaN. It is near nothing instead, and its own row (NaN throughout, its diagonal too) stays NaN.
    undefined = matrix.isnan().all(1)
    worst = -math.inf if largest else math.inf
    matrix = matrix.nan_to_num(nan=worst)
    if exclude_self:
        matrix.fill_diagonal_(worst)
    values, index = matrix.max(1) if largest else matrix.min(1)
    return values.masked_fill(undefined, math.nan), index


def nearest_columns(iou: torch.Tensor, l2: torch.Tensor, other: str, exclude_self: bool = False) -> dict[str, list]:
    """Per-network columns `nearest_{other}_iou`, `..._iou_index`, `..._l2`, `..._l2_index` (as in report.json);
    empty when a set is compared with itself and has a single member."""
    by_iou, by_l2 = nearest(iou, largest=True, exclude_self=exclude_self), nearest(l2, largest=False, exclude_self=exclude_self)
    if by_iou is None:
        return {}
    return {
        f"nearest_{other}_iou": by_iou[0].tolist(),
        f"nearest_{other}_iou_index": by_iou[1].tolist(),
        f"nearest_{other}_l2": by_l2[0].tolist(),
        f"nearest_{other}_l2_index": by_l2[1].tolist(),
    }


def summary(values: torch.Tensor | np.ndarray | list | None) -> dict[str, float] | None:
    """mean, median, min and max of per-network values; None when there are none."""
    if values is None or len(values) == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


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
