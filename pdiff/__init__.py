"""pdiff: generate neural-network weights with latent diffusion (p-diff, arXiv 2402.13144)."""

__version__ = "0.1.0"

from .dataset import ParameterDataset
from .params import ParameterLayout, select_parameters
from .tasks import Task, load_task

__all__ = ["ParameterDataset", "ParameterLayout", "Task", "load_task", "select_parameters", "__version__"]
