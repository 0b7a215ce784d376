"""A task: the data, the network and the part of the network that pdiff generates."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import TaskSchema, validate
from ..params import ParameterLayout
from .data import TaskData, load_data
from .networks import build_network


class Task:
    """Everything `configs/task/<name>.yaml` describes, with the data loaded on first use."""

    def __init__(self, config: Mapping[str, Any] | DictConfig):
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        validate(config, TaskSchema, prefix="task.")
        self.config: dict = dict(config)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def eval_batch_size(self) -> int:
        """Images per batch when scoring many networks at once (`task.eval.batch_size`)."""
        return int(self.config["eval"]["batch_size"])

    @property
    def noise_scales(self) -> tuple[float, ...] | None:
        """The noise baseline's scales (`task.eval.noise_scales`); None: the report's default ladder."""
        scales = self.config["eval"].get("noise_scales")
        return None if scales is None else tuple(float(s) for s in scales)

    @property
    def average_noise_scales(self) -> tuple[float, ...] | None:
        """The scales of the weight average plus noise (`task.eval.average_noise_scales`); None: the report's default."""
        scales = self.config["eval"].get("average_noise_scales")
        return None if scales is None else tuple(float(s) for s in scales)

    @property
    def num_noise_models(self) -> int | None:
        """Networks per noise scale (`task.eval.num_noise_models`); None: as many as are generated."""
        count = self.config["eval"].get("num_noise_models")
        return None if count is None else int(count)

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
            layout.load_into(net, vector.cpu())
        return net.eval()
