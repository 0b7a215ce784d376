"""What pdiff generates: data, networks and the parameters chosen from them."""

from .data import DataNotFoundError, Split, TaskData, load_data
from .networks import NETWORKS, ResNet18CIFAR, SmallCNN, StagedNetwork, build_network
from .task import Task

__all__ = [
    "DataNotFoundError", "Split", "TaskData", "load_data",
    "NETWORKS", "ResNet18CIFAR", "SmallCNN", "StagedNetwork", "build_network",
    "Task",
]
