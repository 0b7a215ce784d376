"""The parameter layout: which tensors of a network make up one generated vector, and where.

A layout is the contract between a network and the flat float32 vectors that pdiff collects,
learns and generates. It is plain data (names, shapes, offsets) so it can live in JSON beside a
dataset or a generator, and every conversion between a vector and a state dict goes through it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


class LayoutMismatchError(ValueError):
    """A vector, state dict or network does not fit a parameter layout."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


class ParameterLayout:
    """Names, shapes and offsets of the tensors that form one flat parameter vector."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError("names and shapes must have the same length")
        if not names:
            raise ValueError("a parameter layout needs at least one tensor")
        slots, offset = [], 0
        for name, shape in zip(names, shapes):
            slot = TensorSlot(str(name), tuple(int(s) for s in shape), offset)
            slots.append(slot)
            offset = slot.end
        self.slots: tuple[TensorSlot, ...] = tuple(slots)
        self.dim = offset

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, names: Iterable[str]) -> "ParameterLayout":
        params = dict(module.named_parameters())
        names = list(names)
        missing = [n for n in names if n not in params]
        if missing:
            raise LayoutMismatchError(f"{type(module).__name__} has no parameters named {missing}")
        return cls(names, [params[n].shape for n in names])

    def to_dict(self) -> dict:
        return {"dim": self.dim, "tensors": [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.slots]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ParameterLayout":
        layout = cls([t["name"] for t in data["tensors"]], [t["shape"] for t in data["tensors"]])
        if "dim" in data and int(data["dim"]) != layout.dim:
            raise LayoutMismatchError(f"layout says dim={data['dim']} but its tensors add up to {layout.dim}")
        return layout

    # -- conversions ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def flatten(self, tensors: Mapping[str, torch.Tensor] | nn.Module) -> torch.Tensor:
        """Concatenate the layout's tensors (from a state dict or a module) into one float32 vector."""
        if isinstance(tensors, nn.Module):
            tensors = dict(tensors.named_parameters())
        parts = []
        for slot in self.slots:
            if slot.name not in tensors:
                raise LayoutMismatchError(f"missing tensor {slot.name!r} (layout has {self.names})")
            t = tensors[slot.name]
            if tuple(t.shape) != slot.shape:
                raise LayoutMismatchError(f"{slot.name}: expected shape {slot.shape}, got {tuple(t.shape)}")
            parts.append(t.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts)

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector [D] or a batch [B, D] into named tensors ([*shape] or [B, *shape]); views, no copy."""
        self.check_vectors(vectors)
        lead = vectors.shape[:-1]
        return {s.name: vectors[..., s.offset : s.end].reshape(*lead, *s.shape) for s in self.slots}

    @torch.no_grad()
    def load_into(self, module: nn.Module, vector: torch.Tensor) -> nn.Module:
        """Copy one vector [D] into the module's layout parameters (in place); returns the module."""
        self.check_module(module)
        params = dict(module.named_parameters())
        for name, value in self.unflatten(vector.detach().to(torch.float32)).items():
            params[name].copy_(value)
        return module

    def check_vectors(self, vectors: torch.Tensor) -> None:
        if vectors.ndim not in (1, 2) or vectors.shape[-1] != self.dim:
            raise LayoutMismatchError(
                f"expected parameter vectors of shape [D] or [B, D] with D={self.dim} "
                f"({len(self.slots)} tensors: {', '.join(self.names[:6])}{', ...' if len(self.slots) > 6 else ''}), "
                f"got shape {tuple(vectors.shape)}"
            )

    def check_module(self, module: nn.Module) -> None:
        """Raise if the module's parameters don't have the layout's names and shapes."""
        params = dict(module.named_parameters())
        for slot in self.slots:
            if slot.name not in params:
                raise LayoutMismatchError(
                    f"the network has no parameter {slot.name!r}; the layout does not belong to this network"
                )
            if tuple(params[slot.name].shape) != slot.shape:
                raise LayoutMismatchError(
                    f"{slot.name}: the layout says {slot.shape}, the network has {tuple(params[slot.name].shape)}"
                )

    def segment_ids(self) -> torch.Tensor:
        """For each of the D positions, the index of the tensor it belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.slots)), torch.tensor([s.numel for s in self.slots]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParameterLayout) and self.slots == other.slots

    def __repr__(self) -> str:
        return f"ParameterLayout(dim={self.dim}, tensors={len(self.slots)})"


def select_parameters(module: nn.Module, patterns: Sequence[str] | str) -> list[str]:
    """Names of the module's parameters matching any of the exact names or glob patterns, in module order.

    A pattern that matches nothing is an error that lists what there is to choose from, because a typo
    here would otherwise silently generate the wrong part of the network.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no parameters selected: give task.param.patterns, e.g. ['layer4.1.bn*']")
    names = [n for n, _ in module.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        matched = {n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)}
        if not matched:
            raise ValueError(
                f"parameter pattern {pattern!r} matches nothing in {type(module).__name__}. "
                f"Its parameters are:\n  " + "\n  ".join(names)
            )
        chosen |= matched
    return [n for n in names if n in chosen]
