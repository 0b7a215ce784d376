"""Bad input, as a hostile newcomer types it: each case is refused before any work, with one line that
names the key or file and says what to do, exit status 2, no traceback, and nothing written.

The table below is the README's reliability table; keep the two in step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pdiff.commands import main as cli
from pdiff.io import LOCK_FILE, output_lock

from generator_helpers import write_malicious_pickle

# (command line, what the one-line error must say). {data} is a copy of the digits parameter dataset,
# {tmp} a scratch folder; nothing here trains or evaluates anything.
CONFIG_CASES = [
    ("collect task.param.k=abc", "task.param.k=abc: expected an integer"),
    ("collect task.param.k=0", "task.param.k=0: must be >= 1"),
    ("collect task.param.save_every=0", "task.param.save_every=0: must be >= 1"),
    ("collect task.param.lr=abc", "task.param.lr=abc: expected a number"),
    ("collect task.param.lr=-1", "task.param.lr=-1: must be > 0"),
    ("collect task.base.epochs=-1", "task.base.epochs=-1: must be >= 0"),
    ("collect task.base.augment=maybe", "task.base.augment=maybe: expected true or false"),
    ("collect task=custom task.network._target_=no_such_pkg.Net task.data.name={tmp} task.param.patterns=[fc.*]",
     "cannot import task.network._target_=no_such_pkg.Net: No module named 'no_such_pkg'. Install the package that provides no_such_pkg, or put"),
    ("collect task=custom task.network._target_=collections.OrderedDict task.data.name={tmp} task.param.patterns=[fc.*]",
     "task.network._target_=collections.OrderedDict is not a torch.nn.Module class"),
    ("collect task.network._target_=torchvision.models.resnet18", "task.network names both name='small_cnn' and _target_"),
    ("train generator=tokens generator.autoencoder.chunk_size=0", "generator.autoencoder.chunk_size=0: must be >= 1"),
    ("collect task.data.val_size=0", "task.data.val_size=0: must be > 0"),
    ("collect task.data.val_size=2.5", "task.data.val_size=2.5: give a whole number of images or a fraction below 1"),
    ("collect task.data.source=ftp", "task.data.source=ftp: choose one of digits, torchvision, hub, fake"),
    ("collect task.eval.batch_size=0", "task.eval.batch_size=0: must be >= 1"),
    ("collect seed=-1", "seed=-1: must be >= 0"),
    ("collect overwrite=yes", "overwrite=yes: expected true or false"),
    ("collect hub.push_to_hub=true", "hub.push_to_hub=true needs hub.dataset_id"),
    ("collect task=no_such_task", "no_such_task"),
    ("collect task.param.kk=1", "unknown config key `task.param.kk`: under `task.param` there is no `kk`. Known keys under `task.param`:"),
    ("collect nokey=1", "unknown config key `nokey`"),
    ("train train.log_every=0", "train.log_every=0: must be >= 1"),
    ("train generator.autoencoder.latent_channels=0", "generator.autoencoder.latent_channels=0: must be >= 1"),
    ("train generator.autoencoder.channels=[8,x]", "generator.autoencoder.channels=[8, 'x']: expected a list of integers"),
    ("train generator.autoencoder.normalization=batch", "generator.autoencoder.normalization=batch: choose one of residual, tensor"),
    ("train generator.unet.norm_num_groups=0", "generator.unet.norm_num_groups=0: must be >= 1"),
    ("train generator.scheduler.beta_end=2", "generator.scheduler.beta_end=2: must be < 1"),
    ("train generator.sampler=euler", "generator.sampler=euler: choose one of ddim, ddpm"),
    ("train generator.num_inference_steps=0", "generator.num_inference_steps=0: must be >= 1"),
    ("train train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train train.ae_steps=-1", "train.ae_steps=-1: must be >= 0"),
    ("train train.ae_lr=0", "train.ae_lr=0: must be > 0"),
    ("train train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0: must be >= 1"),
    ("train train.lr_scheduler=bogus", "train.lr_scheduler=bogus: choose one of"),
    ("train train.ema_decay=1.5", "train.ema_decay=1.5: must be < 1"),
    ("train train.mixed_precision=fp8", "train.mixed_precision=fp8: choose one of null, auto, no, bf16, fp16"),
    ("train train.mixed_precision=fp16 cpu=true", "train.mixed_precision=fp16 needs a CUDA GPU"),
    ("train train.report_to=tensorboard", "train.report_to=tensorboard: choose one of none, wandb"),
    ("train train.phase=both", "train.phase=both: choose one of all, autoencoder, diffusion"),
    ("train train.phase=diffusion", "train.phase=diffusion needs train.autoencoder_path"),
    ("train train.autoencoder_path={tmp}/none", "train.autoencoder_path={tmp}/none: no such folder"),
    ("train train.checkpoints_total_limit=0", "train.checkpoints_total_limit=0: must be >= 1"),
    ("train hub.push_to_hub=true", "hub.push_to_hub=true needs hub.model_id"),
    ("config task.param.k=abc", "task.param.k=abc: expected an integer"),
    ("config train.eval_every=-1", "train.eval_every=-1: must be >= 0"),
    ("config +task.eval.average_noise_scales=[1,-1]", "task.eval.average_noise_scales=[1, -1]: must be >= 0 each"),
    ("config +task.eval.noise_scales=[-2]", "task.eval.noise_scales=[-2]: must be >= 0 each"),
    ("bench task.param.k=abc --device cpu", "task.param.k=abc: expected an integer"),
    ("train generator.unet.block_out_channels=[]", "generator.unet.block_out_channels=[]: give at least one value"),
    ("train generator.autoencoder.channels=[]", "generator.autoencoder.channels=[]: give at least one value"),
    ("train train.ae_lr=inf", "train.ae_lr=inf: must be a finite number"),
    ("collect seed=99999999999999999999", "seed=99999999999999999999: must be < 4294967296"),
    ("config +train.ae_stepz=10", "unknown config key `train.ae_stepz`: under `train` there is no `ae_stepz`"),
    ("train generator.scheduler.beta_start=0.5 generator.scheduler.beta_end=0.1", "beta_start=0.5 must be below generator.scheduler.beta_end=0.1"),
    ("train generator.num_inference_steps=5000", "generator.num_inference_steps=5000: at most generator.scheduler.num_train_timesteps=1000"),
    ("collect output_dir=", "output_dir is empty: give a folder"),
    ("train train.autoencoder_path={tmp}/empty", "train.autoencoder_path={tmp}/empty holds no saved autoencoder (config.json is missing)"),
    ("collect task.param.k=100000000 output_dir={tmp}/c", "task.param.k=100000000 checkpoints of 778 parameters need 622 GB"),
    ("run task.param.k=1 output_dir={tmp}/r", "task.param.k=1: a generator needs at least 2 checkpoints"),
    ("train hub.push_to_hub=true hub.model_id=user/name", "hub.push_to_hub=true cannot upload in offline mode (HF_HUB_OFFLINE=1)"),
]

FILE_CASES = [
    ("train cpu=true dataset_dir={tmp}/none output_dir={tmp}/out", "no parameter dataset folder at {tmp}/none"),
    ("train cpu=true dataset_dir={tmp}/file.txt output_dir={tmp}/out", "{tmp}/file.txt is a file"),
    ("train cpu=true dataset_dir={tmp}/empty output_dir={tmp}/out", "{tmp}/empty is not a pdiff parameter dataset"),
    ("train cpu=true dataset_dir={tmp}/bad_json output_dir={tmp}/out", "pdiff_dataset.json is not valid JSON"),
    ("train cpu=true dataset_dir={tmp}/no_rows output_dir={tmp}/out", "holds no checkpoints (0 rows)"),
    ("train cpu=true dataset_dir={tmp}/one_row output_dir={tmp}/out", "holds 1 checkpoint: a generator needs at least 2"),
    ("train cpu=true dataset_dir={tmp}/truncated_arrow output_dir={tmp}/out", "cannot be read"),
    ("train cpu=true dataset_dir={tmp}/truncated_weights output_dir={tmp}/out", "base_model.safetensors is not a valid safetensors file"),
    ("train cpu=true dataset_dir={tmp}/nan_rows output_dir={tmp}/out", "contain NaN or Inf"),
    ("sample --model {tmp}/none --out {tmp}/s", "no generator folder at {tmp}/none"),
    ("sample --model {data} --out {tmp}/s", "model_index.json is missing"),
    ("sample --model {tmp}/none --out {tmp}/file.txt", "{tmp}/file.txt is a file"),
    ("sample --model {tmp}/none --out {data}", "already holds a sample (or other files); pass --overwrite"),
    ("sample --model {tmp}/none --out {tmp}/s --device bogus", "--device bogus: not a device"),
    ("sample --model {tmp}/none --out {tmp}/s --device cuda:0", "--device cuda:0: no CUDA GPU is available here"),
    ("evaluate --dataset {tmp}/none --generated {data} --out {tmp}/e", "no parameter dataset folder at {tmp}/none"),
    ("evaluate --dataset {data} --generated {tmp}/file.txt --out {tmp}/e", "{tmp}/file.txt: give a parameter dataset folder"),
    ("evaluate --dataset {data} --generated {tmp}/objects.npy --out {tmp}/e", "{tmp}/objects.npy cannot be read"),
    ("evaluate --dataset {data} --generated {tmp}/code.pt --out {tmp}/e", "{tmp}/code.pt cannot be read"),
    ("evaluate --dataset {data} --generated {tmp}/two.safetensors --out {tmp}/e", "{tmp}/two.safetensors holds 2 tensors"),
    ("evaluate --dataset {data} --generated {tmp}/wrong_dim.npy --out {tmp}/e", "expected parameter vectors of shape [D] or [B, D] with D=778"),
    ("evaluate --dataset {data} --generated {tmp}/empty --out {tmp}/e", "{tmp}/empty is not a pdiff parameter dataset"),
    ("evaluate --dataset {data} --generated {data} --out {tmp}/file.txt", "--out {tmp}/file.txt is a file"),
    ("evaluate --dataset {data} --generated {data} --out {tmp}/e --device bogus", "--device bogus: not a device"),
    ("evaluate --dataset {data} --generated {tmp}/other_base --out {tmp}/e", "different frozen base weights"),
    ("evaluate --dataset {tmp}/nan_rows --generated {tmp}/nan_rows --out {tmp}/e", "1 of 4 parameter vectors contain NaN or Inf (rows [1])"),
    ("evaluate --dataset {data} --generated {tmp}/other_networks --out {tmp}/e", "other frozen base weights than the original parameter dataset's"),
    ("sweep {tmp}/malformed.yaml", "{tmp}/malformed.yaml is not valid YAML"),
    ("sweep {tmp}/none.yaml", "no sweep file at {tmp}/none.yaml"),
    ("sweep {tmp}/bad_method.yaml", "method 'annealing' is not one of grid, random, bayes"),
    ("sweep configs/sweeps/noise_grid.yaml train.ae_steps=3", "overrides apply to --local sweeps only"),
    ("bench --device bogus", "--device bogus: not a device"),
    ("sample --model {data} --out {data} --overwrite", "--out {data} would replace --model {data}, which this run reads"),
    ("sample --model {tmp}/none --dataset {data} --out {tmp}/s", "--dataset is read by --evaluate only"),
    ("evaluate --dataset {data} --generated {data} --out {tmp}/e --curve-num-models 5", "shape the curve of --curve-model: add --curve-model"),
    ("evaluate --dataset {data} --generated {data} --out {tmp}/e --num-noise-models 100000000", "(100000000 per noise scale) need"),
    ("bench --dataset {data}", "--dataset goes with --model"),
    ("bench --workdir {tmp}/file.txt", "{tmp}/file.txt is a file, not a folder"),
    ("import-checkpoints --from {tmp}/empty task=digits output_dir={tmp}/imp", "--from {tmp}/empty is a folder; pass its checkpoint files"),
    ("train cpu=true dataset_dir={tmp}/no_version output_dir={tmp}/out", "pdiff_dataset.json is damaged: it holds no format_version"),
    ("train cpu=true dataset_dir={data} output_dir={tmp}/out train.resume_from_checkpoint={tmp}/none",
     "train.resume_from_checkpoint={tmp}/none: no such folder"),
]

PARSER_CASES = [  # refused by argparse itself: exit 2 and a usage line
    ("sample --model m --out o --steps 0", "--steps: 0 is not a positive integer"),
    ("sample --model m --out o --steps -1", "--steps: -1 is not a positive integer"),
    ("sample --model m --out o --num-models 0", "--num-models: 0 is not a positive integer"),
    ("evaluate --dataset d --generated g --out o --batch-size 0", "--batch-size: 0 is not a positive integer"),
    ("evaluate --dataset d --generated g --out o --networks-per-chunk 0", "--networks-per-chunk: 0 is not a positive integer"),
    ("evaluate --dataset d --generated g --out o --average-noise-scales -1", "--average-noise-scales: -1 is not a finite number >= 0"),
    ("evaluate --dataset d --generated g --out o --noise-scales 1 nan", "--noise-scales: nan is not a finite number >= 0"),
    ("bench --num-models 0", "--num-models: 0 is not a positive integer"),
    ("bench --steps -1", "--steps: -1 is not a positive integer"),
    ("sample --model m --out o key=value", "unrecognized arguments: key=value"),
    ("collect --no-such-flag", "unrecognized arguments: --no-such-flag"),
    ("sweep configs/sweeps/noise_grid.yaml --local --count 0", "--count: 0 is not a positive integer"),
    ("sample --model m --out o --seed 18446744073709551616", "--seed: 18446744073709551616 is not a seed from 0 to 4294967295"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, digits_params) -> dict[str, Path]:
    """The broken files and folders the cases point at, made once."""
    from pdiff.data import ParameterDataset

    tmp = tmp_path_factory.mktemp("bad")
    data = Path(shutil.copytree(digits_params, tmp / "data"))
    (tmp / "file.txt").write_text("not a folder")
    (tmp / "empty").mkdir()
    shutil.copytree(data, tmp / "no_version")
    (tmp / "no_version" / "pdiff_dataset.json").write_text("{}")
    shutil.copytree(data, tmp / "bad_json")
    (tmp / "bad_json" / "pdiff_dataset.json").write_text("{not json")
    original = ParameterDataset.from_pretrained(data)
    for name, rows in (("no_rows", []), ("one_row", [0]), ("nan_rows", list(range(4)))):
        subset = ParameterDataset(original.rows.select(rows), original.layout, original.task_config, original.base_state, original.info)
        if name == "nan_rows":
            vectors = subset.vectors.clone()
            vectors[1, 5] = float("nan")
            columns = {c: subset.column(c).tolist() for c in subset.rows.column_names if c != "params"}
            subset = ParameterDataset.from_vectors(vectors, columns, original.layout, original.task_config, original.base_state, original.info)
        subset.save_to_disk(tmp / name)
    shutil.copytree(data, tmp / "truncated_arrow")
    for arrow in (tmp / "truncated_arrow").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:200])
    shutil.copytree(data, tmp / "truncated_weights")
    weights = tmp / "truncated_weights" / "base_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    other_base = {k: v + 1 for k, v in original.base_state.items()}
    ParameterDataset(original.rows, original.layout, original.task_config, other_base, original.info).save_to_disk(tmp / "other_base")
    (tmp / "other_networks").mkdir()
    (tmp / "other_networks" / "pdiff_networks.json").write_text("{}")
    save_file({k: v.contiguous() for k, v in other_base.items()}, str(tmp / "other_networks" / "network-00000.safetensors"))
    np.save(tmp / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp / "wrong_dim.npy", np.zeros((2, 5), dtype=np.float32))
    write_malicious_pickle(tmp / "code.pt", tmp / "PICKLE_WAS_EXECUTED")
    save_file({"a": torch.zeros(2, 778), "b": torch.zeros(2, 778)}, str(tmp / "two.safetensors"))
    (tmp / "malformed.yaml").write_text("method: grid\nparameters: [unclosed\n")
    (tmp / "bad_method.yaml").write_text("method: annealing\nparameters:\n  seed:\n    values: [1, 2]\n")
    return {"tmp": tmp, "data": data}


def _run(line: str, scratch: dict[str, Path], capsys) -> tuple[int, str]:
    argv = line.format(**scratch).split()
    listing = sorted(p.relative_to(scratch["tmp"]) for p in scratch["tmp"].rglob("*"))
    status = cli(argv)
    err = capsys.readouterr().err
    new = sorted(p.relative_to(scratch["tmp"]) for p in scratch["tmp"].rglob("*"))
    assert new == listing, f"{line} wrote {set(new) - set(listing)}"  # nothing written, not even a lock
    return status, err


@pytest.mark.parametrize("line, message", CONFIG_CASES + FILE_CASES, ids=[c[0] for c in CONFIG_CASES + FILE_CASES])
def test_bad_input_is_one_clear_line(line, message, scratch, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    status, err = _run(line, scratch, capsys)
    command = line.split()[0]
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith(f"pdiff {command}: error: "), err
    assert message.format(**scratch) in err, err
    assert not (scratch["tmp"] / "PICKLE_WAS_EXECUTED").exists()


@pytest.mark.parametrize("line, message", PARSER_CASES, ids=[c[0] for c in PARSER_CASES])
def test_bad_options_are_refused_by_the_parser(line, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(line.split())
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: pdiff") and message in err and "Traceback" not in err


def test_a_second_run_into_a_locked_output_dir_is_refused_at_once(tmp_path, digits_params):
    """Two processes: this one holds the output folder's lock, a `pdiff train` into it stops at once."""
    out = tmp_path / "out"
    with output_lock(out, "train"):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder == {"pid": os.getpid(), "host": socket.gethostname(), "command": "train"}
        proc = subprocess.run([sys.executable, "-m", "pdiff", "train", "cpu=true", f"output_dir={out}", f"dataset_dir={digits_params}"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and f"{out} is in use by another run (pdiff train, pid {os.getpid()}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (out / "metrics.jsonl").exists()
    assert not (out / LOCK_FILE).exists()  # released


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_second_sample_or_report_into_a_busy_out_is_refused_at_once(command, tmp_path, digits_params):
    """`pdiff sample` / `pdiff evaluate` hold their --out's lock too: two runs never write one folder."""
    out = tmp_path / "out"
    argv = {"sample": ["--model", str(tmp_path / "none")], "evaluate": ["--dataset", str(digits_params), "--generated", str(digits_params)]}[command]
    with output_lock(out, command):
        proc = subprocess.run([sys.executable, "-m", "pdiff", command, *argv, "--out", str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and f"{out} is in use by another run (pdiff {command}, pid {os.getpid()}" in proc.stderr, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_folder_finished_by_another_run_meanwhile_is_not_replaced(tmp_path):
    from pdiff.io import OutputError, atomic_directory

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="was written by another run meanwhile"):
        with atomic_directory(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()
            (out / "theirs").write_text("first")  # the other run renamed its result into place first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["theirs"]


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out, "sample"):
            raise RuntimeError("stopped before writing")
    assert not out.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "command": "collect"}))
    with output_lock(tmp_path, "train") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_partial_folders_of_killed_runs_are_cleaned_up(tmp_path):
    from pdiff.io import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left_by_kill = tmp_path / f".out.partial-{dead}-abc123"
    left_by_kill.mkdir()
    still_running = tmp_path / f".out.partial-{os.getpid()}-def456"
    still_running.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("done")
    assert not left_by_kill.exists() and still_running.exists() and (tmp_path / "out" / "file").exists()


def test_collect_refuses_to_save_diverged_checkpoints(tmp_path, capsys):
    status = cli(["collect", "cpu=true", f"output_dir={tmp_path}", "task.param.k=4", "task.base.epochs=1", "task.param.warmup_steps=0", "task.param.lr=1e30"])
    err = capsys.readouterr().err
    assert status == 2 and "of 4 checkpoints hold NaN or Inf" in err and "Lower task.param.lr" in err
    assert not (tmp_path / "params").exists()


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing: the path and the reason, the half-written file removed."""
    import errno

    from pdiff.commands import report_failures
    from pdiff.io import write_text

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "report.json"
    monkeypatch.setattr("os.replace", full)
    assert report_failures("evaluate", lambda: write_text(target, "{}")) == 2
    err = capsys.readouterr().err
    assert err == f"pdiff evaluate: error: could not write {target}: No space left on device; free space or choose another output folder\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, argv, hint", [
    ("train", ["pdiff", "train", "task=digits"], "continue with the same command plus train.resume_from_checkpoint=latest"),
    ("train", ["pdiff", "train", "train.resume_from_checkpoint=latest"], "run the same command again to continue from the latest checkpoint"),
    ("run", ["pdiff", "run"], "run the same command again to continue where it stopped"),
    ("collect", ["pdiff", "collect"], "nothing was written under the output name, run the command again"),
])
def test_ctrl_c_is_one_line_that_says_how_to_go_on(monkeypatch, capsys, command, argv, hint):
    """Ctrl-C: no traceback, exit status 130, and the way to continue, which for a training depends on whether
    the command already resumes (as `pdiff run`'s training does)."""
    from pdiff.commands import report_failures

    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", argv)
    assert report_failures(command, stopped) == 130
    assert capsys.readouterr().err == f"pdiff {command}: interrupted; {hint}\n"
