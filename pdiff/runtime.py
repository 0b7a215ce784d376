"""Where and how pdiff computes: the device a command runs on, how many CPU threads it uses, and how
the C allocator keeps memory it frees."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU. A device that is not there is an error now,
    not a CUDA traceback later."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: pdiff runs on cpu or cuda")
    return resolved


def free_memory(device: torch.device) -> int:
    """Bytes free now: on the GPU, the CUDA driver's count; on the CPU, what the OS can give without swapping."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse now, with the numbers, parameter vectors that cannot fit in this machine's memory (they gather on the CPU)."""
    free = free_memory(torch.device("cpu"))
    if nbytes > 0.8 * free:
        raise ValueError(f"{what} need {nbytes / 1e9:.3g} GB and {free / 1e9:.3g} GB of memory are free here; {fix}")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA GPUs with bf16 units, CPUs with AVX512-BF16 or AMX. Elsewhere
    bf16 is emulated and slower than float32. (On the 2-core AVX512-BF16 machine of the README it made the
    autoencoder step 1.9x and the denoiser step 1.1x faster.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# -- threads ----------------------------------------------------------------------------------------
#
# torch's default, one OpenMP thread per core, collapses when several processes share the cores: idle
# OpenMP threads spin while waiting for descheduled siblings. Measured on 2 cores, 4 digits trainings
# at once ran at ~1 step/s each with the default and kept their aggregate throughput with one thread
# each. So pdiff counts the cores that other processes keep busy and uses only the rest (at least one),
# and checks again now and then while training. OMP_NUM_THREADS, when set, always wins.

RECHECK_SECONDS = 10.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_elsewhere(samples: int = 5, interval: float = 0.01) -> int:
    """Threads of other processes that are running or waiting to run right now (Linux; 0 elsewhere)."""
    counts = []
    for _ in range(samples):
        try:
            runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, runnable - _own_runnable_threads()))
        time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def _own_runnable_threads() -> int:
    count = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            count += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return count


def fair_thread_count() -> int:
    """The cores nobody else is using, at least one."""
    return max(1, available_cores() - busy_elsewhere())


class ThreadPolicy:
    """Sets torch's thread count to the fair share now, and again every RECHECK_SECONDS when `update` is called."""

    def __init__(self):
        self.fixed = "OMP_NUM_THREADS" in os.environ
        self._checked = 0.0
        self.update()

    def update(self) -> None:
        if self.fixed or time.monotonic() - self._checked < RECHECK_SECONDS:
            return
        self._checked = time.monotonic()
        threads = fair_thread_count()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


# -- memory ----------------------------------------------------------------------------------------

# glibc hands large freed blocks straight back to the OS (munmap, heap trimming), so the next tensor of
# the same size is faulted in again page by page. pdiff's loops allocate the same activations over and
# over: scoring 20 whole Fashion-MNIST networks took 4.95 M page faults and 12 s of system time in 19 s,
# and 0.12 M faults, 0.5 s of system time and 11 s in all once freed memory was kept (training loops
# gain too: the whole-network base training ran at 47 instead of 26 steps/s). Blocks up to
# MMAP_THRESHOLD now come from the heap, and the heap is not trimmed. The cost: a process keeps its
# peak memory until it exits, which a pdiff command does soon after.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for this setting on 64-bit


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the OS (glibc only; a no-op
    elsewhere). Returns whether the allocator took the settings."""
    name = ctypes.util.find_library("c")
    if os.name != "posix" or name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
