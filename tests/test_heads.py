"""The closed-form classifier head gives every network the hits its own forward pass gives.

The head (`bn -> relu -> pool -> fc`, computed for all networks at once) rounds differently from a
network's forward pass, and near-ties are recomputed the network's way. These tests hold it to
exact equality with one-by-one evaluation on real data, on forced exact ties, and on the corner
cases of its closed form (zero and negative batch-norm scales).
"""

from __future__ import annotations

import pytest
import torch

from pdiff.config import load_config, to_dict
from pdiff.evaluation import evaluate_network, evaluate_vectors
from pdiff.evaluation import heads
from pdiff.evaluation.scoring import SuffixScorer
from pdiff.params import ParameterLayout, select_parameters
from pdiff.tasks import Task
from pdiff.tasks import data as task_data
from pdiff.tasks.data import Split


def _task(name: str, **data) -> Task:
    cfg = to_dict(load_config([f"task={name}"]).task)
    cfg["data"].update(data)
    return Task(cfg)


def _base_and_vectors(task: Task, patterns: list[str], n: int, spread: float, seed: int = 0):
    """A randomly initialised network with non-trivial BN statistics, and n perturbed copies of its slice."""
    torch.manual_seed(seed)
    net = task.build_network()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    layout = ParameterLayout.from_module(net, select_parameters(net, patterns))
    base = layout.flatten(net)
    vectors = base + spread * torch.randn(n, layout.dim) * base.abs().mean()
    return net.state_dict(), layout, vectors


def _one_by_one(task: Task, state, layout, vectors, split: Split, batch_size: int) -> list[float]:
    return [evaluate_network(task.build_network(state, layout, v), split, task.data.prepare, batch_size=batch_size)[0] for v in vectors]


def _batched(task: Task, state, layout, vectors, split: Split, batch_size: int) -> torch.Tensor:
    net = task.build_network(state)
    return evaluate_vectors(net, layout, vectors, split, task.data.prepare, batch_size=batch_size, return_wrong=True)


def test_the_pooled_classifier_slice_takes_the_closed_form_and_others_do_not():
    digits = _task("digits")
    state, layout, _ = _base_and_vectors(digits, ["bn3.*", "fc.*"], 1, 0.0)
    assert SuffixScorer(digits.build_network(state), layout).head is not None
    only_fc = ParameterLayout.from_module(digits.build_network(state), ["fc.weight", "fc.bias"])
    assert SuffixScorer(digits.build_network(state), only_fc).head is None  # a linear suffix: vmap is already cheap
    cifar = _task("fake_cifar_resnet18", train_size=32, val_size=8, test_size=8)
    net = cifar.build_network()
    resnet = ParameterLayout.from_module(net, ["layer4.1.bn1.weight", "layer4.1.bn1.bias"])
    assert SuffixScorer(net, resnet).head is None  # a residual block: no closed form


@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_closed_form_equals_one_by_one_on_digits(spread):
    task = _task("digits")
    state, layout, vectors = _base_and_vectors(task, ["bn3.*", "fc.*"], 24, spread)
    test = task.data.test
    scores = _batched(task, state, layout, vectors, test, batch_size=100)
    assert scores.accuracy.tolist() == _one_by_one(task, state, layout, vectors, test, batch_size=100)
    assert torch.equal(len(test) - scores.wrong.sum(1), (scores.accuracy * len(test)).round().long())


@pytest.mark.skipif(not task_data.DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_closed_form_equals_one_by_one_on_a_fashion_mnist_slice(tmp_path):
    task = _task("fashion_mnist", root=str(tmp_path), download="never")
    state, layout, vectors = _base_and_vectors(task, ["bn3.*", "fc.*"], 16, 0.3)
    test = Split(task.data.test.images[:1500], task.data.test.labels[:1500])
    scores = _batched(task, state, layout, vectors, test, batch_size=500)
    expected = _one_by_one(task, state, layout, vectors, test, batch_size=500)
    assert scores.accuracy.tolist() == expected and len(set(expected)) > 1


@pytest.mark.skipif(not task_data.DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_test_size_scores_on_a_fixed_random_subset(tmp_path):
    """`task.data.test_size` below the test split's size (the wide whole-network task on CPU): the same
    random subset every time, drawn from the whole split."""
    full = _task("fashion_mnist", root=str(tmp_path), download="never").data.test
    subsets = [_task("fashion_mnist", root=str(tmp_path), download="never", test_size=300).data.test for _ in range(2)]
    assert len(subsets[0]) == 300 and torch.equal(subsets[0].images, subsets[1].images)
    assert not torch.equal(subsets[0].labels, full.labels[:300]) and len(set(subsets[0].labels.tolist())) == 10


def test_fake_cifar_resnet18_batched_equals_one_by_one():
    task = _task("fake_cifar_resnet18", train_size=32, val_size=8, test_size=48)
    state, layout, vectors = _base_and_vectors(task, ["layer4.1.bn1.*", "layer4.1.bn2.*"], 6, 0.5)
    test = task.data.test
    scores = _batched(task, state, layout, vectors, test, batch_size=16)
    assert scores.accuracy.tolist() == _one_by_one(task, state, layout, vectors, test, batch_size=16)


def test_exact_ties_are_recomputed_the_networks_way(monkeypatch):
    """Two classes with identical classifier rows tie on every image: argmax then picks the first,
    and only the network's own arithmetic decides near-ties, so every pair must be recomputed."""
    task = _task("digits")
    state, layout, vectors = _base_and_vectors(task, ["bn3.*", "fc.*"], 6, 0.05)
    tied = vectors.clone()
    params = layout.unflatten(tied)  # views: writing them writes `tied`
    params["fc.weight"][:, 1] = params["fc.weight"][:, 7]
    params["fc.bias"][:, 1] = params["fc.bias"][:, 7]
    recomputed = []
    real = heads.PooledLinearHead._recompute
    monkeypatch.setattr(heads.PooledLinearHead, "_recompute", lambda self, logits, pooled, unsure, *a: (recomputed.append(int(unsure.sum())), real(self, logits, pooled, unsure, *a)))
    test = task.data.test
    scores = _batched(task, state, layout, tied, test, batch_size=120)
    assert scores.accuracy.tolist() == _one_by_one(task, state, layout, tied, test, batch_size=120)
    assert sum(recomputed) > 0


def test_zero_and_negative_batch_norm_scales():
    """The closed form branches on the sign of a channel's scale; a zero scale makes the channel constant."""
    task = _task("digits")
    state, layout, vectors = _base_and_vectors(task, ["bn3.*", "fc.*"], 8, 0.05)
    changed = vectors.clone()
    params = layout.unflatten(changed)  # views: writing them writes `changed`
    params["bn3.weight"][:, :16] = 0.0
    params["bn3.weight"][:, 16:40] *= -1
    test = task.data.test
    scores = _batched(task, state, layout, changed, test, batch_size=90)
    assert scores.accuracy.tolist() == _one_by_one(task, state, layout, changed, test, batch_size=90)
