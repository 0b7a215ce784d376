"""ParameterLayout and select_parameters: the contract between networks and flat vectors."""

from __future__ import annotations

import pytest
import torch

from pdiff.params import LayoutMismatchError, ParameterLayout, select_parameters
from pdiff.tasks.networks import ResNet18CIFAR, SmallCNN


@pytest.fixture(scope="module")
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10)


def test_layout_offsets_and_dim(cnn):
    layout = ParameterLayout.from_module(cnn, ["bn3.weight", "bn3.bias", "fc.weight", "fc.bias"])
    assert layout.dim == 64 + 64 + 640 + 10 == 778
    assert [(s.name, s.shape, s.offset) for s in layout.slots] == [
        ("bn3.weight", (64,), 0), ("bn3.bias", (64,), 64), ("fc.weight", (10, 64), 128), ("fc.bias", (10,), 768),
    ]
    assert layout.segment_ids().tolist() == [0] * 64 + [1] * 64 + [2] * 640 + [3] * 10


def test_flatten_unflatten_round_trip_is_exact(cnn):
    layout = ParameterLayout.from_module(cnn, select_parameters(cnn, ["bn3.*", "fc.*"]))
    vector = layout.flatten(cnn)
    assert vector.dtype == torch.float32 and vector.shape == (layout.dim,)
    tensors = layout.unflatten(vector)
    params = dict(cnn.named_parameters())
    for name, value in tensors.items():
        assert torch.equal(value, params[name].detach())
    # A state dict flattens the same way as the module, and the round trip is bit for bit.
    assert torch.equal(layout.flatten(cnn.state_dict()), vector)
    assert torch.equal(layout.flatten(tensors), vector)


def test_unflatten_batch_gives_views(cnn):
    layout = ParameterLayout.from_module(cnn, ["bn3.weight", "fc.weight"])
    batch = torch.randn(5, layout.dim)
    tensors = layout.unflatten(batch)
    assert tensors["fc.weight"].shape == (5, 10, 64)
    assert tensors["bn3.weight"].shape == (5, 64)
    tensors["bn3.weight"][2, 3] = 123.0  # a view: no copy of the generated vectors
    assert batch[2, 3] == 123.0


def test_layout_json_round_trip(cnn):
    layout = ParameterLayout.from_module(cnn, ["bn2.weight", "fc.bias"])
    again = ParameterLayout.from_dict(layout.to_dict())
    assert again == layout and again.dim == layout.dim
    bad = layout.to_dict() | {"dim": layout.dim + 1}
    with pytest.raises(LayoutMismatchError, match="dim"):
        ParameterLayout.from_dict(bad)


def test_wrong_vectors_and_modules_are_rejected(cnn):
    layout = ParameterLayout.from_module(cnn, ["bn3.weight", "bn3.bias"])
    with pytest.raises(LayoutMismatchError, match="D=128"):
        layout.unflatten(torch.zeros(127))
    with pytest.raises(LayoutMismatchError):
        layout.check_vectors(torch.zeros(2, 3, 128))
    with pytest.raises(LayoutMismatchError, match="bn3.weight"):
        layout.check_module(SmallCNN(in_channels=1, num_classes=10, widths=(8, 16, 32)))
    with pytest.raises(LayoutMismatchError, match="no parameters named"):
        ParameterLayout.from_module(cnn, ["bn9.weight"])
    with pytest.raises(LayoutMismatchError, match="missing tensor"):
        layout.flatten({"bn3.weight": torch.zeros(64)})


def test_resnet18_last_two_bn_layers_are_the_papers_2048_numbers():
    net = ResNet18CIFAR(in_channels=3, num_classes=10)
    names = select_parameters(net, ["layer4.1.bn*"])
    assert names == ["layer4.1.bn1.weight", "layer4.1.bn1.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"]
    assert ParameterLayout.from_module(net, names).dim == 2048


def test_select_parameters_keeps_module_order_and_accepts_exact_names(cnn):
    assert select_parameters(cnn, ["fc.bias", "bn3.*"]) == ["bn3.weight", "bn3.bias", "fc.bias"]
    assert select_parameters(cnn, "fc.weight") == ["fc.weight"]


def test_pattern_matching_nothing_lists_the_parameter_names(cnn):
    with pytest.raises(ValueError) as info:
        select_parameters(cnn, ["bn3.*", "layer4.1.bn*"])
    message = str(info.value)
    assert "'layer4.1.bn*' matches nothing" in message
    for name, _ in cnn.named_parameters():
        assert name in message
    with pytest.raises(ValueError, match="no parameters selected"):
        select_parameters(cnn, [])
