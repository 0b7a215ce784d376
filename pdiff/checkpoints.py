"""Training checkpoints: `accelerator.save_state` folders that are complete or ignored, and resumable.

A checkpoint is `<output_dir>/checkpoints/checkpoint-<step>/`: Accelerate's model, optimizer and LR
scheduler state, the EMA weights (safetensors, through a save hook), and `pdiff_state.json` with the step
and the full config, written last. A save interrupted before that file exists is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import UNet1DModel
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig

from pdiff.config import flatten, to_dict

logger = get_logger(__name__)

STATE_FILE = "pdiff_state.json"  # written last into a checkpoint: marks it complete
# Keys that may change between a run and its resumption without changing what is computed.
RESUMABLE_KEYS = ("output_dir", "generator_dir", "train.resume_from_checkpoint", "train.report_to", "train.run_name", "train.wandb_project", "train.log_every",
                  "train.checkpointing_steps", "train.checkpoints_total_limit", "train.eval_every", "train.eval_num_models",
                  "train.num_final_models", "overwrite", "hub.", "generator.sampler", "generator.num_inference_steps")


def checkpoint_root(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose state file was written (an interrupted save has none), oldest first."""
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(cfg: DictConfig) -> Path | None:
    target = cfg.train.resume_from_checkpoint
    if not target:
        return None
    if target == "latest":
        found = complete_checkpoints(checkpoint_root(cfg))
        if not found:
            logger.info(f"no checkpoint in {checkpoint_root(cfg)}: starting from scratch", main_process_only=True)
            return None
        return found[-1]
    path = Path(target)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete pdiff checkpoint ({STATE_FILE} missing)")
    return path


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint={a.get(k)!r} now={b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)]


def save_checkpoint(accelerator: Accelerator, cfg: DictConfig, step: int) -> None:
    root = checkpoint_root(cfg)
    if accelerator.is_main_process and cfg.train.checkpoints_total_limit:
        # Make room first, like diffusers' examples, so at most `limit` checkpoints exist after saving.
        existing = complete_checkpoints(root)
        for old in existing[: max(0, len(existing) - int(cfg.train.checkpoints_total_limit) + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        tmp = path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps({"step": step, "config": to_dict(cfg)}, indent=2))
        tmp.rename(path / STATE_FILE)
    accelerator.wait_for_everyone()


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel | None) -> None:
    """Save/load the EMA weights with each checkpoint as safetensors (diffusers' example pattern)."""
    if ema is None:
        return

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_hook(models, input_dir):
        loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls=UNet1DModel)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
