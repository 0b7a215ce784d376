"""Parameter datasets: schema, bit-exact round trips, rebuilt networks, validation and atomic saving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import pdiff.data.parameter_dataset as pds
from pdiff import ParameterDataset, Task
from pdiff.evaluation import evaluate_network, evaluate_vectors
from pdiff.config import load_config, to_dict
from pdiff.data import InvalidParameterDatasetError, parameter_features
from pdiff.io import atomic_directory

from conftest import DIGITS_K, DIGITS_OVERRIDES

METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")


@pytest.fixture(scope="module")
def ds(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def task(ds) -> Task:
    return ds.task


def _vectors(rows: datasets.Dataset) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows.with_format("numpy")["params"]))


def _partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


def test_schema_rows_and_metadata(ds, digits_params):
    assert len(ds) == DIGITS_K and ds.dim == 778
    assert ds.rows.features == parameter_features(778)
    feature = ds.rows.features["params"]
    assert isinstance(feature, datasets.List) and feature.length == 778 and feature.feature.dtype == "float32"
    assert set(ds.rows.column_names) == {"params", "step", "seed", *METRICS}
    assert ds.vectors.dtype == torch.float32 and ds.vectors.shape == (DIGITS_K, 778)
    assert torch.isfinite(ds.vectors).all()
    # One checkpoint per step after the warm-up (warmup_steps=10, save_every=1), one trajectory, seed 0 + 1.
    assert ds.column("step").tolist() == list(range(11, 11 + DIGITS_K))
    assert set(ds.column("seed").tolist()) == {1}
    # Checkpoints along a trajectory differ, and they are good networks.
    assert len({tuple(v.tolist()) for v in ds.vectors}) == DIGITS_K
    assert ds.column("val_accuracy").min() > 0.9 and ds.column("test_accuracy").min() > 0.9
    assert (ds.column("val_loss") > 0).all()
    # Everything needed to rebuild a network travels with the rows.
    assert ds.layout.names == ["bn3.weight", "bn3.bias", "fc.weight", "fc.bias"]
    assert ds.task_config == to_dict(load_config(DIGITS_OVERRIDES).task)
    assert "bn3.running_mean" in ds.base_state and "conv1.weight" in ds.base_state
    assert ds.info["num_processes"] == 1
    assert {p.name for p in digits_params.iterdir()} >= {"state.json", "dataset_info.json", pds.METADATA_FILE, pds.BASE_WEIGHTS_FILE}
    assert not _partials(digits_params.parent)


def test_round_trip_is_bit_exact(ds, digits_params, tmp_path):
    raw = _vectors(datasets.load_from_disk(str(digits_params)))
    assert raw.dtype == torch.float32 and torch.equal(raw, ds.vectors)
    ds.save_to_disk(tmp_path / "copy")
    again = ParameterDataset.from_pretrained(tmp_path / "copy")
    assert torch.equal(again.vectors, ds.vectors)
    assert again.layout == ds.layout and again.task_config == ds.task_config
    for name in METRICS + ("step", "seed"):
        assert np.array_equal(again.column(name), ds.column(name))
    assert again.base_state.keys() == ds.base_state.keys()
    assert all(torch.equal(again.base_state[k], ds.base_state[k]) for k in ds.base_state)


def test_hub_layout_loads_bit_exact_with_load_dataset_and_from_pretrained(ds, tmp_path):
    folder = ds.save_for_hub(tmp_path / "hub")
    assert (folder / "README.md").exists() and list((folder / "data").glob("*.parquet"))
    card = (folder / "README.md").read_text()
    assert "pdiff" in card and "data/*.parquet" in card and f"{DIGITS_K} checkpoints of 778 parameters" in card
    rows = datasets.load_dataset(str(folder), split="train")  # what `load_dataset(repo_id)` reads on the Hub
    assert rows.features == parameter_features(778)
    assert torch.equal(_vectors(rows), ds.vectors)
    again = ParameterDataset.from_pretrained(folder)
    assert torch.equal(again.vectors, ds.vectors)
    assert again.layout == ds.layout and again.task_config == ds.task_config
    assert all(torch.equal(again.base_state[k], ds.base_state[k]) for k in ds.base_state)
    assert np.array_equal(again.column("test_accuracy"), ds.column("test_accuracy"))


def test_rebuilt_networks_have_exactly_the_recorded_accuracy(ds, task):
    for i in (0, DIGITS_K // 2, DIGITS_K - 1):
        net = ds.build_network(i, task=task)
        assert torch.equal(ds.layout.flatten(net), ds.vectors[i])
        for split in ("val", "test"):
            acc, loss = evaluate_network(net, task.data.split(split), task.data.prepare)
            assert acc == ds.rows[i][f"{split}_accuracy"]
            assert loss == pytest.approx(ds.rows[i][f"{split}_loss"], rel=1e-5)


def test_layout_to_state_dict_to_network(ds, task):
    """The documented manual path: vector -> named tensors -> state dict -> a plain network."""
    i = DIGITS_K - 1
    state = {**ds.base_state, **ds.layout.unflatten(ds.vectors[i])}
    net = task.build_network(state)
    acc, _ = evaluate_network(net, task.data.test, task.data.prepare)
    assert acc == ds.rows[i]["test_accuracy"]


def test_batched_evaluation_equals_one_by_one(ds, task):
    net = ds.build_network(0, task=task)
    scores = evaluate_vectors(net, ds.layout, ds.vectors, task.data.val, task.data.prepare, return_wrong=True)
    assert np.array_equal(scores.accuracy.numpy(), ds.column("val_accuracy"))
    # Chunking over networks and images does not change a count.
    small = evaluate_vectors(net, ds.layout, ds.vectors, task.data.val, task.data.prepare, batch_size=97, networks_per_chunk=5)
    assert torch.equal(small.accuracy, scores.accuracy)
    assert torch.allclose(small.loss, scores.loss, rtol=1e-5)
    assert torch.equal(1 - scores.wrong.double().mean(1), scores.accuracy)
    for i in range(0, DIGITS_K, 4):
        one = ds.build_network(i, task=task)
        acc, loss = evaluate_network(one, task.data.val, task.data.prepare)
        assert scores.accuracy[i].item() == acc
        assert scores.loss[i].item() == pytest.approx(loss, rel=1e-5)
        with torch.no_grad():
            predicted = one(task.data.prepare(task.data.val.images)).argmax(-1)
        assert torch.equal(scores.wrong[i], predicted != task.data.val.labels)


def test_validate_rejects_nan_and_inf(ds):
    ds.validate()  # the collected one is clean
    vectors = ds.vectors.clone()
    vectors[3, 5] = float("nan")
    vectors[7, 0] = float("inf")
    columns = {name: ds.column(name).tolist() for name in ("step", "seed", *METRICS)}
    bad = ParameterDataset.from_vectors(vectors, columns, ds.layout, ds.task_config, ds.base_state)
    with pytest.raises(InvalidParameterDatasetError, match=r"2 of 24 .*rows \[3, 7\]"):
        bad.validate()


def test_check_task_rejects_a_task_the_layout_does_not_fit(ds, task):
    ds.check_task(task)
    narrower = Task({**ds.task_config, "network": {"name": "small_cnn", "widths": [8, 16, 32]}})
    with pytest.raises(InvalidParameterDatasetError, match="does not fit task 'digits'"):
        ds.check_task(narrower)
    resnet_cfg = to_dict(load_config(["task=fake_cifar_resnet18", "task.data.train_size=32", "task.data.val_size=8", "task.data.test_size=8"]).task)
    with pytest.raises(InvalidParameterDatasetError, match="bn3.weight"):
        ds.check_task(Task(resnet_cfg))


def test_params_length_must_match_layout(ds):
    from pdiff.params import ParameterLayout

    with pytest.raises(InvalidParameterDatasetError, match="length 778"):
        ParameterDataset(ds.rows, ParameterLayout(["fc.bias"], [[10]]), ds.task_config, ds.base_state)


def test_existing_dataset_is_refused_and_overwrite_replaces_it(ds, tmp_path):
    target = tmp_path / "params"
    ds.save_to_disk(target)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        ds.save_to_disk(target)
    smaller = ParameterDataset(ds.rows.select(range(3)), ds.layout, ds.task_config, ds.base_state)
    smaller.save_to_disk(target, overwrite=True)
    assert len(ParameterDataset.from_pretrained(target)) == 3
    assert not _partials(tmp_path)


def test_a_file_in_the_way_is_refused_even_with_overwrite(ds, tmp_path):
    (tmp_path / "params").write_text("notes")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file"):
            ds.save_to_disk(tmp_path / "params", overwrite=overwrite)
    assert (tmp_path / "params").read_text() == "notes"
    assert [p.name for p in tmp_path.iterdir()] == ["params"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_nothing_under_the_final_name(ds, tmp_path, monkeypatch, exc):
    def fail_after_rows(self, folder):  # the rows are written, the side files are not
        assert any(folder.iterdir())
        raise exc

    monkeypatch.setattr(ParameterDataset, "_write_sidecars", fail_after_rows)
    with pytest.raises(type(exc)):
        ds.save_to_disk(tmp_path / "params")
    assert not (tmp_path / "params").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_dataset(ds, tmp_path, monkeypatch):
    target = tmp_path / "params"
    ds.save_to_disk(target)
    monkeypatch.setattr(ParameterDataset, "_write_sidecars", lambda self, folder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ds.save_to_disk(target, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(ParameterDataset.from_pretrained(target).vectors, ds.vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["params"]


def test_outputs_follow_the_umask(tmp_path):
    """Folders and files pdiff writes are as private or as shared as the user's umask says (not mkdtemp's 0700)."""
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "file").write_text("x")
        from pdiff.io import write_text

        write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644


def test_atomic_directory(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        (tmp / "a.txt").write_text("complete")
        assert not (tmp_path / "out").exists()  # nothing under the final name until it is complete
    assert (tmp_path / "out" / "a.txt").read_text() == "complete"
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_loading_broken_folders_fails_clearly(ds, digits_params, tmp_path):
    with pytest.raises(InvalidParameterDatasetError, match="pdiff collect"):
        ParameterDataset.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(digits_params, broken)
    (broken / pds.BASE_WEIGHTS_FILE).write_bytes((broken / pds.BASE_WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(InvalidParameterDatasetError, match="safetensors"):
        ParameterDataset.from_pretrained(broken)
    (broken / pds.BASE_WEIGHTS_FILE).unlink()
    with pytest.raises(InvalidParameterDatasetError, match="missing"):
        ParameterDataset.from_pretrained(broken)
    # Offline, a Hub id that is not in the cache and a mistyped path are both "not found", said plainly.
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        ParameterDataset.from_pretrained("nobody/no-such-params")
    with pytest.raises(FileNotFoundError, match="no parameter dataset folder at"):
        ParameterDataset.from_pretrained("outputs/digits/params")


def test_push_to_hub_uploads_the_hub_layout_in_one_commit(ds, monkeypatch):
    """The Hub itself is out of reach offline; check what is sent through the real HfApi methods."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload_folder"] = (repo_id, kwargs, sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
        calls["loaded"] = ParameterDataset.from_pretrained(folder)  # what `from_pretrained(repo_id)` will see
        return "https://huggingface.co/datasets/me/params/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert ds.push_to_hub("me/params", private=True).endswith("/commit/abc")
    assert calls["create_repo"] == ("me/params", {"repo_type": "dataset", "private": True, "exist_ok": True})
    repo_id, kwargs, files = calls["upload_folder"]
    assert repo_id == "me/params" and kwargs["repo_type"] == "dataset"
    assert files == ["README.md", pds.BASE_WEIGHTS_FILE, "data/train-00000-of-00001.parquet", pds.METADATA_FILE]
    assert torch.equal(calls["loaded"].vectors, ds.vectors)
