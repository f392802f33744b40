"""One owner per run directory, atomic small-file writes, and one-line errors for failed writes.

* :func:`run_lock`: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` held while a process trains into the directory.
  The lock file holds the owner's PID. The operating system drops the lock when its owner exits, however it exits
  (kill -9 included), so a lock file left behind by a dead process does not block the next run; a second live
  process fails at once with :class:`~simdiff.train.errors.RunLockedError` naming the owner's PID. The owner
  removes the file when it finishes (a taker checks, after locking, that the file it locked is still the one at
  the path). The lock is re-entrant within one process (the experiment and its trainer both take it).
* Temporary files and folders are named ``.tmp-<name>-<pid>``. A writer removes only its own; entries whose PID no
  longer runs (left by a killed writer) are removed when the next owner takes the lock.
* :func:`atomic_write_bytes`: write a temporary file, ``fsync`` it, ``os.replace`` it over the target and ``fsync``
  the directory, so readers see the old or the new content, never a part.
* :func:`write_error`: an ``OSError`` met while writing (ENOSPC, EROFS, EACCES, ...) -> a one-line
  :class:`~simdiff.train.errors.RunDirError` naming the file, what to do, and the checkpoint the run resumes from.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from simdiff.train.errors import RunDirError, RunLockedError

__all__ = ["LOCK_NAME", "run_lock", "owned_run", "lock_holder", "temp_path", "atomic_write_bytes", "write_synced",
           "fsync_dir", "remove_stale_temps", "pid_alive", "write_error", "is_run_dir_error"]

LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_HELD: dict[str, list] = {}  # real path of a lock file this process holds -> [fd, depth]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- temp files
def temp_path(final: str | Path, pid: int | None = None) -> Path:
    """``final``'s temporary sibling ``.tmp-<name>-<pid>`` (this process's PID by default)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid() if pid is None else pid}")


def _temp_pid(name: str) -> int | None:
    if not name.startswith(TMP_PREFIX):
        return None
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove ``.tmp-*-<pid>`` entries of ``directory`` whose PID is this process's or no longer runs; return them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        pid = _temp_pid(entry.name)
        if pid is None or (pid != os.getpid() and pid_alive(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except OSError:
                continue
        removed.append(entry)
    return removed


def write_synced(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and ``fsync`` it; an ``OSError`` carries ``path`` as its ``filename``."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a directory (makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file + fsync + ``os.replace``); no temp file is left on error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------------ errors
def _resume_hint(run_dir: Path) -> str:
    from simdiff.train.checkpoint import list_checkpoints

    try:
        found = list_checkpoints(run_dir)
    except OSError:
        found = []
    if found:
        return f"the run is resumable: rerun the same command to continue from {found[-1].name} (intact)"
    return "the run is resumable: rerun the same command (no checkpoint yet, so it restarts from step 0)"


def write_error(e: OSError, *, run_dir: str | Path, what: str, path: str | Path | None = None,
                resumable: bool | None = True) -> RunDirError:
    """The one-line :class:`RunDirError` for ``e``, met while writing ``what`` (e.g. "metrics.csv") of ``run_dir``.

    ``path``: the file to name (default: ``e.filename``, else ``run_dir``). ``resumable``: add which checkpoint the
    same command resumes from (None: only when the run has a checkpoint, e.g. before anything was written)."""
    run_dir = Path(run_dir)
    target = path if path is not None else (e.filename if e.filename else run_dir)
    reason = (e.strerror or str(e)).splitlines()[0] if (e.strerror or str(e)) else type(e).__name__
    if e.errno in _NO_SPACE:
        fix = f"no space left on the device while writing {what}; free some space"
    elif e.errno in _NOT_WRITABLE:
        fix = f"cannot write {what} ({reason}); make {run_dir} writable or pass another --run-dir"
    else:
        fix = f"cannot write {what} ({reason}); check {run_dir} or pass another --run-dir"
    hint = _resume_hint(run_dir) if resumable is not False else None
    if resumable is None and hint is not None and "no checkpoint yet" in hint:
        hint = None
    return RunDirError(f"{target}: {fix}" + (f"; {hint}" if hint else ""))


def write_run_yaml(run_dir: str | Path, name: str, data: dict) -> None:
    """Write ``data`` as YAML to ``run_dir/name`` atomically; a failure is the one-line :func:`write_error`."""
    import yaml

    path = Path(run_dir) / name
    try:
        atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    except OSError as e:
        raise write_error(e, run_dir=run_dir, what=name, path=path) from None


def is_run_dir_error(e: OSError, run_dir: Path) -> bool:
    """Whether ``e`` came from writing into ``run_dir`` (or is a disk-full / read-only error with no file named)."""
    if e.filename:
        try:
            return Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(run_dir))
        except (TypeError, ValueError):
            return False
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


# -------------------------------------------------------------------------------------------------------- lock
def lock_holder(run_dir: str | Path) -> int | None:
    """The PID written in ``run_dir``'s lock file (None if there is none); says nothing about whether it is held."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _acquire(run_dir: Path, path: Path) -> int:
    """Open and lock ``path``; the descriptor. Retries when the file was removed or replaced by its previous owner
    between our open and our lock (then we would hold a lock on a file nobody else opens)."""
    import fcntl

    for _ in range(100):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(e, run_dir=run_dir, what=f"the lock file {LOCK_NAME}", path=path,
                              resumable=None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunLockedError(f"{run_dir}: in use by another simdiff process (PID {holder}, lock file {path}); "
                                 "wait for it to finish (or stop it) and rerun, or pass another --run-dir") from None
        except OSError as e:  # a file system without flock (some network mounts): go on unlocked, say so once
            print(f"simdiff: warning: {path}: cannot lock ({e.strerror}); nothing stops a second process from "
                  "writing to this run directory", file=sys.stderr)
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise RunLockedError(f"{run_dir}: the lock file {path} keeps changing; another process is starting and stopping "
                         "in this run directory")


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Own ``run_dir`` (created if missing) for the duration of the block; yields the lock file's path.

    Raises:
        RunLockedError: another live process holds the lock (one line with its PID).
        RunDirError: the directory cannot be created or written (one line).
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:  # re-entered by the same process
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fd = _acquire(run_dir, path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise write_error(e, run_dir=run_dir, what=f"the lock file {LOCK_NAME}", path=path,
                              resumable=None) from None
    _HELD[key] = [fd, 1]
    try:
        remove_stale_temps(run_dir)
        remove_stale_temps(run_dir / "checkpoints")
        yield path
    finally:
        del _HELD[key]
        try:
            path.unlink()  # while still locked: a cleanly finished run leaves no lock file
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the lock


def owned_run(run_dir: str | Path, body: Callable[[], T], *, rank: int = 0) -> T:
    """``body()`` with ``run_dir`` owned (:func:`run_lock`, taken by rank 0 only), so a second process stops before
    any data or model is loaded. A directory this call created is removed again when ``body`` fails before writing
    anything into it."""
    run_dir = Path(run_dir)
    created = rank == 0 and not run_dir.exists()
    try:
        with run_lock(run_dir) if rank == 0 else nullcontext():
            return body()
    except BaseException:
        if created:
            try:
                run_dir.rmdir()  # only succeeds when nothing was written
            except OSError:
                pass
        raise
