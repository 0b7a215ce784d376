"""The bookkeeping around each training step: the optimizer step, logging, checkpoints, timing.

The training script's two loops (autoencoder, then diffusion) call `TrainingRun.optimizer_step` and
`TrainingRun.end_step` once per step and stay a few lines long; everything a step leaves behind (a
metrics row, a checkpoint, the progress bar, throughput) happens here, the same way for both phases.
Whatever else the loop does in a step (validation) goes between the two calls, so the step's
checkpoint, written last, holds it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..io import write_text
from ..runtime import ThreadPolicy, retain_freed_memory
from .checkpoints import checkpoint_root, complete_checkpoints, save_checkpoint
from .losses import step_generator


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or Inf."""


@dataclass
class TrainingState:
    """What a checkpoint must carry besides the weights, so a resumed run ends exactly like an uninterrupted one."""

    step: int = 0
    best_step: int | None = None  # the step of the best generator so far, on validation
    best_val_median: float = -1.0


@dataclass
class PhaseTiming:
    steps: int = 0
    seconds: float = 0.0


@dataclass
class TrainingRun:
    accelerator: Accelerator
    cfg: DictConfig
    total_steps: int
    state: TrainingState = field(default_factory=TrainingState)

    def __post_init__(self):
        self.metrics_path = Path(self.cfg.output_dir) / "metrics.jsonl"
        self.timing = {"ae": PhaseTiming(), "diffusion": PhaseTiming()}
        self.progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", disable=not self.accelerator.is_main_process)
        self._last_log = (time.perf_counter(), self.state.step)
        self._pending: tuple[str, dict] = ("ae", {})
        self.threads = ThreadPolicy()  # the CPU threads nobody else uses, checked again as the run goes
        retain_freed_memory()

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return int(t.batch_size) * self.accelerator.num_processes * int(t.gradient_accumulation_steps)

    def optimizer_step(self, model, optimizer, lr_schedule, loss_of: Callable[[torch.Generator], torch.Tensor], phase: str, ema: EMAModel | None = None) -> None:
        """One optimizer step (with gradient accumulation) and the EMA update; counts the step.

        `loss_of(generator)` draws its batch and noise from the generator it is given, so the step is a
        pure function of (seed, rank, step).
        """
        t, acc = self.cfg.train, self.accelerator
        started = time.perf_counter()
        model.train()
        grad_norm = None
        for micro in range(int(t.gradient_accumulation_steps)):
            with acc.accumulate(model):
                loss = loss_of(step_generator(int(self.cfg.seed), acc.process_index, self.state.step, micro, acc.device))
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), float(t.max_grad_norm))
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
        mean_loss = acc.reduce(loss.detach().float(), "mean").item()  # every rank sees a divergence
        if not math.isfinite(mean_loss):
            self._diverged(phase, mean_loss)
        if ema is not None:
            ema.step(acc.unwrap_model(model).parameters())
        self.state.step += 1
        self.timing[phase].steps += 1
        self.timing[phase].seconds += time.perf_counter() - started
        self.progress.update(1)
        self._pending = (phase, {f"{phase}/loss": mean_loss, f"{phase}/lr": lr_schedule.get_last_lr()[0],
                                 **({f"{phase}/grad_norm": float(grad_norm)} if grad_norm is not None else {})})

    def end_step(self) -> None:
        """Log the step (every train.log_every) and checkpoint it (every train.checkpointing_steps)."""
        (phase, logs), step, t = self._pending, self.state.step, self.cfg.train
        self.threads.update()
        if step % int(t.log_every) == 0 or step == self.total_steps:
            now = time.perf_counter()
            steps_per_s = (step - self._last_log[1]) / max(now - self._last_log[0], 1e-9)
            self._last_log = (now, step)
            self.log({**logs, f"{phase}/steps_per_s": steps_per_s, f"{phase}/samples_per_s": steps_per_s * self.global_batch})
            self.progress.set_postfix(loss=f"{logs[f'{phase}/loss']:.4g}", phase=phase)
        if int(t.checkpointing_steps) and (step % int(t.checkpointing_steps) == 0 or step == self.total_steps):
            self.checkpoint()

    def _diverged(self, phase: str, loss: float) -> None:
        last = complete_checkpoints(checkpoint_root(self.cfg))
        raise TrainingDivergedError(
            f"the {'autoencoder' if phase == 'ae' else 'diffusion'} loss became {loss} at step {self.state.step + 1}; "
            f"last good checkpoint: {last[-1] if last else 'none'}. Lower the learning rate (train.ae_lr / train.diffusion_lr) "
            "or clip harder (a smaller train.max_grad_norm), then resume with train.resume_from_checkpoint=latest"
        )

    def checkpoint(self) -> None:
        save_checkpoint(self.accelerator, self.cfg, asdict(self.state))

    def log(self, logs: dict) -> None:
        """Log to the trackers and append to `<output_dir>/metrics.jsonl` (readable without any tracker)."""
        self.accelerator.log(logs, step=self.state.step)
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": self.state.step, **logs}) + "\n")

    def drop_metrics_after(self, step: int) -> None:
        """On resume: forget the rows logged after the checkpoint, which the resumed run logs again."""
        if not (self.accelerator.is_main_process and self.metrics_path.exists()):
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(self.metrics_path, "".join(row + "\n" for row in rows))

    def summary(self) -> dict:
        """Throughput of each phase this run trained (resumed steps count from the resumption)."""
        acc = self.accelerator
        out = {"num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision, "device": str(acc.device)}
        for phase, t in self.timing.items():
            if t.steps:
                rate = t.steps / max(t.seconds, 1e-9)
                out[phase] = {"steps": t.steps, "seconds": round(t.seconds, 3), "steps_per_s": round(rate, 3), "samples_per_s": round(rate * self.global_batch, 1)}
        return out
