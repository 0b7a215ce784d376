"""Simple distributions over the same checkpoints, scored like a generator: where could one be at IoU 0.88?

    python figures/fashion-mnist/references.py DATASET OUT [--wa-noise 1 1.5 2 2.5] [--gaussian 0.75 1 1.25 1.5]
                                                           [--turned 1 1.5]

* weight average + noise: the originals' mean plus Gaussian noise of `scale` x each tensor's checkpoint spread
  (the noise baseline's unit, centred on the weight average instead of on each original; every report now has
  it as the `average + noise` rows, with the noise baseline's own draws rather than this script's);
* Gaussian fit: samples of N(mean, T^2 * covariance of the originals), the covariance of rank K - 1;
* originals turned: each original's deviation from the mean, tensor by tensor, turned to a random direction of the
  same length (times `scale`): the originals' distances from their mean without their directions.

Each set (200 networks, seed 0) goes through `pdiff evaluate --noise-scales 1 1.5 2`, so its verdict reads the
dataset's noise at the set's own novelty like a generator's; one line per set is printed, and
`OUT/references.json` keeps the points (copied by hand into tradeoff_large.json's `references`, which
plot_tradeoff.py draws).
"""

import argparse
import json
import re
from pathlib import Path

import torch
from score_set import score_set

from pdiff import ParameterDataset
from pdiff.evaluation.baselines import noise_sigmas


def reference_sets(dataset: ParameterDataset, wa_scales, temperatures, turned_scales=(), num_models=200, seed=0) -> dict[str, torch.Tensor]:
    vectors = dataset.vectors.double()
    mean = vectors.mean(0, keepdim=True)
    deviations = vectors - mean
    spread = noise_sigmas(dataset.vectors, dataset.layout)[dataset.layout.segment_ids()]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_models, dataset.dim, generator=gen, dtype=torch.float64)
    w = torch.randn(num_models, len(vectors), generator=gen, dtype=torch.float64)
    sets = {f"weight average + noise x{s:g}": mean + s * spread * z for s in wa_scales}
    # w @ deviations / sqrt(K - 1) has exactly the originals' covariance, without forming the D x D matrix.
    sets |= {f"Gaussian fit, T = {t:g}": mean + t * (w @ deviations) / (len(vectors) - 1) ** 0.5 for t in temperatures}
    turned = turn(deviations, dataset.layout.segment_ids(), torch.randn(deviations.shape, generator=gen, dtype=torch.float64))
    sets |= {f"originals turned x{s:g}": mean + s * turned for s in turned_scales}
    return {name: v.float() for name, v in sets.items()}


def turn(deviations: torch.Tensor, segments: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Each row's segments (tensors) pointed along `directions`, their lengths kept."""
    turned = torch.empty_like(deviations)
    for segment in segments.unique():
        cols = segments == segment
        turned[:, cols] = directions[:, cols] / directions[:, cols].norm(dim=1, keepdim=True) * deviations[:, cols].norm(dim=1, keepdim=True)
    return turned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wa-noise", type=float, nargs="*", default=[1, 1.5, 2, 2.5])
    parser.add_argument("--gaussian", type=float, nargs="*", default=[0.75, 1, 1.25, 1.5])
    parser.add_argument("--turned", type=float, nargs="*", default=[1, 1.5])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = ParameterDataset.from_pretrained(args.dataset)
    points = {name: score_set(args.dataset, vectors, args.out, re.sub(r"[^A-Za-z0-9.]+", "_", name))  # "Gaussian_fit_T_0.75"
              for name, vectors in reference_sets(dataset, args.wa_noise, args.gaussian, args.turned).items()}
    (args.out / "references.json").write_text(json.dumps(points, indent=1) + "\n")


if __name__ == "__main__":
    main()
