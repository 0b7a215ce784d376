"""Tasks: data with fixed train/val/test splits, the networks, and a network rebuilt from a vector."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import pdiff.tasks.data as task_data
from pdiff.config import load_config, to_dict
from pdiff.params import LayoutMismatchError, ParameterLayout, select_parameters
from pdiff.tasks import DataNotFoundError, ResNet18CIFAR, SmallCNN, Task, load_data
from pdiff.tasks.networks import build_network

FASHION_CFG = {"source": "torchvision", "name": "FashionMNIST", "root": None, "download": "never", "val_size": 5000, "split_seed": 0}


def test_digits_splits_are_fixed_disjoint_and_normalised():
    cfg = to_dict(load_config(["task=digits"]).task)
    data = load_data(cfg["data"])
    assert (len(data.train), len(data.val), len(data.test)) == (1797 - 360 - 360, 360, 360)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    # Normalisation statistics come from the training split only.
    x = data.prepare(data.train.images)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    # The same config gives the same split every time (generators are selected on val, reported on test).
    again = load_data(cfg["data"])
    for name in ("train", "val", "test"):
        assert torch.equal(again.split(name).images, data.split(name).images)
        assert torch.equal(again.split(name).labels, data.split(name).labels)
    # val and test are different examples: the splits partition the 1,797 images.
    from sklearn.datasets import load_digits

    total = np.sort(np.concatenate([data.split(s).labels.numpy() for s in ("train", "val", "test")]))
    assert np.array_equal(total, np.sort(load_digits().target))
    with pytest.raises(ValueError, match="unknown split"):
        data.split("validation")


@pytest.mark.skipif(not task_data.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_loads_offline_from_debian_files(tmp_path):
    data = load_data({**FASHION_CFG, "root": str(tmp_path)})
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    # Staged where torchvision looks for them, under their real names only once complete.
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])


def test_missing_fashion_mnist_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(task_data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError) as info:
        load_data({**FASHION_CFG, "root": str(tmp_path / "empty")})
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in message
    assert isinstance(info.value, FileNotFoundError)  # the CLI turns it into a one-line error


def test_fake_cifar_data_has_cifar_shape():
    cfg = to_dict(load_config(["task=fake_cifar_resnet18"]).task)
    data = load_data({**cfg["data"], "train_size": 64, "val_size": 16, "test_size": 32})
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (48, 16, 32)
    assert data.mean.shape == (3,)


def test_local_image_folder_through_load_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 3)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    # Real folders mix image modes: all become RGB like the first one.
    Image.fromarray(rng.integers(0, 255, (12, 10, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "train" / "cat" / "5.png")
    Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8), mode="L").save(tmp_path / "test" / "dog" / "1.png")
    data = load_data({"source": "hub", "name": str(tmp_path), "val_size": 4})
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    assert data.image_shape == (3, 12, 10) and data.num_classes == 2
    assert sorted(data.test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="test_split"):
        load_data({"source": "hub", "name": str(tmp_path), "val_size": 4, "test_split": "validation"})
    # Images of several sizes need task.data.image_size.
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "big.png")
    with pytest.raises(ValueError, match="image_size"):
        load_data({"source": "hub", "name": str(tmp_path), "val_size": 4})
    assert load_data({"source": "hub", "name": str(tmp_path), "val_size": 4, "image_size": 8}).image_shape == (3, 8, 8)


def test_saved_dataset_dict_and_val_size_fraction(tmp_path):
    """A DatasetDict written by `save_to_disk` loads like a Hub dataset; val_size below 1 is a fraction."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L") for _ in range(n)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": split(30), "test": split(9)}).save_to_disk(str(tmp_path / "saved"))
    data = load_data({"source": "hub", "name": str(tmp_path / "saved"), "val_size": 0.2})
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 9)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 3


def test_bad_data_and_network_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown data source 'ftp'"):
        load_data({"source": "ftp"})
    with pytest.raises(ValueError, match="unsupported torchvision dataset"):
        load_data({**FASHION_CFG, "name": "ImageNet"})
    with pytest.raises(ValueError, match="val_size"):
        load_data({"source": "digits", "test_size": 360, "val_size": 5000})
    with pytest.raises(ValueError, match="unknown network 'vgg'"):
        build_network({"name": "vgg"}, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="`task.data.source` is missing"):
        Task({"name": "x", "data": {}, "network": {}})
    cfg = to_dict(load_config([]).task)
    with pytest.raises(ValueError, match="`task.param` is missing"):
        Task({k: v for k, v in cfg.items() if k != "param"})
    with pytest.raises(ValueError, match=r"task.param.k=abc: expected an integer"):
        Task({**cfg, "param": {**cfg["param"], "k": "abc"}})


def test_resnet18_cifar_matches_torchvision_names():
    import torchvision

    ours = ResNet18CIFAR(in_channels=3, num_classes=10)
    theirs = torchvision.models.resnet18(num_classes=10)
    ours_shapes = {n: tuple(p.shape) for n, p in ours.state_dict().items()}
    theirs_shapes = {n: tuple(p.shape) for n, p in theirs.state_dict().items()}
    assert ours_shapes.keys() == theirs_shapes.keys()
    assert ours_shapes["conv1.weight"] == (64, 3, 3, 3)  # CIFAR stem: 3x3, no max-pool
    assert all(ours_shapes[n] == theirs_shapes[n] for n in ours_shapes if n != "conv1.weight")
    assert ours(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # Batched evaluation shares everything before the first generated stage.
    assert ours.stage_names[ours.first_stage_holding(["layer4.1.bn1.weight"])] == "layer4.1"


def test_task_builds_a_network_from_base_weights_and_a_vector():
    task = Task(load_config(["task=digits"]).task)
    torch.manual_seed(0)
    base = task.build_network()
    assert isinstance(base, SmallCNN) and not base.training
    layout = ParameterLayout.from_module(base, select_parameters(base, task.config["param"]["patterns"]))
    vector = torch.randn(layout.dim)
    net = task.build_network(base.state_dict(), layout, vector)
    assert not net.training
    assert torch.equal(layout.flatten(net), vector)
    frozen = {n: t for n, t in base.state_dict().items() if n not in layout.names}
    for name, value in net.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name])
    x = task.data.prepare(task.data.val.images[:4])
    assert net(x).shape == (4, 10)
    with pytest.raises(ValueError, match="layout"):
        task.build_network(base.state_dict(), None, vector)
    with pytest.raises(LayoutMismatchError):
        task.build_network(base.state_dict(), layout, vector[:-1])
    with pytest.raises(RuntimeError):  # base weights of another network
        task.build_network(SmallCNN(1, 10, widths=(8, 16, 32)).state_dict())


def test_any_importable_network_by_target():
    """`task.network._target_`: a torchvision model function by name with its num_classes (it takes **kwargs, so
    nothing is filled in for it), and a class whose named in_channels/num_classes come from the data."""
    from pdiff.tasks.networks import build_network

    net = build_network({"_target_": "torchvision.models.resnet18", "num_classes": 7}, in_channels=3, num_classes=7)
    assert type(net).__name__ == "ResNet" and net.fc.out_features == 7
    net = build_network({"_target_": "pdiff.tasks.networks.SmallCNN", "widths": [4, 8, 8]}, in_channels=1, num_classes=3)
    assert net.fc.in_features == 8 and net.conv1.in_channels == 1


def test_a_users_network_that_fails_is_one_line_naming_the_key(tmp_path, monkeypatch):
    """Import-time failures, a missing dependency, a misspelt argument and a failing constructor: each a
    NetworkImportError (one line on the CLI) that names task.network and what to fix, never the user's traceback."""
    from pdiff.tasks.networks import NetworkImportError

    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "bad_syntax.py").write_text("def f(\n")
    (tmp_path / "needs_a_dependency.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_channels, num_classes, hidden=4):\n"
        "        super().__init__()\n"
        "        if hidden < 1:\n"
        "            raise ValueError('hidden must be positive')\n"
        "        self.fc = nn.Linear(in_channels, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "raises_at_import.Net": "importing task.network._target_=raises_at_import.Net failed in the module's own code: RuntimeError: boom",
        "bad_syntax.Net": "failed in the module's own code: SyntaxError",
        "needs_a_dependency.Net": "needs_a_dependency imports 'not_installed_anywhere', which is not installed here",
    }
    for target, message in cases.items():
        with pytest.raises(NetworkImportError, match=message):
            build_network({"_target_": target}, in_channels=1, num_classes=2)
    with pytest.raises(NetworkImportError, match="task.network.hiden=8: tiny.Net takes no argument 'hiden'; it takes hidden, in_channels, num_classes"):
        build_network({"_target_": "tiny.Net", "hiden": 8}, in_channels=1, num_classes=2)
    with pytest.raises(NetworkImportError, match=r"building task.network._target_=tiny.Net\(in_channels=1, num_classes=2, hidden=0\) failed: ValueError"):
        build_network({"_target_": "tiny.Net", "hidden": 0}, in_channels=1, num_classes=2)
    assert build_network({"_target_": "tiny.Net", "hidden": 2}, in_channels=1, num_classes=2).fc.out_features == 2
