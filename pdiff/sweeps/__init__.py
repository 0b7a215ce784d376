"""Hyperparameter sweeps over the generator, written in W&B's sweep format.

A sweep file (`configs/sweeps/*.yaml`) is a W&B sweep config: a search `method`, the `metric` to
optimise, the `parameters` (pdiff config keys such as `generator.autoencoder.latent_noise`), and a
`command` that runs one trial. It runs with a W&B server (`wandb sweep` + `wandb agent`, see
`server_instructions`) or without one (`run_local`).
"""

from .files import DEFAULT_METRICS_FILE, SweepError, expand_command, load_sweep_config, script_overrides, server_instructions
from .local import lookup_metric, run_local

__all__ = ["DEFAULT_METRICS_FILE", "SweepError", "expand_command", "load_sweep_config", "lookup_metric", "run_local", "script_overrides", "server_instructions"]
