"""The generator (and parameter dataset) on the Hub: push, download, cache, offline, revisions.

Everything goes through the real `huggingface_hub` client against `FakeHub`, an HTTP server on
127.0.0.1 (tests/hub_fake.py). The client reads its endpoint, cache and offline flag from
`huggingface_hub.constants` at call time (the environment only at import), so the `hub` fixture patches
those; `test_offline_cli_uses_the_cache` runs the real `pdiff` command with the environment variables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from generator_helpers import sample, tiny_generator, write_malicious_pickle
from hub_fake import FakeHub
from pdiff import ParameterDataset, PDiffPipeline
from pdiff.evaluation import Report, evaluate_and_write

GENERATOR_FILES = {
    "model_index.json", "README.md",
    "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "target/config.json", "target/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub; the client points at it, online, with an empty cache of its own."""
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield fake


def go_offline(monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def dataset(digits_params) -> ParameterDataset:
    return ParameterDataset.from_pretrained(digits_params)


@pytest.fixture(scope="module")
def pipe(dataset) -> PDiffPipeline:
    return tiny_generator(dataset)


@pytest.fixture(scope="module")
def evaluation(pipe, dataset, tmp_path_factory) -> tuple[Report, list[Path]]:
    """A real pdiff evaluation report of 6 generated networks, and its PNG plots."""
    report, paths = evaluate_and_write(dataset, sample(pipe, 0, num_models=6), tmp_path_factory.mktemp("report"), noise_scales=[1.0], num_noise_models=6)
    return report, sorted(p for p in paths.values() if str(p).endswith(".png"))


# -- push ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xet", [True, False], ids=["xet-installed", "xet-disabled"])
def test_push_uploads_only_shareable_files_and_the_model_card(hub, monkeypatch, pipe, evaluation, xet):
    # With hf_xet installed (the default) upload_folder takes the streamed pipeline; without, create_commit.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    report, plots = evaluation
    assert plots
    url = pipe.push_to_hub("user/tiny-gen", report=report, plots=plots)
    assert url.endswith(hub.head("user/tiny-gen"))
    assert ("POST", "/api/repos/create") in hub.requests and ("POST", "/api/models/user/tiny-gen/commit/main") in hub.requests

    files = hub.files("user/tiny-gen")
    uploaded = set(hub.uploads[-1]["files"])
    assert uploaded == GENERATOR_FILES | {"report.json"} | {p.name for p in plots}
    assert set(files) == uploaded | {".gitattributes"}
    assert all(p.endswith((".json", ".safetensors", ".png", "README.md")) for p in uploaded)
    assert json.loads(files["report.json"]) == report.to_dict()

    card = files["README.md"].decode()
    meta = ModelCard(card).data
    assert "pdiff" in meta.tags and meta.library_name == "pdiff"
    assert "# pdiff generator: digits" in card
    assert "778 parameters" in card.replace(",", "")  # the generated parameter count
    assert f"Generator size: {sum(p.numel() for m in (pipe.unet, pipe.autoencoder) for p in m.parameters()):,} parameters" in card
    gen = report.generated
    assert f"| generated | 6 | {gen.val.mean:.4f} | {gen.val.best:.4f} | {gen.best_on_val.test_accuracy:.4f} | {gen.test.mean:.4f} |" in card
    assert "| original checkpoints | 24 |" in card and "| weight average of the originals | 1 |" in card and "noise x1" in card
    assert f"**Verdict:** {report.verdict.text}" in card and f"**Verdict:** {report.average_verdict.text}" in card
    assert "| weight average + noise x1 (spread) |" in card
    assert f"generated<->generated IoU {report.generated_generated.iou.mean:.3f}, originals<->originals {report.originals.novelty.iou.mean:.3f}" in card
    assert all(f"![{p.name}]({p.name})" in card for p in plots)


def test_card_without_report_says_so(hub, pipe):
    pipe.push_to_hub("user/no-report")
    card = hub.files("user/no-report")["README.md"].decode()
    assert "No evaluation report was saved with this generator." in card and "| generated |" not in card
    assert set(hub.uploads[-1]["files"]) == GENERATOR_FILES


def test_save_pretrained_push_skips_checkpoints_and_pickles(hub, pipe, tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints" / "step-100").mkdir(parents=True)
    (folder / "checkpoints" / "step-100" / "optimizer.pt").write_bytes(b"not for the hub")
    (folder / "checkpoints" / "step-100" / "model.safetensors.tmp").write_bytes(b"partial")
    (folder / "train.log").write_text("log")
    write_malicious_pickle(folder / "unet" / "diffusion_pytorch_model.bin", tmp_path / "marker")
    pipe.save_pretrained(folder, push_to_hub=True, repo_id="user/from-folder", commit_message="first")
    assert set(hub.uploads[-1]["files"]) == GENERATOR_FILES
    assert hub.uploads[-1]["summary"] == "first"


# -- download, cache, offline ------------------------------------------------------------------------


def test_download_caches_and_loads_offline(hub, monkeypatch, pipe, tmp_path):
    pipe.push_to_hub("user/tiny-gen")
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    pickle_path = tmp_path / "evil.bin"
    write_malicious_pickle(pickle_path, marker)
    HfApi().upload_file(path_or_fileobj=str(pickle_path), path_in_repo="unet/diffusion_pytorch_model.bin", repo_id="user/tiny-gen")
    hub.requests.clear()

    loaded = PDiffPipeline.from_pretrained("user/tiny-gen")
    assert torch.equal(sample(loaded, 0), sample(pipe, 0))
    downloaded = {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert downloaded == GENERATOR_FILES - {"README.md"}  # configs and safetensors only: never the pickle
    assert not marker.exists()

    # The real cache layout: models--user--tiny-gen/{refs/main, snapshots/<commit>/...}.
    repo_cache = Path(constants.HF_HUB_CACHE) / "models--user--tiny-gen"
    commit = (repo_cache / "refs" / "main").read_text()
    assert commit == hub.head("user/tiny-gen")
    snapshot = repo_cache / "snapshots" / commit
    assert {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()} == GENERATOR_FILES - {"README.md"}

    go_offline(monkeypatch)
    hub.requests.clear()
    offline = PDiffPipeline.from_pretrained("user/tiny-gen")
    assert hub.requests == []  # not one request
    assert torch.equal(sample(offline, 0), sample(pipe, 0))
    with pytest.raises(FileNotFoundError, match=r"'user/never-downloaded'.*not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        PDiffPipeline.from_pretrained("user/never-downloaded")
    with pytest.raises(FileNotFoundError, match=r"'user/tiny-gen' \(revision v2\).*HF_HUB_OFFLINE=1"):
        PDiffPipeline.from_pretrained("user/tiny-gen", revision="v2")
    assert hub.requests == []


def test_revisions_and_missing_repos(hub, pipe, dataset):
    pipe.push_to_hub("user/tiny-gen")
    first = hub.head("user/tiny-gen")
    retrained = tiny_generator(dataset, seed=1)
    retrained.push_to_hub("user/tiny-gen", commit_message="retrained")
    assert hub.head("user/tiny-gen") != first

    assert torch.equal(sample(PDiffPipeline.from_pretrained("user/tiny-gen"), 0), sample(retrained, 0))
    assert torch.equal(sample(PDiffPipeline.from_pretrained("user/tiny-gen", revision=first), 0), sample(pipe, 0))
    with pytest.raises(FileNotFoundError, match=r"'user/tiny-gen' \(revision no-such-branch\): the revision does not exist"):
        PDiffPipeline.from_pretrained("user/tiny-gen", revision="no-such-branch")
    with pytest.raises(FileNotFoundError, match=r"'user/tiny-gen' \(revision 0{40}\): the revision does not exist"):
        PDiffPipeline.from_pretrained("user/tiny-gen", revision="0" * 40)
    with pytest.raises(FileNotFoundError, match=r"'user/nobody-made-this' \(revision main\) was not found"):
        PDiffPipeline.from_pretrained("user/nobody-made-this")
    with pytest.raises(FileNotFoundError, match="neither an existing generator folder nor a valid Hub repo id"):
        PDiffPipeline.from_pretrained("not a repo!")


def test_offline_cli_uses_the_cache(hub, pipe, tmp_path, run_cli):
    """What a user does: download once, then `HF_HUB_OFFLINE=1 pdiff sample --model user/name` (env vars, real process)."""
    pipe.push_to_hub("user/tiny-gen")
    PDiffPipeline.from_pretrained("user/tiny-gen")  # fills the cache
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": constants.HF_HUB_CACHE, "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = tmp_path / "samples"
    done = run_cli("sample", "--model", "user/tiny-gen", "--num-models", "2", "--steps", "4", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["network-00000.safetensors", "network-00001.safetensors", "pdiff_networks.json"]


def test_offline_cli_names_a_missing_repo(hub, monkeypatch, tmp_path, capsys):
    from pdiff.commands import main as cli

    go_offline(monkeypatch)
    assert cli(["sample", "--model", "user/absent", "--num-models", "2", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "'user/absent'" in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert hub.requests == []


# -- parameter datasets ------------------------------------------------------------------------------


def test_parameter_dataset_push_and_download(hub, dataset):
    url = dataset.push_to_hub("user/digits-params")
    assert "datasets/user/digits-params" in url
    assert set(hub.files("user/digits-params", repo_type="dataset")) == {
        ".gitattributes", "README.md", "pdiff_dataset.json", "base_model.safetensors", "data/train-00000-of-00001.parquet",
    }
    card = hub.files("user/digits-params", repo_type="dataset")["README.md"].decode()
    assert "24 checkpoints of 778 parameters" in card
    loaded = ParameterDataset.from_pretrained("user/digits-params")
    assert torch.equal(loaded.vectors, dataset.vectors) and loaded.layout == dataset.layout
    assert loaded.rows.features == dataset.rows.features
