"""Image-classification data for a task, held as tensors with fixed train / validation / test splits.

The parameter datasets pdiff trains on are tiny; the image data they are evaluated on is not, so it is
loaded once into uint8 tensors (CIFAR-10 is 150 MB that way) and normalised batch by batch. The
validation split is carved out of the training data with a fixed seed: generators are selected on it,
and the test split is only ever reported.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..io import atomic_file

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path(os.environ.get("PDIFF_DATA_DIR", Path.home() / ".cache" / "pdiff" / "data"))


class DataNotFoundError(FileNotFoundError):
    """A task's data is not on disk and cannot be downloaded."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class TaskData:
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # per channel, in [0, 1] units
    std: torch.Tensor
    max_value: float  # what a pixel value of 1.0 is stored as (255, or 16 for digits)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: use train, val or test")
        return getattr(self, name)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32 network inputs, on the images' device."""
        x = images.to(torch.float32) / self.max_value
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def load_data(cfg: Mapping[str, Any]) -> TaskData:
    """Load the data a task config describes (`task.data`)."""
    source = cfg["source"]
    loaders = {"digits": _load_digits, "torchvision": _load_torchvision, "hub": _load_hub, "fake": _load_fake}
    if source not in loaders:
        raise ValueError(f"unknown data source {source!r}: choose one of {sorted(loaders)}")
    train, test, max_value, num_classes = loaders[source](cfg)
    if cfg.get("test_size") is not None and int(cfg["test_size"]) < len(test):  # a fixed random subset: faster scoring
        keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))[: int(cfg["test_size"])]
        test = Split(test.images[keep], test.labels[keep])
    train, val = _carve_validation(train, _validation_count(cfg["val_size"], len(train)), int(cfg.get("split_seed", 0)))
    mean, std = _channel_stats(train.images, max_value)
    return TaskData(train, val, test, num_classes, mean, std, max_value)


# -- sources ---------------------------------------------------------------------------------


def _load_digits(cfg):
    """scikit-learn's bundled 8x8 digits (1,797 images): the default task, no download needed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))
    n_test = int(cfg["test_size"])
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train]), Split(images[test], labels[test]), 16.0, 10


_TORCHVISION = {"FashionMNIST": 10, "MNIST": 10, "KMNIST": 10, "CIFAR10": 10, "CIFAR100": 100}


def _load_torchvision(cfg):
    import torchvision

    name = cfg["name"]
    if name not in _TORCHVISION:
        raise ValueError(f"unsupported torchvision dataset {name!r}: choose one of {sorted(_TORCHVISION)}")
    root = Path(os.path.expanduser(str(cfg.get("root") or DEFAULT_ROOT)))
    if name == "FashionMNIST":
        _stage_debian_fashion_mnist(root)
    cls = getattr(torchvision.datasets, name)
    download = cfg.get("download", "auto")
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as err:  # torchvision says "Dataset not found"
        if download is False or download == "never":
            raise DataNotFoundError(_missing_data_message(name, root)) from err
        try:
            train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
        except Exception as err2:  # no network: say how to get the files instead of a urllib trace
            raise DataNotFoundError(_missing_data_message(name, root) + f"\n(download failed: {err2})") from err2
    return _torchvision_split(train), _torchvision_split(test), 255.0, _TORCHVISION[name]


def _torchvision_split(ds) -> Split:
    images = torch.as_tensor(np.asarray(ds.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # NHWC -> NCHW
    return Split(images.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))


def _stage_debian_fashion_mnist(root: Path) -> None:
    """Offline, use the files of Debian's `dataset-fashion-mnist` package where torchvision looks for them."""
    raw = root / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / n).exists() for n in names) or not DEBIAN_FASHION_MNIST.is_dir():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        src = DEBIAN_FASHION_MNIST / f"{n}.gz"
        if src.exists() and not (raw / n).exists():
            # Under `accelerate launch` every rank stages at once: each writes its own temporary file.
            with atomic_file(raw / n) as tmp, gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def _missing_data_message(name: str, root: Path) -> str:
    msg = f"{name} was not found under {root} and could not be downloaded."
    if name == "FashionMNIST":
        msg += (
            "\nOffline, install the Debian package (`apt-get install dataset-fashion-mnist`) and pdiff finds it, "
            f"or put the four IDX files into {root / 'FashionMNIST' / 'raw'}."
        )
    else:
        msg += f"\nDownload it once with network access (torchvision.datasets.{name}('{root}', download=True)), or set task.data.root."
    return msg


def _load_hub(cfg):
    """Any image-classification dataset from the Hub (by name) or a local folder, via `datasets.load_dataset`."""
    import datasets

    if not cfg.get("name"):
        raise DataNotFoundError("this task's images were a local folder on the machine that made it, and generators do not record "
                                "where: pass the folder (or Hub id) with `--data PATH` or `task.data.name=PATH`")
    kwargs = {k: cfg[k] for k in ("revision", "data_dir") if cfg.get(k)}
    saved = Path(os.path.expanduser(cfg["name"]))
    if (saved / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        ds = datasets.load_from_disk(str(saved))
    else:  # a Hub id, or a local folder load_dataset reads (imagefolder, csv, parquet, ...)
        ds = datasets.load_dataset(cfg["name"], **kwargs)
    image_col, label_col = cfg.get("image_column", "image"), cfg.get("label_column", "label")
    test_split = cfg.get("test_split", "test")
    if test_split not in ds:
        raise ValueError(f"{cfg['name']} has splits {list(ds)}; set task.data.test_split to one of them")
    train_split = cfg.get("train_split", "train")
    if train_split not in ds:
        raise ValueError(f"{cfg['name']} has splits {list(ds)}; set task.data.train_split to one of them")
    first = ds[train_split][0][image_col] if image_col in ds[train_split].column_names else None
    # One channel layout for all images: grayscale stays grayscale, anything else (RGBA, CMYK, P) becomes RGB.
    mode = "L" if getattr(first, "mode", None) in ("L", "1") else "RGB"
    train = _hub_split(ds[train_split], image_col, label_col, cfg.get("image_size"), mode)
    test = _hub_split(ds[test_split], image_col, label_col, cfg.get("image_size"), mode)
    feature = ds[train_split].features[label_col]
    num_classes = getattr(feature, "num_classes", None) or int(max(train.labels.max(), test.labels.max())) + 1
    return train, test, 255.0, num_classes


def _hub_split(ds, image_col: str, label_col: str, size, mode: str = "RGB") -> Split:
    for col in (image_col, label_col):
        if col not in ds.column_names:
            raise ValueError(f"column {col!r} not in dataset columns {ds.column_names}; set task.data.image_column/label_column")
    images = []
    for img in ds[image_col]:
        img = img.convert(mode)
        if size:
            img = img.resize((int(size), int(size)))
        arr = np.asarray(img, dtype=np.uint8)
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    sizes = sorted({a.shape[1:] for a in images})
    if len(sizes) > 1:
        raise ValueError(f"the images come in {len(sizes)} sizes ({', '.join(f'{h}x{w}' for h, w in sizes[:4])}, ...); "
                         "set task.data.image_size to resize them to one square size")
    return Split(torch.from_numpy(np.stack(images)), torch.as_tensor(ds[label_col], dtype=torch.int64))


def _load_fake(cfg):
    """A synthetic, learnable dataset of any image shape: class prototypes plus noise.

    Used to exercise code paths (CIFAR-shaped ResNet-18) whose real data cannot be downloaded here.
    """
    c, h, w = (int(s) for s in cfg["image_shape"])
    num_classes = int(cfg["num_classes"])
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    prototypes = torch.rand(num_classes, c, h, w, generator=gen) * 255

    def make(n: int) -> Split:
        labels = torch.randint(num_classes, (n,), generator=gen)
        noise = torch.randn(n, c, h, w, generator=gen) * float(cfg.get("noise", 60.0))
        return Split((prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    return make(int(cfg["train_size"])), make(int(cfg["test_size"])), 255.0, num_classes


# -- helpers ---------------------------------------------------------------------------------


def _validation_count(val_size: float, num_train: int) -> int:
    """`task.data.val_size`: a count of training images, or below 1 a fraction of them (at least one)."""
    if val_size < 1:
        return max(1, round(val_size * num_train))
    if val_size != int(val_size):
        raise ValueError(f"task.data.val_size={val_size}: give a whole number of images or a fraction below 1")
    return int(val_size)


def _carve_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    if not 0 < val_size < len(train):
        raise ValueError(f"task.data.val_size={val_size} must be between 1 and the training set size - 1 ({len(train) - 1})")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    val, rest = order[:val_size], order[val_size:]
    return Split(train.images[rest], train.labels[rest]), Split(train.images[val], train.labels[val])


def _channel_stats(images: torch.Tensor, max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.to(torch.float64) / max_value
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.float(), std.float()
