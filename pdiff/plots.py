"""PNG plots of an evaluation report, drawn from the report alone (so `report.json` can be re-plotted).

* `accuracy_distributions.png`: validation and test accuracy of every network, per set (originals,
  generated, each noise scale) as a box plot with the individual networks on top; the weight average
  is a dashed line, the network selected on validation a star.
* `accuracy_vs_novelty.png`: test accuracy against similarity to the nearest original, by IoU of the
  test-error sets (right is closer to a copy) and by parameter L2 distance (left is closer).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in worker processes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOT_FILES = {"accuracy_distributions": "accuracy_distributions.png", "accuracy_vs_novelty": "accuracy_vs_novelty.png"}
COLORS = {"originals": "tab:blue", "generated": "tab:red", "weight average": "black"}


def _groups(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any], str, str]]:
    """(label, group, its per-network columns, IoU column, L2 column) for every set of networks."""
    groups = [
        ("originals", report["originals"], report["originals"]["networks"], "nearest_other_original_iou", "nearest_other_original_l2"),
        ("generated", report["generated"], report["generated"]["networks"], "nearest_original_iou", "nearest_original_l2"),
    ]
    for entry in report["baselines"]["noise"]["scales"]:
        groups.append((f"noise x{entry['scale']:g}", entry, entry["networks"], "nearest_original_iou", "nearest_original_l2"))
    return groups


def _noise_colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.15, 0.85, max(n, 1))]


def _color(label: str, noise_colors: list, noise_index: dict) -> Any:
    return COLORS.get(label) or noise_colors[noise_index[label]]


def plot_accuracy_distributions(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    groups = _groups(report)
    noise_labels = [g[0] for g in groups if g[0].startswith("noise")]
    noise_colors, noise_index = _noise_colors(len(noise_labels)), {label: i for i, label in enumerate(noise_labels)}
    rng = np.random.default_rng(0)  # jitter only; fixed so the same report gives the same picture
    # Top row: every set on its full range. Bottom row: zoomed on the originals, the generated networks and
    # the weight average, whose differences strong noise would otherwise squash into one line.
    fig, axes = plt.subplots(2, 2, figsize=(max(9, 1.5 * len(groups) + 4), 8.5))
    for col, split in enumerate(("val", "test")):
        data = [np.asarray(nets[f"{split}_accuracy"], dtype=float) for _, _, nets, _, _ in groups]
        avg = report["baselines"]["weight_average"][f"{split}_accuracy"]
        for row, ax in enumerate(axes[:, col]):
            ax.boxplot(data, showfliers=False, widths=0.5)
            for i, ((label, group, _, _, _), values) in enumerate(zip(groups, data), start=1):
                color = _color(label, noise_colors, noise_index)
                ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=10, alpha=0.6, color=color, zorder=3)
                ax.scatter([i], [group["best_on_val"][f"{split}_accuracy"]], marker="*", s=140, color=color,
                           edgecolor="black", zorder=4, label="selected on val" if i == 1 else None)
            ax.axhline(avg, color="black", linestyle="--", linewidth=1, label=f"weight average {avg:.4f}")
            ax.set_xticks(range(1, len(groups) + 1), [g[0] for g in groups], rotation=30, ha="right")
            ax.set_ylabel(f"{split} accuracy")
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(f"{split} accuracy (n = {report['splits'][split]} examples)")
                ax.legend(fontsize=8, loc="lower left")
            else:
                focus = np.concatenate([data[0], data[1], [avg]])
                pad = max(float(focus.max() - focus.min()), 1.0 / report["splits"][split]) * 0.5
                ax.set_ylim(float(focus.min()) - pad, float(focus.max()) + pad)
                ax.set_title(f"{split} accuracy, zoomed on originals / generated / weight average", fontsize=9)
    fig.suptitle(f"{report['task']}: originals vs generated vs noise-added ({report['baselines']['noise']['mode']} noise)")
    return _save(fig, path)


def plot_accuracy_vs_novelty(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    groups = _groups(report)
    noise_labels = [g[0] for g in groups if g[0].startswith("noise")]
    noise_colors, noise_index = _noise_colors(len(noise_labels)), {label: i for i, label in enumerate(noise_labels)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (col, xlabel) in zip(axes, ((3, "IoU of test errors with the nearest original (1 = same mistakes)"), (4, "L2 distance to the nearest original"))):
        for label, _, nets, iou_key, l2_key in groups:
            key = iou_key if col == 3 else l2_key
            if key not in nets:
                continue  # e.g. a single original has no other original to compare with
            x = np.asarray(nets[key], dtype=float)
            y = np.asarray(nets["test_accuracy"], dtype=float)
            shown = f"{label} (to other originals)" if label == "originals" else label
            style = {"originals": dict(marker="s", zorder=4, edgecolor="black", linewidth=0.5), "generated": dict(marker="D", zorder=3)}
            ax.scatter(x, y, s=16, alpha=0.75, color=_color(label, noise_colors, noise_index), label=shown,
                       **style.get(label, dict(marker="o", zorder=2)))
        avg = report["baselines"]["weight_average"]
        ax.scatter([avg["nearest_original_iou" if col == 3 else "nearest_original_l2"]], [avg["test_accuracy"]], marker="X", s=130, facecolors="none", edgecolors="black",
                   linewidths=1.5, label="weight average", zorder=5)  # hollow: points under it stay visible
        if col == 4 and any(v > 0 for _, _, nets, _, k in groups for v in nets.get(k, [])):
            ax.set_xscale("symlog", linthresh=_smallest_positive(groups))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['task']}: accuracy vs novelty\n" + textwrap.fill(report["verdict"]["text"], 150), fontsize=9)
    return _save(fig, path)


def _smallest_positive(groups) -> float:
    values = [v for _, _, nets, _, k in groups for v in nets.get(k, []) if v and v > 0]
    return float(min(values)) if values else 1.0


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)  # a reader never sees a half-written image
    return path


def plot_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every plot into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "accuracy_distributions": plot_accuracy_distributions(report, out / PLOT_FILES["accuracy_distributions"]),
        "accuracy_vs_novelty": plot_accuracy_vs_novelty(report, out / PLOT_FILES["accuracy_vs_novelty"]),
    }
