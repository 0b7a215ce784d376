"""Stage 2: generator training under Accelerate — DDP, bf16, resume, EMA, W&B, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerator_state
from ports import free_port
from pdiff.config import ConfigError, load_config
from pdiff.evaluation import Report
from pdiff.train import main
from pdiff.training.checkpoints import STATE_FILE, complete_checkpoints
from pdiff.training.loop import TrainingDivergedError
from pdiff.training.validation import most_novel_temperature

REPO = Path(__file__).resolve().parent.parent

# A generator small enough to train a dozen steps in a few seconds; real shapes, real code paths.
TINY = [
    "cpu=true",
    "generator.autoencoder.channels=[8,16]",
    "generator.unet.block_out_channels=[8,16]",
    "generator.num_inference_steps=4",
    "train.ae_steps=6",
    "train.diffusion_steps=6",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_num_models=4",
    "train.num_final_models=6",
    "train.checkpointing_steps=4",
    "train.lr_warmup_steps=2",
]


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """A fixed thread count: the resume tests compare weights bit for bit, and pdiff would otherwise follow the load
    of whatever runs beside it (another test file, under xdist) and change the order of its float reductions."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(out: Path, dataset: Path, *overrides: str) -> Report | None:
    return main([f"output_dir={out}", f"dataset_dir={dataset}", *TINY, *overrides])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("ae/loss", r.get("diffusion/loss")) for r in rows if "ae/loss" in r or "diffusion/loss" in r}


def test_train_writes_a_loadable_generator_and_report(tmp_path, digits_params):
    report = run_train(tmp_path, digits_params)
    gen = tmp_path / "generator"
    assert (gen / "model_index.json").exists() and (gen / "report.json").exists()
    assert {p.name for p in gen.iterdir()} >= {"autoencoder", "unet", "scheduler", "target", "README.md"}
    assert not list(gen.rglob("*.bin")) and not list(gen.rglob("*.pkl"))  # safetensors and JSON only
    assert report.generated.count == 6 and report.selected["selected_on"] == "validation"
    steps = losses(tmp_path)
    assert sorted(steps) == list(range(1, 13)) and all(map(torch.isfinite, torch.tensor(list(steps.values()))))
    replicas = json.loads((tmp_path / "replicas.json").read_text())
    assert replicas["num_processes"] == 1 and replicas["in_sync"]


def test_bf16_mixed_precision_on_cpu(tmp_path, digits_params):
    from accelerate import Accelerator

    Accelerator(cpu=True)  # what `collect` leaves in this process (a notebook): no mixed precision; train changes it
    run_train(tmp_path, digits_params, "train.mixed_precision=bf16")
    assert json.loads((tmp_path / "replicas.json").read_text())["mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(list(losses(tmp_path).values()))))
    # Parameters stay float32 under autocast; the saved generator is float32.
    unet = load_file(str(tmp_path / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in unet.values())


@pytest.mark.parametrize("resume_step", [4, 8])  # inside the autoencoder phase, and inside diffusion
def test_resume_continues_with_the_same_losses(tmp_path, digits_params, resume_step):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train(full, digits_params, "train.checkpoints_total_limit=null")
    checkpoint = full / "checkpoints" / f"checkpoint-{resume_step}"
    assert (checkpoint / STATE_FILE).exists()
    run_train(resumed, digits_params, f"train.resume_from_checkpoint={checkpoint}")
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(resume_step + 1, 13))
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}


def test_resume_latest_and_refusals(tmp_path, digits_params):
    run_train(tmp_path, digits_params)
    # total limit 2 by default: the last two checkpoints survive, including the final step
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-8", "checkpoint-12"]
    # an interrupted save (no state file) is never taken for the latest checkpoint
    (tmp_path / "checkpoints" / "checkpoint-99").mkdir()
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name == "checkpoint-12"
    # a second run into the same folder neither silently resumes nor overwrites
    with pytest.raises(FileExistsError, match="resume_from_checkpoint=latest"):
        run_train(tmp_path, digits_params)
    # resuming with a different config names the keys that differ
    with pytest.raises(ConfigError, match="generator.autoencoder.latent_noise"):
        run_train(tmp_path, digits_params, "train.resume_from_checkpoint=latest", "generator.autoencoder.latent_noise=0.5")


def test_ema_weights_are_what_gets_saved(tmp_path, digits_params):
    run_train(tmp_path, digits_params, "train.ema_decay=0.9")
    saved = load_file(str(tmp_path / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    last = tmp_path / "checkpoints" / "checkpoint-12"
    ema = load_file(str(last / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(last / "model_1.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # EMA != the raw weights


def test_wandb_offline_run_logs_the_training_keys(tmp_path, digits_params, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_train(tmp_path, digits_params, "train.report_to=wandb", "train.eval_every=3")
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    expected = {"ae/loss", "ae/lr", "ae/grad_norm", "diffusion/loss", "diffusion/steps_per_s", "ae/recon_val_acc_median", "eval/val_acc_median", "eval/generated/val_median"}
    assert wandb_logged(files[0], expected) == expected
    assert "eval/never_logged".encode() not in files[0].read_bytes()


def wandb_logged(path: Path, keys: set[str]) -> set[str]:
    """Which of `keys` the offline run file holds. wandb no longer ships a Python reader for its binary
    log (the Go core writes it), so look for the keys' UTF-8 bytes in the protobuf records."""
    import time

    deadline = time.monotonic() + 30  # wandb's core process may still be flushing the file after finish()
    while True:
        data = path.read_bytes()
        found = {k for k in keys if k.encode() in data}
        if found == keys or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_two_process_ddp_ends_with_identical_weights(tmp_path, digits_params):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "pdiff" / "train.py"), f"output_dir={tmp_path}", f"dataset_dir={digits_params}", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replicas = json.loads((tmp_path / "replicas.json").read_text())
    assert replicas["num_processes"] == 2
    assert replicas["in_sync"] and replicas["digests"][0] == replicas["digests"][1]
    assert (tmp_path / "generator" / "model_index.json").exists()


# -- bad input -------------------------------------------------------------------------------------


def test_fp16_on_cpu_is_refused(tmp_path, digits_params):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run_train(tmp_path, digits_params, "train.mixed_precision=fp16")


def test_nan_in_the_dataset_is_refused(tmp_path, digits_params):
    from pdiff import ParameterDataset

    ds = ParameterDataset.from_pretrained(digits_params)
    vectors = ds.vectors.clone()
    vectors[3, 5] = float("nan")
    columns = {c: ds.column(c) for c in ds.rows.column_names if c != "params"}
    bad = tmp_path / "bad"
    ParameterDataset.from_vectors(vectors, columns, ds.layout, ds.task_config, ds.base_state).save_to_disk(bad)
    with pytest.raises(ValueError, match=r"NaN or Inf \(rows \[3\]"):
        run_train(tmp_path / "run", bad)


def test_dataset_of_another_task_is_refused(tmp_path, digits_params):
    with pytest.raises(ValueError, match="was collected for task 'digits', not 'fake_cifar_resnet18': leave task= out"):
        run_train(tmp_path, digits_params, "task=fake_cifar_resnet18")
    with pytest.raises(ValueError, match=r"task.network.widths=\[8, 16, 32\] contradicts"):
        run_train(tmp_path, digits_params, "task.network.widths=[8,16,32]")


def test_the_dataset_carries_its_task(tmp_path, digits_params):
    """Train needs none of the collection's task overrides (the default composed task here is digits too,
    but its stored, resolved config is the one used: a changed default would not leak in)."""
    report = run_train(tmp_path, digits_params, "task.eval.batch_size=50")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"]["eval"]["batch_size"] == 50 and saved["task"]["param"]["k"] != load_config(["task=digits"]).task.param.k
    assert report.generated.count == 6


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits_params):
    with pytest.raises(TrainingDivergedError, match="checkpoint-4"):
        # An absurd learning rate blows the denoiser up right after the checkpoint at step 4.
        run_train(tmp_path, digits_params, "train.diffusion_lr=1e30", "train.lr_warmup_steps=0")
    good = complete_checkpoints(tmp_path / "checkpoints")
    assert good and all(torch.isfinite(t).all() for t in load_file(str(good[-1] / "model.safetensors")).values())


def test_end_to_end_generated_networks_are_as_accurate_as_the_originals(tmp_path, digits_params):
    """The fast digits default, on a shorter budget: generated networks land in the originals' range."""
    report = main([f"output_dir={tmp_path}", f"dataset_dir={digits_params}", "cpu=true", "train.ae_steps=300", "train.diffusion_steps=400",
                   "train.eval_every=200", "train.num_final_models=100", "generator.num_inference_steps=50", "train.checkpointing_steps=0"])
    orig, gen = report.originals, report.generated
    one_example = 1 / report.splits["val"]
    assert gen.val.median >= orig.val.min - one_example
    assert gen.test.median >= orig.test.min - one_example
    assert gen.val.best >= orig.val.median
    assert report.selected["selected_on"] == "validation" and report.nonfinite_indices == []
    # The temperature moves the generator along the accuracy-novelty plane: hotter, more novel mistakes.
    # (Not necessarily further in parameter space: the coldest samples sit at the latent's centre, which
    # need not be nearest to an original; measured here: L2 0.84, 0.82, 0.96, 1.00.)
    points = report.curve_points()
    assert [report.generated_temperature if p is gen else p.scale for p in points] == [0.5, 0.75, 1.0, 1.25]
    # The report's own temperature was chosen on validation by the rule, and the saved generator samples at it.
    chosen = report.selected
    means = {float(t): m for t, m in chosen["temperature_val_means"].items()}
    assert sorted(means) == [0.5, 0.75, 1.0, 1.25]
    duplicates = chosen["temperature_near_duplicates"]
    num_models = json.loads((tmp_path / "config.json").read_text())["train"]["eval_num_models"]
    collapsed = {float(t) for t, n in duplicates.items() if 2 * n > num_models}
    assert report.generated_temperature == chosen["temperature"] == most_novel_temperature(means, chosen["originals_val_mean"], collapsed)
    # Near-duplicates are counted per temperature against the originals' closest pair.
    assert sorted(map(float, duplicates)) == sorted(means) and all(0 <= n <= num_models for n in duplicates.values())
    assert chosen["originals_closest_pair_l2"] == pytest.approx(min(report.originals.networks["nearest_other_original_l2"]))
    assert json.loads((tmp_path / "generator" / "model_index.json").read_text())["default_temperature"] == chosen["temperature"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["selected"] == chosen
    ious = [p.novelty.iou.mean for p in points]
    assert ious == sorted(ious, reverse=True) and ious[0] > ious[-1]


def test_the_temperature_rule_takes_the_most_novel_that_reaches_the_originals():
    means = {0.5: 0.880, 0.75: 0.882, 1.0: 0.878, 1.25: 0.870}
    assert most_novel_temperature(means, reference=0.878) == 1.0
    assert most_novel_temperature(means, reference=0.879) == 0.75
    assert most_novel_temperature(means, reference=0.890) == 0.75  # none reaches it: the most accurate
    # A collapsed temperature (most of its networks near-duplicates) is passed over while another is left.
    assert most_novel_temperature(means, reference=0.878, collapsed={1.0}) == 0.75
    assert most_novel_temperature(means, reference=0.879, collapsed={0.5, 0.75}) == 1.0  # none left reaches it: the most accurate left
    assert most_novel_temperature(means, reference=0.879, collapsed=set(means)) == 0.75  # all collapsed: as if none were


def test_the_selection_counts_near_duplicates_in_each_draw_and_passes_over_collapsed_temperatures(monkeypatch):
    """Cold draws that land on a few networks are the most accurate on validation, but their novelty is that of
    a few networks: the selection counts each temperature's near-duplicates and passes such a temperature over."""
    import types

    import pdiff.training.validation as validation

    spread = torch.arange(8.0)[:, None] * torch.ones(8, 3)  # 8 networks, 1.7 apart
    draws = {0.5: torch.zeros(8, 3), 0.75: 1e-3 * spread, 1.0: spread}  # one network; 8 within 0.002 of each other; 8 distinct
    accuracy = {id(draws[0.5]): 0.90, id(draws[0.75]): 0.89, id(draws[1.0]): 0.85}
    monkeypatch.setattr(validation, "sample_for_validation", lambda pipe, num_models, seed, t: draws[t])
    monkeypatch.setattr(validation, "validation_accuracy", lambda task, target, vectors, device: torch.full((len(vectors),), accuracy[id(vectors)]))
    pipe = types.SimpleNamespace(target=None)
    chosen, means, duplicates = validation.select_temperature(pipe, None, [1.0, 0.5, 0.75], 0.88, 8, 0, "cpu", closest_pair=0.5)
    assert duplicates == {0.5: 8, 0.75: 8, 1.0: 0} and means == pytest.approx({0.5: 0.90, 0.75: 0.89, 1.0: 0.85})
    assert chosen == 1.0  # 0.75 reaches the originals but collapsed; 1.0 does not reach them, yet is the only one left
    assert validation.select_temperature(pipe, None, [0.5, 0.75, 1.0], 0.88, 8, 0, "cpu")[0] == 0.75  # no bar given: nothing collapses


def test_phases_run_alone_from_a_saved_autoencoder(tmp_path, digits_params):
    run_train(tmp_path / "ae", digits_params, "train.phase=autoencoder")
    saved = tmp_path / "ae" / "autoencoder"
    assert (saved / "config.json").exists() and not (tmp_path / "ae" / "generator").exists()
    assert json.loads((saved / "config.json").read_text())["scaling_factor"] != 1.0  # the latent scale travels with it
    report = run_train(tmp_path / "diffusion", digits_params, "train.phase=diffusion", f"train.autoencoder_path={saved}")
    assert (tmp_path / "diffusion" / "generator" / "model_index.json").exists() and report.generated.count == 6
    assert sorted(losses(tmp_path / "diffusion")) == list(range(1, 7))  # diffusion steps only
    with pytest.raises(ConfigError, match="autoencoder_path"):
        run_train(tmp_path / "nothing", digits_params, "train.phase=diffusion")
    # The same overrides as the saved one's (TINY's channels) are fine; one it contradicts would be ignored, so it is refused.
    with pytest.raises(ConfigError, match=r"generator.autoencoder.latent_channels=8 contradicts the saved autoencoder .* \(latent_channels=4\)"):
        run_train(tmp_path / "contradicts", digits_params, "train.phase=diffusion", f"train.autoencoder_path={saved}", "generator.autoencoder.latent_channels=8")


@pytest.mark.parametrize("resume_at", [6, 9])  # at the autoencoder/diffusion boundary, inside diffusion
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, digits_params, resume_at):
    """A run killed after logging step 12 but before the checkpoints after `resume_at` were written, resumed
    from the latest one: metrics.jsonl holds each row once, as the uninterrupted run's does, and the same
    generator is selected."""
    import shutil

    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = ["train.eval_every=2", "train.checkpoints_total_limit=null", "train.checkpointing_steps=3"]
    reference = run_train(full, digits_params, *settings)
    shutil.copytree(full, killed)
    later = [f"checkpoints/checkpoint-{s}" for s in range(resume_at + 3, 13, 3)]
    for name in (*later, "generator", "report", "timings.json"):
        shutil.rmtree(killed / name) if (killed / name).is_dir() else (killed / name).unlink()
    reset_accelerator_state()
    resumed = run_train(killed, digits_params, *settings, "train.resume_from_checkpoint=latest")

    def rows(out):
        timing = ("steps_per_s", "samples_per_s")
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(timing)} for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(killed) == rows(full)
    assert resumed.selected == reference.selected
    assert (killed / "generator" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (full / "generator" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_gradient_accumulation(tmp_path, digits_params):
    report = run_train(tmp_path, digits_params, "train.gradient_accumulation_steps=3", "train.batch_size=4")
    steps = losses(tmp_path)
    assert sorted(steps) == list(range(1, 13)) and all(map(torch.isfinite, torch.tensor(list(steps.values()))))
    assert report.training["ae"]["samples_per_s"] == pytest.approx(report.training["ae"]["steps_per_s"] * 12, rel=1e-2)


def test_every_micro_batch_draws_its_own_randomness():
    from pdiff.training.losses import step_generator

    draws = {(step, micro): tuple(torch.rand(4, generator=step_generator(0, 0, step, micro, "cpu")).tolist()) for step in range(3) for micro in range(130)}
    assert len(set(draws.values())) == len(draws)  # no (step, micro) pair shares a seed, even past 64 micro-batches
    again = torch.rand(4, generator=step_generator(0, 0, 2, 100, "cpu"))
    assert tuple(again.tolist()) == draws[(2, 100)]


def test_the_best_generator_so_far_survives_a_resume(tmp_path, digits_params):
    """The validation bookkeeping travels in the checkpoint: a resumed run compares against the best
    generator found before the interruption (here made unbeatable by editing the checkpoint's state)."""
    settings = ["train.eval_every=2", "train.checkpoints_total_limit=null"]
    run_train(tmp_path, digits_params, *settings)
    state_file = tmp_path / "checkpoints" / "checkpoint-8" / STATE_FILE
    saved = json.loads(state_file.read_text())
    assert saved["state"]["best_step"] == 8  # the evaluation at step 8 ran before the step's checkpoint
    saved["state"]["best_val_median"] = 2.0
    state_file.write_text(json.dumps(saved))
    reset_accelerator_state()
    resumed = run_train(tmp_path, digits_params, *settings, "overwrite=true", f"train.resume_from_checkpoint={state_file.parent}")
    assert {k: resumed.selected[k] for k in ("step", "val_acc_median", "selected_on")} == {"step": 8, "val_acc_median": 2.0, "selected_on": "validation"}


@pytest.mark.parametrize("planted", ["optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_in_a_checkpoint_is_never_run(tmp_path, digits_params, planted):
    """accelerate reads checkpoint state with torch.load(weights_only=True): a pickle that would run code is
    refused (the optimizer's, naming the checkpoint) or skipped (the RNG state, which pdiff does not need)."""
    from generator_helpers import write_malicious_pickle

    run_train(tmp_path, digits_params)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-8"
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    write_malicious_pickle(checkpoint / planted, marker)
    reset_accelerator_state()
    resume = [f"train.resume_from_checkpoint={checkpoint}", "overwrite=true"]
    if planted == "optimizer.bin":
        with pytest.raises(ConfigError, match=r"checkpoint-8 holds a file that is not plain tensor state"):
            run_train(tmp_path, digits_params, *resume)
    else:
        run_train(tmp_path, digits_params, *resume)
    assert not marker.exists()
