"""Running a sweep here, without a W&B server: the `sweeps` engine proposes, trials run as subprocesses.

Each trial's command is expanded with the W&B agent's own code and run with the environment the agent
would give it (run id, sweep parameters for `wandb.init`; W&B offline unless WANDB_MODE says
otherwise); its metric is read back from the JSON report the trial writes (`--metrics-file`). The
driver keeps its state (sweep config, every trial's parameters, command, exit code and metric) in a
JSON file, so running it again continues the same sweep: bayes search sees all earlier trials.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import load_config
from ..io import read_json, write_text
from .files import (
    DEFAULT_METRICS_FILE,
    SWEEPS_INSTALL_HINT,
    SweepError,
    _import_sweeps,
    _plain,
    expand_command,
    load_sweep_config,
    parse_overrides,
    script_overrides,
    sweep_name,
)


def lookup_metric(report: dict[str, Any], name: str) -> float:
    """The value W&B would hold as the trial's summary `name`, read from its JSON report.

    `name` may be a top-level key of the report, a path through it (`generated/val/median`), or, for a
    pdiff evaluation report, one of the scalars pdiff/train.py logs from it: `eval/` + a key of
    `pdiff.evaluation.render.summary_metrics(report)`, e.g. `eval/generated/val_median`.
    """
    candidates: dict[str, Any] = dict(report)
    if "generated" in report and "originals" in report:
        try:
            from ..evaluation import Report
            from ..evaluation.render import summary_metrics

            flat = summary_metrics(Report.from_dict(report))
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


def _require_sweeps():
    sweeps = _import_sweeps()
    if sweeps is None:
        raise SweepError(SWEEPS_INSTALL_HINT)
    return sweeps


def _load_state(path: Path, config: dict[str, Any]) -> list[Trial]:
    if not path.exists():
        return []
    state = read_json(path)
    if state.get("config") != _plain(config):
        raise SweepError(
            f"{path} holds a local sweep with a different sweep config. Continue it with its own config, "
            "or start a new one with --state elsewhere (or delete the file)."
        )
    return [Trial(**t) for t in state["trials"]]


def _save_state(path: Path, config: dict[str, Any], trials: list[Trial]) -> None:
    write_text(path, json.dumps({"config": _plain(config), "trials": [asdict(t) for t in trials]}, indent=2))


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
    _require_sweeps()
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
    while count is None or len(proposed) < count:
        trial, env = _propose(config, runs, extra, seen_reports, metrics_file, seed, dry_run, first=not proposed)
        if trial is None:
            print(f"sweep {name}: the grid is exhausted after {len(runs)} trials", file=stream)
            break
        print(f"[{name} {len(runs) + 1}] {shlex.join(trial.command)}", file=stream, flush=True)
        if dry_run:
            trial.state = "running"  # proposed as if running, so a grid moves on
        else:
            _run_trial(trial, env, metric)
            print(f"[{name} {len(runs) + 1}] {trial.state}" + (f": {metric} = {trial.metric:.6g}" if trial.metric is not None else f" ({trial.error})"), file=stream, flush=True)
            trials.append(trial)
            _save_state(state_path, config, trials)
        proposed.append(trial)
        runs.append(trial.to_sweep_run(metric))
    if dry_run:
        return proposed
    print(summarize(trials, config, state_path), file=stream)
    return trials


def _propose(config: dict, runs: list, extra: dict, seen_reports: set, metrics_file: str, seed: int, dry_run: bool, first: bool) -> tuple[Trial | None, dict]:
    """The engine's next trial (None when a grid is exhausted) and the environment it runs in."""
    import numpy as np
    from wandb.sdk.lib.runid import generate_id

    # Reproducible proposals: the engine draws from both `random` and numpy's global generator.
    random.seed(seed * 100_003 + len(runs))
    np.random.seed((seed * 100_003 + len(runs)) % 2**32)
    proposal = _require_sweeps().next_run(config, runs, validate=True)
    if proposal is None:
        return None, {}
    params, run_id, program = _plain(proposal.config), generate_id(), config.get("program")
    run_args = {**params, **extra}
    command = expand_command(config, run_args)
    env = trial_environment(run_id, run_args, group=sweep_name(config, "")) if not dry_run else {**os.environ, "WANDB_RUN_ID": run_id}
    report = metrics_path(metrics_file, script_overrides(command, program), env)
    # Trials must not share an output folder: checked up front with a second run id (the folder
    # should depend on it), then against every earlier trial.
    if first and report == metrics_path(metrics_file, script_overrides(command, program), {**env, "WANDB_RUN_ID": run_id + "x"}):
        seen_reports.add(str(report))
    if str(report) in seen_reports:
        raise SweepError(
            f"trial {run_id} would write {report}, like other trials: the sweep's command must give each "
            "trial its own output_dir, e.g. output_dir=outputs/sweeps/${oc.env:WANDB_SWEEP_ID,local}/${oc.env:WANDB_RUN_ID,run}"
        )
    seen_reports.add(str(report))
    return Trial(run_id=run_id, params=params, command=command, metrics_file=str(report), extra=extra), env


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
        trial.metric = lookup_metric(read_json(trial.metrics_file), metric)
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

