"""The 2-D map of a feature set: UMAP (cosine, seeded), with PCA as the instant stand-in.

A projection depends only on the feature set, never on k, so it is computed once per
*fingerprint* (backbone + image ids + count, `imgcluster.clustering.fingerprint`) and stored
(``projections`` row + ``.npy`` of coordinates in ``ws.runs_dir``, rows in `load_features`
order). UMAP's numba compilation costs about a minute in a fresh process, so the app never
waits for it: `start_background_projection` runs UMAP in a separate process (numba holds the
GIL, so a thread would freeze the app's server), and `get_projection` returns the stored PCA
map, marked not ready, until the UMAP map is stored.

Run the worker by hand with ``python -m imgcluster.projection WS BACKBONE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imgcluster._process import pid_alive
from imgcluster.clustering import fingerprint, pca_reduce
from imgcluster.features import FeatureMatrix, l2_normalize, load_features
from imgcluster.workspace import Workspace, atomic_write

METHODS = ("umap", "pca")

#: UMAP settings of the 2-D map. Cosine on the L2-normalised vectors; for big sets the vectors
#: are first reduced by PCA to `UMAP_PCA_DIMS` (then Euclidean, which on the centred reduction
#: of unit vectors stands in for cosine): nearest-neighbour search in 1280 dims dominates.
UMAP_N_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1
UMAP_PCA_DIMS = 50
UMAP_PCA_MIN_N = 5_000

#: Below this many images UMAP has too few neighbours to mean anything: PCA is the map.
UMAP_MIN_N = 8


class Projection(NamedTuple):
    """2-D coordinates aligned with ``image_ids`` (the `load_features` order).

    ``ready`` is False while ``method`` is the PCA stand-in for a UMAP map still being made.
    """

    coords: np.ndarray  # float32 (n, 2)
    method: str
    ready: bool
    image_ids: np.ndarray  # int64 (n,)


def umap_embed(
    vectors: np.ndarray,
    n_components: int = 2,
    *,
    seed: int = 0,
    n_neighbors: int = UMAP_N_NEIGHBORS,
    min_dist: float = UMAP_MIN_DIST,
) -> np.ndarray:
    """Seeded UMAP of L2-normalised vectors (PCA first for big sets); float32 ``(n, c)``.

    A fixed ``random_state`` makes umap single-threaded but reproducible.
    """
    import warnings

    x = l2_normalize(vectors)
    metric = "cosine"
    if len(x) >= UMAP_PCA_MIN_N and x.shape[1] > UMAP_PCA_DIMS:
        x = pca_reduce(x, UMAP_PCA_DIMS, seed=seed)
        metric = "euclidean"
    umap = _import_umap()
    model = umap.UMAP(
        n_components=n_components,
        n_neighbors=max(2, min(n_neighbors, len(x) - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        init="spectral" if len(x) > n_components + 1 else "random",
    )
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state": determinism is the point.
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        return model.fit_transform(x).astype(np.float32)


def _import_umap():  # type: ignore[no-untyped-def]
    import umap

    return umap


def pca_2d(vectors: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The instant map: the two leading principal components."""
    x = l2_normalize(vectors)
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32)
    coords = pca_reduce(x, 2, seed=seed)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def compute_projection(
    workspace: Workspace, backbone: str, method: str = "umap", *, seed: int = 0
) -> Projection:
    """Compute (or load) and store the ``method`` map of the current feature set, blocking.

    The app should call `start_background_projection` instead; this is what the worker runs.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} should be one of {METHODS}")
    features = load_features(workspace, backbone)
    fp = fingerprint(features)
    stored = _load_stored(workspace, backbone, method, fp, features)
    if stored is not None:
        return stored
    start = time.perf_counter()
    if method == "umap" and len(features) >= UMAP_MIN_N:
        coords = umap_embed(features.vectors, 2, seed=seed)
        params = {
            "seed": seed,
            "n_neighbors": UMAP_N_NEIGHBORS,
            "min_dist": UMAP_MIN_DIST,
            "pca_dims": UMAP_PCA_DIMS if len(features) >= UMAP_PCA_MIN_N else None,
        }
    else:
        coords = pca_2d(features.vectors, seed=seed)
        params = {"seed": seed}
    _store(workspace, features, method, fp, coords, params, time.perf_counter() - start)
    return Projection(coords, method, True, features.image_ids)


def get_projection(workspace: Workspace, backbone: str) -> Projection:
    """The best stored map, never waiting for UMAP.

    Returns the UMAP map if stored (``ready=True``); otherwise the PCA map (computed and
    stored now, which takes well under a second) with ``ready=False``. Start the UMAP worker
    with `start_background_projection`; poll this function to pick its result up.

    Examples
    --------
    >>> ws = Workspace("ws")                                          # doctest: +SKIP
    >>> coords, method, ready, ids = get_projection(ws, "efficientnet-lite0")  # doctest: +SKIP
    """
    features = load_features(workspace, backbone)
    if not len(features):
        return Projection(np.zeros((0, 2), np.float32), "pca", True, features.image_ids)
    fp = fingerprint(features)
    umap_map = _load_stored(workspace, backbone, "umap", fp, features)
    if umap_map is not None:
        return umap_map
    pca_map = compute_projection(workspace, backbone, "pca")
    return pca_map._replace(ready=len(features) < UMAP_MIN_N)


def _load_stored(
    workspace: Workspace, backbone: str, method: str, fp: str, features: FeatureMatrix
) -> Projection | None:
    with workspace.read() as conn:
        row = conn.execute(
            "SELECT file FROM projections WHERE backbone = ? AND method = ? AND fingerprint = ?",
            (backbone, method, fp),
        ).fetchone()
    if row is None:
        return None
    path = workspace.path / row[0]
    if not path.exists():
        return None
    return Projection(np.load(path), method, True, features.image_ids)


def _store(
    workspace: Workspace,
    features: FeatureMatrix,
    method: str,
    fp: str,
    coords: np.ndarray,
    params: dict[str, object],
    seconds: float,
) -> None:
    relfile = f"runs/projection-{features.backbone}-{method}-{fp}.npy"
    atomic_write(workspace.path / relfile, lambda fh: np.save(fh, coords.astype(np.float32)))
    with workspace.transaction() as conn:
        conn.execute(
            "INSERT INTO projections(backbone, method, fingerprint, params, file, seconds) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(backbone, method, fingerprint) DO UPDATE "
            "SET params = excluded.params, file = excluded.file, seconds = excluded.seconds",
            (features.backbone, method, fp, json.dumps(params), relfile, seconds),
        )


# -- background worker ------------------------------------------------------------------------


@dataclass
class ProjectionJob:
    """A UMAP worker process for one feature set (possibly started by another process)."""

    pid: int
    lock_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return pid_alive(self.pid)

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


_jobs: dict[Path, ProjectionJob] = {}


def start_background_projection(
    workspace: Workspace, backbone: str, *, seed: int = 0, retry: bool = False
) -> ProjectionJob | None:
    """Make sure a UMAP map of the current feature set is stored or being made; never blocks.

    Idempotent, so the app may call it on every rerun: returns None when the map is stored
    (or the set is too small for UMAP), the running job when one exists for this feature set
    (in this or another process, found by a lock file), otherwise starts
    ``python -m imgcluster.projection`` and returns its job. A worker that failed is not
    restarted unless ``retry=True`` (`projection_status` tells why it failed).
    """
    features = load_features(workspace, backbone)
    if len(features) < UMAP_MIN_N:
        return None
    fp = fingerprint(features)
    if _load_stored(workspace, backbone, "umap", fp, features) is not None:
        return None
    lock = workspace.runs_dir / f"projection-{backbone}-umap-{fp}.lock"
    log = lock.with_suffix(".log")
    job = _jobs.get(lock)
    if job is not None and job.running():
        return job
    if not retry and log.exists() and not lock.exists():
        return None  # failed before; the log says why
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            other = _read_pid(lock)
            if other is not None and pid_alive(other):
                return ProjectionJob(other, lock, log)
            if other is None and time.time() - _mtime(lock) < 10:
                # Another caller created the lock an instant ago and is writing its pid.
                return ProjectionJob(-1, lock, log)
            lock.unlink(missing_ok=True)  # stale: its worker died without cleaning up
            continue
        with os.fdopen(fd, "w") as fh, open(log, "wb") as log_fh:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imgcluster.projection",
                    str(workspace.path),
                    backbone,
                    "--seed",
                    str(seed),
                    "--lock",
                    str(lock),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            fh.write(str(process.pid))
        job = ProjectionJob(process.pid, lock, log, process)
        _jobs[lock] = job
        return job
    return None


def projection_status(workspace: Workspace, backbone: str) -> str:
    """``"ready"``, ``"running"``, ``"failed: <last log line>"`` or ``"not started"``."""
    features = load_features(workspace, backbone)
    fp = fingerprint(features)
    if len(features) < UMAP_MIN_N or _load_stored(workspace, backbone, "umap", fp, features):
        return "ready"
    lock = workspace.runs_dir / f"projection-{backbone}-umap-{fp}.lock"
    job = _jobs.get(lock)
    if job is not None and job.running():
        return "running"
    pid = _read_pid(lock) if lock.exists() else None
    if pid is not None and pid_alive(pid):
        return "running"
    log = lock.with_suffix(".log")
    if log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return f"failed: {lines[-1]}"
    return "not started"


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _worker(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcluster.projection")
    parser.add_argument("workspace")
    parser.add_argument("backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lock", type=Path, default=None)
    args = parser.parse_args(argv)
    # umap imports TensorFlow for ParametricUMAP if it can: ~2 s and ~500 MB this worker never
    # uses. A None entry in sys.modules makes that import fail, which umap handles.
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]
    try:
        compute_projection(Workspace(args.workspace), args.backbone, "umap", seed=args.seed)
    finally:
        if args.lock is not None:
            with contextlib.suppress(OSError):
                args.lock.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
