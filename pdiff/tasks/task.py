"""A task: the data, the network and the part of the network that pdiff generates."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..params import ParameterLayout
from .data import TaskData, load_data
from .networks import build_network


class Task:
    """Everything `configs/task/<name>.yaml` describes, with the data loaded on first use."""

    def __init__(self, config: Mapping[str, Any] | DictConfig):
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        self.config: dict = dict(config)
        for key in ("name", "data", "network", "param"):
            if key not in self.config:
                raise ValueError(f"task config is missing `{key}` (have {sorted(self.config)})")

    @property
    def name(self) -> str:
        return self.config["name"]

    @cached_property
    def data(self) -> TaskData:
        return load_data(self.config["data"])

    def build_network(
        self,
        base_state: Mapping[str, torch.Tensor] | None = None,
        layout: ParameterLayout | None = None,
        vector: torch.Tensor | None = None,
    ) -> nn.Module:
        """A fresh network; with `base_state` its frozen weights, with `layout` + `vector` the generated part.

        The network is returned in eval mode: batch-norm layers use the stored running statistics, the
        same way the checkpoints were collected and evaluated.
        """
        data = self.data
        net = build_network(self.config["network"], in_channels=data.image_shape[0], num_classes=data.num_classes)
        if base_state is not None:
            net.load_state_dict(dict(base_state), strict=True)
        if vector is not None:
            if layout is None:
                raise ValueError("a parameter vector needs its layout")
            layout.check_module(net)
            with torch.no_grad():
                params = dict(net.named_parameters())
                for name, value in layout.unflatten(vector.detach().to(torch.float32).cpu()).items():
                    params[name].copy_(value)
        return net.eval()


def load_task(config: Mapping[str, Any] | DictConfig) -> Task:
    return Task(config)
