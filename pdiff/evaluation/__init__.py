"""Evaluation users can trust: are generated networks good, and are they more than copies of the originals?

    report, paths = evaluate_and_write(originals, generated_vectors, "outputs/digits/eval")  # report.json + PNGs
    print(format_summary(report))

    pdiff evaluate --dataset outputs/digits/params --generated samples/ --out outputs/digits/eval

The package, in the order an evaluation runs:

* `scoring`: many parameter vectors scored on one network at once (vmap), exact, with OOM back-off;
* `baselines`: the weight average of the originals, the originals plus noise and the average plus noise;
* `metrics`: novelty (IoU of test-error sets, L2 distance), accuracy statistics, selection on validation;
* `report`: `evaluate_generated` -> the typed `Report` (what it holds is described there) and report.json;
* `verdict`: does the generated set beat noise (and the average plus noise) at equal novelty, in one line;
* `render` and `plots`: the terminal summary, model-card table, tracker scalars, W&B logging and PNGs,
  each drawn from a `Report`, never from the JSON by string keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data import ParameterDataset
from .baselines import DEFAULT_AVERAGE_NOISE_SCALES, DEFAULT_NOISE_SCALES, NOISE_MODES, noise_sigmas, noisy_averages, noisy_copies, weight_average
from .inputs import check_same_network, load_generated
from .metrics import SELECTION_RULE, accuracy_stats, l2_distances, select_on_val, wrong_set_iou
from .render import format_summary, log_to_wandb, markdown_table, network_table, summary_metrics, variety_text
from .report import REPORT_FILE, SCHEMA_VERSION, NetworkSet, Novelty, Report, Selection, Stats, Summary, Twins, evaluate_generated
from .scoring import NetworkEvaluator, Scores, Timing, benchmark_evaluation, evaluate_network, evaluate_vectors
from .verdict import Verdict, verdict


def evaluate_and_write(
    originals: ParameterDataset,
    generated: torch.Tensor | ParameterDataset,
    out_dir: str | os.PathLike,
    *,
    plots: bool = True,
    wandb_run: Any = None,
    step: int | None = None,
    **kwargs: Any,
) -> tuple[Report, dict[str, Path]]:
    """evaluate_generated + report.json + plots + W&B (when a run is active): what every stage calls.

    Returns the report and {"report": path, <plot name>: path, ...}.
    """
    report = evaluate_generated(originals, generated, **kwargs)
    paths = {"report": report.save(out_dir)}
    if plots:
        from .plots import plot_report  # matplotlib only when plotting

        paths.update(plot_report(report, out_dir))
    log_to_wandb(report, paths, step=step, run=wandb_run)
    return report, paths


__all__ = [
    "DEFAULT_AVERAGE_NOISE_SCALES", "DEFAULT_NOISE_SCALES", "NOISE_MODES", "REPORT_FILE", "SCHEMA_VERSION", "SELECTION_RULE",
    "NetworkEvaluator", "NetworkSet", "Novelty", "Report", "Scores", "Selection", "Stats", "Summary", "Timing", "Twins", "Verdict",
    "accuracy_stats", "benchmark_evaluation", "check_same_network", "evaluate_and_write", "evaluate_generated", "evaluate_network",
    "evaluate_vectors", "format_summary", "l2_distances", "load_generated", "log_to_wandb", "markdown_table", "network_table",
    "noise_sigmas", "noisy_averages", "noisy_copies", "select_on_val", "summary_metrics", "variety_text", "verdict", "weight_average", "wrong_set_iou",
]
