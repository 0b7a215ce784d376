"""The parameter autoencoder: flat parameter vectors <-> a short multi-channel latent for diffusion.

A 1-D convolutional encoder/decoder over the normalised vector, as in p-diff. Training adds noise to
the input (small) and to the latent (large): the decoder learns to map a whole neighbourhood of
latents to working parameters, which is what lets diffusion samples decode into working networks.
Normalisation uses GroupNorm, so encoding and decoding never depend on the batch (the original
decoded with batch-norm in train mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..params import ParameterLayout
from .safetensors_only import SafetensorsOnly


@dataclass
class AutoencoderOutput(BaseOutput):
    """`reconstruction`: normalised parameters [B, D]; `latent`: [B, C, L] (unscaled)."""

    reconstruction: torch.Tensor
    latent: torch.Tensor | None = None  # optional, as diffusers outputs are, so Accelerate can rebuild it from a dict


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _block(c_in: int, c_out: int, groups: int, conv: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(math.gcd(groups, c_in), c_in), nn.SiLU(), conv)


class ParameterCodec(SafetensorsOnly, ModelMixin, ConfigMixin):
    """What every parameter autoencoder shares: per-position normalisation (buffers `shift`, `scale`,
    saved with the weights), the noise-augmented forward pass of p-diff, and the latent interface the
    diffusion model uses. Subclasses define `encode`, `decode` and `latent_shape`; their config holds
    `param_dim`, `input_noise`, `latent_noise`, `scaling_factor` and `normalization`."""

    def _init_normalization(self, param_dim: int, normalization: str) -> None:
        if normalization not in ("residual", "tensor"):
            raise ValueError(f"normalization={normalization!r}: use 'residual' or 'tensor'")
        self.register_buffer("shift", torch.zeros(param_dim))
        self.register_buffer("scale", torch.ones(param_dim))

    # -- normalisation ----------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalization(self, vectors: torch.Tensor, layout: ParameterLayout) -> None:
        """Set the normalisation from the training vectors [K, D]; the scale is one number per tensor.

        `tensor`: subtract each tensor's mean, divide by its std (values pooled over checkpoints and
        elements). `residual` (default): subtract the mean checkpoint, divide by each tensor's std of the
        deviations from it. Checkpoints of one trajectory differ by far less than the values within a
        tensor do, so under `tensor` the autoencoder must be accurate to ~1% of a tensor's spread
        before decoded networks work at all; `residual` makes its errors relative to the variation
        between checkpoints, which is what the generator has to learn.
        """
        vectors = vectors.to(self.shift.device, torch.float64)
        seg = layout.segment_ids().to(vectors.device)
        center = vectors.mean(0)
        for i in range(len(layout.slots)):
            cols = seg == i
            values = vectors[:, cols]
            if self.config.normalization == "tensor":
                shift, spread = values.mean().expand(int(cols.sum())), values.std()
            else:
                shift, spread = center[cols], (values - center[cols]).std()
            self.shift[cols] = shift.float()
            self.scale[cols] = float(spread.clamp_min(1e-8)) if values.numel() > 1 else 1.0

    def normalize(self, params: torch.Tensor) -> torch.Tensor:
        return (params - self.shift) / self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutput:
        """Encode and decode; in training mode with the input and latent noise of the config."""
        latent = self.encode(x, generator=generator)
        noisy = latent
        if self.training and self.config.latent_noise > 0:
            noisy = latent + _noise_like(latent, generator) * self.config.latent_noise
        return AutoencoderOutput(reconstruction=self.decode(noisy), latent=latent)

    # -- the interface diffusion uses -------------------------------------------------------
    @torch.no_grad()
    def params_to_latents(self, params: torch.Tensor) -> torch.Tensor:
        """Raw parameter vectors -> latents scaled to unit variance (what the denoiser is trained on)."""
        return self.encode(self.normalize(params), add_noise=False) * self.config.scaling_factor

    @torch.no_grad()
    def latents_to_params(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> raw parameter vectors (float32)."""
        return self.denormalize(self.decode(latents / self.config.scaling_factor).float())


class ParameterAutoencoder(ParameterCodec):
    """Encode [B, D] parameter vectors into latents [B, latent_channels, latent_length] and back.

    Each conv block halves the length; the vector is zero-padded so that the latent length is a
    multiple of `length_multiple` (the UNet1D denoiser needs it divisible by 2^(down blocks - 1)).
    Per-tensor normalisation statistics (`shift`, `scale`, one value per position) are buffers, so they
    are saved with the weights and `decode` returns parameters in their original units.
    """

    @register_to_config
    def __init__(
        self,
        param_dim: int,
        channels: Sequence[int] = (64, 128, 256),
        latent_channels: int = 4,
        input_noise: float = 1e-3,
        latent_noise: float = 1e-1,
        norm_groups: int = 8,
        length_multiple: int = 8,
        scaling_factor: float = 1.0,
        normalization: str = "residual",
    ):
        super().__init__()
        self._init_normalization(param_dim, normalization)
        channels = list(channels)
        stride_total = 2 ** len(channels)
        unit = stride_total * length_multiple
        self.padded_dim = math.ceil(param_dim / unit) * unit

        enc: list[nn.Module] = [nn.Conv1d(1, channels[0], 3, padding=1)]
        widths = [channels[0], *channels]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            enc.append(_block(c_in, c_out, norm_groups, nn.Conv1d(c_in, c_out, 4, stride=2, padding=1)))
        enc.append(_block(channels[-1], latent_channels, norm_groups, nn.Conv1d(channels[-1], latent_channels, 3, padding=1)))
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv1d(latent_channels, channels[-1], 3, padding=1)]
        rev = widths[::-1]
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            dec.append(_block(c_in, c_out, norm_groups, nn.ConvTranspose1d(c_in, c_out, 4, stride=2, padding=1)))
        dec.append(_block(channels[0], 1, norm_groups, nn.Conv1d(channels[0], 1, 3, padding=1)))
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.latent_channels, self.padded_dim // 2 ** len(self.config.channels)

    # -- encoder / decoder on normalised vectors -------------------------------------------
    def encode(self, x: torch.Tensor, add_noise: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised vectors [B, D] -> latents [B, C, L]; input noise is added in training mode by default."""
        add_noise = self.training if add_noise is None else add_noise
        if add_noise and self.config.input_noise > 0:
            x = x + _noise_like(x, generator) * self.config.input_noise
        x = nn.functional.pad(x, (0, self.padded_dim - x.shape[-1]))
        return self.encoder(x.unsqueeze(1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, L] -> normalised vectors [B, D]."""
        return self.decoder(latent).squeeze(1)[:, : self.config.param_dim]

    def activation_bytes(self, batch: int) -> int:
        """One training step's memory, roughly: about 7 float32 tensors of width x length per encoder block
        and sample (fitted to `pdiff bench --memory-by-dim`: 1.6 to 19.6 GB above the process's baseline
        for D = 24k to 300k, batch 50, within 5%)."""
        widths = [self.config.channels[0], *self.config.channels]
        per_sample = sum(c * (self.padded_dim >> i) for i, c in enumerate(widths))
        return int(4 * 7.2 * batch * per_sample)
