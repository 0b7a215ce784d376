"""The baselines a generator has to beat (arXiv 2506.07998 found that generators often do not).

* The uniform **weight average** of the original checkpoints: one network (a model soup).
* The originals plus **Gaussian noise** at several scales. In ``mode="spread"`` the noise on tensor t
  has std ``scale * sigma_t``, where ``sigma_t`` is the std of tensor t's entries across the original
  checkpoints (deviations from the per-entry mean, pooled over the tensor): scale 1 perturbs a
  checkpoint about as much as the checkpoints differ from each other, whatever the task.
  ``mode="absolute"`` uses ``scale`` itself as the std. Noise model i perturbs original
  ``perm[i % K]`` (a seeded permutation, so every original is used evenly) with one seeded
  standard-normal draw shared by all scales: the scales differ only in magnitude, and the same seed
  always gives the same networks.
* The **weight average plus the same noise** (`noisy_averages`): the draws of the noise baseline, around the
  average instead of each original. A distribution as simple as the originals' mean and spread; a generator
  that has learned more than that should beat it at equal novelty. On Fashion-MNIST it is the harder of the
  two noise baselines beyond the originals' own spread (README, "Simpler distributions").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..params import ParameterLayout

DEFAULT_NOISE_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_AVERAGE_NOISE_SCALES = (1.0, 2.0, 4.0)  # x4 is already more novel than generators reach (Fashion-MNIST: IoU 0.78)
NOISE_MODES = ("spread", "absolute")


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
        raise ValueError("noise_mode='spread' needs at least 2 original checkpoints to measure their spread; use 'absolute' "
                         "(pdiff evaluate --noise-mode absolute), or no noise scales (--noise-scales --average-noise-scales, given no values)")
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
    base, per_entry, z, sigmas = _draw(vectors, layout, scales, num_models, seed, mode)
    originals = vectors[base].to(torch.float32)
    return {float(s): originals + float(s) * per_entry * z for s in scales}, base, sigmas


def noisy_averages(
    vectors: torch.Tensor, layout: ParameterLayout, scales: Sequence[float], num_models: int, *, seed: int = 0, mode: str = "spread"
) -> dict[float, torch.Tensor]:
    """The weight average plus noise: {scale: [num_models, D]}, the very draws `noisy_copies` adds with the
    same seed, so the two baselines differ only in where the noise starts."""
    _, per_entry, z, _ = _draw(vectors, layout, scales, num_models, seed, mode)
    average = weight_average(vectors)
    return {float(s): average + float(s) * per_entry * z for s in scales}


def _draw(vectors, layout, scales, num_models: int, seed: int, mode: str) -> tuple[torch.Tensor, ...]:
    """The original each copy starts from, the noise unit per entry [D], the standard-normal draw
    [num_models, D] and the per-tensor sigmas."""
    if num_models < 1:
        raise ValueError(f"num_noise_models={num_models} must be at least 1")
    if any((not math.isfinite(float(s))) or float(s) < 0 for s in scales):
        raise ValueError(f"noise scales must be finite and non-negative, got {list(scales)}")
    sigmas = noise_sigmas(vectors, layout, mode)
    per_entry = sigmas[layout.segment_ids()].to(torch.float32)  # [D]
    gen = torch.Generator().manual_seed(int(seed))
    base = torch.randperm(len(vectors), generator=gen)[torch.arange(num_models) % len(vectors)]
    z = torch.randn(num_models, layout.dim, generator=gen)
    return base, per_entry, z, sigmas
