"""CUDA: the whole method on a GPU, mixed precision, bit-equal save/load, exact batched scoring.

Marked `gpu` and skipped without CUDA. `launch/gpu_check.sh` runs them (`pytest -m gpu`) on a GPU
machine together with the CUDA benchmarks; on a CPU machine they are only collected.
"""

from __future__ import annotations

import pytest
import torch

from generator_helpers import sample, tiny_generator
from pdiff import ParameterDataset, PDiffPipeline
from pdiff.evaluation import evaluate_generated, evaluate_network, evaluate_vectors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("fresh_accelerator_state")]

# test_train.TINY without cpu=true: the same tiny generator, trained on the GPU.
TINY_CUDA = [
    "generator.autoencoder.channels=[8,16]", "generator.unet.block_out_channels=[8,16]", "generator.num_inference_steps=4",
    "train.ae_steps=6", "train.diffusion_steps=6", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
    "train.eval_num_models=4", "train.num_final_models=6", "train.checkpointing_steps=4", "train.lr_warmup_steps=2", "train.report_to=none",
]


@pytest.fixture(scope="module")
def dataset(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


def _losses(out) -> list[float]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[k] for r in rows for k in ("ae/loss", "diffusion/loss") if k in r]


def test_digits_pipeline_end_to_end_on_cuda(tmp_path):
    from conftest import collect_dataset
    from pdiff.sampling import load_generator, sample_networks
    from pdiff.train import main as train_main

    ds = collect_dataset(tmp_path, "task=digits", "task.param.k=24")
    assert ds.info["device"].startswith("cuda")
    report = train_main([f"output_dir={tmp_path}", *TINY_CUDA])
    assert report.generated.count == 6 and report.timing.device.startswith("cuda")
    pipe = load_generator(str(tmp_path / "generator"), device="cuda")
    vectors = sample_networks(pipe, 8, None, seed=0)
    assert vectors.shape == (8, ds.dim) and torch.isfinite(vectors).all()
    again = evaluate_generated(ds, vectors, device="cuda", noise_scales=(1.0,), num_noise_models=4)
    assert again.generated.count == 8 and 0.0 <= again.generated.test.mean <= 1.0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_steps_have_finite_losses(tmp_path, digits_params, precision):
    from pdiff.train import main as train_main

    train_main([f"output_dir={tmp_path}", f"dataset_dir={digits_params}", f"train.mixed_precision={precision}", *TINY_CUDA])
    losses = _losses(tmp_path)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))


def test_save_load_on_cuda_is_bit_equal(dataset, tmp_path):
    pipe = tiny_generator(dataset).to("cuda")
    pipe.save_pretrained(tmp_path / "gen")
    loaded = PDiffPipeline.from_pretrained(tmp_path / "gen").to("cuda")
    for name in ("autoencoder", "unet"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(sample(pipe, seed=3), sample(loaded, seed=3))


def test_pipeline_on_cuda_samples_the_same_networks_for_the_same_seed(dataset):
    pipe = tiny_generator(dataset).to("cuda")
    first, second = sample(pipe, seed=5, num_models=16), sample(pipe, seed=5, num_models=16)
    assert pipe.device.type == "cuda" and first.device.type == "cpu"  # sampled on the GPU, returned ready to save
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(pipe, seed=6, num_models=16))


def test_batched_scoring_on_cuda_equals_one_by_one_on_cuda(dataset):
    task = dataset.task
    vectors = dataset.vectors[:12] + 0.5 * torch.randn(12, dataset.dim, generator=torch.Generator().manual_seed(0)) * dataset.vectors.std(0)
    test = task.data.test.to("cuda")
    net = task.build_network(dataset.base_state).to("cuda")
    batched = evaluate_vectors(net, dataset.layout, vectors.cuda(), test, task.data.prepare, batch_size=100)
    one_by_one = [evaluate_network(task.build_network(dataset.base_state, dataset.layout, v).to("cuda"), test, task.data.prepare, batch_size=100)[0]
                  for v in vectors]
    assert batched.accuracy.tolist() == one_by_one and len(set(one_by_one)) > 1
