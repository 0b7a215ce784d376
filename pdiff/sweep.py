"""Hyperparameter sweeps over the generator, written in W&B's sweep format.

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

import contextlib
import copy
import json
import os
import random
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from .config import ConfigError, load_config

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
    config = yaml.safe_load(path.read_text())
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


# --------------------------------------------------------------------------------------------------
# Reading a trial's result


def lookup_metric(report: dict[str, Any], name: str) -> float:
    """The value W&B would hold as the trial's summary `name`, read from its JSON report.

    `name` may be a top-level key of the report, a path through it (`generated/val/median`), or, for a
    pdiff evaluation report, one of the scalars pdiff/train.py logs from it: `eval/` + a key of
    `pdiff.evaluate.summary_metrics(report)`, e.g. `eval/generated/val_median`.
    """
    candidates: dict[str, Any] = dict(report)
    if "generated" in report and "originals" in report:
        try:
            from .evaluate import summary_metrics

            flat = summary_metrics(report)
            candidates.update(flat)
            candidates.update({f"eval/{k}": v for k, v in flat.items()})
        except (ImportError, KeyError, TypeError):
            pass  # not the report layout this pdiff writes: fall back to keys and paths
    if name in candidates and not isinstance(candidates[name], (dict, list)):
        return float(candidates[name])
    node: Any = report
    for part in name.split("/"):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        if not isinstance(node, (dict, list)):
            return float(node)
    raise KeyError(f"metric {name!r} is not in the report (scalars: {', '.join(sorted(k for k, v in candidates.items() if not isinstance(v, (dict, list))))})")


def metrics_path(template: str, overrides: Sequence[str], env: dict[str, str]) -> Path:
    """Where a trial writes its report: `template` formatted with the trial's own composed config.

    The trial's overrides are composed the way the trial composes them, under the trial's environment
    (the sweep files put `${oc.env:WANDB_RUN_ID}` in output_dir), so `{output_dir}`, `{generator_dir}`
    and any other top-level key mean what they mean inside the trial.
    """
    if "{" not in template:
        return Path(template)
    with _environ(env):
        cfg = load_config(overrides)
    values = {k: v for k, v in cfg.items() if not hasattr(v, "items")}
    try:
        return Path(template.format(**values))
    except KeyError as err:
        raise SweepError(f"--metrics-file {template!r}: {err} is not a top-level config key") from err


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------------
# The local driver


@dataclass
class Trial:
    run_id: str
    params: dict[str, Any]                   # the sampled run config, {"key": {"value": v}}
    command: list[str]
    state: str = "pending"                   # a sweeps.RunState value
    exitcode: int | None = None
    metric: float | None = None
    metrics_file: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_sweep_run(self, metric_name: str | None):
        from sweeps import SweepRun

        summary = {metric_name: self.metric} if metric_name and self.metric is not None else {}
        return SweepRun(name=self.run_id, config=self.params, state=self.state, summary_metrics=summary, exitcode=self.exitcode)


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


def _require_sweeps():
    sweeps = _import_sweeps()
    if sweeps is None:
        raise SweepError(SWEEPS_INSTALL_HINT)
    return sweeps


def _load_state(path: Path, config: dict[str, Any]) -> list[Trial]:
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    if state.get("config") != _plain(config):
        raise SweepError(
            f"{path} holds a local sweep with a different sweep config. Continue it with its own config, "
            "or start a new one with --state elsewhere (or delete the file)."
        )
    return [Trial(**t) for t in state["trials"]]


def _save_state(path: Path, config: dict[str, Any], trials: list[Trial]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": _plain(config), "trials": [asdict(t) for t in trials]}, indent=2))
    tmp.replace(path)


def trial_environment(run_id: str, run_args: dict[str, Any], group: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `wandb agent` gives a trial, for a sweep without a server.

    WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH (a YAML of the run args, read by `wandb.init` into the run's
    config) as the agent sets them; W&B offline unless WANDB_MODE is set; the trials grouped by sweep
    name. WANDB_SWEEP_ID stays unset: there is no server-side sweep to attach the runs to. The folder of
    this Python comes first on PATH, so `accelerate` and `python` in the command are this environment's.
    """
    from wandb.sdk.lib import config_util

    env = dict(os.environ if base is None else base)
    env["WANDB_RUN_ID"] = run_id
    param_path = os.path.join(env.get("WANDB_DIR", ""), "wandb", "sweep-local", f"config-{run_id}.yaml")
    config_util.save_config_file_from_dict(param_path, run_args)
    env["WANDB_SWEEP_PARAM_PATH"] = param_path
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_RUN_GROUP", group)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def run_local(
    config_path: str | os.PathLike,
    count: int | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    state_path: str | os.PathLike | None = None,
    metrics_file: str = DEFAULT_METRICS_FILE,
    seed: int = 0,
    stream: Any = None,
) -> list[Trial]:
    """Run up to `count` trials of a sweep here, one after another; returns every trial of the sweep so far
    (with `dry_run`, the trials that would run).

    `count=None` runs a grid to its end (random and bayes need a count). With `dry_run`, the next trials'
    commands are printed (proposed after the saved ones, as if running), nothing runs and no state is written.
    """
    sweeps = _require_sweeps()
    import numpy as np
    from wandb.sdk.lib.runid import generate_id

    stream = stream or sys.stdout
    config = load_sweep_config(config_path)
    name = sweep_name(config, config_path)
    metric = (config.get("metric") or {}).get("name")
    if config["method"] == "bayes" and not metric:
        raise SweepError(f"{config_path}: a bayes sweep needs `metric: {{name: ..., goal: maximize}}`")
    if count is None and config["method"] != "grid":
        raise SweepError(f"a {config['method']} sweep never ends by itself: give --count N")
    program = config.get("program")
    if program and not Path(program).exists():
        raise SweepError(f"program {program} not found from {Path.cwd()}: run the sweep from the repository root, as `wandb agent` would")
    extra = parse_overrides(overrides, config)

    state_path = Path(state_path or Path("outputs") / "sweeps" / "local" / f"{name}.json")
    trials = _load_state(state_path, config)  # earlier trials of this sweep: the engine builds on them
    proposed: list[Trial] = []  # a dry run's trials, never saved
    runs = [t.to_sweep_run(metric) for t in trials]
    seen_reports = {t.metrics_file for t in trials}
    done = 0
    while count is None or done < count:
        # Reproducible proposals: the engine draws from both `random` and numpy's global generator.
        random.seed(seed * 100_003 + len(runs))
        np.random.seed((seed * 100_003 + len(runs)) % 2**32)
        proposal = sweeps.next_run(config, runs, validate=True)
        if proposal is None:
            print(f"sweep {name}: the grid is exhausted after {len(runs)} trials", file=stream)
            break
        params = _plain(proposal.config)
        run_id = generate_id()
        run_args = {**params, **extra}
        command = expand_command(config, run_args)
        env = trial_environment(run_id, run_args, group=name) if not dry_run else {**os.environ, "WANDB_RUN_ID": run_id}
        report = metrics_path(metrics_file, script_overrides(command, program), env)
        # Trials must not share an output folder: checked up front with a second run id (the folder
        # should depend on it), then against every earlier trial.
        if done == 0 and report == metrics_path(metrics_file, script_overrides(command, program), {**env, "WANDB_RUN_ID": run_id + "x"}):
            seen_reports.add(str(report))
        if str(report) in seen_reports:
            raise SweepError(
                f"trial {run_id} would write {report}, like other trials: the sweep's command must give each "
                "trial its own output_dir, e.g. output_dir=outputs/sweeps/${oc.env:WANDB_SWEEP_ID,local}/${oc.env:WANDB_RUN_ID,run}"
            )
        seen_reports.add(str(report))
        trial = Trial(run_id=run_id, params=params, command=command, metrics_file=str(report), extra=extra)
        print(f"[{name} {len(runs) + 1}] {shlex.join(command)}", file=stream, flush=True)
        if dry_run:
            trial.state = "running"  # proposed as if running, so a grid moves on
            proposed.append(trial)
        else:
            _run_trial(trial, env, metric)
            print(f"[{name} {len(runs) + 1}] {trial.state}" + (f": {metric} = {trial.metric:.6g}" if trial.metric is not None else f" ({trial.error})"), file=stream, flush=True)
            trials.append(trial)
            _save_state(state_path, config, trials)
        runs.append(trial.to_sweep_run(metric))
        done += 1
    if dry_run:
        return proposed
    print(summarize(trials, config, state_path), file=stream)
    return trials


def _run_trial(trial: Trial, env: dict[str, str], metric: str | None) -> None:
    """Run the trial's command, then read its metric; a failed trial is recorded, not raised."""
    trial.exitcode = subprocess.run(trial.command, env=env).returncode
    if trial.exitcode != 0:
        trial.state, trial.error = "failed", f"exit code {trial.exitcode}"
        return
    trial.state = "finished"
    if not metric:
        return
    try:
        trial.metric = lookup_metric(json.loads(Path(trial.metrics_file).read_text()), metric)
    except (OSError, ValueError, KeyError) as err:
        trial.state, trial.error = "crashed", f"no {metric} in {trial.metrics_file}: {err}"


def summarize(trials: list[Trial], config: dict[str, Any], state_path: Path) -> str:
    metric = config.get("metric") or {}
    scored = [t for t in trials if t.metric is not None]
    lines = [f"{len(trials)} trials ({len(scored)} with {metric.get('name')}), state in {state_path}"]
    if scored:
        best = (min if metric.get("goal") == "minimize" else max)(scored, key=lambda t: t.metric)
        lines.append(f"best: {best.run_id} {metric.get('name')} = {best.metric:.6g}")
        lines += [f"  {k} = {v['value']}" for k, v in best.params.items()]
    return "\n".join(lines)


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


def main(
    config_path: str,
    local: bool = False,
    count: int | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    state_path: str | None = None,
    metrics_file: str = DEFAULT_METRICS_FILE,
    seed: int = 0,
) -> None:
    if not local:
        if overrides:
            raise SweepError("overrides apply to --local sweeps only: on a W&B server, put constant values in the sweep file")
        print(server_instructions(config_path, load_sweep_config(config_path)))
        return
    try:
        run_local(config_path, count, overrides, dry_run, state_path, metrics_file, seed)
    except ConfigError as err:
        raise SweepError(f"a trial's overrides do not compose: {err}") from err
