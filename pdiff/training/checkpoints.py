"""Training checkpoints: `accelerator.save_state` folders that are complete or ignored, and resumable.

A checkpoint is `<output_dir>/checkpoints/checkpoint-<step>/`: Accelerate's model, optimizer and LR
scheduler state, the EMA weights (safetensors, through a save hook), and `pdiff_state.json` with the
training state (step, best generator so far) and the full config, written last. A save interrupted
before that file exists is never resumed from.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig

from ..config import ConfigError, flatten, to_dict
from ..io import read_json, write_json
from ..models import UNet1DModel

logger = get_logger(__name__)

STATE_FILE = "pdiff_state.json"  # written last into a checkpoint: marks it complete
# Keys that may change between a run and its resumption without changing what is computed.
RESUMABLE_KEYS = ("output_dir", "generator_dir", "train.resume_from_checkpoint", "train.report_to", "train.run_name", "train.wandb_project", "train.log_every",
                  "train.checkpointing_steps", "train.checkpoints_total_limit", "train.eval_every", "train.eval_num_models",
                  "train.num_final_models", "train.curve_temperatures", "train.curve_num_models", "train.select_temperature", "overwrite", "hub.", "generator.sampler", "generator.num_inference_steps", "generator.temperature")


def checkpoint_root(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose state file was written (an interrupted save has none), oldest first."""
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_point(cfg: DictConfig, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from, after checking it was made with the same settings; None to start anew.

    Checkpoints of an earlier run in the same output_dir are an error unless the run is resumed or
    `overwrite=true` says to start over, which removes them.
    """
    path = _requested_checkpoint(cfg)
    if path is not None:
        diffs = config_differences(read_json(path / STATE_FILE)["config"], to_dict(cfg))
        if diffs:
            raise ConfigError(f"cannot resume from {path}: its config differs in " + "; ".join(diffs) + ". Resume with the same settings, or start a new output_dir")
    elif complete_checkpoints(checkpoint_root(cfg)) and not cfg.overwrite:
        raise FileExistsError(f"{checkpoint_root(cfg)} holds checkpoints of an earlier run: pass train.resume_from_checkpoint=latest to continue it, or overwrite=true to start over")
    if path is None:
        start_over(accelerator, cfg)
    return path


def _requested_checkpoint(cfg: DictConfig) -> Path | None:
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
    if not path.exists():
        raise FileNotFoundError(f"train.resume_from_checkpoint={target}: no such folder; give a checkpoint-N folder of a run, or latest")
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete pdiff checkpoint ({STATE_FILE} missing)")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore models, optimizers, LR schedules and EMA from `path`; returns the saved training state."""
    try:
        with warnings.catch_warnings():  # torch warns about a pickle's protocol before refusing it: the error below says enough
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            accelerator.load_state(str(path))
    except pickle.UnpicklingError as err:  # accelerate reads optimizer/scheduler state with torch.load(weights_only=True)
        raise ConfigError(f"{path} holds a file that is not plain tensor state (refused to unpickle it: {str(err).splitlines()[0]}); resume from another checkpoint") from err
    saved = read_json(path / STATE_FILE)
    logger.info(f"resumed from {path} at step {saved['step']}", main_process_only=True)
    return saved.get("state", {"step": saved["step"]})


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint={a.get(k)!r} now={b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)]


def save_checkpoint(accelerator: Accelerator, cfg: DictConfig, state: dict) -> None:
    root = checkpoint_root(cfg)
    if accelerator.is_main_process and cfg.train.checkpoints_total_limit:
        # Make room first, like diffusers' examples, so at most `limit` checkpoints exist after saving.
        existing = complete_checkpoints(root)
        for old in existing[: max(0, len(existing) - int(cfg.train.checkpoints_total_limit) + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"checkpoint-{state['step']}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json(path / STATE_FILE, {"step": state["step"], "state": state, "config": to_dict(cfg)})  # last: marks it complete
    accelerator.wait_for_everyone()


def start_over(accelerator: Accelerator, cfg: DictConfig) -> None:
    """`overwrite=true` without resuming: the old run's checkpoints and metrics must not be mistaken for this one's."""
    if accelerator.is_main_process and complete_checkpoints(checkpoint_root(cfg)):
        shutil.rmtree(checkpoint_root(cfg))
        (Path(cfg.output_dir) / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel | None) -> None:
    """Save/load the EMA weights with each checkpoint as safetensors (diffusers' example pattern)."""
    if ema is None:
        return

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_hook(models, input_dir):
        # The EMA config holds `decay`, `optimization_step`, ... beside the UNet's: diffusers warns that the
        # UNet does not expect them, which is true and harmless, so keep that warning out of a resumed run.
        with _quiet_diffusers():
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls=UNet1DModel)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
