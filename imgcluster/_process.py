"""One crash-recovery lock scheme for every job that leaves files on disk.

A job (an ingest, an extraction, a background projection, an export build, a zip) holds an
exclusive ``flock`` on a lock file for as long as it runs. The kernel drops the lock when the
process dies, however it dies (SIGKILL included), so "is that job still running?" is answered
by trying the lock, never by a pid that may have been reused, and a leftover of a killed job
(a half-built folder, ``.tmp`` files) is cleaned by whoever next takes the lock.

The lock file holds a line of text for people (``pid 123 ingest``); its content is never
trusted. Lock files are not deleted on release (deleting a lock file races with a second
opener); they are a few bytes each.

API
---
``acquire(path, wait=0, what="")`` -> `JobLock` (raises `Busy`), ``job_lock(...)`` its context
manager, ``is_locked(path)``, ``holder(path)``, ``JobLock.handover()`` (give the lock to a
child process started with ``pass_fds=(lock.fileno(),)``), ``clean_unlocked(lock, *paths)``
and `pid_alive`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from imgcluster.errors import Busy, WorkspaceReadOnly

try:
    import fcntl
except ImportError:  # Windows: fall back to a pid in the file (best effort)
    fcntl = None  # type: ignore[assignment]

_POLL_S = 0.05
_FIRST_POLL_S = 0.002


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (kept for callers; prefer `is_locked`)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class JobLock:
    """An exclusive lock held on ``path`` until `release` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def fileno(self) -> int:
        """The locked descriptor, for ``subprocess.Popen(pass_fds=...)``."""
        if self._fd is None:
            raise ValueError(f"lock {self.path} is released")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock now (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                os.ftruncate(fd, 0)
        os.close(fd)

    def handover(self) -> None:
        """Close this process's descriptor *without* unlocking: a child that inherited it
        (``pass_fds``) now holds the lock alone, until it exits."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its object
        with contextlib.suppress(Exception):
            self.release()


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise WorkspaceReadOnly(
                f"cannot write {path.parent} ({exc.strerror.lower()}); "
                "the folder is read-only: edits are disabled"
            ) from exc
        raise


def _try(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
    text = os.pread(fd, 64, 0).decode(errors="replace").split()
    pid = int(text[1]) if len(text) > 1 and text[1].isdigit() else 0
    return pid == os.getpid() or not pid_alive(pid)


def acquire(path: str | os.PathLike[str], *, wait: float | None = 0, what: str = "") -> JobLock:
    """Take the lock on ``path`` (created if missing).

    Parameters
    ----------
    wait : float or None
        Seconds to wait for another holder (0: not at all, None: for ever).
    what : str
        Shown to people in `Busy` and `holder` (``"ingest"``, ``"extract efficientnet-lite0"``).

    Raises
    ------
    Busy
        Another live process holds it after ``wait`` seconds; the message says who.
    WorkspaceReadOnly
        The lock file cannot be created (read-only folder).
    """
    path = Path(path)
    fd = _open(path)
    deadline = None if wait is None else time.monotonic() + wait
    pause = _FIRST_POLL_S
    try:
        while not _try(fd):
            if deadline is not None and time.monotonic() >= deadline:
                who = holder(path) or "another process"
                raise Busy(
                    f"{what or 'this job'} is already running ({who}, lock {path}); "
                    "wait for it to finish"
                )
            time.sleep(pause)
            pause = min(_POLL_S, pause * 2)
        note = f"pid {os.getpid()} {what}".strip() + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return JobLock(path, fd)


@contextlib.contextmanager
def job_lock(
    path: str | os.PathLike[str], *, wait: float | None = 0, what: str = ""
) -> Iterator[JobLock]:
    """``with job_lock(ws.path / "ingest.lock", wait=None, what="ingest"):`` (see `acquire`)."""
    lock = acquire(path, wait=wait, what=what)
    try:
        yield lock
    finally:
        lock.release()


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether a live process holds the lock on ``path`` right now (False if no such file).

    Never blocks and never creates the file. (Testing takes the lock for an instant when it is
    free, so two testers never both see "free" while a holder exists.)
    """
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if not _try(fd):
            return True
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def holder(path: str | os.PathLike[str]) -> str | None:
    """The note the current holder wrote (``"pid 123 ingest"``), or None if not locked."""
    if not is_locked(path):
        return None
    try:
        return Path(path).read_text(errors="replace").strip() or None
    except OSError:
        return None


def clean_unlocked(lock_path: str | os.PathLike[str], *paths: str | os.PathLike[str]) -> bool:
    """Delete ``paths`` (files or folders) left by a job whose lock is free, then the lock.

    For per-job lock files with unique names (``.OUT.export-XXXX.lock``); a lock shared by all
    runs of a job (``ingest.lock``) is kept and its leftovers cleaned under `job_lock`.

    Returns False (nothing deleted) when a live process holds the lock. The lock is taken
    while deleting, so a job starting at that moment waits for nothing half-deleted.
    """
    try:
        lock = acquire(lock_path, wait=0)
    except Busy:
        return False
    with lock:
        for item in map(Path, paths):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        Path(lock_path).unlink(missing_ok=True)
    return True
