"""W&B sweeps: the sweep files, the trial command as the W&B agent builds it, and `pdiff sweep --local`.

The trial commands are checked against `wandb agent`'s own code path (Agent._command_run with the
process start captured), then run for real: a tiny `accelerate launch pdiff/train.py` per trial.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

from pdiff.sweeps import SweepError, expand_command, load_sweep_config, lookup_metric, run_local, script_overrides

SWEEP_FILES = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
OUTPUT_TEMPLATE = "output_dir=outputs/sweeps/${oc.env:WANDB_SWEEP_ID,local}/${oc.env:WANDB_RUN_ID,run}"
# A generator small enough to train and evaluate in seconds on 2 CPU cores.
TINY = {
    "train.ae_steps": 8, "train.diffusion_steps": 8, "train.eval_every": 0, "train.num_final_models": 4,
    "train.eval_num_models": 4, "train.batch_size": 16, "train.checkpointing_steps": 0, "train.log_every": 4,
    "generator.autoencoder.channels": "[16,32]", "generator.unet.block_out_channels": "[8,16]",
    "generator.num_inference_steps": 4, "cpu": "true",
}
needs_sweeps = pytest.mark.skipif(
    __import__("importlib").util.find_spec("sweeps") is None,
    reason="the `sweeps` engine is not installed: pip install --no-deps sweeps==0.3.0 && pip install -e '.[sweeps]'",
)


def _env(**extra: str) -> dict[str, str]:
    """The test environment with this Python's bin folder first, so `accelerate` is the venv's."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]), **extra}


def _sample(config: dict, seed: int = 0) -> dict:
    """One proposal of the `sweeps` engine (W&B's own search code), as plain Python values."""
    import random

    import numpy as np
    import sweeps

    random.seed(seed)
    np.random.seed(seed)
    run = sweeps.next_run(config, [], validate=True)
    return json.loads(json.dumps(run.config, default=lambda o: o.item()))


def _agent_command(config: dict, run_args: dict, run_id: str, monkeypatch) -> list[str]:
    """The argv `wandb agent` starts for this run: its real `_command_run`, with the process start captured."""
    from wandb import wandb_agent

    started = {}

    class Captured:
        def __init__(self, command=None, env=None, **kwargs):
            started["command"], started["env"] = command, env

    monkeypatch.setattr(wandb_agent, "AgentProcess", Captured)
    for key in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them in os.environ: undo after the test
        monkeypatch.setenv(key, "")
    agent = wandb_agent.Agent(api=None, queue=None)
    agent._sweep_command = list(config["command"])
    agent._command_run({"type": "run", "run_id": run_id, "program": config.get("program"), "args": run_args})
    return started["command"]


@pytest.fixture
def sweep_dir(tmp_path, digits_params):
    """A working folder outside the repository (trials run the installed pdiff) holding the digits dataset."""
    shutil.copytree(digits_params, tmp_path / "outputs" / "digits" / "params")
    return tmp_path


# -- the sweep files ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_a_valid_wandb_sweep(path):
    config = load_sweep_config(path)  # includes W&B's JSON-schema check where `sweeps` is installed
    assert "program" not in config  # trials run the installed pdiff (`-m pdiff.train`), from any folder
    assert config["metric"]["goal"] == "maximize"
    # Macros must be whole list elements (the agent substitutes nothing else); each trial its own folder.
    assert config["command"][:4] == ["accelerate", "launch", "-m", "pdiff.train"]
    assert "${args_no_hyphens}" in config["command"] and OUTPUT_TEMPLATE in config["command"]


@needs_sweeps
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sampled_trial_composes_a_pdiff_config(path, monkeypatch):
    """The sampled keys exist in pdiff's config and take the sampled values, as the trial will see them."""
    from pdiff.config import load_config

    from omegaconf import OmegaConf

    config = load_sweep_config(path)
    params = _sample(config)
    argv = expand_command(config, params)
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    cfg = load_config(script_overrides(argv, config.get("program")))
    assert cfg.output_dir == "outputs/sweeps/local/r1"
    for key, spec in params.items():
        value = cfg.task.name if key == "task" else OmegaConf.select(cfg, key)
        if isinstance(spec["value"], float):
            assert value == pytest.approx(spec["value"]), key
        else:
            assert value == spec["value"], key


def test_metric_name_is_what_train_logs(digits_params):
    """The sweeps' metric is in a real evaluation report, under the name pdiff/train.py logs to W&B."""
    from pdiff.data import ParameterDataset
    from pdiff.evaluation import evaluate_generated

    from pdiff.evaluation import noisy_copies

    originals = ParameterDataset.from_pretrained(digits_params)
    hotter = noisy_copies(originals.vectors, originals.layout, [4.0], 8, seed=1)[0][4.0]  # a curve point more novel than noise x1
    typed = evaluate_generated(originals, originals.vectors[:8], noise_scales=(1.0,), curve={2.0: hotter}, generated_temperature=1.0)
    report = typed.to_dict()
    expected = {"eval/generated/val_median": typed.generated.val.median, "eval/tradeoff/val_gain_over_noise": typed.val_gain_over_noise()}
    assert expected["eval/tradeoff/val_gain_over_noise"] is not None
    for path in SWEEP_FILES:
        name = load_sweep_config(path)["metric"]["name"]
        assert lookup_metric(report, name) == pytest.approx(expected[name])
    with pytest.raises(KeyError, match="not in the report"):
        lookup_metric(report, "eval/no_such_metric")


# -- the trial command ---------------------------------------------------------------------------


@needs_sweeps
@pytest.mark.slow
def test_agent_command_runs_a_trial(sweep_dir, monkeypatch):
    """Sample a trial of generator_bayes, expand it as `wandb agent` does, and run exactly that argv."""
    config = load_sweep_config(REPO_ROOT / "configs" / "sweeps" / "generator_bayes.yaml")
    params = _sample(config, seed=3)
    run_args = {**params, **{k: {"value": v} for k, v in TINY.items()}}
    run_id = "trial0001"

    argv = _agent_command(config, run_args, run_id, monkeypatch)
    expected = ["accelerate", "launch", "-m", "pdiff.train", OUTPUT_TEMPLATE] + [f"{k}={v['value']}" for k, v in run_args.items()]
    assert argv == expected
    assert argv == expand_command(config, run_args)  # pdiff's expansion is the agent's
    latent_noise = params["generator.autoencoder.latent_noise"]["value"]
    assert f"generator.autoencoder.latent_noise={latent_noise}" in argv and "dataset_dir=outputs/digits/params" in argv

    proc = subprocess.run(argv, cwd=sweep_dir, env=_env(WANDB_RUN_ID=run_id, WANDB_MODE="offline"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep_dir / "outputs" / "sweeps" / "local" / run_id
    trained = json.loads((out / "config.json").read_text())
    assert trained["generator"]["autoencoder"]["latent_noise"] == pytest.approx(latent_noise)
    assert trained["generator"]["autoencoder"]["latent_channels"] == params["generator.autoencoder.latent_channels"]["value"]
    assert trained["train"]["ae_lr"] == pytest.approx(params["train.ae_lr"]["value"])
    report = json.loads((out / "generator" / "report.json").read_text())
    assert 0.0 <= lookup_metric(report, config["metric"]["name"]) <= 1.0
    assert list(out.glob(f"wandb/offline-run-*-{run_id}")), "the trial did not log an offline W&B run"


# -- pdiff sweep --local --------------------------------------------------------------------------

# A trial program that reads its key=value overrides like pdiff's stages do (OmegaConf, `oc.env`), without
# training: it scores latent_noise, fails for large values, and writes the report where train.py would.
TOY_PROGRAM = """\
import json, sys
from pathlib import Path
from omegaconf import OmegaConf

cfg = OmegaConf.from_dotlist(sys.argv[1:])
noise = float(cfg.generator.autoencoder.latent_noise)
if noise > 0.4:
    sys.exit(3)  # a trial that fails
out = Path(cfg.output_dir) / "generator"
out.mkdir(parents=True)
(out / "report.json").write_text(json.dumps({"generated": {"val": {"median": 1.0 - abs(noise - 0.1)}}}))
"""


def _toy_sweep(tmp_path: Path, **changes) -> Path:
    config = {
        "name": "toy", "program": "toy.py", "method": "grid",
        "metric": {"name": "generated/val/median", "goal": "maximize"},
        "command": ["${env}", "${interpreter}", "${program}", OUTPUT_TEMPLATE, "${args_no_hyphens}"],
        "parameters": {"generator.autoencoder.latent_noise": {"values": [0.0, 0.1, 0.5]}, "seed": {"value": 7}},
        **changes,
    }
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "toy.py").write_text(TOY_PROGRAM)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@needs_sweeps
def test_local_sweep_runs_continues_and_records_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _toy_sweep(tmp_path)
    first = run_local(path, count=2)
    assert [t.state for t in first] == ["finished", "finished"]
    state = tmp_path / "outputs" / "sweeps" / "local" / "toy.json"
    assert len(json.loads(state.read_text())["trials"]) == 2
    (left,) = run_local(path, dry_run=True)  # a dry run proposes after the saved trials, and saves nothing
    assert len(json.loads(state.read_text())["trials"]) == 2

    trials = run_local(path, count=5)  # continues the same sweep: only the grid's last point is left
    assert "the grid is exhausted after 3 trials" in capsys.readouterr().out
    noises = [t.params["generator.autoencoder.latent_noise"]["value"] for t in trials]
    assert sorted(noises) == [0.0, 0.1, 0.5] and noises[2] == left.params["generator.autoencoder.latent_noise"]["value"]
    by_noise = dict(zip(noises, trials))
    assert by_noise[0.5].state == "failed" and by_noise[0.5].exitcode == 3 and by_noise[0.5].metric is None
    assert by_noise[0.1].metric == pytest.approx(1.0) and by_noise[0.0].metric == pytest.approx(0.9)
    assert all(t.params["seed"] == {"value": 7} for t in trials)
    for t in trials:  # each trial ran with its own W&B run id, output folder and sweep-parameter file
        assert t.metrics_file == f"outputs/sweeps/local/{t.run_id}/generator/report.json"
        params = yaml.safe_load((Path(os.environ.get("WANDB_DIR", "")) / "wandb" / "sweep-local" / f"config-{t.run_id}.yaml").read_text())
        assert params["generator.autoencoder.latent_noise"] == t.params["generator.autoencoder.latent_noise"]


@needs_sweeps
def test_local_sweep_dry_run_prints_commands_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _toy_sweep(tmp_path)
    trials = run_local(path, dry_run=True, overrides=["train.ae_steps=3"])
    out = capsys.readouterr().out
    assert len(trials) == 3 and "exhausted after 3 trials" in out
    assert out.count("toy.py") == 3 and "train.ae_steps=3" in out and "generator.autoencoder.latent_noise=0.5" in out
    assert not (tmp_path / "outputs").exists()


@needs_sweeps
def test_local_sweep_refuses_what_cannot_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match="give --count"):
        run_local(_toy_sweep(tmp_path, method="random"))
    with pytest.raises(SweepError, match="bayes sweep needs `metric"):
        run_local(_toy_sweep(tmp_path, method="bayes", metric=None), count=1)
    with pytest.raises(SweepError, match="program missing.py not found"):
        run_local(_toy_sweep(tmp_path, program="missing.py"), count=1)
    with pytest.raises(SweepError, match="its own output_dir"):  # found before any trial runs
        run_local(_toy_sweep(tmp_path, command=["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]), count=2)
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(SweepError, match="is a parameter of the sweep"):
        run_local(_toy_sweep(tmp_path), count=1, overrides=["generator.autoencoder.latent_noise=0.2"])
    with pytest.raises(SweepError, match="method 'hyperband' is not one of"):
        run_local(_toy_sweep(tmp_path, method="hyperband"), count=1)
    # A different sweep config in the same state file is not silently mixed in.
    run_local(_toy_sweep(tmp_path), count=1)
    with pytest.raises(SweepError, match="different sweep config"):
        run_local(_toy_sweep(tmp_path, parameters={"generator.autoencoder.latent_noise": {"values": [0.2]}}), count=1)


def test_local_sweep_without_the_engine_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sweeps", None)  # import sweeps -> ImportError
    with pytest.raises(SweepError, match="pip install --no-deps 'sweeps==0.3.0'"):
        run_local(_toy_sweep(tmp_path), count=1)


def test_cli_without_local_prints_the_wandb_commands(run_cli, capsys, monkeypatch):
    from pdiff.commands import main

    proc = run_cli("sweep", "configs/sweeps/noise_grid.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "wandb sweep --project pdiff configs/sweeps/noise_grid.yaml" in proc.stdout
    assert "wandb agent " in proc.stdout
    monkeypatch.chdir(REPO_ROOT)
    assert main(["sweep", "configs/sweeps/noise_grid.yaml", "train.ae_steps=3"]) == 2
    assert "--local sweeps only" in capsys.readouterr().err
    assert main(["sweep", "configs/sweeps/nope.yaml", "--local"]) == 2
    assert "no sweep file" in capsys.readouterr().err


@needs_sweeps
@pytest.mark.slow
def test_cli_local_sweep_trains_a_generator(sweep_dir, run_cli):
    """`pdiff sweep configs/sweeps/noise_grid.yaml --local --count 1` + a tiny budget: one real trial."""
    shutil.copytree(REPO_ROOT / "configs" / "sweeps", sweep_dir / "sweeps")
    proc = run_cli("sweep", "sweeps/noise_grid.yaml", "--local", "--count", "1", *[f"{k}={v}" for k, v in TINY.items()], cwd=sweep_dir, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = json.loads((sweep_dir / "outputs" / "sweeps" / "local" / "noise_grid.json").read_text())
    (trial,) = state["trials"]
    assert trial["state"] == "finished" and trial["exitcode"] == 0
    assert trial["params"]["generator.autoencoder.latent_noise"]["value"] in (0.0, 0.01, 0.1, 0.5)
    report = json.loads((sweep_dir / trial["metrics_file"]).read_text())
    assert trial["metric"] == pytest.approx(report["generated"]["val"]["median"])
    assert f"best: {trial['run_id']} eval/generated/val_median" in proc.stdout
