"""The verdict: one line saying whether the generated set beats the noise baseline at equal novelty.

The generated set is compared with the noise scale whose mean nearest-original IoU is closest to the
generated set's (equal novelty): a generator that merely perturbs its training checkpoints should do no
better than noise that moves them as far. It *beats* that baseline when its mean test accuracy is higher
by a margin of at least max(1 / N_test, 2 standard errors of the difference of the two means), *loses*
when lower by as much, and *ties* otherwise. When no scale comes within 0.05 IoU the line says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # report.py imports this module: the type only, no import cycle
    from .report import NetworkSet

EQUAL_NOVELTY_TOLERANCE = 0.05  # mean-IoU gap up to which a noise scale counts as "equal novelty"
VERDICT_RULE = (
    "compare with the noise scale whose mean nearest-original test-error IoU is closest to the generated set's; "
    "beats/loses when the mean test accuracies differ by at least max(1/N_test, 2 x the standard error of the "
    "difference of means, Welch), ties otherwise"
)


@dataclass
class Verdict:
    """Does the generated set beat the noise baseline at equal novelty? (VERDICT_RULE; `text` is one line.)"""

    rule: str
    outcome: str | None  # "beats" | "loses" | "ties"; None without a noise baseline
    matched_scale: float | None = None
    generated_mean_nearest_iou: float | None = None
    noise_mean_nearest_iou: float | None = None
    generated_test_mean: float | None = None
    noise_test_mean: float | None = None
    difference: float | None = None
    standard_error: float | None = None
    margin: float | None = None
    equal_novelty: bool | None = None
    generated_best_on_val_test: float | None = None
    noise_best_on_val_test: float | None = None
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d if self.matched_scale is not None else {k: d[k] for k in ("rule", "outcome", "text")}


def verdict(generated: NetworkSet, noise: Sequence[NetworkSet], num_test: int, noise_mode: str) -> Verdict:
    """Does the generated set beat the noise baseline at equal novelty? (VERDICT_RULE, one line in `text`.)"""
    if not noise or generated.novelty is None:
        return Verdict(VERDICT_RULE, None, text="no noise baseline was evaluated: no verdict")
    g = generated.novelty.iou.mean
    match = min(noise, key=lambda s: (abs(s.novelty.iou.mean - g), s.scale))
    n = match.novelty.iou.mean
    diff = generated.test.mean - match.test.mean
    stderr = math.sqrt(generated.test.std**2 / generated.count + match.test.std**2 / match.count)
    margin = max(1.0 / num_test, 2 * stderr)
    outcome = "beats" if diff >= margin else "loses to" if diff <= -margin else "ties with"
    text = (
        f"generated {outcome} noise at equal novelty: mean test accuracy {generated.test.mean:.4f} vs {match.test.mean:.4f} "
        f"({diff:+.4f}, margin {margin:.4f}) "
        f"for noise scale {match.scale:g} ({noise_mode}), mean nearest-original IoU {g:.3f} vs {n:.3f}"
    )
    if abs(n - g) > EQUAL_NOVELTY_TOLERANCE:
        text += f"; no scale within {EQUAL_NOVELTY_TOLERANCE} IoU, add noise scales for a fair match"
    return Verdict(
        VERDICT_RULE, outcome.split()[0], matched_scale=match.scale, generated_mean_nearest_iou=g, noise_mean_nearest_iou=n,
        generated_test_mean=generated.test.mean, noise_test_mean=match.test.mean, difference=diff, standard_error=stderr, margin=margin,
        equal_novelty=abs(n - g) <= EQUAL_NOVELTY_TOLERANCE, generated_best_on_val_test=generated.best_on_val.test_accuracy,
        noise_best_on_val_test=match.best_on_val.test_accuracy, text=text,
    )
