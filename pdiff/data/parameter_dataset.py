"""Parameter datasets: K checkpoints of a network's chosen parameters, as a Hugging Face dataset.

On disk a parameter dataset is one folder that alone rebuilds working networks:

    <dir>/data-*.arrow, dataset_info.json, state.json   `Dataset.save_to_disk`: one row per checkpoint
    <dir>/pdiff_dataset.json                             layout (names, shapes, offsets) + resolved task config
    <dir>/base_model.safetensors                         the frozen weights of the rest of the network

On the Hub the rows are Parquet under `data/`, beside the same two files and a dataset card, so that
`datasets.load_dataset(repo_id)` reads the rows and `ParameterDataset.from_pretrained` reads it all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import hub
from ..io import atomic_directory, read_json, write_json
from ..params import LayoutMismatchError, ParameterLayout
from ..tasks import Task
from ..tasks.networks import check_network_trust

METADATA_FILE = "pdiff_dataset.json"
BASE_WEIGHTS_FILE = "base_model.safetensors"
FORMAT_VERSION = 1
METRIC_COLUMNS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")


class InvalidParameterDatasetError(ValueError):
    """A parameter dataset that is incomplete, corrupt or does not fit its task."""


def parameter_features(dim: int) -> datasets.Features:
    return datasets.Features(
        {
            "params": datasets.List(datasets.Value("float32"), length=dim),
            "step": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            **{name: datasets.Value("float64") for name in METRIC_COLUMNS},
        }
    )


class ParameterDataset:
    """Rows of flat parameter vectors plus what is needed to turn each one back into a network."""

    def __init__(self, rows: datasets.Dataset, layout: ParameterLayout, task_config: Mapping[str, Any], base_state: Mapping[str, torch.Tensor], info: Mapping[str, Any] | None = None):
        self.rows = rows
        self.layout = layout
        self.task_config = dict(task_config)
        self.base_state = dict(base_state)
        self.info = dict(info or {})
        self._vectors: torch.Tensor | None = None
        feature = rows.features.get("params")
        if feature is None or getattr(feature, "length", None) != layout.dim:
            raise InvalidParameterDatasetError(
                f"the `params` column has length {getattr(feature, 'length', None)} but the layout needs {layout.dim}"
            )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_vectors(cls, vectors: torch.Tensor, columns: Mapping[str, Sequence], layout: ParameterLayout, task_config: Mapping[str, Any], base_state: Mapping[str, torch.Tensor], info: Mapping[str, Any] | None = None) -> "ParameterDataset":
        layout.check_vectors(vectors)
        data = {"params": vectors.detach().cpu().to(torch.float32).numpy()}
        for name in parameter_features(layout.dim):
            if name != "params":
                data[name] = list(columns[name])
        rows = datasets.Dataset.from_dict(data, features=parameter_features(layout.dim))
        return cls(rows, layout, task_config, base_state, info)

    # -- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.rows.num_rows

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def vectors(self) -> torch.Tensor:
        """All K vectors as one float32 tensor [K, D], exactly the stored values (read once, then cached)."""
        if self._vectors is None:
            table = self.rows.with_format("numpy")["params"]
            self._vectors = torch.from_numpy(np.ascontiguousarray(np.asarray(table, dtype=np.float32)).reshape(len(self), self.dim))
            self._vectors.requires_grad_(False)
        return self._vectors

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.rows[name])

    @property
    def task(self) -> Task:
        return Task(self.task_config)

    def build_network(self, index: int | None = None, vector: torch.Tensor | None = None, task: Task | None = None) -> torch.nn.Module:
        """The network of row `index` (or of any `vector` in this layout), in eval mode, on the CPU."""
        if vector is None:
            vector = self.vectors[index]
        return (task or self.task).build_network(self.base_state, self.layout, vector)

    def validate(self) -> None:
        """Raise if any vector holds NaN or Inf: a generator trained on them would learn garbage."""
        vectors = self.vectors
        bad = ~torch.isfinite(vectors)
        if bad.any():
            rows = torch.nonzero(bad.any(1)).flatten().tolist()
            raise InvalidParameterDatasetError(
                f"{len(rows)} of {len(self)} parameter vectors contain NaN or Inf (rows {rows[:10]}"
                f"{', ...' if len(rows) > 10 else ''}); drop them (`rows.filter`) or collect again"
            )

    def check_task(self, task: Task) -> None:
        """Raise if this dataset's layout does not fit the task's network."""
        try:
            self.layout.check_module(task.build_network())
        except LayoutMismatchError as err:
            raise InvalidParameterDatasetError(
                f"this parameter dataset (task {self.task_config.get('name')!r}, D={self.dim}) does not fit task "
                f"{task.name!r}: {err}. Train with the task the dataset was collected on."
            ) from err

    # -- saving ---------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {"format_version": FORMAT_VERSION, "layout": self.layout.to_dict(), "task": self.task_config, "info": self.info}

    def _write_sidecars(self, folder: Path) -> None:
        write_json(folder / METADATA_FILE, self._metadata())
        save_file({k: v.contiguous() for k, v in self.base_state.items()}, str(folder / BASE_WEIGHTS_FILE))

    def save_to_disk(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the dataset folder atomically: it appears under `path` complete, or not at all."""
        with atomic_directory(path, overwrite) as tmp:
            self.rows.save_to_disk(str(tmp))
            self._write_sidecars(tmp)
        return Path(path)

    def save_for_hub(self, folder: str | os.PathLike) -> Path:
        """Lay out the Hub repository: Parquet rows, layout/task JSON, base weights, dataset card."""
        folder = Path(folder)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.rows.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        self._write_sidecars(folder)
        self.dataset_card().save(folder / "README.md")
        return folder

    def dataset_card(self):
        return hub.dataset_card(self)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None, commit_message: str = "Upload pdiff parameter dataset") -> str:
        """Create the dataset repo and upload rows, sidecars and card in one commit; returns the commit URL."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_for_hub(tmp)
            return hub.upload(tmp, repo_id, repo_type="dataset", private=private, token=token, commit_message=commit_message)

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, revision: str | None = None, token: str | None = None,
                        trust_network_code: bool = False) -> "ParameterDataset":
        """Load from a folder written by `save_to_disk` / `save_for_hub`, or from a Hub dataset repo (whose
        network, if it is user code, is built only with `trust_network_code=True`)."""
        folder = Path(path_or_repo)
        if not folder.exists():
            folder = hub.download(str(path_or_repo), repo_type="dataset", revision=revision, token=token, allow_patterns=hub.DATASET_DOWNLOAD_PATTERNS)
            trusted = trust_network_code
        elif not folder.is_dir():
            raise InvalidParameterDatasetError(f"{folder} is a file; a parameter dataset is a folder written by `pdiff collect`")
        else:
            trusted = True  # the user's own folder
        dataset = cls._load_folder(folder)
        check_network_trust(dataset.task_config.get("network") or {}, f"the parameter dataset {path_or_repo}", trusted)
        return dataset

    @classmethod
    def _load_folder(cls, folder: Path) -> "ParameterDataset":
        meta_path = folder / METADATA_FILE
        if not meta_path.exists():
            raise InvalidParameterDatasetError(
                f"{folder} is not a pdiff parameter dataset: {METADATA_FILE} is missing. Create one with `pdiff collect`."
            )
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or "format_version" not in meta:
            raise InvalidParameterDatasetError(f"{meta_path} is damaged: it holds no format_version (pdiff writes one); collect or import the dataset again")
        if meta.get("format_version") != FORMAT_VERSION:
            raise InvalidParameterDatasetError(f"{folder}: format version {meta.get('format_version')} is not {FORMAT_VERSION}; upgrade pdiff")
        rows = _load_rows(folder)
        if rows.num_rows == 0:
            raise InvalidParameterDatasetError(f"{folder} holds no checkpoints (0 rows); collect again with task.param.k >= 2")
        weights = folder / BASE_WEIGHTS_FILE
        if not weights.exists():
            raise InvalidParameterDatasetError(f"{folder}: {BASE_WEIGHTS_FILE} is missing, so no network can be rebuilt")
        try:
            base_state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise InvalidParameterDatasetError(f"{weights} is not a valid safetensors file ({err})") from err
        try:
            layout = ParameterLayout.from_dict(meta["layout"])
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidParameterDatasetError(f"{meta_path}: the layout is damaged ({err}); collect again") from err
        return cls(rows, layout, meta["task"], base_state, meta.get("info"))


def _load_rows(folder: Path) -> datasets.Dataset:
    """The rows, from `save_to_disk` Arrow files or Hub Parquet files; a damaged file names the folder."""
    try:
        if (folder / "state.json").exists():
            if not read_json(folder / "state.json").get("_data_files", True):  # `save_to_disk` of no rows
                return datasets.Dataset.from_dict({})
            return datasets.load_from_disk(str(folder))
        files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
        if not files:
            raise InvalidParameterDatasetError(f"{folder} holds no rows (no state.json, no data/*.parquet)")
        return datasets.Dataset.from_parquet(files)
    except InvalidParameterDatasetError:
        raise
    except Exception as err:  # pyarrow / datasets raise many types for truncated or foreign files
        raise InvalidParameterDatasetError(f"the rows in {folder} cannot be read ({type(err).__name__}: {err}); the files are damaged, collect again") from err
