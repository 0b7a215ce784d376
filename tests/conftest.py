"""Shared test set-up: an offline, hermetic environment and one small parameter dataset for all modules.

The environment variables are set here, at import time, because huggingface_hub, datasets and wandb
read them when they are first imported, and pytest imports this file before any test module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="pdiff-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

# Offline by default: no test may reach the network, ask for a W&B key or block on a download.
for _key, _value in {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_key, _value)

# Hermetic: caches and task data live in a per-session folder, never in the user's ~/.cache. Task data
# that must exist offline (Fashion-MNIST) is staged into this root from Debian's package by pdiff itself.
os.environ["HF_HOME"] = str(_SCRATCH / "hf_home")
os.environ["HF_DATASETS_CACHE"] = str(_SCRATCH / "hf_home" / "datasets")
os.environ["WANDB_DIR"] = str(_SCRATCH / "wandb")
os.environ["PDIFF_DATA_DIR"] = str(_SCRATCH / "data")
os.environ["PDIFF_CACHE"] = str(_SCRATCH / "pdiff_cache")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# The small digits dataset every stage's tests build on: base network trained well enough (~97%
# accuracy) to be meaningful, K small enough to collect in a few seconds on 2 cores.
DIGITS_K = 24
DIGITS_OVERRIDES = ["task=digits", f"task.param.k={DIGITS_K}", "task.base.epochs=12", "task.param.warmup_steps=10", "cpu=true"]


def collect_dataset(output_dir: Path, *overrides: str):
    """Run `pdiff collect` in this process; returns the saved `ParameterDataset`."""
    from pdiff.collect import collect
    from pdiff.config import load_config

    return collect(load_config([f"output_dir={output_dir}", *overrides]))


def reset_accelerator_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerator_state():
    """In-process runs each build their own Accelerator (bf16 after fp32, train after collect), as separate
    processes would; use with `pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")`."""
    reset_accelerator_state()
    yield
    reset_accelerator_state()


@pytest.fixture(scope="session")
def digits_params(tmp_path_factory) -> Path:
    """Path of a parameter dataset folder (`save_to_disk` layout) collected once per session on digits.

    K=24 checkpoints of `bn3.*` + `fc.*` (778 numbers) of the SmallCNN, seed 0. Treat it as read-only:
    copy it (`shutil.copytree`) before changing anything in it.
    """
    out = tmp_path_factory.mktemp("digits")
    collect_dataset(out, *DIGITS_OVERRIDES)
    return out / "params"


@pytest.fixture
def run_cli():
    """Run the real `pdiff` console script in a subprocess: `run_cli("collect", "task.param.k=0")`.

    Returns the `subprocess.CompletedProcess` (text mode, stdout/stderr captured); runs in the
    repository root with the test environment, no stdin, and a 15-minute limit (a busy machine is slow).
    """

    def run(*args: str, cwd: Path | str | None = None, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("pdiff")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pdiff"]
        return subprocess.run(
            [*cmd, *args], cwd=cwd or REPO_ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )

    return run
