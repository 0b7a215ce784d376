"""Draw tradeoff_large.png from tradeoff_large.json: every generator's accuracy-novelty curve against noise's,
and three reference distributions' (references.py).

    python figures/fashion-mnist/plot_tradeoff.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
data = json.loads((HERE / "tradeoff_large.json").read_text())

fig, ax = plt.subplots(figsize=(9, 6))
noise = data["noise"]  # the eta runs' noise; each training report's own (its seed's draws) is within 0.0004 of it
scales = ", ".join(f"x{p['scale']:g}" for p in noise)
ax.plot([p["nearest_iou"] for p in noise], [p["test_mean"] for p in noise], "o--", color="grey", lw=2, label=f"noise (spread) {scales}", zorder=3)
for p in noise:
    ax.annotate(f"x{p['scale']:g}", (p["nearest_iou"], p["test_mean"]), textcoords="offset points", xytext=(4, -10), color="grey")
colors = plt.cm.tab10.colors
for i, (name, generator) in enumerate(data["generators"].items()):
    points = generator["points"]
    ax.plot([p["nearest_iou"] for p in points], [p["test_mean"] for p in points], ".-", color=colors[i % 10], alpha=0.8, label=name)
for eta, marker in (("0.5", "^"), ("1.0", "v")):
    pts = data["eta"][eta]
    ax.plot([p["nearest_iou"] for p in pts], [p["test_mean"] for p in pts], marker, color="black", ms=8, ls="none", label=f"seed 0 at DDIM eta {eta} (T 0.75, 1)")
for (name, style), color in zip((("weight average + noise", "x-."), ("Gaussian fit", "d:"), ("originals turned", "*-")), ("black", "tab:purple", "darkgoldenrod")):
    pts = [(label, p) for label, p in data["references"].items() if label.startswith(name)]  # written by references.py
    ax.plot([p["nearest_iou"] for _, p in pts], [p["test_mean"] for _, p in pts], style, color=color, lw=1.5, label=f"reference: {name} ({', '.join(l.split(name)[1].strip(' ,') for l, _ in pts)})")
ax.plot(data["weight_average"]["nearest_iou"], data["weight_average"]["test_mean"], "k+", ms=16, mew=2, label="weight average")
ax.plot(data["originals"]["nearest_iou"], data["originals"]["test_mean"], "s", color="tab:blue", ms=9, label="originals (to each other)")
ax.set(xlim=(0.80, 0.94), ylim=(0.860, 0.877), xlabel="mean IoU of test errors with the nearest original (left: more novel)",
       ylabel="mean test accuracy", title="generator=large on Fashion-MNIST: points at T = 0.5, 0.75, 1, (1.1), 1.25 per recipe")
ax.grid(alpha=0.3)
ax.legend(fontsize=7, loc="lower right", ncol=2)
fig.tight_layout()
fig.savefig(HERE / "tradeoff_large.png", dpi=110)
