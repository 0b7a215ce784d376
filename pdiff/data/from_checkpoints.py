"""Parameter datasets from checkpoints that already exist: your runs' files, or Hub model repos.

    pdiff import-checkpoints --from 'runs/*/model.safetensors' task=custom task.network._target_=my_model.Net ...

Every checkpoint must be a full state dict of the task's network. The chosen parameters
(`task.param.patterns`) of each become one row; the first checkpoint (or `base=`) gives the frozen
rest, exactly as `pdiff collect` stores it, so a row rebuilds as base + vector. Files are read safely:
safetensors, or `torch.load(weights_only=True)` for `.pt`/`.pth`/`.bin`, which refuses any pickle that
would run code.
"""

from __future__ import annotations

import glob
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file

from .. import hub
from ..evaluation.scoring import score_columns
from ..params import ParameterLayout, select_parameters
from ..tasks import Task
from .parameter_dataset import METRIC_COLUMNS, InvalidParameterDatasetError, ParameterDataset

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
NESTED_KEYS = ("state_dict", "model", "model_state_dict")  # where training scripts commonly put the weights


class CheckpointError(InvalidParameterDatasetError):
    """A checkpoint that cannot be read safely or does not fit the network; names the file."""


def checkpoint_files(sources: Sequence[str], revision: str | None = None) -> list[Path]:
    """Files from globs, paths and Hub model repo ids, in the order given (each glob sorted)."""
    if not sources:
        raise CheckpointError("no checkpoints given: pass files, globs or Hub model repo ids (`--from 'runs/*.safetensors'`)")
    files: list[Path] = []
    for source in sources:
        if glob.has_magic(source):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if p.endswith(SUFFIXES))
            if not matched:
                raise CheckpointError(f"no checkpoint file ({', '.join(SUFFIXES)}) matches {source!r}")
            files += matched
        elif Path(source).expanduser().is_file():
            files.append(Path(source).expanduser())
        elif Path(source).expanduser().is_dir():  # a folder is not a checkpoint: say how to take the files in it
            raise CheckpointError(f"--from {source} is a folder; pass its checkpoint files, e.g. --from '{source.rstrip('/')}/*.safetensors'")
        else:
            files.append(_hub_checkpoint(source, revision))
    repeated = next((p for i, p in enumerate(files) if p.resolve() in {q.resolve() for q in files[:i]}), None)
    if repeated is not None:  # one checkpoint twice would look like two that agree
        raise CheckpointError(f"{repeated} is given twice (--from lists it, or globs that overlap match it): give each checkpoint once")
    return files


def _hub_checkpoint(repo_id: str, revision: str | None) -> Path:
    folder = hub.download(repo_id, repo_type="model", revision=revision, allow_patterns=["*.safetensors"], what="checkpoint")
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise CheckpointError(f"the Hub repo {repo_id} holds no .safetensors file; pdiff imports only safetensors from the Hub (pickles can run code)")
    if len(found) > 1:
        raise CheckpointError(f"the Hub repo {repo_id} holds {len(found)} .safetensors files ({', '.join(p.name for p in found[:4])}); "
                              "sharded or multi-model repos are not supported: download one file and pass its path")
    return found[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, without running any code it might carry."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format; use {', '.join(SUFFIXES)}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: the error below says it all
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything that would import or call code
        raise CheckpointError(f"{path}: refused: loading it would need to unpickle code ({str(err).splitlines()[0][:160]}). "
                              "Only plain tensors are read; re-save the state dict with safetensors.torch.save_file") from None
    for key in NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel's prefix


def check_fits(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], layout: ParameterLayout) -> None:
    """The checkpoint is a state dict of exactly this network, with finite generated parameters."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else [])
        raise CheckpointError(f"{path}: not a checkpoint of this network ({'; '.join(parts)}); all checkpoints must share one architecture")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(state[name].shape)}, the network's has {tuple(tensor.shape)}")
    for name in layout.names:
        if not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf")


def import_checkpoints(sources: Sequence[str], task_config: Mapping, *, base: str | None = None, revision: str | None = None,
                       score: bool = True) -> ParameterDataset:
    """A `ParameterDataset` of the task's chosen parameters in each checkpoint (not yet saved).

    The task's data is loaded (the network's input channels and classes come from it). With `score`,
    every row is evaluated on its validation and test splits; without, those columns are NaN.
    """
    started = time.perf_counter()
    task = Task(task_config)
    files = checkpoint_files(sources, revision)
    net = task.build_network()
    expected = net.state_dict()
    layout = ParameterLayout.from_module(net, select_parameters(net, task.config["param"]["patterns"]))
    base_path = Path(base).expanduser() if base else files[0]
    base_state = read_state_dict(base_path)
    check_fits(base_path, base_state, expected, layout)
    vectors, differs = [], 0
    for path in files:
        state = base_state if path == base_path else read_state_dict(path)
        check_fits(path, state, expected, layout)
        vectors.append(layout.flatten(state))
        differs += any(not torch.equal(state[k], base_state[k]) for k in expected if k not in layout.names)
    if differs:  # p-diff assumes the rest of the network is shared; say so rather than hide it
        logger.warning("%d of %d checkpoints differ from the base (%s) outside the generated parameters; "
                       "their rows rebuild with the base's weights there", differs, len(files), base_path)
    vectors = torch.stack(vectors)
    if score:
        columns = score_columns(task.build_network(base_state), layout, vectors, task, keep=True)
    else:
        columns = {name: [float("nan")] * len(files) for name in METRIC_COLUMNS}
    columns.update(step=list(range(len(files))), seed=[0] * len(files))
    info = {"num_processes": 1, "imported_from": [str(p) for p in files], "base_checkpoint": str(base_path),
            "checkpoints_differing_outside_layout": differs, "collect_seconds": round(time.perf_counter() - started, 3),
            "in_channels": task.data.image_shape[0], "num_classes": task.data.num_classes}
    return ParameterDataset.from_vectors(vectors, columns, layout, task.config, {k: v.detach().clone() for k, v in base_state.items()}, info)
