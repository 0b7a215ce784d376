"""Score one set of parameter vectors against a parameter dataset, as `pdiff evaluate` does, for the figure scripts."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdiff.evaluation.report import Report


def score_set(dataset: str, vectors: torch.Tensor, out: Path, name: str) -> dict:
    """Write `vectors` to OUT/NAME.safetensors, evaluate them with `--noise-scales 1 1.5 2` (and the weight average
    plus noise at the same scales) into OUT/NAME/, print one line and return the set's point: test mean and min,
    nearest-original IoU, its IoU among itself, the lead over noise and over the weight average plus noise."""
    save_file({"params": vectors.contiguous()}, str(out / f"{name}.safetensors"))
    result = subprocess.run([sys.executable, "-m", "pdiff", "evaluate", "--dataset", dataset, "--generated", str(out / f"{name}.safetensors"),
                             "--out", str(out / name), "--noise-scales", "1", "1.5", "2", "--average-noise-scales", "1", "1.5", "2", "--no-plots", "--overwrite"], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"pdiff evaluate failed on {name}:\n{result.stderr[-3000:]}")
    report = Report.load(out / name)
    row, verdict, average = report.generated, report.verdict, report.average_verdict
    point = {"test_mean": round(row.test.mean, 5), "test_min": round(row.test.min, 5), "nearest_iou": round(row.novelty.iou.mean, 4),
             "generated_generated_iou": round(report.generated_generated.iou.mean, 4), "lead": round(verdict.difference, 5), "margin": round(verdict.margin, 5),
             "average_noise_lead": round(average.difference, 5), "average_noise_margin": round(average.margin, 5)}
    print(f"{name:32} test mean {row.test.mean:.4f} min {row.test.min:.4f} IoU {row.novelty.iou.mean:.3f} lead {verdict.difference:+.4f}"
          f" vs average + noise {average.difference:+.4f}", flush=True)
    return point
