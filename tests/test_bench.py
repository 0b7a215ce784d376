"""`pdiff bench`: the whole pipeline on a tiny budget produces valid, complete JSON."""

from __future__ import annotations

import json

import pytest

TINY = [
    "task.param.k=12", "task.base.epochs=4", "task.param.warmup_steps=2",
    "train.ae_steps=8", "train.diffusion_steps=8", "train.eval_every=0", "train.checkpointing_steps=0",
    "generator.autoencoder.channels=[8,16]", "generator.unet.block_out_channels=[8,16]",
    "generator.scheduler.num_train_timesteps=20", "generator.num_inference_steps=4",
]


def test_bench_pipeline_writes_json(tmp_path, run_cli):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--device", "cpu", "--num-models", "6", "--steps", "4", "--out", str(out), "--workdir", str(tmp_path / "work"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the same JSON on stdout
    assert result["mode"] == "pipeline" and result["task"] == "digits" and result["device"]["type"] == "cpu"
    phases = result["phases"]
    for name in ("collect", "autoencoder", "diffusion", "sampling_ddim", "sampling_ddpm", "evaluation"):
        assert phases[name]["seconds"] > 0 and phases[name]["peak_rss_mb"] > 0, name
    assert phases["collect"]["checkpoints"] == 12 and phases["autoencoder"]["steps"] == 8 and phases["diffusion"]["steps"] == 8
    assert phases["sampling_ddim"]["steps"] == 4 and phases["sampling_ddpm"]["steps"] == 20
    assert phases["evaluation_batched_vs_one_by_one"]["identical"] is True
    stages = ("collect", "train_total", "sampling_ddim", "evaluation")
    assert result["pipeline_seconds"] == pytest.approx(sum(phases[name]["seconds"] for name in stages), abs=0.02)
    # the outcome is the saved generator's own report, number for number
    report = json.loads((tmp_path / "work" / "generator" / "report.json").read_text())
    outcome = result["outcome"]
    for group in ("originals", "generated"):
        for split in ("val", "test"):
            assert outcome[group][split] == {k: report[group][split][k] for k in ("best", "mean", "median", "min")}
    assert outcome["generated_test_at_best_val"] == report["generated"]["best_on_val"]["test_accuracy"]
    assert outcome["nearest_original_iou_mean"] == report["similarity"]["generated_original"]["iou"]["mean"]
    assert outcome["verdict"] == report["verdict"]["text"] and report["generated"]["count"] == 6
    assert outcome["average_verdict"] == report["average_verdict"]["text"]
    # sampling figures agree with each other; evaluation covers originals, generated, average, 6 noise scales and 3 around the average
    ddim = phases["sampling_ddim"]
    assert ddim["networks_per_s"] == pytest.approx(ddim["num_models"] / ddim["seconds"], rel=0.1)  # seconds are rounded to 1 ms
    assert phases["evaluation"]["networks_evaluated"] == 12 + 6 + 1 + 6 * 6 + 3 * 6


def test_bench_a_saved_generator(tmp_path, run_cli):
    work = tmp_path / "work"
    assert run_cli("bench", "--device", "cpu", "--num-models", "4", "--steps", "2", "--workdir", str(work), *TINY).returncode == 0
    proc = run_cli("bench", "--model", str(work / "generator"), "--dataset", str(work / "params"), "--num-models", "5", "--steps", "3", "--reference", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["mode"] == "generator" and set(result["phases"]) >= {"load_generator", "sampling_ddim", "sampling_ddpm", "evaluation", "reference_procedure"}
    assert result["phases"]["sampling_ddim"]["num_models"] == 5
    # the original procedure: 2 networks timed one by one (all 20 DDPM steps each), scaled to 5, against pdiff's batched 5
    ref = result["phases"]["reference_procedure"]
    assert ref["reference"]["networks"] == 2 and ref["reference"]["steps"] == 20 and ref["pdiff"]["networks"] == 5 and ref["pdiff"]["steps"] == 4
    scaled = ref["reference"]["extrapolated_seconds_for_5"]
    assert scaled == pytest.approx(ref["reference"]["seconds"] / 2 * 5, abs=0.02)
    assert ref["speedup"] == pytest.approx(scaled / ref["pdiff"]["seconds"], rel=0.05)


def test_bench_concurrent_compares_one_run_with_several(tmp_path, run_cli):
    proc = run_cli("bench", "--concurrent", "2", "--workdir", str(tmp_path), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["mode"] == "concurrent" and result["processes"] == 2 and len(result["concurrent"]) == 2
    solo = result["solo"]
    for phase in ("ae", "diffusion"):
        total = sum(run[phase]["steps_per_s"] for run in result["concurrent"])
        assert result["aggregate_ratio"][phase] == pytest.approx(total / solo[phase]["steps_per_s"], rel=1e-2, abs=1e-3)  # rounded to 3 places
        assert all(run[phase]["steps"] == 8 for run in [solo, *result["concurrent"]])


def test_bench_memory_by_dim_reports_each_generator_and_phase(run_cli):
    proc = run_cli("bench", "--memory-by-dim", "1500", "--batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["mode"] == "memory_by_dim" and result["batch"] == 4
    rows = result["rows"]
    assert {(r["generator"], r["dim"], r["phase"]) for r in rows} == {
        (g, 1500, p) for g in ("conv_paper", "conv_default", "tokens") for p in ("autoencoder", "diffusion")}
    assert all(r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
