"""Parameter datasets: K checkpoints of a network's chosen parameters, as a Hugging Face dataset."""

from .parameter_dataset import METRIC_COLUMNS, InvalidParameterDatasetError, ParameterDataset, parameter_features

__all__ = ["METRIC_COLUMNS", "InvalidParameterDatasetError", "ParameterDataset", "parameter_features"]
