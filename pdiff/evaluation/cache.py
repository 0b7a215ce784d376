"""Scores of the reference networks (originals, weight average, noise copies), kept between reports.

Every report against a parameter dataset scores the same reference networks again: for whole networks on
a CPU that is most of its time (1,400 of the 1,750 networks of a training report). A network's scores
depend only on its parameters and on the evaluation context (the base network, the split's images and
labels, the task, batch size, device type and library versions), so they are stored per network and
split, under a hash of both, as safetensors. A later report (`pdiff evaluate` after `pdiff train`, a
sweep's next trial) reads them instead of scoring again; anything that differs misses and is scored.

The folder is `$PDIFF_CACHE` (default `~/.cache/pdiff`, or `$XDG_CACHE_HOME/pdiff`), `scores/` below
it; `PDIFF_CACHE=off` scores everything afresh. Each file is written whole and renamed into place, and
one that cannot be read is scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SCHEMA = 1  # bump when what a score means changes


def cache_root() -> Path | None:
    """The score cache's folder, or None when PDIFF_CACHE=off."""
    configured = os.environ.get("PDIFF_CACHE")
    if configured and configured.lower() in ("off", "0", "false", "none"):
        return None
    if configured:
        if Path(configured).expanduser().is_file():
            raise NotADirectoryError(f"PDIFF_CACHE={configured} is a file: point it at a folder (or PDIFF_CACHE=off)")
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pdiff"


def tensor_digest(h, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to the hash `h`."""
    tensor = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.view(torch.uint8).numpy().tobytes())


def state_dict_digest(h, state_dict) -> None:
    """Feed every tensor of a state dict, with its name, to the hash `h` (in name order)."""
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        tensor_digest(h, tensor)


def context_digest(task_config: dict, network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   batch_size: int, device: torch.device) -> str:
    """Everything besides the parameters that a network's scores on one split depend on."""
    import pdiff

    # task.eval says how reports are made (its batch size is counted on its own); a network's score
    # does not depend on the noise baseline's settings, so changing them keeps the kept scores.
    task_config = {key: value for key, value in task_config.items() if key != "eval"}
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SCHEMA, "pdiff": pdiff.__version__, "torch": torch.__version__, "device": device.type,
                         "batch_size": batch_size, "task": task_config, "network": type(network).__qualname__},
                        sort_keys=True, default=str).encode())
    state_dict_digest(h, network.state_dict())
    tensor_digest(h, images)
    tensor_digest(h, labels)
    return h.hexdigest()


class ScoreCache:
    """Per-network scores on one split of one evaluation context (`context_digest`)."""

    def __init__(self, root: Path, context: str):
        self.folder = root / "scores" / context[:32]

    def keys(self, vectors: torch.Tensor) -> list[str]:
        keys = []
        for row in vectors:
            h = hashlib.sha256()
            tensor_digest(h, row)
            keys.append(h.hexdigest())
        return keys

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / key[:2] / f"{key}.safetensors"
        try:
            return load_file(str(path)) if path.exists() else None
        except (SafetensorError, OSError, ValueError):
            return None  # unreadable (a disk problem, a foreign file): score the network again

    def store(self, key: str, scores: dict[str, torch.Tensor]) -> None:
        path = self.folder / key[:2] / f"{key}.safetensors"
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.clone() for k, v in scores.items()}, str(partial))
            os.replace(partial, path)
        except OSError:  # a cache that cannot be written (read-only home, full disk) only costs time
            partial.unlink(missing_ok=True)
