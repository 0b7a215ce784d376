"""`pdiff run`: the whole method in one command that continues where it stopped."""

from __future__ import annotations

import json
import shutil

TINY = ["cpu=true", "task.param.k=12", "task.base.epochs=4", "task.param.warmup_steps=2", "train.ae_steps=6", "train.diffusion_steps=6",
        "train.eval_every=0", "train.checkpointing_steps=4", "train.num_final_models=4", "train.eval_num_models=4",
        "generator.autoencoder.channels=[8,16]", "generator.unet.block_out_channels=[8,16]", "generator.scheduler.num_train_timesteps=20",
        "generator.num_inference_steps=4"]


def test_run_does_every_stage_once_and_continues_after_a_stop(tmp_path, run_cli):
    out = tmp_path / "out"
    args = ["run", "--num-models", "5", f"output_dir={out}", *TINY]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line.split(":")[1].strip() for line in first.stdout.splitlines() if line.startswith("pdiff run: ") and "finished" not in line] == \
        ["collect", "train", "sample", "evaluate"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["generated"]["count"] == 5 and report["originals"]["count"] == 12

    again = run_cli(*args)  # a finished run: nothing is redone, the results are named
    assert again.returncode == 0 and again.stdout.count("done already") == 4 and f"report and plots: {out / 'eval'}/" in again.stdout

    # A stop during training: the generator and what follows are missing, the checkpoints are there.
    for name in ("generator", "samples", "eval"):
        shutil.rmtree(out / name)
    shutil.rmtree(out / "checkpoints" / "checkpoint-12")
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "collect: done already" in resumed.stdout and "resumed from" in resumed.stderr and "checkpoint-8" in resumed.stderr
    assert json.loads((out / "eval" / "report.json").read_text())["generated"]["count"] == 5


def test_run_refuses_bad_config_before_any_stage(tmp_path, run_cli):
    proc = run_cli("run", f"output_dir={tmp_path / 'out'}", "task.param.k=abc")
    assert proc.returncode == 2 and "task.param.k=abc: expected an integer" in proc.stderr and not (tmp_path / "out").exists()
