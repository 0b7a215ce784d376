"""Stage 2: train the generator — a parameter autoencoder, then a latent UNet1D diffusion model.

usage: accelerate launch pdiff/train.py [key=value ...]      (or: pdiff train [key=value ...])

    accelerate launch pdiff/train.py task=digits                       # any number of processes / machines
    accelerate launch pdiff/train.py task=digits train.mixed_precision=bf16 train.report_to=wandb
    accelerate launch pdiff/train.py task=digits train.resume_from_checkpoint=latest

Keys are those of configs/config.yaml (`pdiff config` prints them). The script reads top to bottom like
diffusers' training examples: set up, train the autoencoder, encode the dataset once, train the
denoiser, select the generator on validation, report. The parameter dataset is tiny, so it lives on
the device and batches are drawn by indexing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # before importing torch: help is instant
        print(__doc__)
        sys.exit(0)
    if __package__ in (None, ""):  # `accelerate launch pdiff/train.py` puts pdiff/ itself on sys.path
        sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, open_dict

from pdiff.config import ConfigError, flatten, load_config, task_of_dataset, to_dict
from pdiff import hub
from pdiff.data import ParameterDataset
from pdiff.evaluation import REPORT_FILE, Report, evaluate_and_write
from pdiff.evaluation.metrics import nearest_other_l2
from pdiff.evaluation.render import format_summary
from pdiff.evaluation.report import check_report_fits, noise_counts
from pdiff.io import atomic_directory, output_lock, read_json, write_json
from pdiff.models import AUTOENCODER_CLASSES, ParameterAutoencoder, ParameterCodec, TargetNetwork, TokenAutoencoder, UNet1DModel, autoencoder_from_config, build_unet
from pdiff.pipelines import PDiffPipeline
from pdiff.pipelines.loading import check_component_weights
from pdiff.runtime import free_memory, native_bf16
from pdiff.sampling import sample_networks
from pdiff.tasks import Task
from pdiff.training.checkpoints import load_checkpoint, register_ema_hooks, resume_point
from pdiff.training.loop import TrainingRun, TrainingState
from pdiff.training.losses import autoencoder_loss, diffusion_loss
from pdiff.training.validation import (accuracy_stats, build_pipeline, check_replicas_in_sync, is_collapsed, reconstruction_logs, sample_for_validation,
                                      select_temperature, validation_accuracy)

logger = get_logger(__name__)


def cli(argv: Sequence[str] | None = None) -> None:
    """`pdiff train` and `accelerate launch pdiff/train.py`: train, then say on the main process what came out and where."""
    argv = sys.argv[1:] if argv is None else list(argv)
    report = main(argv)
    if report is not None:
        cfg = load_config(argv)
        print(format_summary(report))
        print(f"generator: {cfg.generator_dir}  report and plots: {cfg.output_dir}/report/")


def main(argv: Sequence[str] | None = None) -> Report | None:
    """Train, select and report; returns the final report on the main process (None elsewhere)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file otherwise
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = load_config(argv)
    check_environment(cfg, argv)
    accelerator = make_accelerator(cfg)
    dataset, task = load_parameter_dataset(cfg, argv)  # read and checked before anything is written
    lock = output_lock(cfg.output_dir, "train") if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return train(cfg, accelerator, dataset, task)


def train(cfg: DictConfig, accelerator: Accelerator, dataset: ParameterDataset, task: Task) -> Report | None:
    t, device = cfg.train, accelerator.device
    resume_path = resume_point(cfg, accelerator)
    set_seed(int(cfg.seed), device_specific=True)

    # -- set up: models, optimizers, schedules ---------------------------------------------------
    vectors = dataset.vectors.to(device)  # the whole parameter dataset stays on the device
    ae = build_autoencoder(cfg, dataset)
    unet = build_unet(*ae.latent_shape, **to_dict(cfg.generator.unet))
    noise_scheduler = DDPMScheduler(**to_dict(cfg.generator.scheduler), clip_sample=False)  # latents have unit variance: clipping would distort them
    ae_steps = int(t.ae_steps) if t.phase in ("all", "autoencoder") else 0
    diffusion_steps = int(t.diffusion_steps) if t.phase in ("all", "diffusion") else 0
    opt_ae, lr_ae = optimizer_and_schedule(ae, float(t.ae_lr), ae_steps, cfg, accelerator.num_processes)
    opt_unet, lr_unet = optimizer_and_schedule(unet, float(t.diffusion_lr), diffusion_steps, cfg, accelerator.num_processes)
    ema = make_ema(unet, cfg, accelerator)
    ae, unet, opt_ae, opt_unet, lr_ae, lr_unet = accelerator.prepare(ae, unet, opt_ae, opt_unet, lr_ae, lr_unet)

    state = TrainingState(**load_checkpoint(accelerator, resume_path)) if resume_path else TrainingState()
    run = TrainingRun(accelerator, cfg, total_steps=ae_steps + diffusion_steps, state=state)
    run.drop_metrics_after(state.step)
    start_logging(cfg, accelerator)
    target = TargetNetwork.from_dataset(dataset)

    # -- the autoencoder -----------------------------------------------------------------------
    normalized = accelerator.unwrap_model(ae).normalize(vectors)  # what the autoencoder reconstructs
    trains_autoencoder_now = run.state.step < ae_steps or resume_path is None
    while run.state.step < ae_steps:
        run.optimizer_step(ae, opt_ae, lr_ae, lambda g: autoencoder_loss(ae, normalized[draw_batch(g, len(dataset), cfg)], g), phase="ae")
        run.end_step()

    # -- encode the dataset once ---------------------------------------------------------------
    latents = encode_dataset(accelerator.unwrap_model(ae), vectors, fix_scale=ae_steps > 0)
    if accelerator.is_main_process and run.state.step == ae_steps:  # a run resumed in the diffusion phase has done this
        if trains_autoencoder_now:  # (resumed exactly at the phase boundary, its metrics row exists already)
            run.log(reconstruction_logs(accelerator.unwrap_model(ae), vectors, latents, dataset.column("val_accuracy"), task, target, device))
        if ae_steps:
            save_autoencoder(accelerator.unwrap_model(ae), Path(cfg.output_dir) / "autoencoder")
    accelerator.wait_for_everyone()

    # -- the denoiser --------------------------------------------------------------------------
    while run.state.step < run.total_steps:
        run.optimizer_step(unet, opt_unet, lr_unet, lambda g: diffusion_loss(unet, noise_scheduler, latents[draw_batch(g, len(dataset), cfg)], g), phase="diffusion", ema=ema)
        if t.eval_every and run.state.step % int(t.eval_every) == 0 and run.state.step < run.total_steps:
            validate_and_keep_best(run, build_pipeline(accelerator, ae, unet, ema, noise_scheduler, target, cfg), task, target)
        run.end_step()  # last: the checkpoint holds the step's validation bookkeeping
    run.progress.close()

    # -- select on validation, report ------------------------------------------------------------
    check_replicas_in_sync(accelerator, cfg.output_dir, ae, unet)
    report = None
    if diffusion_steps and accelerator.is_main_process:
        report = select_and_report(run, build_pipeline(accelerator, ae, unet, ema, noise_scheduler, target, cfg), dataset, task)
    if accelerator.is_main_process:
        write_json(Path(cfg.output_dir) / "timings.json", report.training if report else run.summary())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


# -- set-up -----------------------------------------------------------------------------------------


def check_environment(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """What the schema cannot know: this machine's devices, combinations of keys, overrides that would be ignored."""
    t = cfg.train
    precision = mixed_precision(cfg)
    if precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if t.phase == "diffusion" and not t.autoencoder_path:
        raise ConfigError("train.phase=diffusion needs train.autoencoder_path=<folder of a saved autoencoder>")
    if t.autoencoder_path and not Path(t.autoencoder_path).is_dir():
        raise ConfigError(f"train.autoencoder_path={t.autoencoder_path}: no such folder (it holds config.json and the safetensors of a saved autoencoder)")
    if t.autoencoder_path and not (Path(t.autoencoder_path) / "config.json").is_file():
        raise ConfigError(f"train.autoencoder_path={t.autoencoder_path} holds no saved autoencoder (config.json is missing): "
                          "give a training run's autoencoder/ folder")
    if t.autoencoder_path:
        check_saved_autoencoder_agrees(cfg, overrides)
    hub.check_push(cfg.hub, "model_id", "generator")


def check_saved_autoencoder_agrees(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A saved autoencoder is rebuilt from its own config.json: a `generator.autoencoder.*` override that says
    otherwise would be ignored silently, so it is refused (one that agrees, as when a command is reused, is fine)."""
    saved = read_json(Path(cfg.train.autoencoder_path) / "config.json")
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        name = key.removeprefix("generator.autoencoder.")
        if key.startswith("generator.autoencoder.") and name in saved and to_dict(cfg.generator.autoencoder).get(name) != saved[name]:
            raise ConfigError(f"{override} contradicts the saved autoencoder in train.autoencoder_path={cfg.train.autoencoder_path} ({name}={saved[name]}), "
                              f"which is loaded as it was saved: drop {key}, or train a new autoencoder (no train.autoencoder_path)")


def training_device(cfg: DictConfig) -> torch.device:
    """The device Accelerate will pick for this process type (before an Accelerator exists)."""
    return torch.device("cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda")


def mixed_precision(cfg: DictConfig) -> str:
    """`train.mixed_precision`, with null and auto resolved for this process."""
    chosen, launcher = cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION")
    if chosen == "auto":
        return launcher or ("bf16" if native_bf16(training_device(cfg)) else "no")
    return chosen or launcher or "no"


def make_accelerator(cfg: DictConfig) -> Accelerator:
    t = cfg.train
    # Accelerate keeps one precision per process: a stage run before this one in the same process
    # (collect, in a notebook) left its own, and Accelerator(mixed_precision=...) would refuse to change
    # it. Only that state goes; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=bool(cfg.cpu),
        mixed_precision=mixed_precision(cfg),
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )


def load_parameter_dataset(cfg: DictConfig, overrides: Sequence[str]) -> tuple[ParameterDataset, Task]:
    """The dataset and its own task (plus any `task.*` overrides that do not contradict it), which
    replaces the composed `cfg.task`."""
    dataset = ParameterDataset.from_pretrained(cfg.dataset_dir)
    dataset.validate()  # NaN / Inf
    if len(dataset) < 2:
        raise ConfigError(f"{cfg.dataset_dir} holds {len(dataset)} checkpoint: a generator needs at least 2 to learn their spread; collect more (task.param.k)")
    task_config = task_of_dataset(dataset.task_config, overrides, str(cfg.dataset_dir))
    with open_dict(cfg):
        cfg.task = task_config
    task = Task(task_config)
    dataset.check_task(task)  # layout vs network
    check_final_report_fits(cfg, dataset.dim)
    return dataset, task


def check_final_report_fits(cfg: DictConfig, dim: int) -> None:
    """Refuse before training a final report (its samples, curve and noise baselines) that cannot fit in memory."""
    t = cfg.train
    generated = int(t.num_final_models) + int(t.curve_num_models) * len(t.curve_temperatures)
    check_report_fits(dim, generated, *noise_counts(cfg.task.eval, int(t.num_final_models)),
                      f"train.num_final_models={t.num_final_models}: the final report's networks of {dim} parameters",
                      "lower train.num_final_models (or set task.eval.num_noise_models)")


def build_autoencoder(cfg: DictConfig, dataset: ParameterDataset) -> ParameterCodec:
    """A new autoencoder (`generator.autoencoder.type`) normalised on the dataset, or (train.phase=diffusion)
    the saved one; refused here when one training step would not fit in memory."""
    if cfg.train.phase == "diffusion":
        folder = Path(cfg.train.autoencoder_path)
        cls = AUTOENCODER_CLASSES.get(read_json(folder / "config.json").get("_class_name"), ParameterAutoencoder)
        check_component_weights(folder, cls)  # no silently random tensors
        ae = cls.from_pretrained(folder, use_safetensors=True)
        if ae.config.param_dim != dataset.dim:
            raise ConfigError(f"the autoencoder at {cfg.train.autoencoder_path} is for D={ae.config.param_dim}, the dataset has D={dataset.dim}")
        return ae
    ae = autoencoder_from_config(to_dict(cfg.generator.autoencoder), dataset.layout)
    check_step_fits(ae, int(cfg.train.batch_size), training_device(cfg))
    ae.fit_normalization(dataset.vectors, dataset.layout)
    return ae


def check_step_fits(ae: ParameterCodec, batch: int, device: torch.device) -> None:
    """One autoencoder step's activations must fit in the memory that is free now, or nothing starts."""
    needed, free = ae.activation_bytes(batch), free_memory(device)
    if needed > free:
        hint = ("raise generator.autoencoder.chunk_size or lower generator.autoencoder.hidden" if isinstance(ae, TokenAutoencoder)
                else "use generator=tokens (memory ~ D / chunk_size)")
        raise ConfigError(f"one autoencoder step at D={ae.config.param_dim} and train.batch_size={batch} needs about {needed / 2**30:.1f} GiB, "
                          f"and {free / 2**30:.1f} GiB are free: lower train.batch_size, or {hint}")


def optimizer_and_schedule(model, lr: float, steps: int, cfg: DictConfig, world: int):
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(t.weight_decay))
    # Prepared LR schedules step once per process per optimizer step: scale like diffusers' examples.
    schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.lr_warmup_steps) * world, num_training_steps=max(1, steps) * world)
    return optimizer, schedule


def make_ema(unet, cfg: DictConfig, accelerator: Accelerator) -> EMAModel | None:
    """An EMA of the denoiser (diffusers' EMAModel), saved with every checkpoint; None when train.ema_decay is null."""
    if not cfg.train.ema_decay:
        return None
    # foreach: one fused update for all tensors instead of three kernels per tensor, which on a GPU
    # is launch-bound for a denoiser this small.
    ema = EMAModel(unet.parameters(), decay=float(cfg.train.ema_decay), model_cls=UNet1DModel, model_config=unet.config, foreach=True)
    ema.to(accelerator.device)
    register_ema_hooks(accelerator, ema)
    return ema


def start_logging(cfg: DictConfig, accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        write_json(Path(cfg.output_dir) / "config.json", to_dict(cfg))
    if cfg.train.report_to != "none":
        accelerator.init_trackers(cfg.train.wandb_project, config=flatten(to_dict(cfg)),
                                  init_kwargs={"wandb": {"name": cfg.train.run_name, "dir": str(cfg.output_dir)}})


def draw_batch(generator: torch.Generator, num_rows: int, cfg: DictConfig) -> torch.Tensor:
    return torch.randint(num_rows, (int(cfg.train.batch_size),), generator=generator, device=generator.device)


# -- between the phases -----------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(ae: ParameterAutoencoder, vectors: torch.Tensor, fix_scale: bool) -> torch.Tensor:
    """The denoiser's training data: every checkpoint encoded once (eval mode, no noise).

    An autoencoder trained in this run first fixes its latent scale (unit variance); it is part of the
    autoencoder's config, so a diffusion-only run from the saved autoencoder sees the same latents.
    """
    ae.eval()
    if fix_scale:
        raw = ae.encode(ae.normalize(vectors), add_noise=False)
        ae.register_to_config(scaling_factor=float(1.0 / raw.float().std().clamp_min(1e-8)))
    return ae.params_to_latents(vectors).float()


def save_autoencoder(ae: ParameterAutoencoder, path: Path) -> None:
    with atomic_directory(path, overwrite=True) as tmp:
        ae.save_pretrained(tmp, safe_serialization=True)


# -- selection --------------------------------------------------------------------------------------


def validate_and_keep_best(run: TrainingRun, pipe: PDiffPipeline, task: Task, target: TargetNetwork) -> None:
    """Score sampled networks on validation; the best generator so far is saved (validation only)."""
    acc = run.accelerator
    if acc.is_main_process:
        params = sample_for_validation(pipe, int(run.cfg.train.eval_num_models), int(run.cfg.seed))
        logs = accuracy_stats("eval/val_acc", validation_accuracy(task, target, params, acc.device))
        run.log(logs)
        if logs["eval/val_acc_median"] > run.state.best_val_median:
            run.state.best_step, run.state.best_val_median = run.state.step, logs["eval/val_acc_median"]
            save_generator(pipe, Path(run.cfg.output_dir) / "best_generator")
    # every rank carries the same bookkeeping into its checkpoints
    run.state.best_step, run.state.best_val_median = _broadcast_best(acc, run.state)
    acc.wait_for_everyone()


def _broadcast_best(accelerator: Accelerator, state: TrainingState) -> tuple[int | None, float]:
    from accelerate.utils import broadcast_object_list

    best = [state.best_step, state.best_val_median]
    broadcast_object_list(best, from_process=0)
    return best[0], best[1]


TEMPERATURE_RULE = ("the highest whose validation mean reaches the originals', else the most accurate; temperatures where most "
                    "networks are near-duplicates (nearer to another than the originals' closest pair) only when every one is")


def select_generator_temperature(pipe: PDiffPipeline, task: Task, dataset: ParameterDataset, candidates, cfg, device, known=None) -> dict:
    """Make the generator's default temperature the most novel one that is, on validation, as accurate as the
    originals on average and has not collapsed onto a few networks (`most_novel_temperature`); what was
    measured goes into the report's `selected`."""
    reference = float(torch.as_tensor(dataset.column("val_accuracy")).mean())
    closest_pair = float(nearest_other_l2(dataset.vectors).min())
    temperature, means, duplicates = select_temperature(pipe, task, candidates, reference, int(cfg.train.eval_num_models), int(cfg.seed), device, known, closest_pair)
    pipe.register_to_config(default_temperature=temperature)
    num_models = int(cfg.train.eval_num_models)
    logger.info(f"temperature {temperature:g} selected on validation: mean accuracy by temperature "
                + ", ".join(f"{t:g}: {m:.4f} ({duplicates[t]} of {num_models} near-duplicates{': collapsed' if is_collapsed(duplicates[t], num_models) else ''})"
                            for t, m in means.items())
                + f" (originals {reference:.4f}; near-duplicate: nearer to another sampled network than the originals' closest pair, L2 {closest_pair:.4g})",
                main_process_only=True)
    return {"temperature": temperature, "temperature_rule": TEMPERATURE_RULE,
            "temperature_val_means": {f"{t:g}": m for t, m in means.items()}, "originals_val_mean": reference,
            "temperature_near_duplicates": {f"{t:g}": n for t, n in duplicates.items()}, "originals_closest_pair_l2": closest_pair}


def select_and_report(run: TrainingRun, last: PDiffPipeline, dataset: ParameterDataset, task: Task) -> Report:
    """Pick the generator (best on validation, else the last), evaluate it on a fresh sample, save and push it."""
    cfg, acc, started = run.cfg, run.accelerator, time.perf_counter()
    run.threads.update()  # the cores free now: scoring a whole-network report takes minutes, with whatever count this sets
    last_accuracy = validation_accuracy(task, last.target, sample_for_validation(last, int(cfg.train.eval_num_models), int(cfg.seed)), acc.device)
    last_median = float(last_accuracy.median())
    pipe, selected = last, {"step": run.state.step, "val_acc_median": last_median}
    best_dir = Path(cfg.output_dir) / "best_generator"
    if run.state.best_step is not None and run.state.best_val_median > last_median and best_dir.exists():
        pipe = PDiffPipeline.from_pretrained(best_dir).to(acc.device)
        selected = {"step": run.state.best_step, "val_acc_median": run.state.best_val_median}
    pipe.set_progress_bar_config(disable=True)
    temperatures = {pipe.default_temperature, *map(float, cfg.train.curve_temperatures)}
    if cfg.train.select_temperature:
        # The last generator's draws at its own temperature were just scored: the same networks the selection would sample.
        known = {last.default_temperature: float(last_accuracy.mean())} if pipe is last else None
        selected.update(select_generator_temperature(pipe, task, dataset, temperatures, cfg, acc.device, known))

    generated = sample_networks(pipe, int(cfg.train.num_final_models), None, int(cfg.seed) + 1)
    # The curve's points start from the same draws as the first networks above, scaled: only the temperature differs.
    # A point never holds more networks than the generated set itself: the curve is a view beside it.
    per_point = min(int(cfg.train.curve_num_models), int(cfg.train.num_final_models))
    curve = {t: sample_networks(pipe, per_point, None, int(cfg.seed) + 1, t)
             for t in sorted(temperatures - {pipe.default_temperature})}
    report, paths = evaluate_and_write(dataset, generated, Path(cfg.output_dir) / "report", wandb_run=acc, step=run.state.step, task=task, device=acc.device,
                                       seed=int(cfg.seed), curve=curve, generated_temperature=pipe.default_temperature)
    report.selected = {**selected, "selected_on": "validation"}
    report.training = {**run.summary(), "final_evaluation_seconds": round(time.perf_counter() - started, 3)}
    if acc.is_main_process:  # the report folder's copy too holds what was selected and how training went
        write_json(Path(cfg.output_dir) / "report" / REPORT_FILE, report.to_dict())
    plots = [p for p in paths.values() if str(p).endswith(".png")]
    save_generator(pipe, Path(cfg.generator_dir), report=report, plots=plots)
    logger.info(f"saved the generator to {cfg.generator_dir}", main_process_only=True)
    if cfg.hub.push_to_hub:
        pipe.push_to_hub(cfg.hub.model_id, private=bool(cfg.hub.private), report=report, plots=plots)
    return report


def save_generator(pipe: PDiffPipeline, path: Path, report: Report | None = None, plots: list | None = None) -> None:
    with atomic_directory(path, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, report=report, plots=plots)


if __name__ == "__main__":  # `accelerate launch pdiff/train.py`: bad input is one line here too, not a traceback per rank
    from pdiff.commands import report_failures

    sys.exit(report_failures("train", cli))
