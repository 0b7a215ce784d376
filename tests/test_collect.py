"""`pdiff collect`: real collections (digits, fake CIFAR with ResNet-18, 2 processes) and every bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pdiff.tasks.data as task_data
from pdiff import ParameterDataset
from pdiff.commands import main as cli_main
from pdiff.evaluation import evaluate_network
from pdiff.config import ConfigError

from conftest import REPO_ROOT, collect_dataset
from ports import free_port

# A few seconds per collection: a briefly trained base network and a handful of checkpoints.
TINY = ["task.base.epochs=2", "task.param.k=4", "task.param.warmup_steps=2", "cpu=true"]


def _no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


def test_collection_is_deterministic_and_saved_exactly(tmp_path):
    first = collect_dataset(tmp_path / "a", *TINY)
    second = collect_dataset(tmp_path / "b", *TINY)
    assert len(first) == 4 and first.dim == 778
    # The returned dataset is exactly what was written.
    on_disk = ParameterDataset.from_pretrained(tmp_path / "a" / "params")
    assert torch.equal(on_disk.vectors, first.vectors)
    # Same seed: the same base network and the same checkpoints, bit for bit.
    assert torch.equal(second.vectors, first.vectors)
    assert all(torch.equal(second.base_state[k], first.base_state[k]) for k in first.base_state)
    assert (second.column("val_accuracy") == first.column("val_accuracy")).all()
    assert _no_partials(tmp_path / "a")


def test_fake_cifar_resnet18_collects_the_papers_2048_bn_parameters(tmp_path):
    """The CIFAR code path (3x32x32, ResNet-18, `layer4.1.bn1`/`bn2`, augmentation) on fake data of that shape."""
    ds = collect_dataset(
        tmp_path, "task=fake_cifar_resnet18", "task.data.train_size=64", "task.data.val_size=16",
        "task.data.test_size=32", "task.base.batch_size=32", "task.param.batch_size=16", "task.param.k=2", "cpu=true",
    )
    assert ds.dim == 2048 and len(ds) == 2
    assert ds.layout.names == ["layer4.1.bn1.weight", "layer4.1.bn1.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"]
    assert ds.task_config["network"]["name"] == "resnet18_cifar"
    loaded = ParameterDataset.from_pretrained(tmp_path / "params")
    assert torch.equal(loaded.vectors, ds.vectors)
    task = loaded.task
    assert task.data.image_shape == (3, 32, 32)
    net = loaded.build_network(1, task=task)
    acc, _ = evaluate_network(net, task.data.test, task.data.prepare)
    assert acc == loaded.rows[1]["test_accuracy"]


def test_trajectories_split_k_and_each_starts_from_the_base_network(tmp_path):
    """`task.param.trajectories=2`: K split between seeds 1 and 2, each run fine-tuning the base network as if alone."""
    ds = collect_dataset(tmp_path / "five", *TINY, "task.param.k=5", "task.param.trajectories=2")
    assert ds.column("seed").tolist() == [1, 1, 1, 2, 2] and ds.info["trajectories"] == 2  # the first run takes the remainder
    alone = collect_dataset(tmp_path / "alone", *TINY, "task.param.k=3")  # seed 0: its one run has seed 1
    assert torch.equal(ds.vectors[:3], alone.vectors)
    assert ds.column("step").tolist() == alone.column("step").tolist() + alone.column("step").tolist()[:2]
    # Run 2 starts where the base network is, not where run 1 ended: with shares 2 + 1 it is the same run.
    three = collect_dataset(tmp_path / "three", *TINY, "task.param.k=3", "task.param.trajectories=2")
    assert three.column("seed").tolist() == [1, 1, 2]
    assert torch.equal(three.vectors[2], ds.vectors[3]) and torch.equal(three.vectors[:2], ds.vectors[:2])


@pytest.mark.slow
def test_two_processes_under_accelerate_share_the_trajectories(tmp_path):
    """Real 2-rank DDP on CPU (gloo): by default each rank collects its own seed's checkpoints, rank 0 saves them
    all; with 3 trajectories the ranks take runs 1, 3 and 2, and the dataset is the one a single process makes."""
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # one thread: bit-identical runs in any process

    def collect(out: Path, *overrides: str, processes: int = 2) -> ParameterDataset:
        cmd = ([str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "pdiff.collect"] if processes > 1 else [sys.executable, "-m", "pdiff.collect"])
        result = subprocess.run([*cmd, f"output_dir={out}", *TINY, *overrides], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return ParameterDataset.from_pretrained(out / "params")

    ds = collect(tmp_path, "task.param.k=5")
    assert ds.info["num_processes"] == 2 and ds.info["trajectories"] == 2
    assert ds.column("seed").tolist() == [1, 1, 1, 2, 2]  # trajectory 1 takes the remainder: 3 + 2
    first, second = ds.vectors[:3], ds.vectors[3:]
    assert not any(torch.equal(a, b) for a in first for b in second)  # two trajectories, not one copied
    # Both ranks fine-tuned from the same base network, which rebuilds every row's recorded accuracy.
    task = ds.task
    for i in (0, 4):
        acc, _ = evaluate_network(ds.build_network(i, task=task), task.data.test, task.data.prepare)
        assert acc == ds.rows[i]["test_accuracy"]
    assert _no_partials(tmp_path)
    # Rank 0 runs trajectories 1 and 3, rank 1 trajectory 2: rows still in seed order, as one process makes them.
    shared = collect(tmp_path / "shared", "task.param.k=5", "task.param.trajectories=3")
    assert shared.column("seed").tolist() == [1, 1, 2, 2, 3]
    one = collect(tmp_path / "one", "task.param.k=5", "task.param.trajectories=3", processes=1)
    assert torch.equal(one.vectors, shared.vectors) and one.info["num_processes"] == 1


# -- bad input: a clear error, before any work, and nothing lost ------------------------------------------


def test_unknown_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key `task.param.kk`.*Known keys under `task.param`: batch_size, k, lr"):
        collect_dataset(tmp_path, "task.param.kk=3")
    with pytest.raises(ConfigError, match=r"under `train` there is no `nonsense`"):
        collect_dataset(tmp_path, "train.nonsense.deep=3")
    with pytest.raises(ConfigError, match="task=fashion_mnist"):
        collect_dataset(tmp_path, "task=no_such_task")


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(tmp_path, k):
    with pytest.raises(ValueError, match=f"task.param.k={k}"):
        collect_dataset(tmp_path, *TINY, f"task.param.k={k}")
    assert not (tmp_path / "params").exists()


def test_more_trajectories_than_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("pdiff.collect.train_base_network", lambda *a, **k: pytest.fail("trained before checking the config"))
    with pytest.raises(ConfigError, match=r"task.param.k=3 is smaller than task.param.trajectories=4"):
        collect_dataset(tmp_path, *TINY, "task.param.k=3", "task.param.trajectories=4")
    with pytest.raises(ConfigError, match=r"task.param.trajectories=0: must be >= 1"):
        collect_dataset(tmp_path, *TINY, "task.param.trajectories=0")


def test_pattern_matching_nothing_lists_parameter_names(tmp_path):
    with pytest.raises(ValueError) as info:
        collect_dataset(tmp_path, *TINY, "task.param.patterns=[layer4.1.bn*]")
    message = str(info.value)
    assert "'layer4.1.bn*' matches nothing in SmallCNN" in message
    assert all(name in message for name in ("conv1.weight", "bn3.weight", "bn3.bias", "fc.weight", "fc.bias"))


def test_a_single_pattern_string_selects_by_glob(tmp_path):
    # `task.param.patterns=fc.*` on the command line arrives as a string, not a list.
    ds = collect_dataset(tmp_path, *TINY, "task.param.patterns=fc.*", "task.param.k=2")
    assert ds.layout.names == ["fc.weight", "fc.bias"] and ds.dim == 650


def test_missing_fashion_mnist_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(task_data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(task_data.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        collect_dataset(tmp_path, "task=fashion_mnist", f"task.data.root={tmp_path / 'empty'}", "task.data.download=never")
    assert not (tmp_path / "params").exists()


def test_push_to_hub_without_a_repo_id_fails_before_collecting(tmp_path, monkeypatch):
    monkeypatch.setattr("pdiff.collect.train_base_network", lambda *a, **k: pytest.fail("trained before checking the config"))
    with pytest.raises(ValueError, match="hub.dataset_id"):
        collect_dataset(tmp_path, *TINY, "hub.push_to_hub=true")


def test_existing_dataset_is_refused_before_training_and_overwrite_replaces_it(tmp_path, monkeypatch):
    first = collect_dataset(tmp_path, *TINY)
    with monkeypatch.context() as m:
        m.setattr("pdiff.collect.train_base_network", lambda *a, **k: pytest.fail("trained before checking the output dir"))
        with pytest.raises(FileExistsError, match="overwrite=true"):
            collect_dataset(tmp_path, *TINY, "seed=1")
    assert torch.equal(ParameterDataset.from_pretrained(tmp_path / "params").vectors, first.vectors)
    replaced = collect_dataset(tmp_path, *TINY, "seed=1", "overwrite=true")
    assert torch.equal(ParameterDataset.from_pretrained(tmp_path / "params").vectors, replaced.vectors)
    assert not torch.equal(replaced.vectors, first.vectors)  # another seed: another trajectory
    assert set(replaced.column("seed").tolist()) == {2}
    assert _no_partials(tmp_path)


@pytest.mark.parametrize("where", ["during fine-tuning", "while saving"])
def test_interrupted_collection_leaves_no_dataset(tmp_path, monkeypatch, where):
    import pdiff.collect as collect_module

    if where == "during fine-tuning":
        monkeypatch.setattr(collect_module, "collect_trajectory", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:  # the rows are on disk, the layout and base weights are not yet

        def fail(self, folder):
            assert (folder / "state.json").exists()
            raise KeyboardInterrupt

        monkeypatch.setattr(ParameterDataset, "_write_sidecars", fail)
    with pytest.raises(KeyboardInterrupt):
        collect_dataset(tmp_path, *TINY)
    assert list(tmp_path.iterdir()) == []  # no dataset, no half-written folder beside it


# -- the command line -------------------------------------------------------------------------------


def test_cli_bad_input_exits_2_with_an_error_line(run_cli, tmp_path):
    result = run_cli("collect", f"output_dir={tmp_path}", "task.param.kk=3")
    assert result.returncode == 2
    assert result.stderr.startswith("pdiff collect: error:") and "task.param.kk" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task.param.k=0"], "task.param.k=0"),
        (["task.param.patterns=[nope.*]"], "'nope.*' matches nothing"),
        (["task=fashion_mnist", "task.data.download=never", "task.data.root={tmp}"], "apt-get install dataset-fashion-mnist"),
        (["task=cifar10_resnet18", "task.data.download=never", "task.data.root={tmp}"], "CIFAR10 was not found"),
    ],
)
def test_cli_bad_inputs(tmp_path, capsys, monkeypatch, overrides, expected):
    monkeypatch.setattr(task_data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    overrides = [o.format(tmp=tmp_path / "empty") for o in overrides]
    code = cli_main(["collect", f"output_dir={tmp_path}", *TINY, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pdiff collect: error:") and expected in err and "Traceback" not in err


def test_cli_refuses_an_existing_dataset(tmp_path, capsys, digits_params):
    shutil.copytree(digits_params, tmp_path / "params")
    code = cli_main(["collect", f"output_dir={tmp_path}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "already holds" in err and "overwrite=true" in err
    assert len(ParameterDataset.from_pretrained(tmp_path / "params")) == 24
