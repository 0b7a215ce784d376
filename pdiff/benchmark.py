"""Timing every stage of the method on one task, as JSON (`pdiff bench`); also training throughput when
several runs share the machine (`pdiff bench --concurrent N`).

Speed and memory are measured here, never asserted in tests. Peak memory is the process's resident
set (and the CUDA allocator's peak on a GPU) at the end of each phase.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import __version__
from .collect import collect
from .config import load_config
from .data import ParameterDataset
from .evaluation import Report, evaluate_generated
from .evaluation.scoring import benchmark_evaluation, evaluate_network, evaluate_vectors
from .pipelines import PDiffPipeline, sampler_scheduler
from .runtime import resolve_device, synchronize
from .sampling import load_generator, task_of
from .train import main as train_main


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    # ru_maxrss is in KiB on Linux.
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@contextmanager
def phase(results: dict, name: str, device: torch.device) -> Iterator[dict]:
    """Time a phase; the body may add figures (throughput) to the yielded dict."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    entry: dict[str, Any] = {}
    started = time.perf_counter()
    yield entry
    synchronize(device)
    entry.setdefault("seconds", round(time.perf_counter() - started, 3))
    entry.update(peak_memory_mb(device))
    results[name] = entry


def _fresh_accelerator_state() -> None:
    """Stages build their own Accelerator; in one process the previous one's state must go first."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def bench_pipeline(task: str, overrides: Sequence[str], workdir: Path, device: torch.device, num_models: int, steps: int | None,
                   reference: int | None = None) -> dict[str, Any]:
    """Run all four stages on `task` in `workdir`; return the per-phase figures and the outcome."""

    cpu = ["cpu=true"] if device.type == "cpu" else []
    base = [f"task={task}", f"output_dir={workdir}", "overwrite=true", *cpu, *overrides]
    phases: dict[str, Any] = {}

    with phase(phases, "collect", device) as entry:
        _fresh_accelerator_state()
        dataset = collect(load_config(base))
        entry.update(checkpoints=len(dataset), dim=dataset.dim, checkpoints_per_s=round(len(dataset) / max(dataset.info["collect_seconds"], 1e-9), 2),
                     base_training_seconds=dataset.info["base_seconds"])

    with phase(phases, "train", device) as entry:
        _fresh_accelerator_state()
        report = train_main([*base, "train.report_to=none", f"train.num_final_models={num_models}"])
        entry.update(report.training or {})
    training = phases.pop("train")
    phases["autoencoder"] = {**training.get("ae", {}), "peak_rss_mb": training["peak_rss_mb"]}
    phases["diffusion"] = {**training.get("diffusion", {}), "peak_rss_mb": training["peak_rss_mb"]}
    phases["train_total"] = {"seconds": training["seconds"], "final_evaluation_seconds": training.get("final_evaluation_seconds"), "mixed_precision": training.get("mixed_precision")}

    generator = workdir / "generator"
    phases.update(bench_generator(generator, workdir / "params", device, num_models, steps, reference))
    # What a user waits for: collect -> train -> sample (the generator's own sampler) -> evaluate. The DDPM
    # sampling and one-by-one scoring phases are comparisons, not part of the pipeline.
    pipeline = sum(phases[name]["seconds"] for name in ("collect", "train_total", "sampling_ddim", "evaluation"))
    return {"phases": phases, "pipeline_seconds": round(pipeline, 2), "outcome": outcome(report)}


def bench_generator(model: str | Path, dataset_path: str | Path | None, device: torch.device, num_models: int, steps: int | None,
                    reference: int | None = None) -> dict[str, Any]:
    """Sampling and evaluation of `num_models` networks from a saved generator (and, with `reference`, the
    original procedure timed on that many networks)."""
    phases: dict[str, Any] = {}
    with phase(phases, "load_generator", device):
        pipe = load_generator(str(model), device=str(device))
    if reference:
        with phase(phases, "reference_procedure", device) as entry:
            entry.update(bench_reference(pipe, task_of(pipe), device, num_models, reference))
    for sampler, n_steps in (("ddim", steps), ("ddpm", pipe.scheduler.config.num_train_timesteps)):
        with phase(phases, f"sampling_{sampler}", device) as entry:
            pipe.scheduler = sampler_scheduler(sampler, pipe.scheduler.config)
            started = time.perf_counter()
            params = pipe(num_models=num_models, num_inference_steps=n_steps, generator=torch.Generator().manual_seed(0)).params
            seconds = time.perf_counter() - started
            entry.update(num_models=num_models, steps=len(pipe.scheduler.timesteps), seconds=round(seconds, 3), networks_per_s=round(num_models / seconds, 2))
    if dataset_path is None:
        return phases
    originals = ParameterDataset.from_pretrained(dataset_path)
    with phase(phases, "evaluation", device) as entry:
        report = evaluate_generated(originals, params, task=task_of(pipe), device=device)
        entry.update(asdict(report.timing))
        entry["outcome"] = outcome(report)
    with phase(phases, "evaluation_batched_vs_one_by_one", device) as entry:
        entry.update(benchmark_evaluation(originals, params, "test", device=device, max_one_by_one=min(20, num_models)))
    return phases


def bench_reference(pipe, task, device: torch.device, num_models: int, reference_models: int) -> dict[str, Any]:
    """pdiff's way against the original procedure's, same generator, same run, on the test split.

    pdiff: all `num_models` networks in one chain with the generator's own sampler and steps, then scored
    together (batched, exact). The reference (the original p-diff code): every network its own batch-1
    chain of all DDPM training steps, then built and scored alone. The reference is timed on
    `reference_models` networks and scaled to `num_models` (its cost is linear in the count).
    """
    test, layout, base = task.data.test.to(device), pipe.layout, pipe.target.net.state_dict()
    started = time.perf_counter()
    params = pipe(num_models=num_models, generator=torch.Generator().manual_seed(0)).params
    sampled = time.perf_counter()
    evaluate_vectors(pipe.target.net.to(device), layout, params, test, task.data.prepare, batch_size=task.eval_batch_size)
    synchronize(device)
    ours = {"networks": num_models, "sampling_seconds": round(sampled - started, 3), "seconds": round(time.perf_counter() - started, 3),
            "sampler": type(pipe.scheduler).__name__, "steps": len(pipe.scheduler.timesteps)}

    ddpm = PDiffPipeline(autoencoder=pipe.autoencoder, unet=pipe.unet, scheduler=sampler_scheduler("ddpm", pipe.scheduler.config), target=pipe.target)
    ddpm.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for i in range(reference_models):
        vector = ddpm(num_models=1, num_inference_steps=ddpm.scheduler.config.num_train_timesteps, generator=torch.Generator().manual_seed(i)).params[0]
        net = task.build_network({k: v.cpu() for k, v in base.items()}, layout, vector).to(device)
        evaluate_network(net, test, task.data.prepare, batch_size=task.eval_batch_size)
    synchronize(device)
    seconds = time.perf_counter() - started
    reference = {"networks": reference_models, "seconds": round(seconds, 3), "seconds_per_network": round(seconds / reference_models, 4),
                 "steps": ddpm.scheduler.config.num_train_timesteps, f"extrapolated_seconds_for_{num_models}": round(seconds / reference_models * num_models, 2)}
    return {"split": "test", "examples": len(test), "pdiff": ours, "reference": reference,
            "speedup": round(seconds / reference_models * num_models / ours["seconds"], 1)}


def outcome(report: Report) -> dict[str, Any]:
    """Generated vs original accuracy and novelty: the numbers a reader of a benchmark wants first."""
    def stats(group) -> dict:
        return {split: {k: getattr(getattr(group, split), k) for k in ("best", "mean", "median", "min")} for split in ("val", "test")}

    return {
        "originals": stats(report.originals),
        "generated": stats(report.generated),
        "generated_test_at_best_val": report.generated.best_on_val.test_accuracy,
        "nearest_original_iou_mean": report.generated.novelty.iou.mean,
        "original_original_iou_mean": report.originals.novelty.iou.mean,
        "verdict": report.verdict.text,
        "average_verdict": report.average_verdict.text if report.average_verdict else None,
    }


def bench_concurrent(task: str, overrides: Sequence[str], workdir: Path, processes: int) -> dict[str, Any]:
    """Training throughput of one run alone, then of `processes` runs at once on the same machine.

    The runs are separate `pdiff train` processes on one parameter dataset, with the thread policy of
    `pdiff.runtime` (or OMP_NUM_THREADS, when set). `aggregate_ratio` is the summed steps/s of the
    concurrent runs over the solo run's: 1.0 means sharing the machine costs nothing in total.
    """
    base = [f"task={task}", "cpu=true", *overrides]
    dataset = workdir / "params"
    if not dataset.exists():
        _fresh_accelerator_state()
        collect(load_config([*base, f"output_dir={workdir}"]))
    train = [*base, f"dataset_dir={dataset}", "train.eval_every=0", "train.checkpointing_steps=0", "train.report_to=none"]
    solo = _train_at_once(train, workdir / "solo", 1)
    together = _train_at_once(train, workdir / "concurrent", processes)
    result = {"processes": processes, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "solo": solo[0], "concurrent": together}
    result["aggregate_ratio"] = {phase: round(sum(r[phase]["steps_per_s"] for r in together) / solo[0][phase]["steps_per_s"], 3) for phase in ("ae", "diffusion")}
    return result


def _train_at_once(overrides: list[str], root: Path, processes: int) -> list[dict]:
    """Start `processes` trainings together, wait for all; their timings.json."""
    runs = [subprocess.Popen([sys.executable, "-m", "pdiff", "train", *overrides, f"output_dir={root / f'run-{i}'}", "overwrite=true"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    for run in runs:
        _, err = run.communicate()
        if run.returncode:
            raise RuntimeError(f"a benchmark training run failed: {err.strip().splitlines()[-1] if err.strip() else run.returncode}")
    return [json.loads((root / f"run-{i}" / "timings.json").read_text()) for i in range(processes)]


# -- memory by D: how the generator's cost grows with the number of generated parameters -----------------

MEMORY_GENERATORS = {"conv_paper": "paper", "conv_default": "default", "tokens": "tokens"}


def bench_memory_by_dim(dims: Sequence[int], batch: int, steps: int = 2) -> list[dict[str, Any]]:
    """Peak RSS and seconds per step of one autoencoder step and one diffusion step, for each generator
    and D, each in a fresh process (so each peak is its own). Synthetic vectors of a CNN-like layout;
    a configuration whose estimated activations exceed free memory is reported, not run."""
    rows = []
    for dim in dims:
        for name, generator in MEMORY_GENERATORS.items():
            for phase in ("autoencoder", "diffusion"):
                code = ("import json; from pdiff.benchmark import step_figures; "
                        f"print(json.dumps(step_figures({generator!r}, {int(dim)}, {int(batch)}, {phase!r}, {int(steps)})))")
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if proc.returncode == 0:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                elif proc.returncode < 0:  # the kernel's OOM killer sends SIGKILL and leaves no message
                    row = {"error": f"killed by signal {-proc.returncode} (out of memory, when it is 9)"}
                else:
                    row = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                rows.append({"generator": name, "dim": int(dim), "batch": int(batch), "phase": phase, **row})
    return rows


def step_figures(generator: str, dim: int, batch: int, phase: str, steps: int) -> dict[str, Any]:
    """Time `steps` training steps (after one warm-up) of one phase at D = `dim` in this process."""
    from .config import to_dict
    from .models import autoencoder_from_config
    from .params import ParameterLayout
    from .runtime import free_memory
    from .training.losses import autoencoder_loss, diffusion_loss

    cfg = load_config([f"generator={generator}"]).generator
    sizes = [dim * 6 // 10, dim * 3 // 10, dim // 20]  # a few large tensors and a small one, as in a CNN
    sizes.append(dim - sum(sizes))
    layout = ParameterLayout([f"t{i}" for i in range(len(sizes))], [[n] for n in sizes])
    ae = autoencoder_from_config(to_dict(cfg.autoencoder), layout)
    estimate = ae.activation_bytes(batch)
    if estimate > 0.75 * free_memory(torch.device("cpu")):  # leave room: the machine must not swap
        return {"skipped": f"needs about {estimate / 2**30:.1f} GiB, more than three quarters of the free memory"}
    generator_ = torch.Generator().manual_seed(0)
    vectors = torch.randn(batch, dim, generator=generator_)
    ae.fit_normalization(vectors, layout)
    if phase == "autoencoder":
        model, loss_fn, x = ae.train(), autoencoder_loss, ae.normalize(vectors)
    else:
        from diffusers import DDPMScheduler

        from .models import build_unet

        x = ae.eval().params_to_latents(vectors)
        model = build_unet(*ae.latent_shape, **to_dict(cfg.unet)).train()
        scheduler = DDPMScheduler(**to_dict(cfg.scheduler))
        loss_fn = lambda m, latents, g: diffusion_loss(m, scheduler, latents, g)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = loss_fn(model, x, generator_)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return {"seconds_per_step": round(sum(times[1:]) / steps, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "estimated_activation_mb": round(estimate / 2**20, 1), "model_parameters": sum(p.numel() for p in model.parameters())}


def run_benchmark(task: str, overrides: Sequence[str], *, model: str | None, dataset: str | None, device: str, num_models: int, steps: int | None,
                  workdir: str | None, concurrent: int | None = None, reference: int | None = None, memory_dims: Sequence[int] | None = None,
                  batch: int = 50) -> dict[str, Any]:
    """The JSON `pdiff bench` prints: the whole pipeline on `task`, sampling + evaluation of `model`, or
    (`concurrent`) training throughput alone against several runs at once."""
    device = resolve_device(device)
    os.environ["PDIFF_CACHE"] = "off"  # the figures are of scoring, not of reading scores an earlier run kept
    result: dict[str, Any] = {"pdiff_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_info(device)}
    if memory_dims:
        result.update(mode="memory_by_dim", batch=batch, rows=bench_memory_by_dim(memory_dims, batch))
        return result
    if concurrent:
        with tempfile.TemporaryDirectory(prefix="pdiff-bench-") as tmp:
            result.update(mode="concurrent", task=task, overrides=list(overrides), **bench_concurrent(task, overrides, Path(workdir or tmp), concurrent))
        return result
    if model:
        result.update(mode="generator", model=str(model), phases=bench_generator(model, dataset, device, num_models, steps, reference))
        return result
    result.update(mode="pipeline", task=task, overrides=list(overrides))
    with tempfile.TemporaryDirectory(prefix="pdiff-bench-") as tmp:
        result.update(bench_pipeline(task, overrides, Path(workdir or tmp), device, num_models, steps, reference))
    return result
