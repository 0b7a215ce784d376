"""The README's "Use your own model": a network in the user's own file, a local image folder, the CLI only.

The README's code and commands run here exactly as written (in a fresh project folder, with images
made for the test); then the generator is copied elsewhere and evaluated in a fresh process, given
the data path on the command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SECTION = (REPO / "README.md").read_text().split("## Use your own model", 1)[1].split("\n## ", 1)[0]
MODEL_CODE = re.search(r"```python\n(# my_model.py.*?)```", SECTION, flags=re.S).group(1)
MAKE_IMAGES = re.search(r"```python\n(# make_images.py.*?)```", SECTION, flags=re.S).group(1)
COMMANDS = re.search(r"```bash\n(.*?)```", SECTION, flags=re.S).group(1)


def make_images(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """Three learnable classes of 16x16 RGB images: one bright colour channel each, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, channel in (("red", 0), ("green", 1), ("blue", 2)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, size=(16, 16, 3))
                pixels[..., channel] += rng.integers(60, 135)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_the_readmes_image_script_writes_an_image_folder(tmp_path):
    """The README's make_images.py, as written: scikit-learn's digits as images/{train,test}/<class>/*.png."""
    (tmp_path / "make_images.py").write_text(MAKE_IMAGES)
    proc = subprocess.run([sys.executable, "make_images.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {split: len(list((tmp_path / "images" / split).glob("*/*.png"))) for split in ("train", "test")}
    assert counts == {"train": 1437, "test": 360}
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [str(d) for d in range(10)]


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The README's worked example, run as written in a project folder of its own."""
    root = tmp_path_factory.mktemp("my_project")
    (root / "my_model.py").write_text(MODEL_CODE)
    make_images(root / "images", {"train": 40, "test": 12})
    proc = subprocess.run(["bash", "-e", "-c", COMMANDS], cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (root / "log.txt").write_text(proc.stdout)
    return root


def test_the_worked_example_runs_end_to_end(project):
    out = project / "outputs" / "mine"
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["generated"]["count"] == 50 and report["originals"]["count"] == 50
    target = json.loads((out / "generator" / "target" / "config.json").read_text())
    assert target["network"] == {"_target_": "my_model.TinyNet", "hidden": 16}
    assert target["task"]["data"]["name"] is None  # the local folder is not recorded in the generator
    assert "verdict:" in (project / "log.txt").read_text()


def test_a_copied_generator_evaluates_elsewhere_given_the_data(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(project / "outputs" / "mine" / "generator", elsewhere / "gen")
    shutil.copy(project / "my_model.py", elsewhere / "my_model.py")
    env = {**_env(elsewhere), "PYTHONPATH": str(elsewhere)}
    base = [sys.executable, "-m", "pdiff", "sample", "--model", "gen", "--num-models", "8", "--evaluate", "--format", "dataset"]
    proc = subprocess.run([*base, "--out", "s1"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pass the folder (or Hub id) with `--data PATH`" in proc.stderr
    proc = subprocess.run([*base, "--out", "s2", "--data", str(project / "images")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val accuracy" in proc.stdout or "accuracy" in proc.stdout


def test_without_the_module_the_error_says_what_to_install(project, tmp_path):
    shutil.copytree(project / "outputs" / "mine" / "generator", tmp_path / "gen")
    proc = subprocess.run([sys.executable, "-m", "pdiff", "sample", "--model", "gen", "--num-models", "2", "--out", "s"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "cannot import task.network._target_=my_model.TinyNet" in proc.stderr and "PYTHONPATH" in proc.stderr


def test_a_hub_generator_with_user_code_needs_trust(project, monkeypatch):
    """Loading by Hub id imports the network's module only with trust_network_code=True; a local folder is trusted."""
    from pdiff import PDiffPipeline
    from pdiff.pipelines import pipeline_pdiff
    from pdiff.tasks.networks import UntrustedNetworkError

    generator = project / "outputs" / "mine" / "generator"
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setattr(pipeline_pdiff, "resolve_folder", lambda name, **kwargs: generator)  # "you/tiny" as if downloaded
    imported = set(sys.modules)
    with pytest.raises(UntrustedNetworkError, match="builds its network with my_model.TinyNet, which would import the module 'my_model'"):
        PDiffPipeline.from_pretrained("you/tiny")
    assert "my_model" not in set(sys.modules) - imported  # refused before anything was imported
    pipe = PDiffPipeline.from_pretrained("you/tiny", trust_network_code=True)
    assert type(pipe.target.net).__name__ == "TinyNet"
    assert PDiffPipeline.from_pretrained(str(generator)).target.layout.dim == pipe.target.layout.dim
