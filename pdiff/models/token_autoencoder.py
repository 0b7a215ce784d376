"""The token autoencoder: whole networks as chunks of their tensors, with memory linear in D and small.

The conv autoencoder runs its first layers at the full length D with tens of channels, so one training
step needs batch x D x width activations: 20.5 GB at D = 300,000 with the paper's widths. Here every
tensor of the layout (normalised as for the conv autoencoder) is cut into chunks of `chunk_size`
numbers that never cross a tensor boundary (a tensor's last chunk is zero-padded). One MLP, shared by
all chunks, plus a learned embedding of the chunk's position (which tensor, which offset: one per
token) encodes each chunk into `latent_channels` numbers; the tokens, in layout order, are the
[latent_channels, tokens] sequence the UNet1D denoises, and the decoder maps each token back to its
chunk. Activations are batch x tokens x hidden = batch x (D / chunk_size) x hidden. (SANE tokenises
per neuron and RPG per layer; fixed-size chunks keep one MLP for every tensor shape.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)
from torch import nn

from .autoencoder import ParameterCodec, _noise_like


def chunk_index(tensor_sizes: Sequence[int], chunk_size: int) -> torch.Tensor:
    """[tokens, chunk_size]: the vector position each token slot reads; sum(tensor_sizes) marks padding.
    Every token lies inside one tensor."""
    dim, rows, offset = sum(tensor_sizes), [], 0
    for size in tensor_sizes:
        for lo in range(0, size, chunk_size):
            positions = list(range(offset + lo, offset + min(lo + chunk_size, size)))
            rows.append(positions + [dim] * (chunk_size - len(positions)))
        offset += size
    return torch.tensor(rows, dtype=torch.long)


def _mlp(hidden: int, d_out: int) -> nn.Sequential:
    """The layers after the input projection (to which the position embedding is added)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class TokenAutoencoder(ParameterCodec):
    """Encode [B, D] parameter vectors into [B, latent_channels, tokens (padded)] latents, chunk by chunk."""

    @register_to_config
    def __init__(
        self,
        param_dim: int,
        tensor_sizes: Sequence[int],
        chunk_size: int = 64,
        hidden: int = 128,
        latent_channels: int = 4,
        input_noise: float = 1e-3,
        latent_noise: float = 1e-1,
        length_multiple: int = 8,
        scaling_factor: float = 1.0,
        normalization: str = "residual",
    ):
        super().__init__()
        if sum(tensor_sizes) != param_dim:
            raise ValueError(f"the tensor sizes add up to {sum(tensor_sizes)}, not param_dim={param_dim}: this autoencoder is for another layout")
        if chunk_size < 1 or hidden < 1 or latent_channels < 1:
            raise ValueError(f"chunk_size ({chunk_size}), hidden ({hidden}) and latent_channels ({latent_channels}) must be positive")
        self._init_normalization(param_dim, normalization)
        index = chunk_index(tensor_sizes, chunk_size)
        self.num_tokens = len(index)
        self.register_buffer("token_index", index, persistent=False)  # rebuilt from the config, never stored
        self.register_buffer("valid_slots", (index.flatten() < param_dim).nonzero().flatten(), persistent=False)
        self.encoder_in, self.encoder_position = nn.Linear(chunk_size, hidden), nn.Embedding(self.num_tokens, hidden)
        self.encoder = _mlp(hidden, latent_channels)
        self.decoder_in, self.decoder_position = nn.Linear(latent_channels, hidden), nn.Embedding(self.num_tokens, hidden)
        self.decoder = _mlp(hidden, chunk_size)

    @property
    def latent_shape(self) -> tuple[int, int]:
        multiple = self.config.length_multiple
        return self.config.latent_channels, math.ceil(self.num_tokens / multiple) * multiple

    def encode(self, x: torch.Tensor, add_noise: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised vectors [B, D] -> latents [B, C, L]; input noise is added in training mode by default."""
        add_noise = self.training if add_noise is None else add_noise
        if add_noise and self.config.input_noise > 0:
            x = x + _noise_like(x, generator) * self.config.input_noise
        chunks = nn.functional.pad(x, (0, 1))[:, self.token_index]  # [B, T, chunk]; the pad slot reads a zero
        tokens = self.encoder(self.encoder_in(chunks) + self.encoder_position.weight)  # [B, T, C]
        return nn.functional.pad(tokens.transpose(1, 2), (0, self.latent_shape[1] - self.num_tokens))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, L] -> normalised vectors [B, D]."""
        tokens = latent[:, :, : self.num_tokens].transpose(1, 2)
        chunks = self.decoder(self.decoder_in(tokens) + self.decoder_position.weight)  # [B, T, chunk]
        return chunks.flatten(1)[:, self.valid_slots]

    def activation_bytes(self, batch: int) -> int:
        """A rough upper bound of one training step's activation memory (forward + backward), float32."""
        per_token = self.config.chunk_size * 3 + self.config.hidden * 8 + self.config.latent_channels * 2
        return 4 * 2 * batch * self.num_tokens * per_token
