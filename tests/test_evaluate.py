"""Evaluation: batched == one-by-one, the IoU metric, the report and its JSON, renderers, plots, the noise baseline, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pdiff.data import ParameterDataset
from pdiff.evaluation import (
    REPORT_FILE,
    NetworkEvaluator,
    NetworkSet,
    Novelty,
    Report,
    Selection,
    Stats,
    Summary,
    Twins,
    benchmark_evaluation,
    evaluate_generated,
    evaluate_network,
    format_summary,
    variety_text,
    load_generated,
    log_to_wandb,
    markdown_table,
    network_table,
    noise_sigmas,
    noisy_averages,
    noisy_copies,
    select_on_val,
    summary_metrics,
    verdict,
    weight_average,
    wrong_set_iou,
)
from pdiff.evaluation.plots import PLOT_FILES, plot_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def originals(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def candidates(originals) -> torch.Tensor:
    """Stand-ins for generated networks, from exact copies to clearly damaged ones, so accuracies vary."""
    noise, _, _ = noisy_copies(originals.vectors, originals.layout, [0.0, 4.0, 32.0, 128.0], 4, seed=3)
    return torch.cat(list(noise.values()))  # 16 networks


@pytest.fixture(scope="module")
def report(originals, candidates) -> Report:
    generated = torch.cat([candidates, originals.vectors[:2]])  # the last two are exact copies of originals 0, 1
    curve = {2.0: candidates[8:12], 0.5: candidates[:4]}  # stand-ins for the generator at two other temperatures
    return evaluate_generated(originals, generated, device="cpu", noise_scales=(2.0, 16.0, 64.0), average_noise_scales=(4.0, 1.0), num_noise_models=8,
                              seed=0, curve=curve, generated_temperature=1.0)


# -- batched evaluation --------------------------------------------------------------------------


def test_batched_accuracies_equal_one_by_one(originals, candidates):
    task = originals.task
    # Small chunks and passes so that the chunking itself is exercised, not just one vmap call.
    evaluator = NetworkEvaluator(task, originals.base_state, originals.layout, device="cpu", batch_size=180, networks_per_chunk=6, max_networks_per_pass=10)
    for split in ("val", "test"):
        scores = evaluator.score(candidates, split, return_wrong=True)
        data = task.data.split(split)
        one_by_one = [evaluate_network(originals.build_network(vector=v, task=task), data, task.data.prepare)[0] for v in candidates]
        assert scores.accuracy.tolist() == one_by_one  # exact: these are counts of correct examples
        assert len(set(one_by_one)) > 2  # the candidates really differ, so equality means something
        correct = (scores.accuracy * len(data)).round().long()
        assert torch.equal(correct, len(data) - scores.wrong.sum(1))  # the wrong masks agree with the counts
    assert evaluator.networks_scored == 2 * len(candidates) and evaluator.seconds > 0


def test_nonfinite_networks_count_as_all_wrong(originals, candidates):
    evaluator = NetworkEvaluator(originals.task, originals.base_state, originals.layout, device="cpu")
    broken = candidates[:3].clone()
    broken[1, 5] = math.nan
    scores = evaluator.score(broken, "test", return_wrong=True)
    assert scores.accuracy[1] == 0 and scores.wrong[1].all() and math.isnan(scores.loss[1])
    assert scores.accuracy[0] > 0.5 and scores.accuracy[2] > 0.5


def test_benchmark_reports_rates_and_agreement(originals, candidates):
    result = benchmark_evaluation(originals, candidates, "val", device="cpu", max_one_by_one=4)
    assert result["identical"] is True
    assert result["batched_networks"] == len(candidates) and result["one_by_one_networks"] == 4
    assert result["batched_networks_per_s"] > 0 and result["one_by_one_networks_per_s"] > 0


# -- the IoU metric ------------------------------------------------------------------------------


def _mask(n: int, *wrong: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(wrong)] = True
    return m


def test_wrong_set_iou_hand_made_cases():
    a = torch.stack([_mask(6, 0, 1, 2), _mask(6), _mask(6, 4, 5), _mask(6, 0, 1, 2)])
    b = torch.stack([_mask(6, 1, 2, 3), _mask(6), _mask(6, 0, 1, 2), _mask(6, 3, 4)])
    iou = wrong_set_iou(a, b)
    assert iou.shape == (4, 4) and iou.dtype == torch.float64
    assert iou[0, 0] == pytest.approx(2 / 4)  # {0,1,2} vs {1,2,3}: 2 shared of 4
    assert iou[0, 2] == 1.0  # identical sets
    assert iou[0, 3] == 0.0  # disjoint
    assert iou[1, 1] == 1.0  # both empty: defined as identical
    assert iou[1, 0] == 0.0 and iou[0, 1] == 0.0  # empty vs non-empty
    assert iou[2, 3] == pytest.approx(1 / 3)  # {4,5} vs {3,4}
    assert torch.equal(wrong_set_iou(a, b, chunk_size=1), iou)  # chunking does not change results
    assert torch.equal(wrong_set_iou(a), wrong_set_iou(a, a))
    with pytest.raises(ValueError, match="same N"):
        wrong_set_iou(a, torch.zeros(2, 5, dtype=torch.bool))


def test_nearest_other_l2_excludes_each_vector_itself():
    from pdiff.evaluation.metrics import nearest_other_l2

    vectors = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0 + 2**-10], [10.0, 0.0]])  # exact in float32: a near-duplicate pair
    assert nearest_other_l2(vectors).tolist() == [5.0, 2**-10, 2**-10, math.hypot(7.0, 4.0)]
    assert nearest_other_l2(vectors[:1]).tolist() == [math.inf]


def test_select_on_val_uses_validation_only():
    # Ties on accuracy are broken by the lower loss, then the lower index.
    assert select_on_val(torch.tensor([0.8, 0.9, 0.9]), torch.tensor([0.1, 0.5, 0.4])) == 2
    assert select_on_val(torch.tensor([0.9, 0.9]), torch.tensor([0.3, 0.3])) == 0
    assert select_on_val(torch.tensor([0.9, 0.9]), torch.tensor([math.nan, 0.3])) == 1


# -- the noise baseline --------------------------------------------------------------------------


def test_noise_baseline_is_reproducible_for_a_seed(originals):
    v, layout = originals.vectors, originals.layout
    a, base_a, _ = noisy_copies(v, layout, [1.0, 3.0], 10, seed=7)
    b, base_b, _ = noisy_copies(v, layout, [3.0], 10, seed=7)  # the list of scales does not matter
    c, _, _ = noisy_copies(v, layout, [1.0, 3.0], 10, seed=8)
    assert torch.equal(a[3.0], b[3.0]) and torch.equal(base_a, base_b)
    assert not torch.allclose(a[3.0], c[3.0])
    # One draw, scaled: a scale-3 copy is three times as far from its original as the scale-1 copy.
    torch.testing.assert_close(a[3.0] - v[base_a], 3 * (a[1.0] - v[base_a]), rtol=1e-4, atol=1e-6)
    assert len(set(base_a.tolist())) == 10  # distinct originals while there are enough ...
    _, base, _ = noisy_copies(v, layout, [1.0], 2 * len(v), seed=7)
    assert torch.equal(torch.bincount(base, minlength=len(v)), torch.full((len(v),), 2))  # ... then each used evenly


def test_the_average_plus_noise_adds_the_noise_baselines_draws_to_the_weight_average(originals):
    v, layout = originals.vectors, originals.layout
    copies, base, _ = noisy_copies(v, layout, [1.0, 3.0], 10, seed=7)
    around_average = noisy_averages(v, layout, [0.0, 3.0], 10, seed=7)
    assert torch.equal(around_average[0.0], weight_average(v).expand(10, -1))  # scale 0: the weight average itself
    torch.testing.assert_close(around_average[3.0] - weight_average(v), copies[3.0] - v[base], rtol=1e-4, atol=1e-6)  # the same draws


def test_noise_scale_is_relative_to_the_checkpoint_spread(originals):
    v, layout = originals.vectors, originals.layout
    sigmas = noise_sigmas(v, layout, "spread")
    for slot, sigma in zip(layout.slots, sigmas):
        block = v[:, slot.offset : slot.end].double()
        assert sigma == pytest.approx(float((block - block.mean(0)).pow(2).mean().sqrt()))
    noise, base, _ = noisy_copies(v, layout, [2.0], 400, seed=0, mode="spread")
    slot = layout.slots[2]  # fc.weight: enough entries for the empirical std to be close
    measured = (noise[2.0] - v[base])[:, slot.offset : slot.end].std()
    assert float(measured) == pytest.approx(2.0 * float(sigmas[2]), rel=0.05)
    absolute, base, _ = noisy_copies(v, layout, [0.01], 400, seed=0, mode="absolute")
    assert float((absolute[0.01] - v[base]).std()) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="noise_mode"):
        noise_sigmas(v, layout, "relative")
    with pytest.raises(ValueError, match="at least 2"):
        noise_sigmas(v[:1], layout, "spread")


def test_noise_baseline_in_the_report_is_reproducible(originals, candidates, report):
    generated = torch.cat([candidates, originals.vectors[:2]])
    again = evaluate_generated(originals, generated, device="cpu", noise_scales=(16.0,), num_noise_models=8, seed=0)
    other = evaluate_generated(originals, generated, device="cpu", noise_scales=(16.0,), num_noise_models=8, seed=1)
    first = next(row for row in report.noise if row.scale == 16.0)
    assert again.noise[0].networks == first.networks
    assert other.noise[0].nearest("l2") != first.nearest("l2")


def test_the_task_sets_the_noise_baseline_and_keeps_the_kept_scores(originals, candidates, tmp_path, monkeypatch):
    """`task.eval.noise_scales` / `num_noise_models` shape every report against the task (a whole network's
    noise copies cost a full forward pass each); arguments still win, and scores kept under the task's
    other settings are still read: the noise settings do not change a network's score."""
    from pdiff.tasks import Task

    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "cache"))
    evaluate_generated(originals, candidates[:4], device="cpu", noise_scales=(16.0,), seed=0)
    config = originals.task.config
    task = Task({**config, "eval": {**config["eval"], "noise_scales": [16, 4], "num_noise_models": 3}})
    r = evaluate_generated(originals, candidates[:4], task=task, device="cpu", seed=0)
    assert [(row.scale, row.count) for row in r.noise] == [(4.0, 3), (16.0, 3)]
    assert [(row.scale, row.count) for row in r.average_noise] == [(1.0, 3), (2.0, 3), (4.0, 3)]  # the default scales
    assert r.timing.networks_from_cache >= len(originals.vectors) + 1 + 2  # originals, average, x16's first copies
    given = evaluate_generated(originals, candidates[:4], task=task, device="cpu", noise_scales=(2.0,), num_noise_models=5)
    assert [(row.scale, row.count) for row in given.noise] == [(2.0, 5)]
    task = Task({**config, "eval": {**config["eval"], "average_noise_scales": [0.5]}})
    assert [row.scale for row in evaluate_generated(originals, candidates[:4], task=task, device="cpu", noise_scales=()).average_noise] == [0.5]


def test_reference_scores_are_kept_between_reports(originals, candidates, tmp_path, monkeypatch):
    """A second report against the same dataset reads the originals', weight average's and both noise baselines'
    scores instead of scoring them again, and says so; anything else about it is the same report."""
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "cache"))
    k, n = len(originals.vectors), len(candidates)
    kwargs = dict(device="cpu", noise_scales=(1.0, 16.0), average_noise_scales=(2.0,), seed=0)
    first, second = (evaluate_generated(originals, candidates, **kwargs) for _ in range(2))
    kept = sorted((tmp_path / "cache").rglob("*.safetensors"))  # this context's files
    assert first.timing.networks_from_cache == 0 and second.timing.networks_from_cache == k + 1 + 3 * n
    assert first.timing.networks_evaluated == second.timing.networks_evaluated == k + 1 + 4 * n
    assert [s.networks for s in second.noise] == [s.networks for s in first.noise] and second.originals.networks == first.originals.networks
    assert [s.networks for s in second.average_noise] == [s.networks for s in first.average_noise]
    assert second.generated.networks == first.generated.networks and second.verdict == first.verdict and second.average_verdict == first.average_verdict

    # Fewer noise copies are the first rows of the same draw: read too (but perhaps the last, whose tail torch's
    # vectorised randn draws differently when the total size differs). Another context (batch size) is not.
    fewer = evaluate_generated(originals, candidates[:4], **kwargs)
    assert k + 1 + 3 * 3 <= fewer.timing.networks_from_cache <= k + 1 + 3 * 4
    assert evaluate_generated(originals, candidates, batch_size=7, **kwargs).timing.networks_from_cache == 0

    # A damaged file is scored again (and rewritten); PDIFF_CACHE=off reads and writes nothing.
    kept[0].write_bytes(b"not a safetensors file")
    again = evaluate_generated(originals, candidates, **kwargs)
    assert again.timing.networks_from_cache < k + 1 + 3 * n
    # The rescored networks are scored in other chunks than the first time: accuracies are exact, losses equal
    # to rounding (measured: they differ in the last bits with OMP_NUM_THREADS=1).
    for column, values in first.originals.networks.items():
        expected = pytest.approx(values, rel=1e-6) if column.endswith("_loss") else values
        assert again.originals.networks[column] == expected, column
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    monkeypatch.setenv("PDIFF_CACHE", "off")
    assert evaluate_generated(originals, candidates, **kwargs).timing.networks_from_cache == 0
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == files


# -- the report ----------------------------------------------------------------------------------

STATS = {"best", "mean", "median", "min", "std"}


def _check_group(group: dict, count: int) -> None:
    assert group["count"] == count
    for split in ("val", "test"):
        assert set(group[split]) == STATS
        s = group[split]
        assert 0 <= s["min"] <= s["median"] <= s["best"] <= 1 and s["min"] <= s["mean"] <= s["best"] and s["std"] >= 0
        assert len(group["networks"][f"{split}_accuracy"]) == count
        assert s["best"] == max(group["networks"][f"{split}_accuracy"])
    best = group["best_on_val"]
    val = group["networks"]["val_accuracy"]
    assert val[best["index"]] == max(val) == best["val_accuracy"]  # chosen on validation ...
    assert best["test_accuracy"] == group["networks"]["test_accuracy"][best["index"]]  # ... test only reported


def test_report_schema(report, originals):
    """report.json keeps the layout of schema_version 1, key for key."""
    report = report.to_dict()
    json.dumps(report, allow_nan=False)  # strict JSON
    assert report["schema_version"] == 1 and report["task"] == "digits" and report["dim"] == originals.dim
    assert report["splits"] == {"val": 360, "test": 360}
    k, g = len(originals), 18
    _check_group(report["originals"], k)
    _check_group(report["generated"], g)
    assert report["originals"]["stored_val_accuracy_matches"] is True
    gen = report["generated"]["networks"]
    for key in ("nearest_original_iou", "nearest_original_l2", "nearest_other_generated_iou", "nearest_other_generated_l2"):
        assert len(gen[key]) == g and all(isinstance(x, float) for x in gen[key])
    for key in ("nearest_original_iou_index", "nearest_original_l2_index"):
        assert all(isinstance(i, int) and 0 <= i < k for i in gen[key])
    assert all(0 <= x <= 1 for x in gen["nearest_original_iou"])
    # Exact copies (the first 4 candidates, scale 0, and the last two rows) are found as such.
    for row in (*range(4), g - 2, g - 1):
        assert gen["nearest_original_l2"][row] == 0.0 and gen["nearest_original_iou"][row] == 1.0
    assert gen["nearest_original_l2_index"][g - 2:] == [0, 1]
    assert report["generated"]["nonfinite_indices"] == []

    avg = report["baselines"]["weight_average"]
    assert set(avg) == {"val_accuracy", "test_accuracy", "val_loss", "test_loss", "nearest_original_iou", "nearest_original_l2"}
    task = originals.task
    expected = evaluate_network(originals.build_network(vector=weight_average(originals.vectors)[0], task=task), task.data.test, task.data.prepare)[0]
    assert avg["test_accuracy"] == expected

    noise = report["baselines"]["noise"]
    assert noise["mode"] == "spread" and noise["seed"] == 0 and noise["num_models"] == 8
    assert set(noise["sigma_per_tensor"]) == set(originals.layout.names)
    assert [e["scale"] for e in noise["scales"]] == [2.0, 16.0, 64.0]
    for e in noise["scales"]:
        _check_group(e, 8)
        assert set(e["similarity_to_originals"]) == {"iou", "l2"}
    # More noise moves the copies further from the originals.
    dists = [e["similarity_to_originals"]["l2"]["mean"] for e in noise["scales"]]
    assert dists == sorted(dists)
    around_average = report["baselines"]["average_noise"]  # the same draws around the weight average; noise's mode, seed, count
    assert set(around_average) == {"scales"} and [e["scale"] for e in around_average["scales"]] == [1.0, 4.0]
    for e in around_average["scales"]:
        _check_group(e, 8)
        assert set(e["similarity_to_originals"]) == {"iou", "l2"}

    curve = report["generated_curve"]  # the generator at other temperatures, ascending, scored like the generated set
    assert curve["knob"] == "temperature" and curve["generated_at"] == 1.0 and [p["temperature"] for p in curve["points"]] == [0.5, 2.0]
    for point in curve["points"]:
        _check_group(point, 4)
        assert set(point["similarity_to_originals"]) == {"iou", "l2"}
    assert curve["points"][0]["similarity_to_originals"]["l2"]["mean"] == 0.0  # the exact copies among the candidates

    sim = report["similarity"]
    for key in ("original_original", "generated_generated", "generated_original"):
        assert set(sim[key]) == {"iou", "l2"} and set(sim[key]["iou"]) == {"mean", "median", "min", "max"}
    assert set(sim["noise_original"]) == {"2.0", "16.0", "64.0"} and set(sim["average_noise_original"]) == {"1.0", "4.0"}

    v = report["verdict"]
    assert v["outcome"] in ("beats", "loses", "ties") and isinstance(v["text"], str) and "\n" not in v["text"]
    assert v["matched_scale"] in (2.0, 16.0, 64.0)
    against_average = report["average_verdict"]
    assert against_average["outcome"] in ("beats", "loses", "ties") and against_average["matched_scale"] in (1.0, 4.0)
    assert " the weight average plus noise at equal novelty: " in against_average["text"] and "for average + noise " in against_average["text"]
    t = report["timing"]
    assert t["networks_evaluated"] == k + g + 2 * 4 + 1 + 3 * 8 + 2 * 8 and t["networks_per_s"] > 0 and t["device"] == "cpu"
    summary = format_summary(Report.from_dict(report))
    assert f"verdict: {v['text']}\nverdict: {against_average['text']}" in summary


def _set(kind: str, mean: float, std: float, iou: float, scale: float | None = None, count: int = 50) -> NetworkSet:
    """A made-up set of networks with the test accuracy and nearest-original IoU the verdict looks at."""
    stats = Stats(best=mean, mean=mean, median=mean, min=mean, std=std)
    novelty = Novelty(Summary(iou, iou, iou, iou), None)
    return NetworkSet(kind, kind, count, stats, stats, Selection(0, mean, mean), novelty, {}, scale)


def test_val_gain_over_noise_reads_the_curve_on_validation_at_equal_novelty(report):
    """The sweep metric: the generator's curve (validation accuracy against nearest-original IoU of
    validation errors) interpolated at the weakest noise set's novelty, minus that set's accuracy."""
    gen = report.generated.networks["nearest_original_val_iou"]
    assert len(gen) == report.generated.count and gen[-2:] == [1.0, 1.0]  # the last two are exact copies

    def point(kind, val_mean, val_iou, scale=None):
        row = _set(kind, 0.5, 0.0, 0.5, scale=scale)  # test figures play no part
        return dataclasses.replace(row, val=Stats(val_mean, val_mean, val_mean, val_mean, 0.0), networks={"nearest_original_val_iou": [val_iou]})

    curve = [point("temperature", 0.90, 0.95, 0.5), point("temperature", 0.80, 0.75, 2.0)]
    made = dataclasses.replace(report, curve=curve, generated=point("generated", 0.86, 0.85), generated_temperature=1.0, noise=[point("noise", 0.84, 0.80, 1.0)])
    assert made.val_gain_over_noise() == pytest.approx(0.83 - 0.84)  # halfway between T=2 (0.75: 0.80) and T=1 (0.85: 0.86)
    # A curve more novel than the noise everywhere (IoU 0.75-0.95 against 0.99) is read at its least novel point, T=0.5;
    # one that never gets as novel as the noise (0.50) scores nothing: a generator that only copies must not score.
    assert dataclasses.replace(made, noise=[point("noise", 0.84, 0.99, 1.0)]).val_gain_over_noise() == pytest.approx(0.90 - 0.84)
    assert dataclasses.replace(made, noise=[point("noise", 0.84, 0.50, 1.0)]).val_gain_over_noise() is None
    around_average = dataclasses.replace(made, average_noise=[point("average_noise", 0.86, 0.80, 1.0), point("average_noise", 0.80, 0.60, 2.0)])
    assert around_average.val_gain_over_noise("average_noise") == pytest.approx(0.83 - 0.86)  # its weakest scale, x1
    with pytest.raises(KeyError):
        made.val_gain_over_noise("avg_noise")
    assert dataclasses.replace(made, average_noise=[]).val_gain_over_noise("average_noise") is None and summary_metrics(around_average)["tradeoff/val_gain_over_average_noise"] == pytest.approx(-0.03)


def test_the_summary_says_when_the_generated_networks_vary_less_than_the_originals(report):
    """Near-copies of one network can sit far from every original (the weight average of spread-out checkpoints
    does), so the near line sets the generated networks' IoU among themselves beside the originals'."""
    def near_line(generated_iou: float, originals_iou: float) -> str:
        made = dataclasses.replace(report, generated_generated=Novelty(Summary(*[generated_iou] * 4), None),
                                   originals=dataclasses.replace(report.originals, novelty=Novelty(Summary(*[originals_iou] * 4), None)))
        return next(line for line in format_summary(made).splitlines() if line.startswith("near IoU/L2"))

    assert "generated<->generated IoU 0.989, originals<->originals 0.883: the generated networks vary less than the originals;" in near_line(0.989, 0.883)
    assert "generated<->generated IoU 0.923, originals<->originals 0.994;" in near_line(0.923, 0.994)  # then the near-duplicates
    assert "vary less" not in near_line(0.923, 0.994)
    lone_original = dataclasses.replace(report, originals=dataclasses.replace(report.originals, novelty=None))  # no other original to compare
    assert variety_text(lone_original).startswith(f"generated<->generated IoU {report.generated_generated.iou.mean:.3f};")
    assert "originals<->originals" not in variety_text(lone_original)


def test_the_summary_counts_generated_networks_nearer_to_each_other_than_any_two_originals(report):
    """A generator that collapses onto a few modes samples near-duplicates: the bar is the originals' closest pair."""
    def made(generated_l2: list, originals_l2: list) -> Report:
        return dataclasses.replace(
            report, generated=dataclasses.replace(report.generated, networks={**report.generated.networks, "nearest_other_generated_l2": generated_l2}),
            originals=dataclasses.replace(report.originals, networks={**report.originals.networks, "nearest_other_original_l2": originals_l2}))

    collapsed = made([0.001, 0.001, 0.5, None], [0.05, 0.02])  # None: a non-finite network, counted elsewhere
    assert collapsed.twins() == Twins(2, 3, 0.02)
    assert variety_text(collapsed).endswith("; 2 of 3 generated networks are nearer to another generated one than the two closest originals are to each other (L2 0.02)")
    assert summary_metrics(collapsed)["similarity/generated_twins_share"] == pytest.approx(2 / 3)
    varied = made([0.5, 0.3], [0.05, 0.02])
    assert varied.twins().count == 0 and "; none of the 2 generated networks is nearer to another generated one" in variety_text(varied)
    assert Report.from_dict(collapsed.to_dict()).twins() == collapsed.twins()  # from report.json's columns alone


def test_a_network_with_nan_parameters_hides_no_other_networks_distances(originals, candidates):
    """min/max propagate NaN: without care, one NaN network would blank every generated network's nearest-other
    distance and so the near-duplicate count."""
    generated = torch.cat([candidates[:4], candidates[:4]])  # four exact pairs: every network has a twin at L2 0
    generated[7, 0] = math.nan
    r = evaluate_generated(originals, generated, device="cpu", noise_scales=(), average_noise_scales=())
    near = r.generated.networks["nearest_other_generated_l2"]
    assert near[:7] == [0.0] * 3 + [near[3]] + [0.0] * 3 and near[3] > 0 and near[7] is None  # network 3 lost its twin, 7
    assert r.twins() == Twins(6, 7, min(r.originals.networks["nearest_other_original_l2"]))


def test_the_summary_says_where_the_novelty_comes_from(report):
    """The generated networks that reach the originals' mean validation accuracy against the rest: validation
    draws the line, test describes the parts (a hot sample's novelty can be all in its weaker networks)."""
    nets = {"val_accuracy": [0.90, 0.70, 0.95, 0.60], "test_accuracy": [0.88, 0.65, 0.90, 0.50], "nearest_original_iou": [0.95, 0.50, 0.85, 0.40]}
    originals = dataclasses.replace(report.originals, val=Stats(best=0.9, mean=0.8, median=0.8, min=0.7, std=0.05))
    made = dataclasses.replace(report, originals=originals, generated=dataclasses.replace(report.generated, count=4, networks=nets))
    part = made.accurate_part()
    assert (part.count, part.total) == (2, 4) and part.test_mean == pytest.approx(0.89) and part.nearest_iou == pytest.approx(0.90)
    assert part.rest_test_mean == pytest.approx(0.575) and part.rest_nearest_iou == pytest.approx(0.45)
    assert ("generated reaching the originals' val mean 0.8000: 2 of 4, test mean 0.8900, near IoU 0.900; "
            "the rest: test mean 0.5750, near IoU 0.450") in format_summary(made).splitlines()
    weak = dataclasses.replace(made, originals=dataclasses.replace(originals, val=Stats(best=1.0, mean=0.99, median=0.99, min=0.99, std=0.0)))
    assert "generated reaching the originals' val mean 0.9900: none of 4" in format_summary(weak)
    assert dataclasses.replace(made, generated=dataclasses.replace(made.generated, networks={})).accurate_part() is None
    # A network with NaN/Inf parameters (all wrong, IoU near 0) is garbage, not novelty: it is in neither part.
    broken = dataclasses.replace(made, nonfinite_indices=[3]).accurate_part()
    assert (broken.count, broken.total) == (2, 3) and broken.rest_nearest_iou == pytest.approx(0.50)


def _verdict(gen_mean, gen_std, noise_entries, n_test=1000):
    noise = [_set("noise", m, sd, iou, scale=s) for s, iou, m, sd in noise_entries]
    return verdict(_set("generated", gen_mean, gen_std, 0.80), noise, n_test, "spread")


def test_verdict_compares_at_equal_novelty():
    """Between two noise scales the baseline is noise's accuracy interpolated at the generated set's own IoU:
    a set between x4 and x16 is held to noise there, not to the more novel, less accurate x16."""
    entries = [(1.0, 0.95, 0.90, 0.0), (4.0, 0.84, 0.85, 0.0), (16.0, 0.50, 0.60, 0.0)]  # (scale, IoU, test mean, std)
    at_080 = 0.85 + (0.84 - 0.80) / (0.84 - 0.50) * (0.60 - 0.85)  # the generated sets below sit at IoU 0.80
    v = _verdict(at_080 + 0.02, 0.0, entries)
    assert v.noise_test_mean == pytest.approx(at_080) and v.noise_mean_nearest_iou == pytest.approx(0.80)
    assert v.interpolated_between == [4.0, 16.0] and v.matched_scale == 4.0 and v.equal_novelty  # x4 is 0.04 away
    assert v.outcome == "beats" and "noise interpolated between scales 4 and 16 (spread), mean nearest-original IoU 0.800 (x4: 0.840, x16: 0.500)" in v.text
    assert _verdict(at_080 - 0.002, 0.0, entries).outcome == "loses"
    assert _verdict(at_080 + 0.0005, 0.0, entries).outcome == "ties"  # less than one test example apart
    assert _verdict(0.62, 0.0, entries).outcome == "loses"  # x16's accuracy alone would have made this a win
    spread = _verdict(at_080 + 0.02, 0.1, entries)  # 2 standard errors: 2 x sqrt(0.1^2 / 50) = 0.028 > 0.02
    assert spread.outcome == "ties" and spread.standard_error == pytest.approx(0.1 / 50**0.5)
    noisy = _verdict(at_080 + 0.02, 0.0, [(4.0, 0.84, 0.85, 0.1), (16.0, 0.50, 0.60, 0.1)])
    w = (0.84 - 0.80) / (0.84 - 0.50)
    # The scales share their draw, so their means are correlated: the bound for correlation 1, never the smaller independent one.
    assert noisy.standard_error == pytest.approx(((1 - w) * 0.1 + w * 0.1) / 50**0.5)
    # Outside the noise curve the nearest scale stands in; no scale near: the line says so.
    far = _verdict(0.87, 0.0, [(1.0, 0.99, 0.90, 0.0)])
    assert far.interpolated_between is None and far.noise_test_mean == 0.90 and "for noise scale 1 " in far.text
    assert not far.equal_novelty and "add noise scales" in far.text
    wide = _verdict(0.87, 0.0, [(1.0, 0.95, 0.90, 0.0), (16.0, 0.50, 0.60, 0.0)])  # interpolated across a 0.45 IoU gap
    assert wide.interpolated_between == [1.0, 16.0] and not wide.equal_novelty and "add noise scales" in wide.text


def test_no_noise_baseline_and_a_nonfinite_network(originals, candidates):
    generated = candidates[:3].clone()
    generated[1, 0] = math.inf  # garbage from a generator: listed and counted as all wrong, not skipped
    r = evaluate_generated(originals, generated, device="cpu", noise_scales=(), average_noise_scales=())
    assert r.noise == r.average_noise == [] and r.verdict.outcome is None and r.average_verdict is None and r.nonfinite_indices == [1]
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["baselines"]["noise"]["scales"] == [] and set(d["verdict"]) == {"rule", "outcome", "text"}
    assert Report.from_dict(d) == r
    summary = format_summary(r)  # the L2 to a non-finite network is NaN (null in JSON): still renders
    assert "WARNING: 1 generated networks hold NaN/Inf" in summary and "no verdict" in summary
    lone = ParameterDataset.from_vectors(originals.vectors[:1], {c: originals.column(c)[:1].tolist() for c in ("step", "seed", "val_accuracy", "val_loss", "test_accuracy", "test_loss")},
                                         originals.layout, originals.task_config, originals.base_state)
    assert evaluate_generated(lone, generated, device="cpu", noise_scales=(), average_noise_scales=()).originals.count == 1  # no spread needed
    with pytest.raises(ValueError, match="--noise-mode absolute"):
        evaluate_generated(lone, generated, device="cpu", noise_scales=())  # the average plus noise needs the originals' spread


def test_rejects_vectors_of_another_layout(originals):
    with pytest.raises(ValueError, match="D="):
        evaluate_generated(originals, torch.zeros(3, originals.dim + 1), device="cpu")


# -- outputs -------------------------------------------------------------------------------------


def _write(report: Report, out) -> dict:
    return {"report": report.save(out), **plot_report(report, out)}


def test_report_round_trips_through_json(report, tmp_path):
    d = report.to_dict()
    assert Report.from_dict(d) == report
    assert Report.from_dict(json.loads(json.dumps(d))).to_dict() == d
    report.selected, report.training = {"step": 12, "selected_on": "validation"}, {"seconds": 1.5}  # set by train.py
    try:
        path = report.save(tmp_path)
        assert path.name == REPORT_FILE and not list(tmp_path.glob(".*partial"))  # atomic: no leftovers
        loaded = Report.load(tmp_path)
        assert loaded == report and loaded.selected["step"] == 12 and Report.load(path).training == {"seconds": 1.5}
        assert list(json.loads(path.read_text()))[-2:] == ["selected", "training"]
    finally:
        report.selected = report.training = None
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_dict({**d, "schema_version": 2})
    # A report written before the weight average plus noise was a baseline still loads, without it.
    older = {**d, "baselines": {k: v for k, v in d["baselines"].items() if k != "average_noise"}}
    del older["average_verdict"]
    assert Report.from_dict(older) == dataclasses.replace(report, average_noise=[], average_verdict=None)


def test_every_renderer_works_from_a_loaded_report(report, tmp_path):
    report.save(tmp_path)
    loaded = Report.load(tmp_path / REPORT_FILE)
    assert format_summary(loaded) == format_summary(report)
    assert markdown_table(loaded) == markdown_table(report)
    assert summary_metrics(loaded) == summary_metrics(report)
    assert network_table(loaded) == network_table(report)
    rows = list(loaded.rows())
    assert [r.kind for r in rows] == ["originals", "generated", "temperature", "temperature", "weight_average", "noise", "noise", "noise", "average_noise", "average_noise"]
    # The weight average is a set of one: every renderer shows it like any other row.
    avg = loaded.weight_average
    assert avg.count == 1 and avg.test.std == 0 and avg.test.best == avg.test.mean == avg.best_on_val.test_accuracy
    table = markdown_table(loaded).splitlines()
    assert len(table) == 2 + len(rows) and table[6].startswith("| weight average of the originals | 1 |")
    assert table[-1].startswith("| weight average + noise x4 (spread) | 8 |") and table[7].startswith("| originals + noise x2 (spread) | 8 |")
    columns, table_rows = network_table(loaded)
    assert len(table_rows) == sum(r.count for r in rows) and columns[0] == "kind"
    metrics = summary_metrics(loaded)
    assert metrics["average_noise_4/test_mean"] == loaded.average_noise[1].test.mean and metrics["noise_2/test_mean"] == loaded.noise[0].test.mean
    assert metrics["verdict/generated_minus_average_noise_test_mean"] == loaded.average_verdict.difference
    assert metrics["generated/val_median"] == loaded.generated.val.median and metrics["weight_average/test_accuracy"] == avg.test.mean
    part = loaded.accurate_part()
    assert metrics["accurate_part/share"] == part.count / part.total and metrics.get("accurate_part/nearest_original_iou_mean") == part.nearest_iou
    paths = plot_report(loaded, tmp_path / "plots")
    assert set(paths) == set(PLOT_FILES) and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in paths.values())


def test_oom_halves_networks_per_chunk(originals, candidates, monkeypatch):
    import pdiff.evaluation.scoring as scoring

    evaluator = NetworkEvaluator(originals.task, originals.base_state, originals.layout, device="cpu", networks_per_chunk=16)
    expected = evaluator.score(candidates, "val").accuracy
    real, tried = scoring.evaluate_vectors, []

    def small_memory(*args, networks_per_chunk, **kwargs):
        tried.append(networks_per_chunk)
        if networks_per_chunk > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, networks_per_chunk=networks_per_chunk, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_vectors", small_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert torch.equal(evaluator.score(candidates, "val").accuracy, expected)
    assert tried == [16, 8, 4] and evaluator.networks_per_chunk == 4
    evaluator.score(candidates, "val")
    assert tried[-1] == 4 and len(tried) == 4  # the smaller size is kept


def test_write_report_json_and_valid_pngs(report, tmp_path):
    from PIL import Image
    import matplotlib.image

    paths = _write(report, tmp_path / "eval")
    assert json.loads(paths["report"].read_text()) == report.to_dict()
    assert paths["report"].name == REPORT_FILE
    for name, filename in PLOT_FILES.items():
        path = paths[name]
        assert path.name == filename and path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
        assert matplotlib.image.imread(path).ndim == 3
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted([REPORT_FILE, *PLOT_FILES.values()])


def test_log_report_to_wandb(report, tmp_path):
    import wandb

    assert log_to_wandb(report) is False  # no active run: nothing to do, no error
    paths = _write(report, tmp_path)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="pdiff-tests")
    try:
        assert log_to_wandb(report, paths) is True
        assert run.summary["eval/verdict"] == report.verdict.text
    finally:
        run.finish()


def test_log_report_through_an_accelerate_tracker(report, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with="wandb")
    accelerator.init_trackers("pdiff-tests", init_kwargs={"wandb": {"mode": "offline", "dir": str(tmp_path)}})
    try:
        assert log_to_wandb(report, _write(report, tmp_path), step=3, run=accelerator) is True
        run = accelerator.get_tracker("wandb", unwrap=True)
        assert run.summary["eval/verdict"] == report.verdict.text
    finally:
        accelerator.end_training()
    assert log_to_wandb(report, run=Accelerator(cpu=True)) is False  # no wandb tracker configured


# -- command line --------------------------------------------------------------------------------


def test_cli_end_to_end(originals, candidates, digits_params, tmp_path, run_cli):
    generated = ParameterDataset.from_vectors(
        candidates, {"step": [0] * len(candidates), "seed": [0] * len(candidates), **{c: [0.0] * len(candidates) for c in ("val_accuracy", "val_loss", "test_accuracy", "test_loss")}},
        originals.layout, originals.task_config, originals.base_state,
    )
    gen_dir = generated.save_to_disk(tmp_path / "generated")
    out = tmp_path / "eval"
    args = ["evaluate", "--dataset", str(digits_params), "--generated", str(gen_dir), "--out", str(out), "--device", "cpu", "--noise-scales", "4", "16", "--num-noise-models", "5"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "generated" in result.stdout and "verdict:" in result.stdout and "networks/s" in result.stdout
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["generated"]["count"] == len(candidates) and [e["scale"] for e in report["baselines"]["noise"]["scales"]] == [4.0, 16.0]
    assert all((out / f).read_bytes()[:8] == PNG_SIGNATURE for f in PLOT_FILES.values())


def test_cli_inputs_and_errors(originals, candidates, digits_params, tmp_path, capsys):
    from pdiff.commands import main  # in-process: the console script itself is covered above

    out = tmp_path / "eval"
    torch.save(candidates[:4], tmp_path / "samples.pt")  # a plain [N, D] tensor works too
    args = ["evaluate", "--dataset", str(digits_params), "--generated", str(tmp_path / "samples.pt"), "--out", str(out), "--device", "cpu", "--noise-scales", "--no-plots"]
    assert main(args) == 0
    assert json.loads((out / REPORT_FILE).read_text())["generated"]["count"] == 4
    assert not any(out.glob("*.png"))

    capsys.readouterr()
    assert main(args) == 2  # an existing report is not silently replaced
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    torch.save(torch.zeros(3, originals.dim + 2), tmp_path / "wrong.pt")
    assert main(["evaluate", "--dataset", str(digits_params), "--generated", str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "D=" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", str(tmp_path / "missing"), "--generated", str(tmp_path / "samples.pt"), "--out", str(tmp_path / "y")]) == 2


def test_generated_dataset_on_other_base_weights_is_refused(originals, candidates, tmp_path):
    other_base = {k: v + 1 if v.is_floating_point() else v for k, v in originals.base_state.items()}
    columns = {"step": [0] * 2, "seed": [0] * 2, **{c: [0.0] * 2 for c in ("val_accuracy", "val_loss", "test_accuracy", "test_loss")}}
    other = ParameterDataset.from_vectors(candidates[:2], columns, originals.layout, originals.task_config, other_base)
    path = other.save_to_disk(tmp_path / "other")
    with pytest.raises(ValueError, match="different frozen base weights"):
        load_generated(path, originals)

