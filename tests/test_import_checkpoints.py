"""`pdiff import-checkpoints`: parameter datasets from checkpoint files and Hub repos, read safely."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from generator_helpers import write_malicious_pickle
from pdiff import ParameterDataset
from pdiff.config import load_config, to_dict
from pdiff.data import from_checkpoints
from pdiff.data.from_checkpoints import CheckpointError, import_checkpoints


@pytest.fixture(scope="module")
def originals(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def checkpoint_dir(originals, tmp_path_factory):
    """Every collected digits checkpoint as a full SmallCNN state dict in its own .safetensors file."""
    folder = tmp_path_factory.mktemp("runs")
    for i in range(len(originals)):
        state = originals.build_network(i).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"run-{i:03d}.safetensors"))
    return folder


def _task() -> dict:
    return to_dict(load_config(["task=digits"]).task)


def test_imported_vectors_are_the_files_bit_for_bit_and_scores_match(originals, checkpoint_dir):
    started = time.perf_counter()
    imported = import_checkpoints([str(checkpoint_dir / "*.safetensors")], _task())
    seconds = time.perf_counter() - started
    assert len(imported) == len(originals) and imported.layout == originals.layout
    assert torch.equal(imported.vectors, originals.vectors)  # bit for bit
    # The recorded scores are those of one-by-one evaluation (the collected columns were checked that way).
    for column in ("val_accuracy", "test_accuracy"):
        assert (imported.column(column) == originals.column(column)).all()
    assert imported.info["checkpoints_differing_outside_layout"] == 0
    print(f"imported {len(imported)} checkpoints in {seconds:.2f} s")


def test_pt_files_and_nested_state_dicts(originals, tmp_path):
    state = originals.build_network(3).state_dict()
    torch.save(state, tmp_path / "a.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "b.pth")
    imported = import_checkpoints([str(tmp_path / "a.pt"), str(tmp_path / "b.pth")], _task(), score=False)
    assert torch.equal(imported.vectors[0], originals.vectors[3]) and torch.equal(imported.vectors[1], originals.vectors[3])


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="evil.pt: refused: loading it would need to unpickle code"):
        import_checkpoints([str(tmp_path / "evil.pt")], _task())
    assert not marker.exists()


def test_wrong_architecture_names_the_file(originals, tmp_path, checkpoint_dir):
    from pdiff.tasks.networks import SmallCNN

    save_file(SmallCNN(1, 10, widths=(8, 16, 32)).state_dict(), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(CheckpointError, match=r"narrow.safetensors: tensor conv1.weight has shape \(8, 1, 3, 3\)"):
        import_checkpoints([str(checkpoint_dir / "run-000.safetensors"), str(tmp_path / "narrow.safetensors")], _task())
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="other.safetensors: not a checkpoint of this network"):
        import_checkpoints([str(tmp_path / "other.safetensors")], _task())


def test_non_finite_parameters_name_file_and_tensor(originals, tmp_path):
    state = originals.build_network(0).state_dict()
    state["fc.bias"][2] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="nan.safetensors: tensor fc.bias holds NaN or Inf"):
        import_checkpoints([str(tmp_path / "nan.safetensors")], _task())


def test_empty_glob_and_hub_repo_without_safetensors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no checkpoints given"):
        import_checkpoints([], _task())
    with pytest.raises(CheckpointError, match="no checkpoint file .* matches"):
        import_checkpoints([str(tmp_path / "*.safetensors")], _task())
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "pytorch_model.bin").write_bytes(b"pickle")
    monkeypatch.setattr(from_checkpoints.hub, "download", lambda *a, **k: tmp_path / "repo")
    with pytest.raises(CheckpointError, match="the Hub repo you/run-1 holds no .safetensors file"):
        import_checkpoints(["you/run-1"], _task())


def test_cli_writes_a_dataset_and_nothing_on_error(run_cli, checkpoint_dir, tmp_path):
    out = tmp_path / "mine"
    proc = run_cli("import-checkpoints", "--from", str(checkpoint_dir / "run-00*.safetensors"), "task=digits", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "10 checkpoints x 778 parameters" in proc.stdout and "imported in" in proc.stdout
    assert len(ParameterDataset.from_pretrained(out / "params")) == 10
    bad = tmp_path / "bad"
    proc = run_cli("import-checkpoints", "--from", str(tmp_path / "none-*.pt"), "task=digits", f"output_dir={bad}")
    assert proc.returncode == 2 and "no checkpoint file" in proc.stderr and not (bad / "params").exists()


def test_checkpoints_at_chance_on_the_named_task_get_a_note(originals, capsys):
    """Checkpoints of another task score at chance on the one named: imported, with a note that says so."""
    from pdiff.commands.import_checkpoints import warn_at_chance

    warn_at_chance(originals, "digits")
    assert capsys.readouterr().err == ""
    columns = {c: originals.column(c).tolist() for c in originals.rows.column_names if c != "params"}
    columns["val_accuracy"] = [0.1] * len(originals)
    at_chance = ParameterDataset.from_vectors(originals.vectors, columns, originals.layout, originals.task_config, originals.base_state,
                                              {**originals.info, "num_classes": 10})
    warn_at_chance(at_chance, "fashion_mnist")
    assert "note: the checkpoints score 0.100 on task fashion_mnist's validation split, about chance (0.10)" in capsys.readouterr().err


def test_one_checkpoint_given_twice_is_refused(checkpoint_dir):
    """Twice the same file would look like two checkpoints that agree exactly."""
    one = str(checkpoint_dir / "run-000.safetensors")
    with pytest.raises(CheckpointError, match="run-000.safetensors is given twice"):
        from_checkpoints.checkpoint_files([one, str(checkpoint_dir / "run-00*.safetensors")])


def test_a_file_as_the_score_cache_is_named(tmp_path, monkeypatch):
    from pdiff.evaluation.cache import cache_root

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="PDIFF_CACHE=.*file is a file: point it at a folder"):
        cache_root()
