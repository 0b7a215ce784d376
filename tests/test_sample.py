"""`pdiff sample`: generated networks as safetensors or as a parameter dataset, with --evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator_helpers import sample, tiny_generator
from pdiff import ParameterDataset, PDiffPipeline, Task
from pdiff.commands import main as cli
from pdiff.evaluation import Report, evaluate_vectors
from pdiff.tasks.networks import build_network


@pytest.fixture(scope="module")
def dataset(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def generator(dataset, tmp_path_factory) -> tuple[PDiffPipeline, Path]:
    pipe = tiny_generator(dataset)
    folder = tmp_path_factory.mktemp("sample") / "generator"
    pipe.save_pretrained(folder)
    return pipe, folder


def fresh_network(pipe: PDiffPipeline) -> torch.nn.Module:
    cfg = pipe.target.config
    return build_network(cfg.network, cfg.in_channels, cfg.num_classes)


def test_safetensors_per_network_loadable_strictly(generator, tmp_path, run_cli):
    pipe, folder = generator
    out = tmp_path / "nets"
    done = run_cli("sample", "--model", str(folder), "--num-models", "3", "--steps", "4", "--seed", "7", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "sampled 3 networks" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"network-0000{i}.safetensors" for i in range(3)] + ["pdiff_networks.json"]
    expected = sample(pipe, seed=7, num_models=3, steps=4)  # the same seed in this process: the same networks
    for i in range(3):
        net = fresh_network(pipe)
        net.load_state_dict(load_file(out / f"network-0000{i}.safetensors"), strict=True)
        assert torch.equal(pipe.layout.flatten(net), expected[i])
    spec = json.loads((out / "pdiff_networks.json").read_text())
    assert spec["layout"] == pipe.layout.to_dict() and spec["task"]["name"] == "digits" and spec["network"]["name"] == "small_cnn"


def test_dataset_format_matches_collect_and_evaluate_prints_accuracy(generator, dataset, tmp_path, capsys):
    pipe, folder = generator
    out = tmp_path / "generated"
    assert cli(["sample", "--model", str(folder), "--num-models", "5", "--steps", "4", "--seed", "3", "--out", str(out), "--format", "dataset", "--evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "sampled 5 networks" in printed and " val accuracy  best" in printed and "test accuracy  best" in printed

    generated = ParameterDataset.from_pretrained(out)
    assert len(generated) == 5 and generated.dim == dataset.dim
    assert generated.rows.features == dataset.rows.features  # the schema of `pdiff collect`
    assert generated.layout == dataset.layout and generated.task_config == dataset.task_config
    assert generated.info["generated"] is True
    assert all(torch.equal(generated.base_state[k], dataset.base_state[k]) for k in dataset.base_state)
    params = sample(pipe, seed=3, num_models=5, steps=4)
    assert torch.equal(generated.vectors, params)
    task = Task(dataset.task_config)
    for split in ("val", "test"):
        scores = evaluate_vectors(pipe.target.net, pipe.layout, params, task.data.split(split), task.data.prepare)
        assert generated.column(f"{split}_accuracy").tolist() == pytest.approx(scores.accuracy.tolist(), abs=0)
        acc = scores.accuracy
        assert f"best {acc.max():.4f}  mean {acc.mean():.4f}" in printed
    net = generated.build_network(0)  # usable like a collected dataset
    assert torch.equal(pipe.layout.flatten(net), params[0])


def test_existing_out_is_refused_without_overwrite(generator, tmp_path, capsys):
    _, folder = generator
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["sample", "--model", str(folder), "--num-models", "2", "--steps", "2", "--out", str(out)]
    assert cli(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["network-00000.safetensors", "network-00001.safetensors", "pdiff_networks.json"]


def test_sampler_dtype_and_bad_model(generator, tmp_path, capsys):
    pipe, folder = generator
    out = tmp_path / "ddpm"
    assert cli(["sample", "--model", str(folder), "--num-models", "2", "--steps", "3", "--sampler", "ddpm", "--dtype", "bf16", "--out", str(out), "--format", "dataset"]) == 0
    generated = ParameterDataset.from_pretrained(out)
    assert torch.isfinite(generated.vectors).all() and generated.vectors.dtype == torch.float32
    assert cli(["sample", "--model", str(tmp_path / "no-generator"), "--out", str(tmp_path / "x")]) == 2
    assert "no generator folder" in capsys.readouterr().err
    for option in ("--num-models", "--steps"):  # refused by the parser, before the generator is loaded
        for bad in ("0", "-1"):
            with pytest.raises(SystemExit) as exit_:
                cli(["sample", "--model", str(folder), option, bad, "--out", str(tmp_path / "y")])
            assert exit_.value.code == 2 and f"{option}: {bad} is not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_evaluate_with_the_original_dataset_writes_the_full_report(generator, digits_params, tmp_path, capsys):
    _, folder = generator
    out = tmp_path / "gen"
    assert cli(["sample", "--model", str(folder), "--num-models", "4", "--steps", "3", "--out", str(out), "--evaluate", "--dataset", str(digits_params)]) == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "weight average" in printed
    report = json.loads((tmp_path / "gen-report" / "report.json").read_text())
    assert report["generated"]["count"] == 4 and report["originals"]["count"] == 24


def test_every_command_that_evaluates_refuses_another_base_network(generator, dataset, digits_params, tmp_path, capsys):
    """A generator's networks scored against a parameter dataset of other frozen weights would report
    nonsense accuracies; `sample --evaluate --dataset` and `evaluate` (dataset or networks folder) refuse."""
    _, folder = generator
    other = tmp_path / "other-params"
    ParameterDataset(dataset.rows, dataset.layout, dataset.task_config, {k: v + 1 for k, v in dataset.base_state.items()}, dataset.info).save_to_disk(other)
    assert cli(["sample", "--model", str(folder), "--num-models", "2", "--steps", "2", "--out", str(tmp_path / "s"), "--evaluate", "--dataset", str(other)]) == 2
    assert "different frozen base weights" in capsys.readouterr().err and not (tmp_path / "s").exists()  # refused before sampling
    nets = tmp_path / "nets"
    assert cli(["sample", "--model", str(folder), "--num-models", "2", "--steps", "2", "--out", str(nets)]) == 0
    assert cli(["evaluate", "--dataset", str(other), "--generated", str(nets), "--out", str(tmp_path / "e")]) == 2
    assert "other frozen base weights" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # against its own dataset, the networks folder of `pdiff sample` evaluates as it is
    assert cli(["evaluate", "--dataset", str(digits_params), "--generated", str(nets), "--out", str(tmp_path / "ok"), "--no-plots"]) == 0
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["generated"]["count"] == 2


def test_a_sample_too_large_for_this_machine_is_refused_with_the_numbers(generator, tmp_path, capsys, monkeypatch):
    import pdiff.sampling

    _, folder = generator
    assert cli(["sample", "--model", str(folder), "--num-models", str(10**12), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--num-models 1000000000000: their parameters alone need" in err and "at most about" in err and not (tmp_path / "s").exists()
    # Chains are cut at CHUNK networks: chain i is seeded with seed + i, the first is the plain call.
    monkeypatch.setattr(pdiff.sampling, "CHUNK", 3)
    pipe, _ = generator
    chunked = pdiff.sampling.sample_networks(pipe, 7, 2, seed=5)
    assert chunked.shape == (7, pipe.layout.dim)
    assert torch.equal(chunked[:3], sample(pipe, seed=5, num_models=3, steps=2)) and torch.equal(chunked[3:6], sample(pipe, seed=6, num_models=3, steps=2))


def validated_with_3_steps(folder, tmp_path):
    """A copy of the generator that was validated with 3 denoising steps, so sampling without --steps is quick."""
    quick = tmp_path / "quick-generator"
    loaded = PDiffPipeline.from_pretrained(folder)
    loaded.register_to_config(default_num_inference_steps=3)
    loaded.save_pretrained(quick)
    return quick


def test_temperature_and_the_curve_from_the_command_line(generator, digits_params, tmp_path, capsys):
    pipe, folder = generator
    quick = validated_with_3_steps(folder, tmp_path)  # the curve samples with those
    cold = tmp_path / "cold"
    assert cli(["sample", "--model", str(quick), "--num-models", "3", "--temperature", "0.5", "--out", str(cold), "--format", "dataset"]) == 0
    expected = pipe(num_models=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0), temperature=0.5).params
    assert torch.equal(ParameterDataset.from_pretrained(cold).vectors, expected)  # the same draws, scaled
    out = tmp_path / "eval"
    assert cli(["evaluate", "--dataset", str(digits_params), "--generated", str(cold), "--out", str(out), "--curve-model", str(quick),
                "--curve-temperatures", "2", "0.5", "--curve-num-models", "3", "--noise-scales", "4", "--num-noise-models", "3"]) == 0
    printed = capsys.readouterr().out
    assert "generated T=0.5" in printed and "generated T=2" in printed
    report = Report.load(out)
    assert [p.scale for p in report.curve] == [0.5, 2.0] and report.curve[0].networks["test_accuracy"] == report.generated.networks["test_accuracy"]
    assert report.generated_temperature == 0.5  # recorded by `pdiff sample --format dataset`
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as exit_:
            cli(["sample", "--model", str(folder), "--temperature", bad, "--out", str(tmp_path / "never")])
        assert exit_.value.code == 2 and "is not a positive number" in capsys.readouterr().err


def test_eta_from_the_command_line(generator, digits_params, tmp_path, capsys):
    """`--eta` reaches DDIM's step: the networks are the pipeline's with the same seed; bad values are one line."""
    pipe, folder = generator
    out = tmp_path / "stochastic"
    assert cli(["sample", "--model", str(folder), "--num-models", "3", "--steps", "3", "--eta", "1", "--out", str(out), "--format", "dataset"]) == 0
    expected = pipe(num_models=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0), eta=1.0).params
    written = ParameterDataset.from_pretrained(out)
    assert torch.equal(written.vectors, expected) and written.info["eta"] == 1.0
    for bad in ("-0.1", "2", "x"):
        with pytest.raises(SystemExit) as exit_:
            cli(["sample", "--model", str(folder), "--eta", bad, "--out", str(tmp_path / "never")])
        assert exit_.value.code == 2 and "--eta" in capsys.readouterr().err
    assert cli(["sample", "--model", str(folder), "--eta", "0.5", "--sampler", "ddpm", "--out", str(tmp_path / "never")]) == 2
    assert "--eta applies to the DDIM sampler" in capsys.readouterr().err and not (tmp_path / "never").exists()
    # The curve of a set sampled with eta is sampled with the same eta: at the set's own temperature, the same networks.
    quick = validated_with_3_steps(folder, tmp_path)
    hot = tmp_path / "hot"
    assert cli(["sample", "--model", str(quick), "--num-models", "3", "--eta", "1", "--temperature", "0.5", "--out", str(hot), "--format", "dataset"]) == 0
    assert cli(["evaluate", "--dataset", str(digits_params), "--generated", str(hot), "--out", str(tmp_path / "eval"), "--curve-model", str(quick),
                "--curve-temperatures", "0.5", "2", "--curve-num-models", "3", "--noise-scales", "4", "--num-noise-models", "3", "--no-plots"]) == 0
    report = Report.load(tmp_path / "eval")
    assert report.curve[0].scale == 0.5 and report.curve[0].networks["nearest_original_l2"] == report.generated.networks["nearest_original_l2"]


def test_options_a_sample_would_ignore_are_refused(generator, tmp_path, capsys):
    """--steps past the training timesteps, --revision for a local folder, --data for a task that reads no folder:
    each refused by name, before sampling, with nothing written."""
    _, folder = generator
    base = ["sample", "--model", str(folder), "--num-models", "2", "--out", str(tmp_path / "s")]
    for extra, message in ((["--steps", "5000"], "--steps 5000: use 1 to 1000"),
                           (["--revision", "main"], "--revision main picks a Hub revision; --model"),
                           (["--data", str(tmp_path)], "this generator's task reads its data from 'digits'")):
        assert cli([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
