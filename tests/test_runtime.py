"""pdiff/runtime.py: the device resolver and the CPU thread policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pdiff import runtime


def test_thread_policy_uses_the_cores_nobody_else_uses(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    before = torch.get_num_threads()
    try:
        for busy, expected in ((0, 8), (3, 5), (7, 1), (20, 1)):
            monkeypatch.setattr(runtime, "busy_elsewhere", lambda busy=busy: busy)
            runtime.ThreadPolicy()
            assert torch.get_num_threads() == expected
        policy = runtime.ThreadPolicy()
        monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 0)
        policy.update()  # within RECHECK_SECONDS of the last check: unchanged
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(runtime.time, "monotonic", lambda: 1e12)
        policy.update()
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_always_wins():
    code = "import torch; from pdiff.runtime import ThreadPolicy; p = ThreadPolicy(); p.update(); print(p.fixed, torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout
    assert out.split() == ["True", "1"]  # not the 2 cores of this machine


def test_busy_elsewhere_counts_other_processes():
    """A busy child process is seen as busy; this process's own threads are not counted."""
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("Linux only")
    idle = runtime.busy_elsewhere()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        assert runtime.busy_elsewhere(samples=9) >= min(idle + 1, 1)
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("device, message", [("bogus", "not a device"), ("meta", "pdiff runs on cpu or cuda")])
def test_resolve_device_refuses_what_is_not_there(device, message):
    with pytest.raises(ValueError, match=message):
        runtime.resolve_device(device)
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(None).type in ("cpu", "cuda")


def test_auto_mixed_precision_follows_the_launcher_else_native_bf16(monkeypatch):
    import pdiff.train as train_script
    from pdiff.config import load_config

    cfg = load_config(["cpu=true"])
    assert cfg.train.mixed_precision == "auto"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(train_script, "native_bf16", lambda device: True)
    assert train_script.mixed_precision(cfg) == "bf16"
    monkeypatch.setattr(train_script, "native_bf16", lambda device: False)
    assert train_script.mixed_precision(cfg) == "no"  # emulated bf16 would be slower than float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert train_script.mixed_precision(cfg) == "fp16"
    assert train_script.mixed_precision(load_config(["cpu=true", "train.mixed_precision=no"])) == "no"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_retain_freed_memory_settings():
    """mallopt returns 0 for a value it refuses (e.g. an mmap threshold above glibc's 32 MB ceiling); the
    speed-up it buys (NOTES: page faults took most of batched evaluation's CPU time) is in `pdiff bench`."""
    assert runtime.retain_freed_memory()
