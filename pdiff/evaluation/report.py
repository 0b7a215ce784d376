"""The evaluation report: one typed object that every renderer reads, and its `report.json`.

    report = evaluate_generated(originals, generated_vectors)      # a Report
    report.save("outputs/digits/eval")                             # report.json, atomically
    report = Report.load("outputs/digits/eval")                    # the same Report back
    for row in report.rows(): ...                                  # originals, generated, curve, weight average, noise

What the report holds, and the choices behind it:

* **Accuracy** of the original checkpoints, the generated networks and every baseline on the validation and
  the test split: best (max), mean, median, min and sample std (`Stats`). A network is only ever *selected*
  on the validation split (highest validation accuracy, then lowest validation loss, then lowest index);
  the test accuracy of that network is what `best_on_val` reports. `test.best` is the oracle max over the
  set, kept for comparison with the paper, which selected on test.
* **Baselines** (see `pdiff.evaluation.baselines`): the uniform weight average of the originals (a set of
  one network, so it reads like every other row), the originals plus Gaussian noise at several scales, and
  the weight average plus the same noise.
* **Novelty** (the paper's analysis): the similarity of two networks is the IoU of their sets of wrongly
  classified test examples, |W_a ∩ W_b| / |W_a ∪ W_b| (1.0 when both sets are empty), and, independently,
  the L2 distance of their parameter vectors. For each generated (and noise) network the report gives its
  nearest original by either measure; the summaries give, per network, the max IoU / min L2 to the
  nearest *other* original (original<->original), other generated network (generated<->generated) and
  original (generated->original, noise->original).
* **The generator's curve**: the generated set again at other sampling temperatures (the starting
  noise's scale, `PDiffPipeline(temperature=...)`), each scored like the generated set, so the report
  shows where the generator sits on the accuracy-novelty plane and how far it can move along it.
* **Verdict**, one line: the generated set against noise at its own mean nearest-original IoU (equal
  novelty), read off the noise scales' curve between the two scales around it (see `verdict.py`); a second
  line holds it to the weight average plus noise the same way.
* **Where the novelty comes from**: the generated networks that reach the originals' mean validation
  accuracy against the rest, each part's test mean and nearest-original IoU (`Report.accurate_part`).

Networks with NaN/Inf parameters count as getting every example wrong (accuracy 0, loss null) and are
listed in `nonfinite_indices`, so a generator that produces garbage is visible rather than skipped.

`report.json` (schema_version 1) is strict JSON with NaN/Inf as null; `Report.to_dict()` writes that layout
and `Report.from_dict()` reads it back, so a saved report renders exactly like a fresh one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data import ParameterDataset
from ..io import read_json, write_json
from ..tasks import Task
from .baselines import DEFAULT_AVERAGE_NOISE_SCALES, DEFAULT_NOISE_SCALES, noise_sigmas, noisy_averages, noisy_copies, weight_average
from .inputs import as_vectors
from .metrics import SELECTION_RULE, accuracy_stats, l2_distances, nearest_columns, select_on_val, summary, wrong_set_iou
from .scoring import SPLITS, NetworkEvaluator, Scores, Timing
from .verdict import Verdict, verdict

REPORT_FILE = "report.json"
SCHEMA_VERSION = 1
SIMILARITY_MEASURE = "per network: max IoU of test wrong-example sets / min parameter L2 distance to the nearest member of the other set"
LABELS = {"originals": "originals (to other)", "generated": "generated", "weight_average": "weight average"}
NOISE_NAMES = {"noise": "noise", "average_noise": "average + noise"}  # the two noise baselines: originals or their average, plus noise
CURVE_KNOB = "temperature"


def jsonable(obj: Any) -> Any:
    """Plain Python with NaN/Inf as None, so the report is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- the typed report ---------------------------------------------------------------------------


@dataclass
class Stats:
    """Accuracy of a set of networks on one split."""

    best: float
    mean: float
    median: float
    min: float
    std: float


@dataclass
class Summary:
    """A per-network quantity (nearest IoU or L2) over a set; None where it was NaN (non-finite networks)."""

    mean: float | None
    median: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Summary | None:
        values = [math.nan if v is None else v for v in values]
        s = summary(values)
        return None if s is None else cls(**jsonable(s))


@dataclass
class Novelty:
    """How close a set is to the nearest original (or, for generated<->generated, to its own members)."""

    iou: Summary | None
    l2: Summary | None

    @classmethod
    def of(cls, columns: Mapping[str, list], other: str) -> Novelty | None:
        if f"nearest_{other}_iou" not in columns:
            return None  # e.g. a single original has no other original to compare with
        return cls(Summary.of(columns[f"nearest_{other}_iou"]), Summary.of(columns[f"nearest_{other}_l2"]))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Novelty | None:
        if d is None:
            return None
        return cls(*(Summary(**d[m]) if d.get(m) is not None else None for m in ("iou", "l2")))


@dataclass
class Selection:
    """The network chosen on validation, and its test accuracy (reported, never used to choose)."""

    index: int
    val_accuracy: float
    test_accuracy: float


@dataclass
class NetworkSet:
    """One row of the report: a set of networks scored on both splits, with their novelty."""

    kind: str  # "originals" | "generated" | "temperature" (a point of the generator's curve) | "weight_average" | "noise" | "average_noise"
    label: str  # terminal label: "originals (to other)", "generated", "generated T=0.5", "weight average", "noise x2 (spread)", "average + noise x2 (spread)"
    count: int
    val: Stats
    test: Stats
    best_on_val: Selection
    novelty: Novelty | None  # to the nearest original (originals: to the nearest OTHER original)
    networks: dict[str, list]  # per-network columns, as in report.json
    scale: float | None = None  # noise scale, or sampling temperature

    @property
    def name(self) -> str:
        """Short name for plot axes and legends: "originals", "weight average", "noise x2", "average + noise x2", "T=0.5", ..."""
        if self.kind == "temperature":
            return f"T={self.scale:g}"
        return f"{NOISE_NAMES[self.kind]} x{self.scale:g}" if self.kind in NOISE_NAMES else self.kind.replace("_", " ")

    def nearest(self, measure: str) -> list | None:
        """Per network, the IoU ("iou") or L2 ("l2") to the nearest original; None when there is none."""
        other = "other_original" if self.kind == "originals" else "original"
        return self.networks.get(f"nearest_{other}_{measure}")

    def group_dict(self) -> dict[str, Any]:
        return {"count": self.count, "val": asdict(self.val), "test": asdict(self.test), "best_on_val": asdict(self.best_on_val), "networks": self.networks}

    @classmethod
    def from_group(cls, kind: str, d: Mapping[str, Any], novelty: Mapping | None, scale: float | None = None, mode: str = "") -> NetworkSet:
        return cls(
            kind=kind, label=set_label(kind, scale, mode), count=d["count"], val=Stats(**d["val"]), test=Stats(**d["test"]),
            best_on_val=Selection(**d["best_on_val"]), novelty=Novelty.from_dict(novelty), networks=d["networks"], scale=scale,
        )

    @classmethod
    def single(cls, kind: str, d: Mapping[str, Any]) -> NetworkSet:
        """A set of one network from its flat record (the weight average in report.json)."""
        networks = {key: [d[key]] for key in ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "nearest_original_iou", "nearest_original_l2")}
        val, test = (Stats(**accuracy_stats([d[f"{split}_accuracy"]])) for split in SPLITS)
        return cls(kind=kind, label=set_label(kind), count=1, val=val, test=test, best_on_val=Selection(0, d["val_accuracy"], d["test_accuracy"]),
                   novelty=Novelty.of(networks, "original"), networks=networks)

    def single_dict(self) -> dict[str, Any]:
        return {key: column[0] for key, column in self.networks.items()}


def set_label(kind: str, scale: float | None = None, mode: str = "") -> str:
    if kind == "temperature":
        return f"generated T={scale:g}"
    return f"{NOISE_NAMES[kind]} x{scale:g} ({mode})" if kind in NOISE_NAMES else LABELS[kind]


def _known(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class AccuratePart:
    """The generated networks whose validation accuracy reaches the originals' mean ("accurate") and the rest:
    how many, and each part's mean test accuracy and mean nearest-original IoU (None for an empty part)."""

    threshold: float
    count: int
    total: int
    test_mean: float | None
    nearest_iou: float | None
    rest_test_mean: float | None
    rest_nearest_iou: float | None


@dataclass
class Twins:
    """The generated networks nearer (parameter L2) to another generated network than the two closest originals
    are to each other (`threshold`): how many of how many."""

    count: int
    total: int
    threshold: float


@dataclass
class Report:
    """Everything `evaluate_generated` found; see the module docstring. `selected` and `training` are
    set by the training script before the report is saved next to the generator."""

    task: str
    dim: int
    parameters: list[str]
    splits: dict[str, int]
    selection_rule: str
    originals: NetworkSet
    generated: NetworkSet
    weight_average: NetworkSet
    noise: list[NetworkSet]
    noise_mode: str
    noise_seed: int
    noise_num_models: int
    sigma_per_tensor: dict[str, float]
    generated_generated: Novelty | None
    nonfinite_indices: list[int]
    stored_val_accuracy_matches: bool
    verdict: Verdict
    timing: Timing
    created: str
    schema_version: int = SCHEMA_VERSION
    selected: dict | None = None
    training: dict | None = None
    curve: list[NetworkSet] = field(default_factory=list)  # the generator at other temperatures, ascending
    generated_temperature: float | None = None  # the generated set's own temperature, when known
    average_noise: list[NetworkSet] = field(default_factory=list)  # the weight average plus noise, by scale
    average_verdict: Verdict | None = None  # the verdict against the weight average plus noise

    def curve_points(self) -> list[NetworkSet]:
        """The generator's curve in temperature order, with the generated set where its temperature is known."""
        points = list(self.curve)
        if self.generated_temperature is not None:
            points.append(self.generated)
        return sorted(points, key=lambda p: self.generated_temperature if p is self.generated else p.scale)

    def val_gain_over_noise(self, kind: str = "noise") -> float | None:
        """Validation accuracy the generator gains over the weakest noise baseline at that baseline's novelty:
        its curve's mean validation accuracy, interpolated at the noise set's mean nearest-original IoU of
        validation errors, minus the noise set's. A trade-off a sweep can maximise without the test split.
        A curve that is more novel than the noise set everywhere is read at its least novel point (a
        comparison that can only flatter the noise); one that never gets as novel gives None, since
        a generator that only copies must not score; so does a report without noise or curve.
        `kind="average_noise"`: against the weight average plus noise's weakest scale instead."""
        baseline = {"noise": self.noise, "average_noise": self.average_noise}[kind]
        if not baseline or not self.curve:
            return None

        def val_novelty(row: NetworkSet) -> float:
            return float(np.nanmean(np.asarray(row.networks.get("nearest_original_val_iou", [math.nan]), dtype=float)))

        noise = baseline[0]
        points = sorted((val_novelty(p), p.val.mean) for p in self.curve_points())  # IoU ascending: most novel first
        novelty, target = [x for x, _ in points], val_novelty(noise)
        if target < novelty[0]:
            return None  # the baseline is more novel than every point of the curve
        return float(np.interp(target, novelty, [y for _, y in points])) - noise.val.mean  # beyond the curve: its least novel point

    def accurate_part(self) -> AccuratePart | None:
        """Where the generated set's novelty comes from. A hotter sample is more novel on average, but when its
        accurate networks sit as near the originals as a colder sample's, the extra novelty is all in its weaker
        networks. Validation draws the line (the originals' mean); test only describes the two parts. Networks
        with NaN/Inf parameters are left out (the summary counts them), so garbage cannot pose as novelty. None
        without per-network novelty."""
        g = self.generated.networks
        if not g.get("nearest_original_iou"):
            return None
        finite = np.ones(len(g["val_accuracy"]), dtype=bool)
        finite[list(self.nonfinite_indices)] = False
        val, test, iou = (np.asarray(g[k], dtype=float)[finite] for k in ("val_accuracy", "test_accuracy", "nearest_original_iou"))
        accurate = val >= self.originals.val.mean

        def mean(x: np.ndarray) -> float | None:
            x = x[~np.isnan(x)]  # a loaded report.json holds null where a value was not finite
            return float(x.mean()) if x.size else None

        return AccuratePart(self.originals.val.mean, int(accurate.sum()), int(finite.sum()), mean(test[accurate]), mean(iou[accurate]),
                            mean(test[~accurate]), mean(iou[~accurate]))

    def twins(self) -> Twins | None:
        """Near-duplicates among the generated networks. A generator that collapses onto a few modes samples
        networks far from every original yet nearly equal to each other; distance to the originals cannot show
        that, nor can a mean over the set. The bar is the originals' own closest pair, so no radius is chosen
        (two identical originals set it at 0: then nothing counts). None without both distances (a lone
        original or generated network)."""
        generated = self.generated.networks.get("nearest_other_generated_l2")
        originals = self.originals.networks.get("nearest_other_original_l2")
        if not generated or not originals:
            return None
        distances = np.asarray(generated, dtype=float)  # None (a non-finite network's, in a loaded report) -> NaN
        distances = distances[~np.isnan(distances)]  # non-finite networks are counted elsewhere
        threshold = float(np.nanmin(np.asarray(originals, dtype=float)))
        return Twins(int((distances < threshold).sum()), len(distances), threshold)

    def rows(self) -> Iterator[NetworkSet]:
        """Every set of networks in report order: originals, generated, the generator's curve, weight
        average, each noise scale, each scale of the average plus noise."""
        yield self.originals
        yield self.generated
        yield from self.curve
        yield self.weight_average
        yield from self.noise
        yield from self.average_noise

    # -- report.json ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of schema_version 1 (strict: NaN/Inf as None)."""
        out = {
            "schema_version": self.schema_version, "created": self.created, "task": self.task, "dim": self.dim,
            "parameters": self.parameters, "splits": self.splits, "selection_rule": self.selection_rule,
            "originals": {**self.originals.group_dict(), "stored_val_accuracy_matches": self.stored_val_accuracy_matches},
            "generated": {**self.generated.group_dict(), "nonfinite_indices": self.nonfinite_indices},
            "generated_curve": {
                "knob": CURVE_KNOB, "generated_at": self.generated_temperature,
                "points": [{CURVE_KNOB: p.scale, **p.group_dict(), "similarity_to_originals": _novelty_dict(p.novelty)} for p in self.curve],
            },
            "baselines": {
                "weight_average": self.weight_average.single_dict(),
                "noise": {
                    "mode": self.noise_mode, "seed": self.noise_seed, "num_models": self.noise_num_models, "sigma_per_tensor": self.sigma_per_tensor,
                    "scales": [_scale_dict(s) for s in self.noise],
                },
                "average_noise": {"scales": [_scale_dict(s) for s in self.average_noise]},  # noise's mode, seed and draws
            },
            "similarity": {
                "measure": SIMILARITY_MEASURE,
                "original_original": _novelty_dict(self.originals.novelty),
                "generated_generated": _novelty_dict(self.generated_generated),
                "generated_original": _novelty_dict(self.generated.novelty),
                # The flat weight-average entry of schema 1: one network, so its IoU and L2 are plain numbers.
                "weight_average_original": {m: self.weight_average.nearest(m)[0] for m in ("iou", "l2")},
                "noise_original": {str(s.scale): _novelty_dict(s.novelty) for s in self.noise},
                "average_noise_original": {str(s.scale): _novelty_dict(s.novelty) for s in self.average_noise},
            },
            "timing": asdict(self.timing),
            "verdict": self.verdict.to_dict(),
        }
        if self.average_verdict is not None:
            out["average_verdict"] = self.average_verdict.to_dict()
        out.update({k: v for k, v in (("selected", self.selected), ("training", self.training)) if v is not None})
        return jsonable(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Read the layout `to_dict` writes; raises ValueError for another schema."""
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"not a pdiff evaluation report of schema_version {SCHEMA_VERSION} (got {d.get('schema_version')!r})")
        sim, noise = d["similarity"], d["baselines"]["noise"]
        return cls(
            task=d["task"], dim=d["dim"], parameters=d["parameters"], splits=d["splits"], selection_rule=d["selection_rule"],
            originals=NetworkSet.from_group("originals", d["originals"], sim["original_original"]),
            generated=NetworkSet.from_group("generated", d["generated"], sim["generated_original"]),
            weight_average=NetworkSet.single("weight_average", d["baselines"]["weight_average"]),
            noise=[NetworkSet.from_group("noise", e, e["similarity_to_originals"], e["scale"], noise["mode"]) for e in noise["scales"]],
            noise_mode=noise["mode"], noise_seed=noise["seed"], noise_num_models=noise["num_models"], sigma_per_tensor=noise["sigma_per_tensor"],
            generated_generated=Novelty.from_dict(sim["generated_generated"]),
            nonfinite_indices=d["generated"]["nonfinite_indices"], stored_val_accuracy_matches=d["originals"]["stored_val_accuracy_matches"],
            verdict=Verdict(**_known(Verdict, d["verdict"])), timing=Timing(**_known(Timing, d["timing"])), created=d["created"],
            schema_version=d["schema_version"], selected=d.get("selected"), training=d.get("training"),
            curve=[NetworkSet.from_group("temperature", p, p["similarity_to_originals"], p[CURVE_KNOB]) for p in d.get("generated_curve", {}).get("points", [])],
            generated_temperature=d.get("generated_curve", {}).get("generated_at"),
            # Reports written before the average-plus-noise baseline have neither key.
            average_noise=[NetworkSet.from_group("average_noise", e, e["similarity_to_originals"], e["scale"], noise["mode"])
                           for e in d["baselines"].get("average_noise", {}).get("scales", [])],
            average_verdict=Verdict(**_known(Verdict, d["average_verdict"])) if "average_verdict" in d else None,
        )

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `out_dir/report.json` atomically: a reader never sees half a report."""
        return write_json(Path(out_dir) / REPORT_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """A report from `report.json` or the folder holding it."""
        path = Path(path)
        return cls.from_dict(read_json(path / REPORT_FILE if path.is_dir() else path))


def _novelty_dict(novelty: Novelty | None) -> dict[str, Any] | None:
    return None if novelty is None else asdict(novelty)


def _scale_dict(row: NetworkSet) -> dict[str, Any]:
    return {"scale": row.scale, **row.group_dict(), "similarity_to_originals": _novelty_dict(row.novelty)}


# -- building it --------------------------------------------------------------------------------


def evaluate_generated(
    originals: ParameterDataset,
    generated: torch.Tensor | ParameterDataset,
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    noise_scales: Sequence[float] | None = None,
    average_noise_scales: Sequence[float] | None = None,
    noise_mode: str = "spread",
    num_noise_models: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    networks_per_chunk: int | None = None,
    max_networks_per_pass: int = 2048,
    curve: Mapping[float, torch.Tensor] | None = None,
    generated_temperature: float | None = None,
) -> Report:
    """Evaluate generated parameter vectors [N, D] against the originals they were learned from.

    `noise_scales` and `num_noise_models` default to the task's (`task.eval.*`), else to
    `DEFAULT_NOISE_SCALES` and the number of generated networks, so every noise scale is a set of the
    same size; `noise_scales=()` leaves the noise baseline out. `average_noise_scales` (the task's
    `eval.average_noise_scales`, else `DEFAULT_AVERAGE_NOISE_SCALES`; `()`: left out) are the weight average
    plus the same noise draws. `curve` maps sampling temperatures to
    vectors the same generator sampled at them (the points of its accuracy-novelty curve); each is
    scored like the generated set.
    `generated_temperature` is the temperature `generated` itself was sampled at, when known.
    """
    started = time.perf_counter()
    originals.validate()  # a NaN original would poison the baselines (its spread, the average) and so the verdict
    generated = as_vectors(generated, originals)
    task = task or originals.task
    num_noise_models = num_noise_models or task.num_noise_models or len(generated)
    noise_scales, average_noise_scales = report_scales(task.noise_scales if noise_scales is None else noise_scales,
                                                       task.average_noise_scales if average_noise_scales is None else average_noise_scales)
    check_report_fits(originals.dim, len(generated) + sum(map(len, (curve or {}).values())), num_noise_models, len(noise_scales) + len(average_noise_scales))
    noise, noise_base, sigmas = {}, torch.zeros(0, dtype=torch.long), None
    if noise_scales:
        noise, noise_base, sigmas = noisy_copies(originals.vectors, originals.layout, noise_scales, num_noise_models, seed=seed, mode=noise_mode)
    average_noise = {}
    if average_noise_scales:
        average_noise = noisy_averages(originals.vectors, originals.layout, average_noise_scales, num_noise_models, seed=seed, mode=noise_mode)
        sigmas = noise_sigmas(originals.vectors, originals.layout, noise_mode) if sigmas is None else sigmas  # the unit both baselines share
    evaluator = NetworkEvaluator(
        task, originals.base_state, originals.layout, device=device, batch_size=batch_size,
        networks_per_chunk=networks_per_chunk, max_networks_per_pass=max_networks_per_pass,
    )
    curve = {float(t): as_vectors(v, originals) for t, v in sorted((curve or {}).items())}
    sets = _score_sets(evaluator, originals.vectors, generated, noise, noise_base, average_noise, noise_mode, curve)
    splits = {name: len(evaluator.splits[name]) for name in SPLITS}
    stored_val = originals.column("val_accuracy")
    report = Report(
        task=task.name, dim=originals.dim, parameters=list(originals.layout.names), splits=splits, selection_rule=SELECTION_RULE, **sets,
        noise_mode=noise_mode, noise_seed=int(seed), noise_num_models=num_noise_models if noise_scales or average_noise_scales else 0,
        sigma_per_tensor={} if sigmas is None else {name: float(v) for name, v in zip(originals.layout.names, sigmas)},
        nonfinite_indices=(~torch.isfinite(generated).all(1)).nonzero().flatten().tolist(),
        stored_val_accuracy_matches=bool(np.allclose(stored_val, sets["originals"].networks["val_accuracy"], atol=0.5 / splits["val"])),
        verdict=verdict(sets["generated"], sets["noise"], splits["test"], noise_mode),
        average_verdict=verdict(sets["generated"], sets["average_noise"], splits["test"], noise_mode, "average_noise") if average_noise else None,
        timing=evaluator.timing(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), generated_temperature=generated_temperature,
    )
    report.timing.total_seconds = round(time.perf_counter() - started, 4)
    return report


def report_scales(noise_scales: Sequence[float] | None, average_noise_scales: Sequence[float] | None) -> tuple[list[float], list[float]]:
    """Both noise baselines' scales, sorted and distinct; None: the defaults, `()`: the baseline left out."""
    return tuple(sorted({float(s) for s in (default if scales is None else scales)})
                 for scales, default in ((noise_scales, DEFAULT_NOISE_SCALES), (average_noise_scales, DEFAULT_AVERAGE_NOISE_SCALES)))


def noise_counts(eval_cfg: Mapping[str, Any], num_generated: int) -> tuple[int, int]:
    """The noise copies per scale and the number of scales a report on a task with `eval_cfg` (`task.eval`) draws."""
    noise, average = report_scales(eval_cfg.get("noise_scales"), eval_cfg.get("average_noise_scales"))
    return int(eval_cfg.get("num_noise_models") or num_generated), len(noise) + len(average)


def check_report_fits(dim: int, num_generated: int, num_noise_models: int, num_scales: int, what: str = "",
                      fix: str = "use fewer networks (pdiff evaluate --num-noise-models, or fewer generated)") -> None:
    """Refuse a report whose parameter vectors (generated, and every noise scale's copies) cannot fit in memory."""
    from ..runtime import check_memory

    networks = num_generated + num_noise_models * num_scales
    check_memory(networks * dim * 4 * 2, what or f"the report's {networks} networks of {dim} parameters ({num_noise_models} per noise scale)", fix)


def _score_sets(evaluator: NetworkEvaluator, orig_vectors, generated, noise: dict, noise_base, average_noise: dict, noise_mode: str, curve: dict) -> dict[str, Any]:
    """Score every set on both splits and measure its novelty: all on the test split's wrong-example sets
    and on the parameter vectors."""

    def score(vectors: torch.Tensor, reference: bool = False) -> dict[str, Scores]:
        # The reference sets are the same in every report against this dataset: kept between reports.
        return {split: evaluator.score(vectors, split, return_wrong=True, reuse=reference) for split in SPLITS}

    average = weight_average(orig_vectors)
    orig, gen, avg = score(orig_vectors, reference=True), score(generated), score(average, reference=True)
    noise_scores = {s: score(v, reference=True) for s, v in noise.items()}
    average_noise_scores = {s: score(v, reference=True) for s, v in average_noise.items()}
    orig_wrong = orig["test"].wrong

    def to_originals(vectors, scores) -> dict[str, list]:
        columns = nearest_columns(wrong_set_iou(scores["test"].wrong, orig_wrong), l2_distances(vectors, orig_vectors), "original")
        # The same novelty on validation errors, for choosing a generator without looking at the test split.
        columns["nearest_original_val_iou"] = wrong_set_iou(scores["val"].wrong, orig["val"].wrong).max(1).values.tolist()
        return columns

    def to_own_set(vectors, scores, other: str) -> dict[str, list]:
        return nearest_columns(wrong_set_iou(scores["test"].wrong), l2_distances(vectors), other, exclude_self=True)

    gen_columns = {**to_originals(generated, gen), **to_own_set(generated, gen, "other_generated")}
    avg_near = to_originals(average, avg)
    avg_record = {f"{split}_{metric}": float(getattr(avg[split], metric)[0]) for metric in ("accuracy", "loss") for split in SPLITS}
    avg_record.update({f"nearest_original_{m}": avg_near[f"nearest_original_{m}"][0] for m in ("iou", "l2")})
    return {
        "originals": _network_set("originals", orig, to_own_set(orig_vectors, orig, "other_original")),
        "generated": _network_set("generated", gen, gen_columns),
        "weight_average": NetworkSet.single("weight_average", jsonable(avg_record)),
        "noise": [
            _network_set("noise", noise_scores[s], to_originals(v, noise_scores[s]), scale=s, mode=noise_mode, base_index=noise_base.tolist())
            for s, v in noise.items()
        ],
        "average_noise": [
            _network_set("average_noise", average_noise_scores[s], to_originals(v, average_noise_scores[s]), scale=s, mode=noise_mode) for s, v in average_noise.items()
        ],
        "generated_generated": Novelty.of(gen_columns, "other_generated"),
        "curve": [_curve_point(t, v, score(v), to_originals) for t, v in curve.items()],
    }


def _curve_point(temperature: float, vectors: torch.Tensor, scores: dict[str, Scores], to_originals) -> NetworkSet:
    return _network_set("temperature", scores, to_originals(vectors, scores), scale=temperature)


def _network_set(kind: str, scores: dict[str, Scores], near: dict[str, list], *, scale=None, mode: str = "", base_index=None) -> NetworkSet:
    columns = {} if base_index is None else {"base_index": base_index}
    columns.update({f"{split}_{metric}": getattr(scores[split], metric).tolist() for split in SPLITS for metric in ("accuracy", "loss")})
    columns.update(near)
    val, test = scores["val"].accuracy, scores["test"].accuracy
    best = select_on_val(val, scores["val"].loss)
    return NetworkSet(
        kind=kind, label=set_label(kind, scale, mode), count=len(val), val=Stats(**accuracy_stats(val)), test=Stats(**accuracy_stats(test)),
        best_on_val=Selection(best, float(val[best]), float(test[best])), novelty=Novelty.of(columns, "other_original" if kind == "originals" else "original"),
        networks=jsonable(columns), scale=scale,
    )
