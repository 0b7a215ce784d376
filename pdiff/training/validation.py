"""Scoring the generator while it trains: sample networks, score them on validation, compare replicas.

Generators are only ever selected on the validation split; the test split is left to the final report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ..evaluation.cache import state_dict_digest
from ..evaluation.metrics import nearest_other_l2
from ..evaluation.scoring import evaluate_vectors
from ..models import ParameterAutoencoder, TargetNetwork, UNet1DModel
from ..pipelines import PDiffPipeline, sampler_scheduler
from ..tasks import Task

logger = get_logger(__name__)


def build_pipeline(accelerator: Accelerator, ae, unet, ema: EMAModel | None, noise_scheduler: DDPMScheduler, target: TargetNetwork, cfg) -> PDiffPipeline:
    """A pipeline on the trained components, with the EMA weights in the denoiser when EMA is on."""
    unet = accelerator.unwrap_model(unet)
    if ema is not None:
        unet = UNet1DModel.from_config(unet.config).to(accelerator.device)
        ema.copy_to(unet.parameters())
    pipe = PDiffPipeline(autoencoder=accelerator.unwrap_model(ae).eval(), unet=unet.eval(), target=target,
                         scheduler=sampler_scheduler(cfg.generator.sampler, noise_scheduler.config),
                         default_num_inference_steps=int(cfg.generator.num_inference_steps), default_temperature=float(cfg.generator.temperature))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_for_validation(pipe: PDiffPipeline, num_models: int, seed: int, temperature: float | None = None) -> torch.Tensor:
    """The same latent noise at every evaluation, so medians of different steps are comparable."""
    return pipe(num_models=num_models, generator=torch.Generator().manual_seed(seed), temperature=temperature).params


def most_novel_temperature(val_means: dict[float, float], reference: float, collapsed=frozenset()) -> float:
    """The highest temperature whose networks' validation mean reaches `reference` (the originals'): novelty
    grows with the temperature, so this is the most novel setting that gives nothing up on validation.
    When none reaches it, the temperature with the best validation mean. Temperatures in `collapsed` (most
    of their networks near-duplicates) are passed over while any other is left: their novelty and accuracy
    are those of a few networks drawn many times."""
    eligible = {t: mean for t, mean in val_means.items() if t not in collapsed} or val_means
    reaching = [t for t, mean in eligible.items() if mean >= reference]
    return max(reaching) if reaching else max(eligible, key=eligible.get)


def select_temperature(pipe: PDiffPipeline, task: Task, candidates, reference: float, num_models: int, seed: int, device,
                       known: dict[float, float] | None = None, closest_pair: float | None = None) -> tuple[float, dict[float, float], dict[float, int]]:
    """`most_novel_temperature` among `candidates`, each scored on `num_models` fresh networks (validation only).
    `known`: validation means already measured on these very draws (`sample_for_validation`, same seed).
    Also, per temperature, how many of the networks are near-duplicates: nearer (L2) to another of them than
    `closest_pair`, the originals' two closest checkpoints; a temperature where they are the majority has
    collapsed, and the rule passes it over."""
    known = known or {}
    means, duplicates = {}, {}
    for t in sorted(set(candidates)):
        vectors = sample_for_validation(pipe, num_models, seed, t)  # sampling is cheap next to scoring: drawn again when known
        means[t] = known[t] if t in known else float(validation_accuracy(task, pipe.target, vectors, device).mean())
        if closest_pair is not None:
            duplicates[t] = int((nearest_other_l2(vectors.cpu()) < closest_pair).sum())
    collapsed = {t for t, n in duplicates.items() if is_collapsed(n, num_models)}
    return most_novel_temperature(means, reference, collapsed), means, duplicates


def is_collapsed(near_duplicates: int, num_models: int) -> bool:
    """Most of a draw's networks are near-duplicates: it holds a few networks, drawn many times."""
    return 2 * near_duplicates > num_models


def validation_accuracy(task: Task, target: TargetNetwork, vectors: torch.Tensor, device) -> torch.Tensor:
    return evaluate_vectors(target.net.to(device), target.layout, vectors, task.data.val, task.data.prepare, batch_size=task.eval_batch_size).accuracy


def accuracy_stats(prefix: str, acc: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_best": float(acc.max()), f"{prefix}_mean": float(acc.mean()), f"{prefix}_median": float(acc.median()), f"{prefix}_min": float(acc.min())}


@torch.no_grad()
def reconstruction_logs(ae: ParameterAutoencoder, vectors: torch.Tensor, latents: torch.Tensor, original_val_accuracy, task: Task, target: TargetNetwork, device) -> dict:
    """How well the autoencoder alone reproduces the checkpoints: decoded networks on validation, and MSE."""
    recon = ae.latents_to_params(latents)
    logs = {**accuracy_stats("ae/recon_val_acc", validation_accuracy(task, target, recon, device)),
            **accuracy_stats("ae/original_val_acc", torch.as_tensor(original_val_accuracy)),
            "ae/recon_mse": float(torch.nn.functional.mse_loss(ae.normalize(recon), ae.normalize(vectors)))}
    logger.info(f"autoencoder reconstruction: val acc median {logs['ae/recon_val_acc_median']:.4f} (originals {logs['ae/original_val_acc_median']:.4f})", main_process_only=True)
    return logs


def state_digest(model) -> str:
    h = hashlib.sha256()
    state_dict_digest(h, model.state_dict())
    return h.hexdigest()


def check_replicas_in_sync(accelerator: Accelerator, output_dir: str, ae, unet) -> None:
    """Compare every rank's weights after training; record the digests in `<output_dir>/replicas.json`.

    DDP keeps replicas identical by construction; a difference means a rank trained on something the
    others did not (a bug, or non-deterministic kernels), and the saved generator is only rank 0's.
    """
    mine = {"ae": state_digest(accelerator.unwrap_model(ae)), "unet": state_digest(accelerator.unwrap_model(unet))}
    digests = gather_object([mine])
    if accelerator.is_main_process:
        in_sync = all(d == digests[0] for d in digests)
        record = {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "in_sync": in_sync, "digests": digests}
        (Path(output_dir) / "replicas.json").write_text(json.dumps(record, indent=2))
        if not in_sync:
            logger.warning("the ranks ended with different weights; the saved generator is rank 0's", main_process_only=True)
