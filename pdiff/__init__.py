"""pdiff: generate neural-network weights with latent diffusion (p-diff, arXiv 2402.13144).

The public API, imported on first use: `import pdiff` alone loads neither torch nor diffusers, so the
`pdiff` command line starts in a fraction of a second. Touching `pdiff.PDiffPipeline` (or any name
below) imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PDiffPipeline": "pdiff.pipelines",
    "PDiffPipelineOutput": "pdiff.pipelines",
    "register_with_diffusers": "pdiff.pipelines",
    "ParameterAutoencoder": "pdiff.models",
    "TargetNetwork": "pdiff.models",
    "build_unet": "pdiff.models",
    "ParameterDataset": "pdiff.data",
    "ParameterLayout": "pdiff.params",
    "select_parameters": "pdiff.params",
    "Task": "pdiff.tasks",
}

__all__ = [
    "PDiffPipeline", "PDiffPipelineOutput", "ParameterAutoencoder", "ParameterDataset", "ParameterLayout",
    "TargetNetwork", "Task", "build_unet", "register_with_diffusers", "select_parameters", "__version__",
]

if TYPE_CHECKING:
    from .data import ParameterDataset
    from .models import ParameterAutoencoder, TargetNetwork, build_unet
    from .params import ParameterLayout, select_parameters
    from .pipelines import PDiffPipeline, PDiffPipelineOutput, register_with_diffusers
    from .tasks import Task


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
