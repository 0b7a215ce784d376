"""The networks whose parameters pdiff generates.

Each network is a `StagedNetwork`: its forward pass is a fixed sequence of named submodules. That
lets batched evaluation run the frozen prefix once for all generated networks and vmap only over
the stages that hold generated parameters; for ResNet-18 with `layer4.1.bn*` generated, that
shares more than 90% of the compute.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class StagedNetwork(nn.Module):
    """A network whose forward is `stage_names` applied in order (names of submodules)."""

    stage_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_stages(x, 0, len(self.stage_names))

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in self.stage_names[start:stop]:
            x = self.get_submodule(name)(x)
        return x

    def first_stage_holding(self, param_names: Sequence[str]) -> int:
        """Index of the first stage that owns any of the given parameters."""
        for i, stage in enumerate(self.stage_names):
            if any(p == stage or p.startswith(stage + ".") for p in param_names):
                return i
        raise ValueError(f"none of {list(param_names)[:4]} belongs to a stage of {type(self).__name__}")


class SmallCNN(StagedNetwork):
    """Three conv-BN-ReLU blocks (strides 1, 2, 2), global average pooling and a linear classifier.

    Small enough to train in seconds on 8x8 digits; ~87% on 28x28 Fashion-MNIST after 3 epochs.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1, self.bn1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c3)
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c3, num_classes)
        self.stage_names = ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3", "relu", "pool", "fc")


class ResNet18CIFAR(StagedNetwork):
    """ResNet-18 for 32x32 images as in p-diff: 3x3 stem, no max-pool; parameter names match torchvision
    (`layer4.1.bn1.weight`, ...)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes, stages = 64, []
        for i, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layer = nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes))
            setattr(self, f"layer{i}", layer)
            stages += [f"layer{i}.0", f"layer{i}.1"]
            inplanes = planes
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)
        self.stage_names = ("conv1", "bn1", "relu", *stages, "pool", "fc")


NETWORKS: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "resnet18_cifar": ResNet18CIFAR}


def build_network(cfg: Mapping[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate `task.network` (`name` plus keyword arguments) for the task's data."""
    kwargs = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in cfg.items() if k != "name"}
    name = cfg["name"]
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: choose one of {sorted(NETWORKS)}")
    return NETWORKS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
