"""The background worker that makes a feature set's UMAP spaces, and numba's cache warmer.

Kept apart from `imgcluster.spaces` (the maths, the in-process cache and the stored spaces):
this module is process management -- a worker process per feature set, found again by its
``flock`` (`imgcluster._process`), its progress file and its log -- while `spaces` only computes
and stores. The app calls `start_background` on every rerun and polls `space_status`; neither
loads a vector. (Both names are also reachable as ``imgcluster.spaces.start_background`` etc.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcluster import settings
from imgcluster._process import acquire, is_locked
from imgcluster.errors import Busy
from imgcluster.spaces import (
    BACKGROUND_METHODS,
    REFINED,
    REFINED_COMPONENTS,
    REFINED_N_NEIGHBORS,
    UMAP_MIN_N,
    _import_umap,
    _stored_file,
    compute_space,
    feature_state,
    umap_embed,
)
from imgcluster.workspace import Workspace, atomic_write

if TYPE_CHECKING:
    from imgcluster.images import Progress

__all__ = ["SpaceJob", "SpaceStatus", "space_status", "start_background", "warm_numba_cache"]


# -- the background worker --------------------------------------------------------------------


@dataclass
class SpaceJob:
    """A worker process making the UMAP spaces of one feature set (maybe another process's).

    The worker holds the ``flock`` on ``lock_path`` (`imgcluster._process`) while it runs; the
    kernel drops it however the worker dies, so "running" never trusts a pid. ``pid`` is -1
    for a worker another process started."""

    pid: int
    lock_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return is_locked(self.lock_path)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker exits (tests, CLI); True if it has exited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()


_jobs: dict[Path, SpaceJob] = {}


def _job_paths(workspace: Workspace, backbone: str, fsid: str) -> tuple[Path, Path, Path]:
    lock = workspace.runs_dir / f"spaces-{backbone}-{fsid}.lock"
    return lock, lock.with_suffix(".log"), lock.with_suffix(".progress")


def _missing(workspace: Workspace, backbone: str) -> tuple[str, list[str]]:
    """The feature set's identity and the background spaces not stored yet, in one read."""
    n, fsid = feature_state(workspace, backbone)  # memoised per revision: O(n) joins
    if n < UMAP_MIN_N:
        return fsid, []
    with workspace.read() as conn:
        missing = [
            m
            for m in BACKGROUND_METHODS
            if _stored_file(conn, workspace, backbone, m, fsid) is None
        ]
    return fsid, missing


def start_background(
    workspace: Workspace, backbone: str, *, retry: bool = False
) -> SpaceJob | None:
    """Make sure the UMAP spaces (refined, then the 2-D map) are stored or being made; never blocks.

    Idempotent, so the app may call it on every rerun (one cheap query when all is stored; no
    vectors are loaded here): returns None when both spaces are stored (or the set is too small
    for UMAP), the running job when one exists for this feature set (in this or another
    process, found by its lock), otherwise starts a worker process (numba
    holds the GIL, so a thread would freeze the app's server) and returns its job. A worker
    that failed is not restarted unless ``retry=True`` (`space_status` tells why it failed).
    """
    fsid, missing = _missing(workspace, backbone)
    if not missing:
        return None
    lock_path, log, progress_file = _job_paths(workspace, backbone, fsid)
    job = _jobs.get(lock_path)
    if job is not None and job.running():
        return job
    if is_locked(lock_path):
        return SpaceJob(-1, lock_path, log)
    if not retry and log.exists():
        return None  # a worker ran and failed (or was killed); the log says why
    try:
        lock = acquire(lock_path, wait=0, what=f"spaces {backbone}")
    except Busy:  # another process started one an instant ago
        return SpaceJob(-1, lock_path, log)
    args = json.dumps([str(workspace.path), backbone, str(progress_file)])
    try:
        with open(log, "wb") as log_fh:
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, args],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(lock.fileno(),),
            )
    except BaseException:
        lock.release()
        raise
    lock.handover()  # the worker holds the lock alone, until it exits
    job = SpaceJob(process.pid, lock_path, log, process)
    _jobs[lock_path] = job
    return job


_WORKER_CODE = (
    "import sys; from imgcluster.space_worker import _worker; sys.exit(_worker(sys.argv[1]))"
)


@dataclass(frozen=True)
class SpaceStatus:
    """Where a stored space stands. ``state`` is ``"ready"``, ``"running"``, ``"failed"``,
    ``"not started"`` or ``"unavailable"`` (too few images: the instant space serves)."""

    state: str
    fraction: float | None = None
    message: str = ""

    def __str__(self) -> str:
        if self.state == "failed":
            return f"failed: {self.message}"
        return self.state


def space_status(workspace: Workspace, backbone: str, method: str = REFINED) -> SpaceStatus:
    """Whether ``method``'s space of the current feature set is ready, being made (with the
    fraction done), failed (with the worker's last log line) or not started. No vectors read."""
    fsid, missing = _missing(workspace, backbone)
    if method not in missing:
        with workspace.read() as conn:
            ready = _stored_file(conn, workspace, backbone, method, fsid) is not None
        return SpaceStatus("ready" if ready else "unavailable", 1.0 if ready else None)
    lock, log, progress_file = _job_paths(workspace, backbone, fsid)
    job = _jobs.get(lock)
    if (job is not None and job.running()) or is_locked(lock):
        return SpaceStatus("running", _read_progress(progress_file, method))
    if log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return SpaceStatus("failed", None, lines[-1])
    return SpaceStatus("not started")


def _read_progress(path: Path, method: str) -> float | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = data.get(method)
    return float(value) if isinstance(value, (int, float)) else None


def _progress_writer(path: Path, method: str, done_before: dict[str, float]) -> Progress:
    """A callback recording ``method``'s fraction done in the job's progress file."""

    def write(done: int, total: int) -> None:
        done_before[method] = round(done / total, 3) if total else 0.0
        with contextlib.suppress(OSError):
            atomic_write(path, lambda fh: fh.write(json.dumps(done_before).encode()))

    return write


def _worker(args_json: str) -> int:
    """The background process (holding the job's lock): make every missing UMAP space."""
    workspace_path, backbone, progress_file = json.loads(args_json)
    try:
        workspace = Workspace(workspace_path)
        fsid, missing = _missing(workspace, backbone)
        fractions: dict[str, float] = {}
        for method in missing:
            writer = _progress_writer(Path(progress_file), method, fractions)
            compute_space(workspace, backbone, method, progress=writer, fsid=fsid)
            writer(1, 1)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(progress_file)
    return 0


# -- numba's cache ----------------------------------------------------------------------------


def warm_numba_cache(*, block: bool = False) -> subprocess.Popen[bytes] | None:
    """Compile umap's numba code into the on-disk cache, in a background process by default.

    The app's server calls this once when it starts, so the first real UMAP fit of the day
    does not pay for the compilation (bench/README.md: first-call time before and after). A
    marker per umap/numba version makes later calls return None at once.
    """
    marker = _warm_marker()
    if marker is None or marker.exists():
        return None
    process = subprocess.Popen(
        [sys.executable, "-c", "from imgcluster.space_worker import _warm; _warm()"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if block:
        process.wait()
    return process


def _warm_marker() -> Path | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = f"umap-{version('umap-learn')}-numba-{version('numba')}"
    except PackageNotFoundError:
        return None
    return settings.numba_cache_dir() / f"warm-{tag}.ok"


def _warm() -> None:
    """One small fit of each UMAP kind the library runs (cosine and, for big sets, Euclidean)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    umap_embed(x, REFINED_COMPONENTS, n_neighbors=REFINED_N_NEIGHBORS, min_dist=0.0)
    umap_embed(x, 2, progress=lambda done, total: None)
    # Big sets run Euclidean UMAP on a PCA reduction: other specialisations to compile.
    _import_umap().UMAP(n_components=2, metric="euclidean", random_state=0).fit_transform(x)
    marker = _warm_marker()
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok")
