"""pdiff: generate neural-network weights with latent diffusion (p-diff, arXiv 2402.13144)."""

__version__ = "0.1.0"

import diffusers as _diffusers

from .dataset import ParameterDataset
from .models import ParameterAutoencoder, TargetNetwork, build_unet
from .params import ParameterLayout, select_parameters
from .pipeline import PDiffPipeline, PDiffPipelineOutput
from .tasks import Task, load_task

# `DiffusionPipeline.from_pretrained` looks the class named in model_index.json up in the diffusers
# namespace; registering ours there lets the base class load pdiff generators once pdiff is imported,
# without `custom_pipeline` / `trust_remote_code` (which would run code from the repository).
setattr(_diffusers, "PDiffPipeline", PDiffPipeline)

__all__ = [
    "PDiffPipeline", "PDiffPipelineOutput", "ParameterAutoencoder", "ParameterDataset", "ParameterLayout",
    "TargetNetwork", "Task", "build_unet", "load_task", "select_parameters", "__version__",
]
