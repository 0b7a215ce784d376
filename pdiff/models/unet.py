"""The latent denoiser: a diffusers `UNet1DModel` configured for a generic latent of C channels.

Uses the ResNet/temporal block family, in which the timestep enters every block (the audio-style
blocks see the timestep only when the first block is `DownBlock1DNoSkip` with `extra_in_channels` set to the
time-embedding width; otherwise they can silently drop it or return half the length).
"""

from __future__ import annotations

from typing import Sequence

from diffusers import UNet1DModel as DiffusersUNet1DModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from .safetensors_only import SafetensorsOnly


class UNet1DModel(SafetensorsOnly, DiffusersUNet1DModel):
    """diffusers' UNet1DModel, loaded from safetensors only (see `SafetensorsOnly`)."""


def build_unet(latent_channels: int, latent_length: int, block_out_channels: Sequence[int] = (32, 64, 128, 256), layers_per_block: int = 1, norm_num_groups: int = 8) -> UNet1DModel:
    """A UNet1DModel for latents [B, latent_channels, latent_length]; checks its shape rules up front."""
    n = len(block_out_channels)
    if latent_length % 2 ** (n - 1):
        raise ValueError(f"latent length {latent_length} must be divisible by 2^(len(block_out_channels)-1) = {2 ** (n - 1)}")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {bad} are not multiples of norm_num_groups={norm_num_groups}")
    return UNet1DModel(
        sample_size=latent_length,
        in_channels=latent_channels,
        out_channels=latent_channels,
        extra_in_channels=0,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownResnetBlock1D",) * n,
        up_block_types=("UpResnetBlock1D",) * (n - 1),
        mid_block_type="MidResTemporalBlock1D",
        out_block_type="OutConv1DBlock",
        act_fn="mish",
        time_embedding_type="positional",
        use_timestep_embedding=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_num_groups=norm_num_groups,
        layers_per_block=layers_per_block,
    )
