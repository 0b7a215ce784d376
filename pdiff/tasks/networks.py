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
# Import paths a network config may name without the user vouching for them: pdiff's own code and
# torchvision's models (a dependency already imported). Anything else names code to run.
BUILTIN_PREFIXES = ("pdiff.", "torchvision.models.")


class NetworkImportError(ImportError, ValueError):
    """A network's `_target_` cannot be imported, or is not a network (bad input: one line on the CLI)."""


def build_network(cfg: Mapping[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate `task.network` for the task's data: pdiff's own networks by `name`, any importable
    network by `_target_` (Hydra's convention: an import path plus keyword arguments).

    A `_target_` callable that takes `in_channels` or `num_classes` and is not given them gets the data's.
    """
    kwargs = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in cfg.items() if k not in ("name", "_target_")}
    if "_target_" in cfg:
        if cfg.get("name"):
            raise ValueError(f"task.network names both name={cfg['name']!r} and _target_={cfg['_target_']!r}: "
                             "start from task=custom (no built-in network), or drop the other with task.network.name=null")
        factory = import_network(str(cfg["_target_"]))
        accepted, takes_any = _parameters(factory)
        defaults = {"in_channels": in_channels, "num_classes": num_classes}
        kwargs = {**{k: v for k, v in defaults.items() if k in accepted and k not in kwargs}, **kwargs}
        net = _construct(factory, kwargs, str(cfg["_target_"]), None if takes_any or not accepted else accepted)
        if not isinstance(net, nn.Module):
            raise NetworkImportError(f"task.network._target_={cfg['_target_']} returned a {type(net).__name__}, not a torch.nn.Module")
        return net
    name = cfg.get("name")
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: choose one of {sorted(NETWORKS)}, or give an import path as task.network._target_")
    return NETWORKS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


def import_network(path: str) -> Callable[..., Any]:
    """The class or function at `path` (`package.module.Name`), with errors that say what to install."""
    module = path.rpartition(".")[0]
    if not module:
        raise NetworkImportError(f"task.network._target_={path!r} is not an import path: use package.module.ClassName")
    try:
        target = _locate(path)
    except (ImportError, AttributeError) as err:
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if missing and not (module == missing or module.startswith(missing + ".")):  # the module is there; something it imports is not
            raise NetworkImportError(f"cannot import task.network._target_={path}: {module} imports {missing!r}, which is not installed here; "
                                     f"install it") from None
        raise NetworkImportError(
            f"cannot import task.network._target_={path}: {err}. "
            f"Install the package that provides {module}, or put the folder that holds it on PYTHONPATH"
        ) from None
    except Exception as err:  # the module's own code failed while importing (a syntax error, an exception at import time)
        raise NetworkImportError(f"importing task.network._target_={path} failed in the module's own code: {type(err).__name__}: {err}; "
                                 f"fix {module}") from None
    if not callable(target) or (isinstance(target, type) and not issubclass(target, nn.Module)):
        raise NetworkImportError(f"task.network._target_={path} is not a torch.nn.Module class or a function that returns one")
    return target


class UntrustedNetworkError(PermissionError):
    """A downloaded generator or dataset names network code the user has not vouched for."""


def check_network_trust(network_cfg: Mapping[str, Any], source: str, trusted: bool) -> None:
    """Refuse, before anything is imported, to build a downloaded network whose `_target_` is outside
    pdiff and torchvision, unless the user passed `trust_network_code` (`--trust-network-code`).

    Like transformers' `trust_remote_code`: importing a module runs its code. Local folders are the
    user's own and are trusted; Hub repos are not.
    """
    target = network_cfg.get("_target_")
    if trusted or target is None or str(target).startswith(BUILTIN_PREFIXES):
        return
    module = str(target).rpartition(".")[0]
    raise UntrustedNetworkError(
        f"{source} builds its network with {target}, which would import the module {module!r} and run its code. "
        "If you trust it, install that module and pass trust_network_code=True (CLI: --trust-network-code; pdiff train has no such "
        "flag: download the repo to a folder, e.g. `hf download REPO --repo-type dataset --local-dir DIR`, and give that folder)"
    )


def _locate(path: str) -> Any:
    """The object at a dotted path: the longest importable module prefix, then attributes (as Hydra's
    `_target_` resolution does), with Python's own ImportError / AttributeError when it is not there."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name != ".".join(parts[:cut]):  # the module exists but fails to import something itself
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"No module named {parts[0]!r}", name=parts[0])


def _construct(factory: Callable[..., Any], kwargs: dict[str, Any], path: str, accepted: set[str] | None) -> Any:
    """`factory(**kwargs)`, a failure named by the keys the user gave rather than a traceback from their code.
    `accepted`: the keyword arguments it takes (None: any, or unknown)."""
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise NetworkImportError(f"task.network.{unknown[0]}={kwargs[unknown[0]]}: {path} takes no argument {unknown[0]!r}; "
                                 f"it takes {', '.join(sorted(accepted))}")
    try:
        return factory(**kwargs)
    except Exception as err:
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise NetworkImportError(f"building task.network._target_={path}({given}) failed: {type(err).__name__}: {err}; "
                                 "check the task.network.* values") from None


def _parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """The factory's named parameters, and whether it also takes any keyword (`**kwargs`; assumed when its
    signature cannot be read)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    # Only named parameters count: what a **kwargs catch-all accepts cannot be known (torchvision's
    # model functions forward it), so nothing is filled in through it.
    return {p.name for p in params if p.kind is not p.VAR_KEYWORD}, any(p.kind is p.VAR_KEYWORD for p in params)
