"""Scoring many generated classifier heads at once, without per-network activation maps.

p-diff's usual slice is the last BatchNorm and the classifier: `bn -> relu -> global average pool
-> linear` on top of a frozen prefix. Run per network, that head materialises a
[networks, images, channels, H*W] tensor, and evaluation becomes a stream of page faults. Each
channel of the head only thresholds and averages its H*W values, though:

    mean_s relu(a*x_s + b) = (|a| * sum_s |x_s - t| + a * sum_s x_s + S*b) / 2S,   t = -b/a

(a, b: the batch-norm's per-channel scale and shift in eval mode), and `torch.cdist(p=1)` computes
sum_s |x_s - t| for every (image, network) pair of a channel in one fused, vectorised kernel. What
reaches memory is the pooled [networks, images, channels] tensor, the head's real size.

That arithmetic differs from the network's own forward pass, so two nearly tied logits could swap.
`PooledLinearHead.logits` bounds the rounding error of both computations and recomputes every
(network, image) pair inside the bound with the network's own modules, in the same way the
network's forward pass computes it. Only ties that involve the label can change a hit into a miss,
so those are the pairs recomputed: hits, accuracies and wrong-example sets are the network's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

_EPS32 = torch.finfo(torch.float32).eps


@dataclass
class PooledLinearHead:
    """The stages `BatchNorm2d -> ReLU -> AdaptiveAvgPool2d(1) -> Flatten -> Linear` of a network."""

    bn: nn.BatchNorm2d
    between: list[nn.Module]  # relu, pool, flatten: run as they are when a pair is recomputed
    fc: nn.Linear
    bn_name: str
    fc_name: str

    @classmethod
    def find(cls, stages: list[tuple[str, nn.Module]]) -> "PooledLinearHead | None":
        """The head when `stages` (name, module) are exactly this pattern, else None."""
        flat = [(name, m) for name, module in stages for m in (module if isinstance(module, nn.Sequential) else [module])]
        if [type(m) for _, m in flat] != [nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]:
            return None
        (bn_name, bn), relu, pool, flatten, (fc_name, fc) = flat
        size = pool[1].output_size
        if any(s != 1 for s in (size if isinstance(size, tuple) else (size,))) or bn.running_mean is None or bn.training:
            return None
        return cls(bn, [relu[1], pool[1], flatten[1]], fc, bn_name, fc_name)

    def logits(self, features: torch.Tensor, params: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Logits [n, B, K] of n heads on `features` [B, C, H, W] with labels [B].

        Whether the argmax hits the label is exactly what each network's own forward pass gives.
        `params` maps network parameter names (`bn3.weight`, `fc.bias`, ...) to [n, ...] tensors; the
        head's parameters it lacks come from the base network.
        """
        weight, bias = self._stacked(params, self.fc_name, self.fc)
        gamma, beta = self._stacked(params, self.bn_name, self.bn)
        scale = gamma * torch.rsqrt(self.bn.running_var + self.bn.eps)  # [n, C]: the eval batch-norm as x*a + b
        shift = beta - self.bn.running_mean * scale
        n, (batch, channels) = scale.shape[0], features.shape[:2]
        x = features.reshape(batch, channels, -1).transpose(0, 1).contiguous()  # [C, B, S]
        size, x_sum = x.shape[-1], x.sum(-1)
        threshold = torch.where(scale != 0, -shift / scale, torch.zeros_like(shift))
        thresholds = threshold.T.unsqueeze(-1).expand(channels, n, size).contiguous()
        l1 = torch.cdist(thresholds, x, p=1)  # [C, n, B]: sum_s |x_s - t| for every channel, network, image
        # pooled = (|a| * l1 + a * sum_s x + S * (b + |b| where a == 0)) / 2S. The linear layer takes
        # each term on its own, so only l1 is ever as large as [networks, images, channels].
        relu_b = (scale == 0) * shift.abs() + shift  # [n, C]
        logits = torch.bmm(weight * scale.abs().unsqueeze(1) / (2 * size), l1.transpose(0, 1)).transpose(1, 2).contiguous()  # [n, B, K]
        logits += torch.matmul(x_sum.T, (weight * scale.unsqueeze(1) / (2 * size)).transpose(1, 2))
        logits += (torch.bmm(weight, relu_b.unsqueeze(-1)).squeeze(-1) / 2 + bias).unsqueeze(1)
        # Rounding errors are at most (terms summed) * eps * (sum of the magnitudes summed), in this
        # computation and in the network's own, for both logits compared: 4 * (S + C + 8) * eps * spread.
        # A channel's terms are at most 2 * (|a| * sum_s |x| + S * |b|) / S; |W| carries them to a logit.
        reach = weight.abs().amax(1)  # [n, C]
        spread = 2 * torch.matmul(reach * scale.abs(), x.abs().sum(-1)) / size + 2 * (reach * shift.abs()).sum(-1, keepdim=True)
        spread += bias.abs().amax(1, keepdim=True)
        # Only a near-tie between the label and the best other class can change a hit into a miss.
        label_logit = logits.gather(-1, labels.expand(n, batch).unsqueeze(-1)).squeeze(-1)
        best_other = logits.scatter(-1, labels.expand(n, batch).unsqueeze(-1), -torch.inf).amax(-1)
        unsure = ~((label_logit - best_other).abs() > 4 * (size + channels + 8) * _EPS32 * spread)  # NaN lands here too
        if unsure.any():
            pooled = _PooledColumns(l1, x_sum, scale, relu_b, size)
            self._recompute(logits, pooled, unsure, features, gamma, beta, weight, bias)
        return logits

    def _recompute(self, logits, pooled: "_PooledColumns", unsure, features, gamma, beta, weight, bias) -> None:
        """Overwrite the unsure (network, image) logits with the network's own computation.

        Batch-norm, ReLU and pooling act per image and channel, so all unsure pairs go through them at
        once (pairs laid side by side as channels). The linear layer's rounding depends on how many
        rows it multiplies (one row takes a different kernel), so each network's rows are multiplied
        as the full batch its forward pass would see.
        """
        nets, images = unsure.nonzero(as_tuple=True)
        pairs, channels = len(nets), features.shape[1]
        x = features[images].reshape(1, pairs * channels, *features.shape[2:])
        bn = self.bn
        y = F.batch_norm(x, bn.running_mean.repeat(pairs), bn.running_var.repeat(pairs), gamma[nets].flatten(), beta[nets].flatten(), False, 0.0, bn.eps)
        y = y.view(pairs, channels, *features.shape[2:])
        for module in self.between:
            y = module(y)
        for net in nets.unique().tolist():
            own = unsure[net]
            rows = pooled.of(net)
            rows[own] = y[nets == net]
            logits[net, own] = F.linear(rows, weight[net].contiguous(), bias[net].contiguous())[own]

    def _stacked(self, params: Mapping[str, torch.Tensor], prefix: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        n = next(iter(params.values())).shape[0]
        pair = []
        for attr in ("weight", "bias"):
            value = params.get(f"{prefix}.{attr}")
            pair.append(value if value is not None else getattr(module, attr).expand(n, *getattr(module, attr).shape))
        return pair[0], pair[1]


@dataclass
class _PooledColumns:
    """One network's pooled activations [B, C] in closed form, computed only when asked for."""

    l1: torch.Tensor  # [C, n, B]
    x_sum: torch.Tensor  # [C, B]
    scale: torch.Tensor  # [n, C]
    relu_b: torch.Tensor  # [n, C]
    size: int

    def of(self, net: int) -> torch.Tensor:
        a = self.scale[net].unsqueeze(1)
        return ((a.abs() * self.l1[:, net] + a * self.x_sum + self.size * self.relu_b[net].unsqueeze(1)) / (2 * self.size)).T.contiguous()
