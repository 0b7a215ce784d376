"""Evaluate many parameter vectors on one network in a single pass.

Generated networks differ only in the parameters of the layout, so the frozen stages before the
first generated parameter are run once per image batch and only the remaining stages are run, with
`torch.func.vmap` over `functional_call`, for a chunk of networks at a time. Accuracies are exact
counts, so the same network scores the same here as when it is built and run on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .params import ParameterLayout
from .tasks.data import Split
from .tasks.networks import StagedNetwork


@dataclass
class Scores:
    """Per-network results on one split."""

    accuracy: torch.Tensor  # [B] float64, correct / N
    loss: torch.Tensor  # [B] float64, mean cross-entropy
    wrong: torch.Tensor | None = None  # [B, N] bool: which examples each network gets wrong


class _Stages(nn.Module):
    """Stages [start, stop) of a staged network, as a module `functional_call` can swap parameters in."""

    def __init__(self, net: StagedNetwork, start: int, stop: int):
        super().__init__()
        self.net, self.start, self.stop = net, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stages(x, self.start, self.stop)


@torch.no_grad()
def evaluate_vectors(
    network: nn.Module,
    layout: ParameterLayout,
    vectors: torch.Tensor,
    split: Split,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 1000,
    networks_per_chunk: int = 100,
    return_wrong: bool = False,
) -> Scores:
    """Accuracy and loss of `network` with each row of `vectors` [B, D] put into its layout's parameters.

    `network` holds the frozen (base) weights, is in eval mode and sits on the device to compute on.
    """
    layout.check_vectors(vectors)
    layout.check_module(network)
    network.eval()
    device = next(network.parameters()).device
    vectors = vectors.to(device=device, dtype=torch.float32).reshape(-1, layout.dim)
    num_networks, n = vectors.shape[0], len(split)

    if isinstance(network, StagedNetwork):
        cut = network.first_stage_holding(layout.names)
        prefix = _Stages(network, 0, cut)
        suffix = _Stages(network, cut, len(network.stage_names))
        prefix_key = "net."
    else:  # unknown architecture: no shared prefix, vmap over the whole network
        prefix, suffix, prefix_key = nn.Identity(), network, ""

    def logits_of(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return functional_call(suffix, params, (features,))

    batched_logits = vmap(logits_of, in_dims=(0, None))
    correct = torch.zeros(num_networks, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(num_networks, dtype=torch.float64, device=device)
    wrong = torch.zeros(num_networks, n, dtype=torch.bool) if return_wrong else None

    for start in range(0, n, batch_size):
        images = split.images[start : start + batch_size].to(device)
        labels = split.labels[start : start + batch_size].to(device)
        features = prefix(prepare(images))
        for lo in range(0, num_networks, networks_per_chunk):
            chunk = layout.unflatten(vectors[lo : lo + networks_per_chunk])
            params = {prefix_key + name: value for name, value in chunk.items()}
            logits = batched_logits(params, features)  # [b, batch, classes]
            hits = logits.argmax(-1) == labels
            correct[lo : lo + len(hits)] += hits.sum(-1)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(len(hits)), reduction="none")
            loss_sum[lo : lo + len(hits)] += losses.view(len(hits), -1).double().sum(-1)
            if wrong is not None:
                wrong[lo : lo + len(hits), start : start + len(labels)] = ~hits.cpu()

    return Scores(correct.cpu().double() / n, loss_sum.cpu() / n, wrong)


@torch.no_grad()
def evaluate_network(
    network: nn.Module, split: Split, prepare: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean loss) of one ready network: the plain, one-by-one reference path."""
    network.eval()
    device = next(network.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device)
        labels = split.labels[start : start + batch_size].to(device)
        logits = network(prepare(images))
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / len(split), loss_sum / len(split)
