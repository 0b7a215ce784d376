"""What an evaluation takes in: generated vectors from a tensor, a tensor file, a folder of networks
(`pdiff sample`) or a parameter dataset, checked against the originals' layout and frozen base weights
before any work starts.

A bare [N, D] tensor names no network, so only its shape can be checked; the other inputs carry their
network, and vectors built on other frozen weights than the originals' are refused.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data import ParameterDataset

NETWORKS_FILE = "pdiff_networks.json"  # marks a folder written by `pdiff sample` (see pdiff.sampling)


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
    check_base_network(originals, other.layout, other.base_state, "the generated parameter dataset")


def check_base_network(originals: ParameterDataset, layout, base_state, what: str) -> None:
    """Raise unless `layout` and `base_state` (of a generator or a dataset) are the originals' own."""
    if layout != originals.layout:
        raise ValueError(f"{what} has layout {layout} ({layout.names}), the originals {originals.layout} ({originals.layout.names})")
    keys = set(originals.base_state)
    if set(base_state) != keys or any(not torch.equal(originals.base_state[k], base_state[k].cpu()) for k in keys):
        raise ValueError(
            f"{what} was built on different frozen base weights than the originals "
            "(e.g. collected with another seed), so its vectors do not belong to the originals' network"
        )


def load_generated(path: str | os.PathLike, originals: ParameterDataset) -> torch.Tensor:
    """Generated vectors from a parameter dataset (folder or Hub id), a `pdiff sample` folder of networks,
    or a tensor file (.pt, .safetensors, .npy)."""
    p = Path(path)
    if p.is_dir() and (p / NETWORKS_FILE).exists():
        return networks_folder_vectors(p, originals)
    if p.is_file() and p.suffix.lower() in (".pt", ".pth", ".safetensors", ".npy"):
        return as_vectors(_tensor_file(p), originals)
    if p.is_file():
        raise ValueError(f"{p}: give a parameter dataset folder, a `pdiff sample` folder, or a .pt/.safetensors/.npy [N, D] tensor")
    return as_vectors(ParameterDataset.from_pretrained(path), originals)


def _tensor_file(p: Path) -> torch.Tensor:
    try:
        if p.suffix.lower() == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False))
        if p.suffix.lower() == ".safetensors":
            tensors = load_file(str(p))
            if len(tensors) != 1:
                raise ValueError(f"{p} holds {len(tensors)} tensors ({sorted(tensors)}); expected one [N, D] tensor")
            return next(iter(tensors.values()))
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing one: the error says enough
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            vectors = torch.load(p, map_location="cpu", weights_only=True)  # weights only: no pickled code runs
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        raise ValueError(f"{p} cannot be read as an [N, D] tensor ({' '.join(str(err).split())[:200]})") from err
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"{p} does not hold a tensor (got {type(vectors).__name__}); save an [N, D] tensor with torch.save")
    return vectors


def networks_folder_vectors(folder: Path, originals: ParameterDataset) -> torch.Tensor:
    """The layout's part of every `network-*.safetensors` that `pdiff sample` wrote; the rest of each
    network must be the originals' frozen base weights."""
    files = sorted(folder.glob("network-*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no network-*.safetensors files; sample again with `pdiff sample`")
    layout, frozen = originals.layout, {k: v for k, v in originals.base_state.items() if k not in originals.layout.names}
    vectors = []
    for file in files:
        try:
            state = load_file(str(file))
        except SafetensorError as err:
            raise ValueError(f"{file} is not a valid safetensors file ({err})") from err
        changed = [k for k, v in frozen.items() if k not in state or state[k].shape != v.shape or not torch.equal(state[k], v)]
        if changed:
            raise ValueError(f"{file} was generated for other frozen base weights than the original parameter dataset's "
                             f"({changed[0]} differs), so its parameters do not belong to the originals' network")
        vectors.append(layout.flatten(state))
    return as_vectors(torch.stack(vectors), originals)
