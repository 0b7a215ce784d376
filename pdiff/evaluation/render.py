"""Renderers of a `Report`: the terminal summary, the model-card table, flat tracker scalars, the
per-network table and the W&B logging that combines them. Each takes the typed report, so a report
loaded from `report.json` renders exactly like a fresh one."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any, Mapping

from .report import AccuratePart, NetworkSet, Report, Summary
from .scoring import SPLITS
from .verdict import Verdict

CARD_LABELS = {"originals": "original checkpoints", "generated": "generated", "weight_average": "weight average of the originals"}
TABLE_COLUMNS = ["kind", "noise_scale", "temperature", "index", "val_accuracy", "test_accuracy", "nearest_original_iou", "nearest_original_l2"]
TABLE_KINDS = {"originals": "original"}  # the per-network table names one network, not the set


def _mean(s: Summary | None) -> float:
    """The mean of a summary; NaN when there is none (a lone original) or it was NaN (non-finite networks)."""
    return math.nan if s is None or s.mean is None else s.mean


def _iou_l2(row: NetworkSet) -> tuple[float, float]:
    return (_mean(row.novelty.iou), _mean(row.novelty.l2)) if row.novelty else (math.nan, math.nan)


def format_summary(report: Report) -> str:
    """A compact table of the report for the terminal."""
    width = max(22, *(len(row.label) + 1 for row in report.rows()))  # "average + noise x0.5 (absolute)" is 31
    header = f"{'':<{width}}{'n':>5}{'val mean':>10}{'val best':>10}{'test@val':>10}{'test mean':>10}{'test min':>10}{'test std':>10}{'near IoU':>10}{'near L2':>10}"
    lines = [f"task {report.task}: D={report.dim}, val {report.splits['val']}, test {report.splits['test']} examples", header]
    for row in report.rows():
        iou, l2 = _iou_l2(row)
        v, t = row.val, row.test
        lines.append(
            f"{row.label:<{width}}{row.count:>5}{v.mean:>10.4f}{v.best:>10.4f}{row.best_on_val.test_accuracy:>10.4f}"
            f"{t.mean:>10.4f}{t.min:>10.4f}{t.std:>10.4f}{iou:>10.3f}{l2:>10.4g}"
        )
    lines.append(_near_line(report))
    part = report.accurate_part()
    if part is not None:
        lines.append(_accurate_part_line(part))
    if report.nonfinite_indices:
        lines.append(f"WARNING: {len(report.nonfinite_indices)} generated networks hold NaN/Inf (counted as all wrong)")
    lines.extend("verdict: " + v.text for v in verdicts(report))
    t = report.timing
    reused = f"; {t.networks_from_cache} of them read from the score cache" if t.networks_from_cache else ""
    lines.append(f"evaluated {t.networks_evaluated} networks on val+test in {t.evaluation_seconds:.2f} s on {t.device} ({t.networks_per_s} networks/s{reused})")
    return "\n".join(lines)


def verdicts(report: Report) -> list[Verdict]:
    """The verdict against noise, then the one against the weight average plus noise (when evaluated)."""
    return [report.verdict] + ([report.average_verdict] if report.average_verdict else [])


def _near_line(report: Report) -> str:
    head = "near IoU/L2: mean over networks of the max IoU of test-error sets / min L2 to the nearest original"
    variety = variety_text(report)
    return f"{head}; {variety}" if variety else head


def variety_text(report: Report) -> str:
    """How alike the generated networks are, beside the originals: a set of near-copies of one network can be
    far from every original (the weight average of spread-out checkpoints is), so distance to the originals
    alone would call it novel. Empty without generated<->generated similarity. Each network's nearest other
    member is searched in its own set, and a larger set has nearer ones: a set smaller than the originals
    looks a little more varied than it is."""
    if not report.generated_generated:
        return ""
    generated_iou = _mean(report.generated_generated.iou)
    text = f"generated<->generated IoU {generated_iou:.3f}"
    originals_iou = _mean(report.originals.novelty.iou) if report.originals.novelty else math.nan
    if not math.isnan(originals_iou):
        text += f", originals<->originals {originals_iou:.3f}"
        if generated_iou > originals_iou:
            text += ": the generated networks vary less than the originals"
    twins = report.twins()
    if twins:  # said when none are, too: a reader looking for collapse should not have to infer it from silence
        count = f"{twins.count} of {twins.total} generated networks are" if twins.count else f"none of the {twins.total} generated networks is"
        text += f"; {count} nearer to another generated one than the two closest originals are to each other (L2 {twins.threshold:.4g})"
    return text


def _accurate_part_line(part: AccuratePart) -> str:
    head = f"generated reaching the originals' val mean {part.threshold:.4f}: "
    if not part.count:
        return head + f"none of {part.total}"
    line = head + f"{part.count} of {part.total}, test mean {_num(part.test_mean)}, near IoU {_num(part.nearest_iou, '.3f')}"
    if part.count < part.total:
        line += f"; the rest: test mean {_num(part.rest_test_mean)}, near IoU {_num(part.rest_nearest_iou, '.3f')}"
    return line


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not math.isnan(value) else "–"


def markdown_table(report: Report | None) -> str:
    """The model card's table of the report (one row per set of networks); empty without a report."""
    if report is None:
        return ""
    rows = [
        "| networks | n | val mean | val best | test of best-on-val | test mean | test min | test max | nearest-original IoU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows():
        label = {"noise": f"originals + {row.label}", "average_noise": f"weight {row.label}"}.get(row.kind) or CARD_LABELS.get(row.kind, row.label)
        val, test = row.val, row.test
        rows.append(
            f"| {label} | {row.count} | {_num(val.mean)} | {_num(val.best)} | {_num(row.best_on_val.test_accuracy)} | "
            f"{_num(test.mean)} | {_num(test.min)} | {_num(test.best)} | {_num(_iou_l2(row)[0], '.3f')} |"
        )
    return "\n".join(rows)


def summary_metrics(report: Report) -> dict[str, float]:
    """The headline numbers as flat `group/metric` scalars (for trackers, sweeps and benchmarks)."""
    out: dict[str, Any] = {}
    for row in (report.originals, report.generated):
        for split in SPLITS:
            out.update({f"{row.kind}/{split}_{stat}": value for stat, value in asdict(getattr(row, split)).items()})
        out[f"{row.kind}/test_at_best_val"] = row.best_on_val.test_accuracy
    average = report.weight_average.best_on_val
    out["weight_average/val_accuracy"], out["weight_average/test_accuracy"] = average.val_accuracy, average.test_accuracy
    for row in (*report.noise, *report.average_noise):
        out[f"{row.kind}_{row.scale:g}/test_mean"] = row.test.mean
        out[f"{row.kind}_{row.scale:g}/nearest_original_iou_mean"] = row.novelty.iou.mean
    for row in report.curve:
        out[f"temperature_{row.scale:g}/val_mean"], out[f"temperature_{row.scale:g}/test_mean"] = row.val.mean, row.test.mean
        out[f"temperature_{row.scale:g}/nearest_original_iou_mean"] = _mean(row.novelty.iou)
    out["tradeoff/val_gain_over_noise"] = report.val_gain_over_noise()  # validation only: a sweep metric
    out["tradeoff/val_gain_over_average_noise"] = report.val_gain_over_noise("average_noise")
    similarity = {"original_original": report.originals.novelty, "generated_generated": report.generated_generated, "generated_original": report.generated.novelty}
    for name, novelty in similarity.items():
        if novelty is not None and novelty.iou is not None:
            out[f"similarity/{name}_iou_mean"] = novelty.iou.mean
            out[f"similarity/{name}_l2_mean"] = novelty.l2.mean if novelty.l2 else None
    part = report.accurate_part()
    if part is not None and part.total:
        out["accurate_part/share"] = part.count / part.total
        out["accurate_part/test_mean"] = part.test_mean
        out["accurate_part/nearest_original_iou_mean"] = part.nearest_iou
        out["accurate_part/rest_test_mean"] = part.rest_test_mean
        out["accurate_part/rest_nearest_original_iou_mean"] = part.rest_nearest_iou
    twins = report.twins()
    if twins and twins.total:
        out["similarity/generated_twins_share"] = twins.count / twins.total
    out["timing/networks_per_s"] = report.timing.networks_per_s
    out["verdict/generated_minus_noise_test_mean"] = report.verdict.difference
    if report.average_verdict:
        out["verdict/generated_minus_average_noise_test_mean"] = report.average_verdict.difference
    return {k: v for k, v in out.items() if v is not None}


def network_table(report: Report) -> tuple[list[str], list[list]]:
    """One row per evaluated network (originals, generated, curve, weight average, both noise baselines): columns and rows."""
    rows: list[list] = []
    for row in report.rows():
        iou, l2 = row.nearest("iou"), row.nearest("l2")
        for i in range(row.count):
            nets = row.networks
            noise_scale, temperature = (None, row.scale) if row.kind == "temperature" else (row.scale, None)
            rows.append([TABLE_KINDS.get(row.kind, row.kind), noise_scale, temperature, i, nets["val_accuracy"][i], nets["test_accuracy"][i],
                         iou[i] if iou else None, l2[i] if l2 else None])
    return list(TABLE_COLUMNS), rows


def log_to_wandb(report: Report, plots: Mapping[str, os.PathLike] | None = None, *, step: int | None = None, run: Any = None, prefix: str = "eval") -> bool:
    """Log the headline numbers, a per-network `wandb.Table` and the plots to W&B; False when no run is active.

    `run` may be a wandb run, an `accelerate.Accelerator` (its "wandb" tracker; other ranks log nothing),
    or None for the active `wandb.run`.
    """
    if run is not None and hasattr(run, "get_tracker"):  # an Accelerator
        if not run.is_main_process or not any(t.name == "wandb" for t in run.trackers):
            return False
        run = run.get_tracker("wandb", unwrap=True)
    if run is None:
        import wandb  # only when asked: importing wandb is slow

        run = wandb.run
    if run is None:
        return False
    import wandb

    columns, rows = network_table(report)
    data: dict[str, Any] = {f"{prefix}/{k}": v for k, v in summary_metrics(report).items()}
    data[f"{prefix}/networks"] = wandb.Table(columns=columns, data=rows)
    for name, path in (plots or {}).items():
        if str(path).endswith(".png"):
            data[f"{prefix}/{name}"] = wandb.Image(str(path))
    run.log(data, step=step)
    run.summary[f"{prefix}/verdict"] = report.verdict.text
    if report.average_verdict:
        run.summary[f"{prefix}/average_verdict"] = report.average_verdict.text
    return True
