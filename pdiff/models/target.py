"""The target network as a pipeline component: what a generated vector is loaded into.

`TargetNetwork` holds the frozen base network (its weights are this component's safetensors), the
parameter layout and the task spec in its config. It turns generated vectors into state dicts or
ready `nn.Module`s, so a generator folder alone rebuilds working networks without the dataset.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)
from torch import nn

from ..params import ParameterLayout
from ..tasks.networks import build_network
from .safetensors_only import SafetensorsOnly


class TargetNetwork(SafetensorsOnly, ModelMixin, ConfigMixin):
    """The base network plus the layout of its generated part."""

    @register_to_config
    def __init__(self, network: Mapping[str, Any], in_channels: int, num_classes: int, layout: Mapping[str, Any], task: Mapping[str, Any] | None = None):
        super().__init__()
        self.net = build_network(dict(network), in_channels=in_channels, num_classes=num_classes).eval()
        self.layout = ParameterLayout.from_dict(layout)
        self.layout.check_module(self.net)

    @classmethod
    def from_dataset(cls, dataset) -> "TargetNetwork":
        """Build from a `ParameterDataset`: its task's network, its layout, its base weights."""
        task = dataset.task
        data_spec = _data_spec(dataset)
        target = cls(network=task.config["network"], layout=dataset.layout.to_dict(), task=portable_task(dataset.task_config), **data_spec)
        target.net.load_state_dict(dataset.base_state, strict=True)
        return target

    def state_dicts(self, vectors: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Full state dicts (base weights with the generated part replaced), one per vector."""
        base = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        out = []
        for vector in vectors.detach().float().cpu().reshape(-1, self.layout.dim):
            state = dict(base)
            state.update({k: v.clone() for k, v in self.layout.unflatten(vector).items()})
            out.append(state)
        return out

    def networks(self, vectors: torch.Tensor) -> list[nn.Module]:
        """Ready networks in eval mode, one per vector, on the CPU."""
        base = copy.deepcopy(self.net).cpu().eval()
        return [self.layout.load_into(copy.deepcopy(base), vector) for vector in vectors.detach().float().cpu().reshape(-1, self.layout.dim)]


def portable_task(task: Mapping[str, Any]) -> dict:
    """The task as a generator records it: without where the data lived on the training machine.

    A generator travels (to the Hub, to a colleague); a local data folder does not. `data.root` is
    dropped (the default data folder is used), and a local `data.name` (an image folder) becomes None:
    evaluating such a generator then asks for the data (`pdiff sample --data`, `task.data.name=`).
    """
    task = copy.deepcopy(dict(task))
    data = task.get("data") or {}
    data.pop("root", None)
    name = data.get("name")
    if data.get("source") == "hub" and isinstance(name, str) and (os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)):
        data["name"] = None
    return task


def _data_spec(dataset) -> dict[str, int]:
    """Input channels and class count of the dataset's network (recorded at collection time)."""
    return {"in_channels": int(dataset.info["in_channels"]), "num_classes": int(dataset.info["num_classes"])}
