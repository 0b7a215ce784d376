"""Whole networks: every parameter generated (no frozen prefix), with the token autoencoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import collect_dataset, reset_accelerator_state
from pdiff.evaluation import evaluate_network, evaluate_vectors
from pdiff.evaluation.scoring import SuffixScorer

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

WHOLE = ["task=digits", "task.param.patterns=[*]", "task.param.k=12", "task.param.lr=2e-3", "task.base.epochs=3", "cpu=true"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    return folder, collect_dataset(folder, *WHOLE)


def test_whole_network_collection_rebuilds_exactly(whole):
    _, ds = whole
    net = ds.build_network(0)
    assert ds.dim == sum(p.numel() for p in net.parameters()) and ds.layout.names[0] == "conv1.weight"
    for i in (0, 5, 11):
        acc, _ = evaluate_network(ds.build_network(i), ds.task.data.test, ds.task.data.prepare)
        assert acc == ds.rows[i]["test_accuracy"]


def test_whole_network_batched_scoring_equals_one_by_one(whole):
    _, ds = whole
    task = ds.task
    vectors = ds.vectors + 0.3 * torch.randn(ds.vectors.shape, generator=torch.Generator().manual_seed(0)) * ds.vectors.std(0)
    net = task.build_network(ds.base_state)
    scorer = SuffixScorer(net, ds.layout)
    assert scorer.head is None and len(scorer.prefix.net.stage_names[scorer.prefix.start : scorer.prefix.stop]) == 0  # nothing shared
    batched = evaluate_vectors(net, ds.layout, vectors, task.data.test, task.data.prepare, batch_size=90)
    one_by_one = [evaluate_network(task.build_network(ds.base_state, ds.layout, v), task.data.test, task.data.prepare, batch_size=90)[0] for v in vectors]
    assert batched.accuracy.tolist() == one_by_one and len(set(one_by_one)) > 1
    assert scorer.generates_convolutions  # so on the CPU each network ran on its own; a GPU vmaps them:
    scorer.generates_convolutions = False
    vmapped = evaluate_vectors(net, ds.layout, vectors, task.data.test, task.data.prepare, batch_size=90, scorer=scorer)
    assert vmapped.accuracy.tolist() == one_by_one
    # chunks are sized by the network's largest activation, not by its input
    feats = scorer.features(task.data.test, task.data.prepare, 90, torch.device("cpu"))[0][0]
    assert scorer._largest_activation(feats) == 16 * 8 * 8  # conv1: 16 channels at 8x8


@pytest.fixture(scope="module")
def trained(whole):
    """A tiny generator=tokens run on the whole-network dataset."""
    from pdiff.train import main

    folder, _ = whole
    reset_accelerator_state()
    return folder, main([f"output_dir={folder}", "cpu=true", "generator=tokens", "generator.autoencoder.chunk_size=32", "generator.autoencoder.hidden=16",
                   "generator.unet.block_out_channels=[8,16]", "generator.num_inference_steps=4", "train.ae_steps=4", "train.diffusion_steps=4",
                   "train.batch_size=8", "train.eval_every=0", "train.num_final_models=6", "train.checkpointing_steps=0", "train.report_to=none"])


def test_tiny_whole_network_run_trains_end_to_end_with_tokens(whole, trained, caplog):
    from diffusers.utils import logging as diffusers_logging

    from pdiff import PDiffPipeline

    _, ds = whole
    folder, report = trained
    assert report.generated.count == 6 and report.dim == ds.dim
    diffusers_logging.enable_propagation()  # diffusers' own handler writes past pytest's capture
    try:
        pipe = PDiffPipeline.from_pretrained(folder / "generator")
    finally:
        diffusers_logging.disable_propagation()
    assert type(pipe.autoencoder).__name__ == "TokenAutoencoder"
    # The generator samples at the temperature chosen on validation (generator=tokens starts from 0.75);
    # the report's curve shows the other candidates.
    assert pipe.default_temperature == report.generated_temperature == report.selected["temperature"]
    assert sorted([p.scale for p in report.curve] + [report.generated_temperature]) == [0.5, 0.75, 1.0, 1.25]
    assert "Expected types" not in caplog.text  # diffusers checks components against the pipeline's annotations
    assert pipe(num_models=2, num_inference_steps=2).params.shape == (2, ds.dim)


def test_a_step_that_cannot_fit_is_refused_before_training(whole, tmp_path):
    from pdiff.config import ConfigError
    from pdiff.train import main

    folder, _ = whole
    with pytest.raises(ConfigError, match=r"one autoencoder step at D=\d+ and train.batch_size=100000000 needs about .* GiB.*use generator=tokens"):
        main([f"output_dir={tmp_path}", f"dataset_dir={folder / 'params'}", "cpu=true", "train.batch_size=100000000", "train.report_to=none"])


def test_a_token_autoencoder_for_another_layout_is_refused(trained, tmp_path):
    """Same D, tensors cut differently: the tokens would straddle the target's tensors."""
    import json
    import shutil

    from pdiff import PDiffPipeline
    from pdiff.params import LayoutMismatchError

    folder, _ = trained
    copy = Path(shutil.copytree(folder / "generator", tmp_path / "gen"))
    config = json.loads((copy / "autoencoder" / "config.json").read_text())
    sizes = config["tensor_sizes"]
    config["tensor_sizes"] = [sizes[0] + sizes[1], *sizes[2:]]
    (copy / "autoencoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises((LayoutMismatchError, ValueError), match="another layout|do not match"):
        PDiffPipeline.from_pretrained(copy)
