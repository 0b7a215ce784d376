"""What an evaluation takes in: generated vectors from a tensor, a tensor file or a parameter dataset,
checked against the originals' layout and frozen base weights before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data import ParameterDataset


def as_vectors(generated: torch.Tensor | ParameterDataset, originals: ParameterDataset) -> torch.Tensor:
    """Generated vectors as a float32 CPU tensor [N, D], checked against the originals' layout."""
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


def load_generated(path: str | os.PathLike, originals: ParameterDataset) -> torch.Tensor:
    """Generated vectors from a parameter dataset (folder or Hub id) or a tensor file (.pt, .safetensors, .npy)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not (p.is_file() and suffix in (".pt", ".pth", ".safetensors", ".npy")):
        return as_vectors(ParameterDataset.from_pretrained(path), originals)
    if suffix == ".npy":
        vectors = torch.from_numpy(np.load(p))
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if len(tensors) != 1:
            raise ValueError(f"{p} holds {len(tensors)} tensors ({sorted(tensors)}); expected one [N, D] tensor")
        vectors = next(iter(tensors.values()))
    else:
        vectors = torch.load(p, map_location="cpu", weights_only=True)  # weights only: no pickled code runs
        if not isinstance(vectors, torch.Tensor):
            raise ValueError(f"{p} does not hold a tensor (got {type(vectors).__name__}); save an [N, D] tensor with torch.save")
    return as_vectors(vectors, originals)
