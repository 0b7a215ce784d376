"""Variations of the originals (SDEdit, Meng et al. 2022), tried on a Fashion-MNIST generator; not in pdiff: they lose
to the weight average plus noise at every strength.

    python figures/fashion-mnist/variations.py GENERATOR DATASET OUT [--strengths 0.2 0.4 0.6 0.8]

Each original's latent is noised to the DDIM timestep a fraction `strength` of the way up the generator's schedule
(diffusers' `add_noise`), then denoised from there with DDIM, eta 0: a network per original, near it at low strength,
as far as a full sample at 1. Unlike a temperature below 1, every chain starts from a different network, so the set
cannot collapse onto a few basins.

200 networks per strength (one per original), seed 0; each goes through `pdiff evaluate --noise-scales 1 1.5 2
--average-noise-scales 1 1.5 2`; one line per set, and OUT/variations.json keeps the points (copied by hand into
tradeoff_large.json's `variations`).
"""

import argparse
import json
from pathlib import Path

import torch
from score_set import score_set

from pdiff import ParameterDataset
from pdiff.sampling import load_generator


@torch.no_grad()
def variations(pipe, vectors: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
    scheduler = pipe.scheduler
    scheduler.set_timesteps(pipe.config.get("default_num_inference_steps") or scheduler.config.num_train_timesteps)
    timesteps = scheduler.timesteps[min(round(len(scheduler.timesteps) * (1 - strength)), len(scheduler.timesteps) - 1):]
    clean = pipe.autoencoder.params_to_latents(vectors)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    latents = scheduler.add_noise(clean, noise, timesteps[:1].expand(len(clean)))
    for t in timesteps:
        latents = scheduler.step(pipe.unet(latents, t).sample.float(), t, latents).prev_sample
    return pipe.autoencoder.latents_to_params(latents).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator")
    parser.add_argument("dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_generator(args.generator)
    vectors = ParameterDataset.from_pretrained(args.dataset).vectors.float()
    points = {f"strength_{s:g}": score_set(args.dataset, variations(pipe, vectors, s), args.out, f"strength_{s:g}") for s in args.strengths}
    (args.out / "variations.json").write_text(json.dumps(points, indent=1) + "\n")


if __name__ == "__main__":
    main()
