"""Sweep files: W&B sweep configs for pdiff, and the trial commands they expand to.

A sweep file (`configs/sweeps/*.yaml`) is a W&B sweep config: a search `method`, the `metric` to
optimise, the `parameters` (pdiff config keys such as `generator.autoencoder.latent_noise`), and a
`command` that runs one trial, e.g. `accelerate launch pdiff/train.py key=value ...`. It runs two ways:

* With a W&B server: `wandb sweep configs/sweeps/X.yaml`, then `wandb agent ENTITY/PROJECT/ID` on each
  machine (`launch/sweep.sh` does both). The server proposes every trial.
* Without one: `pdiff sweep configs/sweeps/X.yaml --local --count 8`. The open-source `sweeps` engine
  (what W&B's own controller runs) proposes each trial from the finished ones; the trial's command is
  expanded with the W&B agent's own code, run as a subprocess with the environment the agent would give
  it (run id, sweep parameters for `wandb.init`; W&B offline unless WANDB_MODE says otherwise), and its
  metric is read back from the JSON report the trial writes (`--metrics-file`).

The local driver keeps its state (sweep config, every trial's parameters, command, exit code and metric)
in a JSON file, so running it again continues the same sweep: bayes search sees all earlier trials.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

# Where a trial's metric is read from; formatted with the trial's composed config (top-level keys).
DEFAULT_METRICS_FILE = "{generator_dir}/report.json"
SWEEPS_INSTALL_HINT = (
    "`pdiff sweep --local` needs the open-source `sweeps` engine. It pins numpy<2, which pdiff's other "
    "dependencies outgrew, but works beside numpy 2; install it without its pins and add its remaining "
    "dependencies:\n    pip install --no-deps 'sweeps==0.3.0' && pip install 'pdiff[sweeps]'"
)


class SweepError(ValueError):
    """A sweep file or a local sweep that pdiff cannot run."""


# --------------------------------------------------------------------------------------------------
# Sweep files


def load_sweep_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a W&B sweep config; the checks are the ones that otherwise fail mid-sweep."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep file at {path} (see configs/sweeps/ for examples)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping with method, metric, parameters and command")
    for key in ("method", "parameters"):
        if key not in config:
            raise SweepError(f"{path}: the sweep has no `{key}:`")
    if config["method"] not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: method {config['method']!r} is not one of grid, random, bayes")
    if not isinstance(config["parameters"], dict) or not config["parameters"]:
        raise SweepError(f"{path}: `parameters:` must map config keys to their values or distributions")
    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command)):
        raise SweepError(f"{path}: `command:` must be a list of strings, one per argument")
    violations = _schema_violations(config)
    if violations:
        raise SweepError(f"{path}: not a valid W&B sweep config:\n  " + "\n  ".join(violations))
    return config


def _schema_violations(config: dict[str, Any]) -> list[str]:
    """W&B's JSON-schema check of a sweep config, where the `sweeps` package is installed."""
    sweeps = _import_sweeps()
    return [] if sweeps is None else list(sweeps.schema_violations_from_proposed_config(config))


def sweep_name(config: dict[str, Any], path: str | os.PathLike) -> str:
    return str(config.get("name") or Path(path).stem)


# --------------------------------------------------------------------------------------------------
# The trial's command, exactly as `wandb agent` builds it


def expand_command(config: dict[str, Any], run_args: dict[str, dict[str, Any]], args_json_file: str | None = None) -> list[str]:
    """The argv the W&B agent runs for one trial.

    `run_args` is a run config as the agent receives it: `{"key": {"value": v}, ...}`. The macros
    (`${program}`, `${args_no_hyphens}`, `${envvar:NAME}`, ...) are filled in by wandb's own functions
    (`create_sweep_command`, `create_sweep_command_args`); the last step, replacing each element that is
    a whole macro by its list of words, is the loop inside `wandb.wandb_agent.Agent._command_run`,
    which is not a function of its own: it is repeated here line for line.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    # create_sweep_command edits its argument in place (and would edit wandb's default list): copy.
    command = sweep_utils.create_sweep_command(copy.deepcopy(config.get("command")) or list(sweep_utils.DEFAULT_SWEEP_COMMAND))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": run_args})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [config.get("program")] if config.get("program") else []
    sweep_vars["args_json_file"] = [args_json_file] if args_json_file else []
    if sys.platform != "win32":
        sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv += [chunk]
    return argv


def script_overrides(argv: Sequence[str], program: str | None) -> list[str]:
    """The Hydra overrides the trial's script receives: every argument after the program.

    Without the program in argv (e.g. `-m pdiff.train`), the `key=value` words that are not launcher flags.
    """
    if program and program in argv:
        return list(argv[list(argv).index(program) + 1 :])
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _plain(value: Any) -> Any:
    """numpy scalars (what the `sweeps` engine samples) as Python values, so commands and JSON read naturally."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def parse_overrides(overrides: Sequence[str], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Extra `key=value` words from the command line, as constant run args appended to every trial."""
    extra: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"{item!r} is not a key=value override")
        if key in config["parameters"]:
            raise SweepError(f"{key} is a parameter of the sweep; change its values in the sweep file instead")
        extra[key] = {"value": value}
    return extra


def _import_sweeps():
    """The `sweeps` engine, or None where it is not installed."""
    import warnings

    with warnings.catch_warnings():
        # sweeps 0.3 declares a pydantic-v1 style `class Config`; harmless, but pydantic warns at import.
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2", category=UserWarning)
        try:
            import sweeps
        except ImportError:
            return None
    return sweeps


def server_instructions(config_path: str | os.PathLike, config: dict[str, Any]) -> str:
    """How to run a sweep on a W&B server (what `launch/sweep.sh` does)."""
    project = config.get("project") or os.environ.get("WANDB_PROJECT") or "pdiff"
    return "\n".join(
        [
            f"# Sweep {sweep_name(config, config_path)} ({config['method']}, metric {(config.get('metric') or {}).get('name')}) on a W&B server:",
            f"wandb sweep --project {shlex.quote(project)} {shlex.quote(str(config_path))}   # prints the sweep id",
            "wandb agent ENTITY/PROJECT/SWEEP_ID                  # on every machine, from the repository root",
            f"# or both at once: launch/sweep.sh {shlex.quote(str(config_path))} --agents N",
            f"# without a server: pdiff sweep {shlex.quote(str(config_path))} --local --count N",
        ]
    )
