"""Stage 2: train the generator — a parameter autoencoder, then a latent UNet1D diffusion model.

    accelerate launch pdiff/train.py task=digits                       # any number of processes / machines
    accelerate launch pdiff/train.py task=digits train.mixed_precision=bf16 train.report_to=wandb
    accelerate launch pdiff/train.py task=digits train.resume_from_checkpoint=latest

Reads like diffusers' training examples: one Accelerator, prepared models/optimizers/LR schedules,
`accelerator.save_state` checkpoints (EMA saved through a save hook), trackers on the main process.
The parameter dataset is tiny, so it lives on the device and batches are drawn by indexing it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__" and __package__ in (None, ""):
    # `accelerate launch pdiff/train.py` puts pdiff/ itself on sys.path; use the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet1DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pdiff.batched import evaluate_vectors
from pdiff.checkpoints import (
    STATE_FILE,
    checkpoint_root,
    complete_checkpoints,
    config_differences,
    register_ema_hooks,
    resolve_resume,
    save_checkpoint,
)
from pdiff.config import ConfigError, flatten, load_config, to_dict
from pdiff.dataset import ParameterDataset, atomic_directory
from pdiff.models import ParameterAutoencoder, TargetNetwork, build_unet
from pdiff.pipeline import SAMPLERS, PDiffPipeline, check_component_weights, sampler_scheduler
from pdiff.tasks import Task

logger = get_logger(__name__)

class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


# -- set-up ------------------------------------------------------------------------------------


def check_config(cfg: DictConfig) -> None:
    """Reject settings that cannot work here, before any process group is created."""
    t = cfg.train
    if t.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r}: use no, bf16, fp16, or null for the launcher's setting")
    precision = t.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if t.phase not in ("all", "autoencoder", "diffusion"):
        raise ConfigError(f"train.phase={t.phase!r}: use all, autoencoder or diffusion")
    if t.phase == "diffusion" and not t.autoencoder_path:
        raise ConfigError("train.phase=diffusion needs train.autoencoder_path=<folder of a saved autoencoder>")
    if t.report_to not in ("none", "wandb"):
        raise ConfigError(f"train.report_to={t.report_to!r}: use none or wandb")
    if cfg.generator.sampler not in SAMPLERS:
        raise ConfigError(f"generator.sampler={cfg.generator.sampler!r}: use ddpm or ddim")
    for key in ("ae_steps", "diffusion_steps", "batch_size", "gradient_accumulation_steps"):
        if int(t[key]) < (1 if key in ("batch_size", "gradient_accumulation_steps") else 0):
            raise ConfigError(f"train.{key}={t[key]} is out of range")


def load_parameter_dataset(cfg: DictConfig) -> tuple[ParameterDataset, Task]:
    dataset = ParameterDataset.from_pretrained(cfg.dataset_dir)
    dataset.validate()  # NaN / Inf
    task = Task(cfg.task)
    dataset.check_task(task)  # layout vs network
    if dataset.task_config.get("name") != task.name:
        raise ConfigError(f"{cfg.dataset_dir} was collected for task {dataset.task_config.get('name')!r}, not {task.name!r}: pass task={dataset.task_config.get('name')}")
    return dataset, task


def build_autoencoder(cfg: DictConfig, dataset: ParameterDataset) -> ParameterAutoencoder:
    if cfg.train.phase == "diffusion":
        check_component_weights(Path(cfg.train.autoencoder_path), ParameterAutoencoder)  # no silently random tensors
        ae = ParameterAutoencoder.from_pretrained(cfg.train.autoencoder_path, use_safetensors=True)
        if ae.config.param_dim != dataset.dim:
            raise ConfigError(f"the autoencoder at {cfg.train.autoencoder_path} is for D={ae.config.param_dim}, the dataset has D={dataset.dim}")
        return ae
    ae = ParameterAutoencoder(param_dim=dataset.dim, **to_dict(cfg.generator.autoencoder))
    ae.fit_normalization(dataset.vectors, dataset.layout)
    return ae


def noise_scheduler_from(cfg: DictConfig) -> DDPMScheduler:
    # Latents are scaled to unit variance, not to [-1, 1]: clipping would distort them.
    return DDPMScheduler(**to_dict(cfg.generator.scheduler), clip_sample=False)


def step_generator(seed: int, rank: int, step: int, micro: int, device) -> torch.Generator:
    """The random source of one micro-batch: a pure function of (seed, rank, step, micro-batch).

    Batches, noise and timesteps all come from it, so a resumed run draws exactly what the
    uninterrupted one drew, with no random state to save, and each rank draws its own.
    """
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro)
    return g


# -- evaluation during training ------------------------------------------------------------------


def build_pipeline(cfg, accelerator, ae, unet, ema, noise_scheduler, target) -> PDiffPipeline:
    """A pipeline on the trained components, with the EMA weights in the denoiser when EMA is on."""
    unet = accelerator.unwrap_model(unet)
    if ema is not None:
        unet = UNet1DModel.from_config(unet.config).to(accelerator.device)
        ema.copy_to(unet.parameters())
    pipe = PDiffPipeline(autoencoder=accelerator.unwrap_model(ae).eval(), unet=unet.eval(), scheduler=sampler_scheduler(cfg.generator.sampler, noise_scheduler.config), target=target,
                         default_num_inference_steps=int(cfg.generator.num_inference_steps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score_on_validation(task: Task, target: TargetNetwork, vectors: torch.Tensor, device) -> torch.Tensor:
    net = target.net.to(device)
    batch = int(task.config.get("eval", {}).get("batch_size", 1000))
    return evaluate_vectors(net, target.layout, vectors, task.data.val, task.data.prepare, batch_size=batch).accuracy


def accuracy_stats(prefix: str, acc: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_best": float(acc.max()), f"{prefix}_mean": float(acc.mean()), f"{prefix}_median": float(acc.median()), f"{prefix}_min": float(acc.min())}


# -- the loop ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict | None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file otherwise
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    t = cfg.train
    accelerator = Accelerator(
        cpu=bool(cfg.cpu),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    main_process, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    resume_path = resolve_resume(cfg)
    if resume_path is not None:
        saved = json.loads((resume_path / STATE_FILE).read_text())
        diffs = config_differences(saved["config"], to_dict(cfg))
        if diffs:
            raise ConfigError(f"cannot resume from {resume_path}: its config differs in\n  " + "\n  ".join(diffs) + "\nresume with the same settings, or start a new output_dir")
    elif complete_checkpoints(checkpoint_root(cfg)):
        if not cfg.overwrite:
            raise FileExistsError(f"{checkpoint_root(cfg)} holds checkpoints of an earlier run: pass train.resume_from_checkpoint=latest to continue it, or overwrite=true to start over")
        if main_process:  # starting over: the old run's checkpoints must not be mistaken for this one's
            shutil.rmtree(checkpoint_root(cfg))
            (Path(cfg.output_dir) / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    set_seed(int(cfg.seed), device_specific=True)

    dataset, task = load_parameter_dataset(cfg)
    vectors = dataset.vectors.to(device)  # the whole parameter dataset stays on the device
    ae = build_autoencoder(cfg, dataset)
    unet = build_unet(*ae.latent_shape, **to_dict(cfg.generator.unet))
    noise_scheduler = noise_scheduler_from(cfg)
    train_ae = t.phase in ("all", "autoencoder")
    ae_steps = int(t.ae_steps) if train_ae else 0
    total_steps = ae_steps + (int(t.diffusion_steps) if t.phase in ("all", "diffusion") else 0)

    opt_ae = torch.optim.AdamW(ae.parameters(), lr=float(t.ae_lr), weight_decay=float(t.weight_decay))
    opt_unet = torch.optim.AdamW(unet.parameters(), lr=float(t.diffusion_lr), weight_decay=float(t.weight_decay))
    # Prepared LR schedulers step once per process per optimizer step: scale like diffusers' examples.
    lr_ae = get_scheduler(t.lr_scheduler, opt_ae, num_warmup_steps=int(t.lr_warmup_steps) * world, num_training_steps=max(1, ae_steps) * world)
    lr_unet = get_scheduler(t.lr_scheduler, opt_unet, num_warmup_steps=int(t.lr_warmup_steps) * world, num_training_steps=max(1, int(t.diffusion_steps)) * world)
    ema = EMAModel(unet.parameters(), decay=float(t.ema_decay), model_cls=UNet1DModel, model_config=unet.config) if t.ema_decay else None
    ae, unet, opt_ae, opt_unet, lr_ae, lr_unet = accelerator.prepare(ae, unet, opt_ae, opt_unet, lr_ae, lr_unet)
    if ema is not None:
        ema.to(device)
    register_ema_hooks(accelerator, ema)
    normalized = accelerator.unwrap_model(ae).normalize(vectors)  # what the autoencoder reconstructs; fixed once fitted

    step = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        step = json.loads((resume_path / STATE_FILE).read_text())["step"]
        logger.info(f"resumed from {resume_path} at step {step}", main_process_only=True)

    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if t.report_to != "none":
        accelerator.init_trackers(t.wandb_project, config=flatten(to_dict(cfg)), init_kwargs={"wandb": {"name": t.run_name, "dir": str(cfg.output_dir)}})

    target = TargetNetwork.from_dataset(dataset)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not main_process)
    best = {"val_acc_median": -1.0, "step": None}
    latents = None
    last_log = (time.perf_counter(), step)
    timing = {"ae": {"steps": 0, "seconds": 0.0}, "diffusion": {"steps": 0, "seconds": 0.0}}  # optimizer steps only

    while step < total_steps:
        in_ae_phase = step < ae_steps
        if not in_ae_phase and latents is None:
            latents = prepare_latents(accelerator, ae, vectors, task, target, dataset, step, train_ae, cfg)
        model, opt, sched = (ae, opt_ae, lr_ae) if in_ae_phase else (unet, opt_unet, lr_unet)
        model.train()
        step_started = time.perf_counter()
        for micro in range(int(t.gradient_accumulation_steps)):
            with accelerator.accumulate(model):
                g = step_generator(int(cfg.seed), accelerator.process_index, step, micro, device)
                idx = torch.randint(len(dataset), (int(t.batch_size),), generator=g, device=device)
                loss = autoencoder_loss(ae, normalized[idx], g) if in_ae_phase else diffusion_loss(unet, noise_scheduler, latents[idx], g)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), float(t.max_grad_norm)) if accelerator.sync_gradients else None
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()  # every rank sees a divergence
        if not math.isfinite(mean_loss):
            last = complete_checkpoints(checkpoint_root(cfg))
            raise TrainingDivergedError(
                f"the {'autoencoder' if in_ae_phase else 'diffusion'} loss became {mean_loss} at step {step + 1}; "
                f"last good checkpoint: {last[-1] if last else 'none'}. Lower the learning rate (train.ae_lr / train.diffusion_lr) "
                "or clip harder (a smaller train.max_grad_norm), then resume with train.resume_from_checkpoint=latest"
            )
        if not in_ae_phase and ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        step += 1
        bucket = timing["ae" if in_ae_phase else "diffusion"]
        bucket["steps"] += 1
        bucket["seconds"] += time.perf_counter() - step_started
        progress.update(1)

        if step % int(t.log_every) == 0 or step == total_steps:
            now = time.perf_counter()
            steps_per_s = (step - last_log[1]) / max(now - last_log[0], 1e-9)
            last_log = (now, step)
            phase = "ae" if in_ae_phase else "diffusion"
            logs = {f"{phase}/loss": mean_loss, f"{phase}/lr": sched.get_last_lr()[0], f"{phase}/steps_per_s": steps_per_s,
                    f"{phase}/samples_per_s": steps_per_s * int(t.batch_size) * world * int(t.gradient_accumulation_steps)}
            if grad_norm is not None:
                logs[f"{phase}/grad_norm"] = float(grad_norm)
            log(accelerator, cfg, logs, step)
            progress.set_postfix(loss=f"{mean_loss:.4g}", phase=phase)
        if t.checkpointing_steps and (step % int(t.checkpointing_steps) == 0 or step == total_steps):
            save_checkpoint(accelerator, cfg, step)
        if not in_ae_phase and t.eval_every and step % int(t.eval_every) == 0 and step < total_steps:
            evaluate_during_training(cfg, accelerator, ae, unet, ema, noise_scheduler, target, task, step, best)
        if in_ae_phase and step == ae_steps:
            # Fix the latent scale before saving, so a diffusion-only run from this autoencoder sees the same latents.
            latents = prepare_latents(accelerator, ae, vectors, task, target, dataset, step, train_ae, cfg)
            if main_process:
                save_autoencoder(accelerator, ae, cfg)
            accelerator.wait_for_everyone()

    progress.close()
    check_replicas_in_sync(accelerator, cfg, ae, unet)
    training = training_summary(timing, int(t.batch_size) * world * int(t.gradient_accumulation_steps), accelerator)
    result = None
    if t.phase != "autoencoder":
        finish_started = time.perf_counter()
        result = finish(cfg, accelerator, ae, unet, ema, noise_scheduler, target, task, dataset, step, best, training)
        training["final_evaluation_seconds"] = round(time.perf_counter() - finish_started, 3)
    if main_process:
        (Path(cfg.output_dir) / "timings.json").write_text(json.dumps(training, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def training_summary(timing: dict, global_batch: int, accelerator: Accelerator) -> dict:
    """Throughput of each phase this run trained (resumed steps count from the resumption)."""
    out = {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)}
    for phase, t in timing.items():
        if t["steps"]:
            rate = t["steps"] / max(t["seconds"], 1e-9)
            out[phase] = {"steps": t["steps"], "seconds": round(t["seconds"], 3), "steps_per_s": round(rate, 3), "samples_per_s": round(rate * global_batch, 1)}
    return out


def log(accelerator: Accelerator, cfg: DictConfig, logs: dict, step: int) -> None:
    """Log to the trackers and append to `<output_dir>/metrics.jsonl` (readable without any tracker)."""
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


def state_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(accelerator: Accelerator, cfg: DictConfig, ae, unet) -> None:
    """Compare every rank's weights after training; record the digests in `<output_dir>/replicas.json`.

    DDP keeps replicas identical by construction; a difference means a rank trained on something the
    others did not (a bug, or non-deterministic kernels), and the saved generator is only rank 0's.
    """
    from accelerate.utils import gather_object

    mine = {"ae": state_digest(accelerator.unwrap_model(ae)), "unet": state_digest(accelerator.unwrap_model(unet))}
    digests = gather_object([mine])
    if accelerator.is_main_process:
        in_sync = all(d == digests[0] for d in digests)
        record = {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "in_sync": in_sync, "digests": digests}
        (Path(cfg.output_dir) / "replicas.json").write_text(json.dumps(record, indent=2))
        if not in_sync:
            logger.warning("the ranks ended with different weights; the saved generator is rank 0's", main_process_only=True)


def autoencoder_loss(ae, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction error of noise-augmented normalised parameters (p-diff's autoencoder objective)."""
    return F.mse_loss(ae(x, generator=generator).reconstruction.float(), x)


def diffusion_loss(unet, noise_scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction loss at uniformly drawn timesteps, one per sample."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps).sample.float(), noise)


@torch.no_grad()
def prepare_latents(accelerator, ae, vectors, task, target, dataset, step, trained_here: bool, cfg) -> torch.Tensor:
    """Encode the dataset once (eval mode, no noise); fix the latent scale; log reconstruction quality."""
    ae_model = accelerator.unwrap_model(ae).eval()
    if trained_here:
        # Scale latents to unit variance for the denoiser; the factor is part of the autoencoder's config.
        raw = ae_model.encode(ae_model.normalize(vectors), add_noise=False)
        ae_model.register_to_config(scaling_factor=float(1.0 / raw.float().std().clamp_min(1e-8)))
        latents = (raw * ae_model.config.scaling_factor).float()  # = params_to_latents(vectors), without encoding twice
    else:
        latents = ae_model.params_to_latents(vectors).float()
    if accelerator.is_main_process:
        recon = ae_model.latents_to_params(latents)
        acc = score_on_validation(task, target, recon, accelerator.device)
        orig = torch.tensor(dataset.column("val_accuracy"))
        logs = {**accuracy_stats("ae/recon_val_acc", acc), **accuracy_stats("ae/original_val_acc", orig),
                "ae/recon_mse": float(F.mse_loss(ae_model.normalize(recon), ae_model.normalize(vectors)))}
        log(accelerator, cfg, logs, step)
        logger.info(f"autoencoder reconstruction: val acc median {logs['ae/recon_val_acc_median']:.4f} (originals {logs['ae/original_val_acc_median']:.4f})", main_process_only=True)
    return latents


def save_autoencoder(accelerator, ae, cfg) -> None:
    path = Path(cfg.output_dir) / "autoencoder"
    with atomic_directory(path, overwrite=True) as tmp:
        accelerator.unwrap_model(ae).save_pretrained(tmp, safe_serialization=True)


@torch.no_grad()
def evaluate_during_training(cfg, accelerator, ae, unet, ema, noise_scheduler, target, task, step, best) -> None:
    """Sample networks, score them on validation, keep the best generator so far (validation only)."""
    if accelerator.is_main_process:
        pipe = build_pipeline(cfg, accelerator, ae, unet, ema, noise_scheduler, target)
        params = pipe(num_models=int(cfg.train.eval_num_models), num_inference_steps=int(cfg.generator.num_inference_steps), generator=torch.Generator().manual_seed(int(cfg.seed))).params
        acc = score_on_validation(task, target, params, accelerator.device)
        logs = accuracy_stats("eval/val_acc", acc)
        log(accelerator, cfg, logs, step)
        if logs["eval/val_acc_median"] > best["val_acc_median"]:
            best.update(val_acc_median=logs["eval/val_acc_median"], step=step)
            save_generator(pipe, Path(cfg.output_dir) / "best_generator")
    accelerator.wait_for_everyone()


def save_generator(pipe: PDiffPipeline, path: Path, report: dict | None = None, plots: list | None = None) -> None:
    with atomic_directory(path, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, report=report, plots=plots)


def finish(cfg, accelerator, ae, unet, ema, noise_scheduler, target, task, dataset, step, best, training) -> dict | None:
    """Pick the generator (best on validation, else the last), evaluate it, save it, push it."""
    if not accelerator.is_main_process:
        return None
    last = build_pipeline(cfg, accelerator, ae, unet, ema, noise_scheduler, target)
    params = last(num_models=int(cfg.train.eval_num_models), num_inference_steps=int(cfg.generator.num_inference_steps), generator=torch.Generator().manual_seed(int(cfg.seed))).params
    last_median = float(score_on_validation(task, target, params, accelerator.device).median())
    pipe, selected = last, {"step": step, "val_acc_median": last_median}
    best_dir = Path(cfg.output_dir) / "best_generator"
    if best["step"] is not None and best["val_acc_median"] > last_median and best_dir.exists():
        pipe, selected = PDiffPipeline.from_pretrained(best_dir).to(accelerator.device), dict(best)
    pipe.set_progress_bar_config(disable=True)

    generated = pipe(num_models=int(cfg.train.num_final_models), num_inference_steps=int(cfg.generator.num_inference_steps), generator=torch.Generator().manual_seed(int(cfg.seed) + 1)).params
    report, plots = final_report(dataset, generated, task, cfg, accelerator, step)
    report["selected"] = {**selected, "selected_on": "validation"}
    report["training"] = training
    save_generator(pipe, Path(cfg.generator_dir), report=report, plots=plots)
    logger.info(f"saved the generator to {cfg.generator_dir}", main_process_only=True)
    if cfg.hub.push_to_hub:
        if not cfg.hub.model_id:
            raise ConfigError("hub.push_to_hub=true needs hub.model_id=<user>/<name>")
        pipe.push_to_hub(cfg.hub.model_id, private=bool(cfg.hub.private), report=report, plots=plots)
    return report


def final_report(dataset, generated, task, cfg, accelerator, step: int) -> tuple[dict, list]:
    """The evaluation report of the final generated set (see pdiff.evaluate), logged to the trackers."""
    from pdiff.evaluate import evaluate_and_write

    report, paths = evaluate_and_write(dataset, generated, Path(cfg.output_dir) / "report", wandb_run=accelerator, step=step, task=task, device=accelerator.device, seed=int(cfg.seed))
    return report, [p for p in paths.values() if str(p).endswith(".png")]


if __name__ == "__main__":
    main()
