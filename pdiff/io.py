"""Files that are complete or absent: atomic writes, output folders that refuse to be clobbered, run locks.

Every file or folder pdiff writes goes through here, so an interrupted run never leaves something
under the final name that looks complete, and two runs never write into one output folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".pdiff.lock"
PARTIAL_MARK = ".partial-"


class OutputError(OSError):
    """An output path that cannot be written (exists, read-only, full disk, locked by another run)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def check_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "output", flag: str = "overwrite=true",
                     elsewhere: str = "output_dir=") -> None:
    """Refuse, before any work is done, to write where something already lives unless told to (`flag`);
    `elsewhere` names the setting that picks another place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; choose another directory for the {what}")
    if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already holds a {what} (or other files); pass {flag} to replace it, or another {elsewhere}")
    check_writable(path.parent if not path.exists() else path)


def check_apart(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str = "--out") -> None:
    """Refuse an output that is one of the run's inputs or holds one: replacing it would delete what the run reads."""
    target = Path(out).resolve()
    for name, value in inputs.items():
        if value and Path(value).exists() and (Path(value).resolve() == target or target in Path(value).resolve().parents):
            raise ValueError(f"{flag} {out} would replace {name} {value}, which this run reads; choose another {flag}")


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path`, or the closest of its parents that exists: where a new output would be created."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, naming the folder, if nothing can be written under `path` (or its nearest existing parent)."""
    path = nearest_existing(path)
    if not path.is_dir():
        raise OutputError(errno.ENOTDIR, f"{path} is a file, not a folder: choose an output folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"{path} is not writable: choose an output folder you can write to")


@contextlib.contextmanager
def friendly_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or a read-only file system into one line that names the path."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise OutputError(err.errno, f"could not write {path}: {os.strerror(err.errno)}; free space or choose another output folder") from err
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL_MARK}{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is shared like any folder the user makes
    try:
        with friendly_os_errors(path):
            yield tmp
            if not overwrite and path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
                # another run finished it while this one worked: keep theirs, say so (only --overwrite replaces)
                raise OutputError(errno.EEXIST, f"{path} was written by another run meanwhile; nothing replaced it. Choose another output folder")
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_partials(path: Path) -> None:
    """Remove `.NAME.partial-PID-*` folders that a killed process left beside `path`."""
    for partial in path.parent.glob(f".{path.name}{PARTIAL_MARK}*"):
        pid = partial.name[len(f".{path.name}{PARTIAL_MARK}") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write to; on success it replaces `path`, on error it is removed.

    Readers see the old content or the new, never half of it. The name is private to this process and
    call, so several processes (ranks) may write the same file at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with friendly_os_errors(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:  # open() keeps the umask's file mode
            f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged one is an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or write it again") from err


# -- locks --------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold `<folder>/.pdiff.lock` (PID and host) for the duration of a run; a second run fails at once.

    A lock whose process is gone (same host, PID not alive) is stale and taken over, so a run killed
    with -9 never blocks the next one.
    """
    folder = Path(folder)
    check_writable(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder and holder.get("host") == owner["host"] and not _alive(int(holder.get("pid", -1))):
                lock.unlink(missing_ok=True)  # stale: its process died
                continue
            raise OutputError(errno.EBUSY, f"{folder} is in use by another run ({_describe(holder)}); wait for it, or choose another output folder")
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        break
    try:
        yield lock
    finally:
        if (_read_lock(lock) or {}).get("pid") == owner["pid"]:
            lock.unlink(missing_ok=True)
        if created:  # a run that stopped before writing leaves no empty folder under the output name
            with contextlib.suppress(OSError):
                folder.rmdir()


def _read_lock(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return f"see {LOCK_FILE}"
    return f"pdiff {holder.get('command', '?')}, pid {holder.get('pid')} on {holder.get('host')}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
