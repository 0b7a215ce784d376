"""A tiny, untrained `PDiffPipeline` built straight from a collected parameter dataset (no train.py run).

Untrained is enough for what the pipeline tests check (saving, loading, determinism, batching, file
safety): the autoencoder's normalisation is fitted to the dataset, so decoded vectors sit near the
checkpoints and make working networks.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pdiff import ParameterAutoencoder, ParameterDataset, PDiffPipeline, TargetNetwork, build_unet


def tiny_generator(dataset: ParameterDataset | str | Path, sampler: str = "ddim", seed: int = 0) -> PDiffPipeline:
    """Autoencoder [8, 16] -> latent (4, L), UNet1D [8, 16]; weights drawn from `seed`."""
    if not isinstance(dataset, ParameterDataset):
        dataset = ParameterDataset.from_pretrained(dataset)
    torch.manual_seed(seed)
    ae = ParameterAutoencoder(param_dim=dataset.dim, channels=[8, 16], latent_channels=4)
    ae.fit_normalization(dataset.vectors, dataset.layout)
    unet = build_unet(*ae.latent_shape, block_out_channels=[8, 16], norm_num_groups=8)
    scheduler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler](num_train_timesteps=1000, clip_sample=False)
    pipe = PDiffPipeline(autoencoder=ae.eval(), unet=unet.eval(), scheduler=scheduler, target=TargetNetwork.from_dataset(dataset))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: PDiffPipeline, seed: int = 0, num_models: int = 4, steps: int = 4) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_models=num_models, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).params


class _CreatesMarker:
    """Unpickling this object opens (creates) the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weight": _CreatesMarker(marker)}))
