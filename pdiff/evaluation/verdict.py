"""The verdict: one line saying whether the generated set beats the noise baseline at equal novelty.

The generated set is compared with noise at its own mean nearest-original IoU (equal novelty): a generator
that merely perturbs its training checkpoints should do no better than noise that moves them as far. The
noise scales form a curve of accuracy against IoU; between the two scales around the generated set's IoU
the baseline is read off that curve by linear interpolation, so a set that falls between x1 and x2 is held
to the accuracy noise has *there*, not to the more novel (and less accurate) of the two. Outside the curve
the nearest scale stands in. When no scale is within 0.05 IoU the line says so. The generated set
*beats* the baseline when its mean test accuracy is higher by a margin of at least max(1 / N_test, 2 standard
errors of the difference), *loses* when lower by as much, and *ties* otherwise. The noise scales perturb the
same originals along one shared draw, so an interpolated baseline's standard error is taken at its upper bound.
The same rule holds the generated set to the weight average plus noise (`kind="average_noise"`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # report.py imports this module: the type only, no import cycle
    from .report import NetworkSet

BASELINE_NAMES = {"noise": ("noise", "noise"), "average_noise": ("the weight average plus noise", "average + noise")}  # (in the sentence, by scale)
EQUAL_NOVELTY_TOLERANCE = 0.05  # mean-IoU gap up to which a noise scale counts as "equal novelty"
VERDICT_RULE = (
    "compare with the noise baseline (the originals plus noise, or the weight average plus noise) at the generated set's "
    "mean nearest-original test-error IoU: the noise scales' "
    "mean test accuracy interpolated linearly in IoU between the two scales around it (outside them, the nearest scale); "
    "beats/loses when the mean test accuracies differ by at least max(1/N_test, 2 x the standard error of the "
    "difference of means, Welch; an interpolated baseline's error at its upper bound, since all scales share one draw), ties otherwise"
)


@dataclass
class Verdict:
    """Does the generated set beat the noise baseline at equal novelty? (VERDICT_RULE; `text` is one line.)"""

    rule: str
    outcome: str | None  # "beats" | "loses" | "ties"; None without a noise baseline
    matched_scale: float | None = None  # the scale nearest in IoU
    interpolated_between: list[float] | None = None  # the two scales the baseline was interpolated between, if it was
    generated_mean_nearest_iou: float | None = None
    noise_mean_nearest_iou: float | None = None  # where the baseline was read: the generated set's IoU when interpolated
    generated_test_mean: float | None = None
    noise_test_mean: float | None = None  # the baseline: interpolated, or the nearest scale's
    difference: float | None = None
    standard_error: float | None = None
    margin: float | None = None
    equal_novelty: bool | None = None
    generated_best_on_val_test: float | None = None
    noise_best_on_val_test: float | None = None  # of the nearest scale
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d if self.matched_scale is not None else {k: d[k] for k in ("rule", "outcome", "text")}


def verdict(generated: NetworkSet, noise: Sequence[NetworkSet], num_test: int, noise_mode: str, kind: str = "noise") -> Verdict:
    """Does the generated set beat a noise baseline (`kind`: "noise", "average_noise") at equal novelty?
    (VERDICT_RULE, one line in `text`.)"""
    baseline, by_scale = BASELINE_NAMES[kind]
    if not noise or generated.novelty is None:
        return Verdict(VERDICT_RULE, None, text=f"no {by_scale} baseline was evaluated: no verdict")
    g = generated.novelty.iou.mean
    match = min(noise, key=lambda s: (abs(s.novelty.iou.mean - g), s.scale))
    weights = _weights_at(noise, g) or {match.scale: 1.0}
    scales = {s.scale: s for s in noise}
    noise_mean = sum(w * scales[k].test.mean for k, w in weights.items())
    n = sum(w * scales[k].novelty.iou.mean for k, w in weights.items())
    diff = generated.test.mean - noise_mean
    # Every noise scale perturbs the same originals along the same draw, so the two set means are positively
    # correlated: the interpolated mean's standard error is bounded by the weighted sum of theirs (correlation 1).
    noise_stderr = sum(w * scales[k].test.std / math.sqrt(scales[k].count) for k, w in weights.items())
    stderr = math.sqrt(generated.test.std**2 / generated.count + noise_stderr**2)
    margin = max(1.0 / num_test, 2 * stderr)
    outcome = "beats" if diff >= margin else "loses to" if diff <= -margin else "ties with"
    between = sorted(weights) if len(weights) == 2 else None
    if between:
        lo, hi = (scales[k] for k in between)
        where = (f"{by_scale} interpolated between scales {lo.scale:g} and {hi.scale:g} ({noise_mode}), mean nearest-original IoU {g:.3f} "
                 f"(x{lo.scale:g}: {lo.novelty.iou.mean:.3f}, x{hi.scale:g}: {hi.novelty.iou.mean:.3f})")
    else:
        where = f"{by_scale} scale {match.scale:g} ({noise_mode}), mean nearest-original IoU {g:.3f} vs {n:.3f}"
    text = (
        f"generated {outcome} {baseline} at equal novelty: mean test accuracy {generated.test.mean:.4f} vs {noise_mean:.4f} "
        f"({diff:+.4f}, margin {margin:.4f}) for {where}"
    )
    gap = abs(match.novelty.iou.mean - g)  # interpolated or not, how far the nearest measured noise set is
    if gap > EQUAL_NOVELTY_TOLERANCE:
        text += f"; no scale within {EQUAL_NOVELTY_TOLERANCE} IoU, add noise scales for a fair match"
    return Verdict(
        VERDICT_RULE, outcome.split()[0], matched_scale=match.scale, interpolated_between=between, generated_mean_nearest_iou=g,
        noise_mean_nearest_iou=n, generated_test_mean=generated.test.mean, noise_test_mean=noise_mean, difference=diff, standard_error=stderr, margin=margin,
        equal_novelty=gap <= EQUAL_NOVELTY_TOLERANCE, generated_best_on_val_test=generated.best_on_val.test_accuracy,
        noise_best_on_val_test=match.best_on_val.test_accuracy, text=text,
    )


def _weights_at(noise: Sequence[NetworkSet], iou: float) -> dict[float, float] | None:
    """{scale: weight} of the two noise sets whose mean IoU brackets `iou` (linear interpolation), or None
    when `iou` is outside the noise curve or on one of its points."""
    above = [s for s in noise if s.novelty.iou.mean > iou]  # less novel than the generated set
    below = [s for s in noise if s.novelty.iou.mean < iou]  # more novel
    if not above or not below:
        return None
    a = min(above, key=lambda s: s.novelty.iou.mean)
    b = max(below, key=lambda s: s.novelty.iou.mean)
    w = (a.novelty.iou.mean - iou) / (a.novelty.iou.mean - b.novelty.iou.mean)
    return {a.scale: 1.0 - w, b.scale: w}
