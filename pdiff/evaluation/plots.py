"""PNG plots of an evaluation report, drawn from the `Report` alone (so `report.json` can be re-plotted).

* `accuracy_distributions.png`: validation and test accuracy of every network, per set (originals,
  generated, each scale of both noise baselines) as a box plot with the individual networks on top; the weight average
  is a dashed line, the network selected on validation a star.
* `accuracy_vs_novelty.png`: test accuracy against similarity to the nearest original, per network, by
  IoU of the test-error sets (right is closer to a copy) and by parameter L2 distance (left is closer);
  then the trade-off of set means, zoomed where the generator sits: its curve over sampling
  temperatures and the curves of both noise baselines, so they compare at equal novelty.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in worker processes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import atomic_file  # noqa: E402
from .render import verdicts  # noqa: E402
from .report import NetworkSet, Report  # noqa: E402

PLOT_FILES = {"accuracy_distributions": "accuracy_distributions.png", "accuracy_vs_novelty": "accuracy_vs_novelty.png"}
COLORS = {"originals": "tab:blue", "generated": "tab:red", "weight_average": "black"}
# Sets often coincide (digits: every network at IoU 1.0 and one accuracy). Small filled originals on top of
# larger generated diamonds on top of ever larger hollow noise rings keep every set visible where they meet.
MARKERS = {"originals": dict(marker="s", s=12, zorder=5, edgecolor="black", linewidth=0.5), "generated": dict(marker="D", s=30, zorder=4)}
HOLLOW = {"noise": "o", "average_noise": "^"}  # the noise baselines' hollow markers, larger with each scale
NOVELTY_AXES = {"iou": "IoU of test errors with the nearest original (1 = same mistakes)", "l2": "L2 distance to the nearest original"}


def _boxed_sets(report: Report) -> list[NetworkSet]:
    """The sets drawn as distributions; the weight average, one network, is drawn as a line or a marker."""
    return [row for row in report.rows() if row.kind != "weight_average"]


def _colors(rows: list[NetworkSet]) -> list[Any]:
    shades = {}
    for kind, cmap, lowest in (("noise", "viridis", 0.15), ("average_noise", "copper", 0.2), ("temperature", "Reds", 0.35)):
        count = max(sum(row.kind == kind for row in rows), 1)
        shades[kind] = iter([plt.get_cmap(cmap)(x) for x in np.linspace(lowest, 0.85, count)])
    return [COLORS.get(row.kind) or next(shades[row.kind]) for row in rows]


def plot_accuracy_distributions(report: Report, path: str | os.PathLike) -> Path:
    rows = _boxed_sets(report)
    colors = _colors(rows)
    rng = np.random.default_rng(0)  # jitter only; fixed so the same report gives the same picture
    # Top row: every set on its full range. Bottom row: zoomed on the originals, the generated networks and
    # the weight average, whose differences strong noise would otherwise squash into one line.
    fig, axes = plt.subplots(2, 2, figsize=(max(9, 1.5 * len(rows) + 4), 8.5))
    for col, split in enumerate(("val", "test")):
        data = [np.asarray(row.networks[f"{split}_accuracy"], dtype=float) for row in rows]
        avg = getattr(report.weight_average, split).mean
        for ax_row, ax in enumerate(axes[:, col]):
            shown = len(rows) if ax_row == 0 else 2  # the zoomed row: originals and generated only, no noise whiskers off the axis
            ax.boxplot(data[:shown], showfliers=False, widths=0.5)
            for i, (row, values, color) in enumerate(zip(rows[:shown], data, colors), start=1):
                ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=10, alpha=0.6, color=color, zorder=3)
                ax.scatter([i], [getattr(row.best_on_val, f"{split}_accuracy")], marker="*", s=140, color=color,
                           edgecolor="black", zorder=4, label="selected on val" if i == 1 else None)
            ax.axhline(avg, color="black", linestyle="--", linewidth=1, label=f"weight average {avg:.4f}")
            ax.set_xticks(range(1, shown + 1), [row.name for row in rows[:shown]], rotation=30, ha="right")
            ax.set_ylabel(f"{split} accuracy")
            ax.grid(axis="y", alpha=0.3)
            if ax_row == 0:
                ax.set_title(f"{split} accuracy (n = {report.splits[split]} examples)")
                ax.legend(fontsize=8, loc="lower left")
            else:
                focus = np.concatenate([data[0], data[1], [avg]])
                pad = max(float(focus.max() - focus.min()), 1.0 / report.splits[split]) * 0.5
                ax.set_ylim(float(focus.min()) - pad, float(focus.max()) + pad)
                ax.set_title(f"{split} accuracy, zoomed on originals / generated / weight average", fontsize=9)
    fig.suptitle(f"{report.task}: originals vs generated vs noise-added ({report.noise_mode} noise)")
    return _save(fig, path)


def plot_accuracy_vs_novelty(report: Report, path: str | os.PathLike) -> Path:
    rows = _boxed_sets(report)
    colors = _colors(rows)
    noise_rank = {row.name: i for kind in HOLLOW for i, row in enumerate(r for r in rows if r.kind == kind)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for ax, (measure, xlabel) in zip(axes, NOVELTY_AXES.items()):
        for row, color in zip(rows, colors):
            x = row.nearest(measure)
            if x is None or row.kind == "temperature":
                continue  # a single original has no other to compare with; curve points are drawn as means below
            shown = "originals (to other originals)" if row.kind == "originals" else row.name
            style = MARKERS.get(row.kind) or dict(marker=HOLLOW[row.kind], s=50 + 25 * noise_rank[row.name], facecolors="none", edgecolors=color, linewidths=1.2, zorder=2)
            ax.scatter(np.asarray(x, dtype=float), np.asarray(row.networks["test_accuracy"], dtype=float), alpha=0.75,
                       **({"color": color} if row.kind in MARKERS else {}), label=shown, **style)
        avg = report.weight_average
        ax.scatter(avg.nearest(measure), [avg.test.mean], marker="+", s=320, color="black",
                   linewidths=1.5, label="weight average", zorder=6)  # a plain cross: points under it stay visible
        positive = [v for row in rows for v in row.nearest(measure) or [] if v is not None and v > 0]
        if measure == "l2" and positive:
            ax.set_xscale("symlog", linthresh=float(min(positive)))  # distances span orders of magnitude
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    _plot_tradeoff(axes[2], report)
    lines = [textwrap.fill(v.text, 140, break_long_words=False, break_on_hyphens=False) for v in verdicts(report)]  # whole words only
    fig.suptitle("\n".join([f"{report.task}: accuracy vs novelty", *lines]), fontsize=8)
    return _save(fig, path)


def _plot_tradeoff(ax, report: Report) -> None:
    """Set means only: mean test accuracy against mean nearest-original IoU. The generator's curve (one point
    per temperature) and both noise baselines' curves, with the originals and the weight average; the axes
    frame the generator and the originals, where the comparison at equal novelty is made."""

    def mean_point(row: NetworkSet) -> tuple[float, float]:
        return float(np.nanmean(np.asarray(row.nearest("iou"), dtype=float))), row.test.mean

    def curve(rows: list[NetworkSet], names: list[str], **style) -> list[tuple[float, float]]:
        points = [mean_point(row) for row in rows]
        ax.plot(*zip(*points), **style)
        for i, (name, (x, y)) in enumerate(zip(names, points)):  # above and below in turn: neighbouring points can coincide
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 == 0 else -10), fontsize=7, color=style["color"])
        return points

    generator = report.curve_points() if report.curve else [report.generated]
    names = [f"T={report.generated_temperature if row is report.generated else row.scale:g}" if report.curve else "generated" for row in generator]
    focus = curve(generator, names, color=COLORS["generated"], marker="D", markersize=5, markeredgecolor="black", linewidth=1.2, zorder=5,
                  label="generator" + (" by temperature" if report.curve else ""))
    if report.noise:
        curve(report.noise, [f"x{row.scale:g}" for row in report.noise], color="gray", marker="o", markersize=4, linestyle=":", linewidth=1,
              label="noise scales")
    if report.average_noise:
        curve(report.average_noise, [f"x{row.scale:g}" for row in report.average_noise], color="black", marker="^", markersize=4, linestyle="--",
              linewidth=1, label="weight average + noise")
    for row, style in ((report.originals, dict(marker="s", color=COLORS["originals"], label="originals (to other)")),
                       (report.weight_average, dict(marker="+", s=200, color="black", linewidths=1.5, label="weight average"))):
        if row.nearest("iou") is not None:
            focus.append(mean_point(row))
            ax.scatter(*focus[-1], zorder=6, **style)
    finite = np.asarray([p for p in focus if np.isfinite(p).all()], dtype=float)  # a set of NaN networks has no novelty
    if len(finite):
        (x_lo, y_lo), (x_hi, y_hi) = finite.min(0), finite.max(0)
        pad_x, pad_y = max(x_hi - x_lo, 0.02) * 0.3, max(y_hi - y_lo, 2.0 / report.splits["test"]) * 0.3
        ax.set_xlim(x_lo - pad_x, x_hi + pad_x)
        ax.set_ylim(y_lo - pad_y, y_hi + pad_y)
    ax.set_xlabel("mean IoU with the nearest original (set means)")
    ax.set_ylabel("mean test accuracy")
    ax.set_title("trade-off at equal novelty (zoomed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:  # a reader never sees a half-written image
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def plot_report(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every plot into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "accuracy_distributions": plot_accuracy_distributions(report, out / PLOT_FILES["accuracy_distributions"]),
        "accuracy_vs_novelty": plot_accuracy_vs_novelty(report, out / PLOT_FILES["accuracy_vs_novelty"]),
    }
