"""The two training objectives, and the random source of each micro-batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

_PRIME = 1_000_003


def step_generator(seed: int, rank: int, step: int, micro: int, device) -> torch.Generator:
    """The random source of one micro-batch: a pure function of (seed, rank, step, micro-batch).

    Batches, noise and timesteps all come from it, so a resumed run draws exactly what the
    uninterrupted one drew, with no random state to save, and each rank draws its own. Every part gets
    its own factor, so no two (rank, step, micro-batch) below a million share a seed.
    """
    g = torch.Generator(device=device)
    g.manual_seed((((seed * _PRIME + rank) * _PRIME + step) * _PRIME + micro) % 2**63)
    return g


def autoencoder_loss(ae, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction error of noise-augmented normalised parameters (p-diff's autoencoder objective)."""
    return F.mse_loss(ae(x, generator=generator).reconstruction.float(), x)


def diffusion_loss(unet, noise_scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction loss at uniformly drawn timesteps, one per sample."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps).sample.float(), noise)
