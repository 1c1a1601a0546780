"""KMeans clustering of feature vectors with an adjustable k, stored runs, typicality, k advice.

A run clusters every image that has a vector for one backbone, in a *clustering space* made from
the L2-normalised vectors by one of `PREPROCESSING` (the spaces are `imgcluster.spaces`'s). It is
stored in the workspace (the ``clusterings`` row, one ``assignments`` row per image, the
centroids as a ``.npy`` in ``workspace.runs_dir``; this module owns those two tables, and the
other modules read them through `run_info`, `latest_run`, `list_runs` and `run_assignments`), so
the app's k slider and the CLI return to an earlier result instantly: `cluster` first looks for
a stored run with the same inputs on the same feature set (`find_run`).

Per image the run keeps three numbers, all in the clustering space:

* ``distance``: Euclidean distance to its own centroid. Small = typical; grids list members by
  ascending distance (`typicality_order`, or ``ORDER BY distance`` in SQL).
* ``margin``: distance to the second-nearest centroid minus ``distance`` (>= 0). Small = the
  image sits on the border between two clusters.
* ``silhouette``: exact silhouette value for runs of up to `EXACT_SILHOUETTE_MAX_N` images; above
  that the *simplified* (centroid) silhouette ``margin / (distance + margin)``, which costs
  O(n k) instead of O(n^2). ``params["silhouette"]`` records which.

An image is a **misfit** (shown with a flag, suggested for moving) when its silhouette is below
`MISFIT_SILHOUETTE` (on average it is closer to the members of another cluster than to its
own) or its relative margin ``margin / (distance + margin)`` is below `MISFIT_RELATIVE_MARGIN`
(almost as close to another centroid as to its own). `MISFIT_SQL` is the same test for SQL.

Randomness comes only from ``random_state``: the same vectors, k, algorithm, random state and
preprocessing give the same clusters, numbered by decreasing size.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcluster import spaces
from imgcluster.errors import (
    InvalidParameter,
    NotEnoughImages,
    UnknownCluster,
    WorkspaceCorrupt,
    WorkspaceReadOnly,
)
from imgcluster.features import FeatureMatrix
from imgcluster.kmeans import (
    ALGORITHMS,
    EXACT_SILHOUETTE_MAX_N,
    MINIBATCH_THRESHOLD,
    MISFIT_RELATIVE_MARGIN,
    MISFIT_SILHOUETTE,
    MISFIT_SQL,
    KMeansResult,
    assign,
    fit_kmeans,
    kmeans_with_fixed_centroids,
    misfit_mask,
    resolve_algorithm,
    silhouette_values,
)
from imgcluster.ksuggest import STABLE_ARI, KSuggestion, suggest_k
from imgcluster.spaces import (
    DEFAULT_PREPROCESS,
    PCA_COMPONENTS,
    PREPROCESSING,
    REFINED_PREPROCESS,
    pca_reduce,
    preprocess_vectors,
)
from imgcluster.workspace import Workspace, atomic_write

if TYPE_CHECKING:
    from imgcluster.images import Progress

__all__ = [
    "ALGORITHMS",
    "DEFAULT_PREPROCESS",
    "EXACT_SILHOUETTE_MAX_N",
    "K_MAX",
    "K_MIN",
    "MINIBATCH_THRESHOLD",
    "MISFIT_RELATIVE_MARGIN",
    "MISFIT_SILHOUETTE",
    "MISFIT_SQL",
    "PCA_COMPONENTS",
    "PREPROCESSING",
    "REFINED_PREPROCESS",
    "STABLE_ARI",
    "ClusterRun",
    "KMeansResult",
    "KSuggestion",
    "NotEnoughImages",
    "RunInfo",
    "assign",
    "cluster",
    "cluster_members",
    "find_run",
    "fit_kmeans",
    "kmeans_with_fixed_centroids",
    "latest_run",
    "list_runs",
    "load_run",
    "misfit_mask",
    "pca_reduce",
    "preprocess_vectors",
    "run_assignments",
    "run_info",
    "silhouette_values",
    "store_partition",
    "suggest_k",
    "typicality_order",
]

#: Old name of `imgcluster.spaces.REFINED_COMPONENTS`.
UMAP_COMPONENTS = spaces.REFINED_COMPONENTS

K_MIN, K_MAX = 2, 200

# -- stored runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterRun:
    """A stored clustering run. Arrays are aligned with ``image_ids`` (relative-path order).

    Clusters are numbered ``0..k-1`` by decreasing size.
    """

    id: int
    backbone: str
    k: int
    algorithm: str
    random_state: int
    preprocess: str
    image_ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,)
    distances: np.ndarray  # float32 (n,)
    silhouettes: np.ndarray  # float32 (n,)
    margins: np.ndarray  # float32 (n,)
    centroids: np.ndarray  # float32 (k, d') in the clustering space
    seconds: float
    created_at: str
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def sizes(self) -> np.ndarray:
        """Number of images per cluster, ``(k,)``."""
        return np.bincount(self.labels, minlength=self.k)

    @property
    def misfits(self) -> np.ndarray:
        """Boolean mask of likely misfits (see the module docstring)."""
        return misfit_mask(self.distances, self.margins, self.silhouettes)

    @property
    def mean_silhouette(self) -> float:
        return float(self.silhouettes.mean()) if len(self) else math.nan

    def members(self, cluster: int) -> np.ndarray:
        """Image ids of one cluster, most typical first."""
        return self.image_ids[typicality_order(self, cluster)]


def typicality_order(run: ClusterRun, cluster: int | None = None) -> np.ndarray:
    """Row indices ordered most typical first (ascending distance to own centroid).

    With ``cluster`` only that cluster's rows; without, all rows grouped by cluster. Ties keep
    relative-path order, so the order is stable across reloads.
    """
    if cluster is None:
        return np.lexsort((run.distances, run.labels))
    if not 0 <= cluster < run.k:
        raise UnknownCluster(f"cluster={cluster} should be in 0..{run.k - 1}")
    rows = np.flatnonzero(run.labels == cluster)
    return rows[np.argsort(run.distances[rows], kind="stable")]


def clustering_space(
    features: FeatureMatrix,
    preprocess: str,
    *,
    workspace: Workspace | None = None,
    random_state: int = spaces.SPACE_RANDOM_STATE,
) -> np.ndarray:
    """Points of ``features`` in the ``preprocess`` space, rows as in ``features``.

    With ``workspace``, the workspace's stored/memoised space (`imgcluster.spaces.space_of`,
    the one its runs were made in); without, computed now. New code calls
    `imgcluster.spaces.space_of`.
    """
    if workspace is None:
        return preprocess_vectors(features.vectors, preprocess, random_state=random_state)
    ids, space = spaces.space_of(workspace, features.backbone, preprocess, features=features)
    return _align(space, ids, features.image_ids)


def _align(space: np.ndarray, ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``space`` (aligned with ``ids``) for the image ids ``wanted``, in that order."""
    if len(ids) == len(wanted) and np.array_equal(ids, wanted):
        return space
    order = np.argsort(ids)
    pos = order[np.searchsorted(ids, wanted, sorter=order)]
    return space[pos]


def cluster(
    workspace: Workspace,
    backbone: str,
    k: int,
    *,
    algorithm: str = "auto",
    random_state: int = 0,
    preprocess: str | None = None,
    progress: Progress | None = None,
) -> ClusterRun:
    """Cluster the workspace's images by their ``backbone`` features, or return the stored run.

    Parameters
    ----------
    workspace : Workspace
    backbone : str
        Backbone whose stored vectors are clustered (`imgcluster.features.load_features`).
    k : int
        Number of clusters, `K_MIN` to `K_MAX`.
    algorithm : {"auto", "kmeans", "minibatch"}, default="auto"
    random_state : int, default=0
    preprocess : {"l2", "pca", "pca-whiten", "umap"}, optional
        The space to cluster in. Default: the best one stored for this feature set, i.e. the
        refined space (``"umap"``) once the background worker stored it
        (`imgcluster.space_worker.start_background`), `DEFAULT_PREPROCESS` until then; never waits
        for UMAP. ``"umap"`` explicitly computes the refined space now if it is missing
        (blocking; the CLI shows a progress bar for it).
    progress : callable, optional
        ``(done, total)`` over the steps load, preprocess, fit, score, store.

    Returns
    -------
    ClusterRun
        The stored run. A second call with the same inputs on the same feature set returns it
        from the workspace without recomputing (and makes it the newest run, `latest_run`).

    Raises
    ------
    NotEnoughImages
        If fewer than ``k`` images have features (e.g. extraction has not run yet).

    Examples
    --------
    >>> run = cluster(Workspace("ws"), "efficientnet-lite0", 6)   # doctest: +SKIP
    >>> run.sizes                                                  # doctest: +SKIP
    array([31, 30, 30, 30, 30, 29])
    """
    step = _stepper(progress, 5)
    _check_k(k)
    n, fsid = spaces.feature_state(workspace, backbone)  # memoised: O(n) joins at 1M
    preprocess = spaces.resolve_preprocess(workspace, backbone, preprocess, fsid)
    if n < k:
        raise NotEnoughImages(
            f"{n} images have {backbone} features, fewer than k={k}; run `imgcluster extract` first"
        )
    concrete = resolve_algorithm(algorithm, n)
    step()
    existing = _find_run_id(workspace, backbone, k, concrete, random_state, preprocess, fsid)
    if existing is not None:
        _mark_used(workspace, existing)
        if progress:
            progress(5, 5)
        return load_run(workspace, existing)
    start = time.perf_counter()
    image_ids, space = spaces.space_of(workspace, backbone, preprocess, feature_set_key=fsid)
    step()
    result = fit_kmeans(space, k, algorithm=concrete, random_state=random_state)
    step()
    silhouettes, silhouette_kind = silhouette_values(space, result)
    step()
    seconds = time.perf_counter() - start
    params = {
        "preprocess": preprocess,
        "feature_set": fsid,
        "dim": int(space.shape[1]),
        "silhouette": silhouette_kind,
        "inertia": result.inertia,
        "n_iter": result.n_iter,
    }
    run_id = _store_run(
        workspace,
        backbone,
        image_ids,
        k,
        concrete,
        random_state,
        params,
        result,
        silhouettes,
        seconds,
    )
    step()
    # The run as `load_run` would read it back (same rows, order and float32 values), without
    # reading 1M assignment rows back (~2 s at 1M).
    return _run_from_result(workspace, run_id, image_ids, result, silhouettes)


def _run_from_result(
    workspace: Workspace,
    run_id: int,
    image_ids: np.ndarray,
    result: KMeansResult,
    silhouettes: np.ndarray,
) -> ClusterRun:
    """The just-stored run from the arrays in memory (rows in the space's relpath order)."""
    info = run_info(workspace, run_id)
    return ClusterRun(
        id=info.id,
        backbone=info.backbone,
        k=info.k,
        algorithm=info.algorithm,
        random_state=info.random_state,
        preprocess=info.preprocess,
        image_ids=np.asarray(image_ids, np.int64),
        labels=np.asarray(result.labels, np.int64),
        distances=np.asarray(result.distances, np.float32),
        silhouettes=np.nan_to_num(np.asarray(silhouettes, np.float32)),
        margins=np.asarray(result.margins, np.float32),
        centroids=result.centroids,
        seconds=info.seconds,
        created_at=info.created_at,
        params=info.params,
    )


def _check_k(k: int) -> None:
    if not K_MIN <= k <= K_MAX:
        raise InvalidParameter(f"k={k} should be between {K_MIN} and {K_MAX}")


def _stepper(progress: Progress | None, total: int) -> Callable[[], None]:
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return step


#: Recency of a run: the ``used`` sequence number stamped when `cluster` creates or returns it
#: (so a stored run that `cluster` hands back again becomes the newest, issue 14 §9), or its id
#: for runs stored before the stamp existed.
_RECENCY_SQL = "COALESCE(json_extract(params, '$.used'), id)"


def _next_used(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute(f"SELECT COALESCE(MAX({_RECENCY_SQL}), 0) + 1 FROM clusterings").fetchone()[0]
    )


def _mark_used(workspace: Workspace, run_id: int) -> None:
    """Make a stored run the newest, unless it already is (then nothing is written)."""
    with workspace.read() as conn:
        newest = latest_run(conn)
    if newest is not None and newest.id == run_id:
        return
    # Which run is newest is bookkeeping, not a change anyone's cached view depends on; a
    # read-only workspace still returns its stored runs, it just cannot record this.
    with (
        contextlib.suppress(WorkspaceReadOnly),
        workspace.transaction(bump_revision=False) as conn,
    ):
        conn.execute(
            "UPDATE clusterings SET params = json_set(params, '$.used', ?) WHERE id = ?",
            (_next_used(conn), run_id),
        )


def _store_run(
    workspace: Workspace,
    backbone: str,
    image_ids: np.ndarray,
    k: int,
    algorithm: str,
    random_state: int,
    params: dict[str, Any],
    result: KMeansResult,
    silhouettes: np.ndarray,
    seconds: float,
) -> int:
    # The centroid and arrays files are in place before the row that names them is committed:
    # a crash leaves at most orphan files, never a run without them.
    name = f"clustering-{uuid.uuid4().hex}"
    atomic_write(workspace.runs_dir / f"{name}.npy", lambda fh: np.save(fh, result.centroids))
    arrays = {
        "image_ids": np.asarray(image_ids, np.int64),
        "labels": np.asarray(result.labels, np.int64),
        "distances": np.asarray(result.distances, np.float32),
        "silhouettes": np.nan_to_num(np.asarray(silhouettes, np.float32)),
        "margins": np.asarray(result.margins, np.float32),
    }
    atomic_write(workspace.runs_dir / f"{name}.npz", lambda fh: np.savez(fh, **arrays))
    with workspace.transaction() as conn:
        params = {**params, "used": _next_used(conn), ARRAYS_KEY: f"runs/{name}.npz"}
        cur = conn.execute(
            "INSERT INTO clusterings(backbone, k, algorithm, seed, params, centroids_file, "
            "n_images, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                backbone,
                k,
                algorithm,
                random_state,
                json.dumps(params),
                f"runs/{name}.npy",
                len(image_ids),
                seconds,
            ),
        )
        run_id = int(cur.lastrowid or 0)
    return run_id


#: ``params`` key of a run's per-image arrays file (runs stored before it have ``assignments``
#: rows instead). One ``.npz`` of five columns instead of one SQLite row per image: at 1M
#: images the rows cost 4-6 s of CPU to insert (two B-trees) and ~2 s to read back, most of a
#: k change (bench/README.md, "1M"); the file costs ~0.1 s each way.
ARRAYS_KEY = "arrays_file"


class _RunArrays:
    """Per-image arrays of stored runs, memoised (file names are unique, never rewritten)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._items: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> dict[str, np.ndarray]:
        key = str(path)
        with self._lock:
            found = self._items.get(key)
        if found is not None:
            return found
        try:
            with np.load(path) as data:
                found = {name: data[name] for name in data.files}
            for array in found.values():  # shared by every run read from this file
                array.setflags(write=False)
        except (OSError, ValueError, EOFError) as exc:
            raise WorkspaceCorrupt(
                f"clustering run file {path} is missing or damaged ({type(exc).__name__}); "
                "cluster again (imgcluster cluster, or the k control) to make a new run"
            ) from None
        with self._lock:
            if len(self._items) >= self._size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = found
        return found


_arrays = _RunArrays()


def _db_folder(conn: sqlite3.Connection) -> Path:
    """The workspace folder of an open connection (its main database's folder)."""
    for row in conn.execute("PRAGMA database_list").fetchall():
        if row[1] == "main":
            return Path(row[2]).parent
    raise WorkspaceCorrupt("connection has no main database file")


def _run_arrays(conn: sqlite3.Connection, run_id: int) -> dict[str, np.ndarray] | None:
    """The run's per-image arrays from its file, or None for a run stored as rows."""
    row = conn.execute("SELECT params FROM clusterings WHERE id = ?", (int(run_id),)).fetchone()
    if row is None:
        raise UnknownCluster(f"no clustering run with id {run_id}")
    relfile = json.loads(row[0] or "{}").get(ARRAYS_KEY)
    if relfile is None:
        return None
    return _arrays.get(_db_folder(conn) / relfile)


def load_run(workspace: Workspace, run_id: int) -> ClusterRun:
    """A stored run, its arrays in the images' relative-path order.

    A centroids file deleted from ``runs/`` is recomputed from the stored assignments (the
    mean of each cluster's members in the run's space) and written back.

    Raises
    ------
    UnknownCluster
        If no run has this id.
    """
    with workspace.read() as conn:
        row = conn.execute("SELECT * FROM clusterings WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownCluster(f"no clustering run with id {run_id}")
        arrays = _run_arrays(conn, run_id)
    if arrays is not None:
        return _run_of(workspace, row, arrays)
    with workspace.read() as conn:
        cur = conn.execute(
            """
            SELECT a.image_id, a.cluster, a.distance, a.silhouette, a.margin
            FROM assignments AS a JOIN image_catalog AS i ON i.id = a.image_id
            WHERE a.run_id = ? ORDER BY i.relpath
            """,
            (run_id,),
        )
        cur.row_factory = None  # plain tuples: 5x faster than sqlite3.Row for 100k rows
        rows = cur.fetchall()
    table = np.array(rows, dtype=np.float64).reshape(-1, 5)
    params = json.loads(row["params"])
    image_ids = table[:, 0].astype(np.int64)
    labels = table[:, 1].astype(np.int64)
    preprocess = params.get("preprocess", "l2")
    centroids = _load_centroids(
        workspace,
        row["centroids_file"],
        row["backbone"],
        preprocess,
        image_ids,
        labels,
        int(row["k"]),
    )
    return ClusterRun(
        id=int(row["id"]),
        backbone=row["backbone"],
        k=int(row["k"]),
        algorithm=row["algorithm"],
        random_state=int(row["seed"]),
        preprocess=preprocess,
        image_ids=image_ids,
        labels=labels,
        distances=table[:, 2].astype(np.float32),
        silhouettes=np.nan_to_num(table[:, 3]).astype(np.float32),
        margins=table[:, 4].astype(np.float32),
        centroids=centroids,
        seconds=float(row["seconds"]),
        created_at=row["created_at"],
        params=params,
    )


def _run_of(workspace: Workspace, row: Any, arrays: dict[str, np.ndarray]) -> ClusterRun:
    """A run stored as an arrays file; rows in the relpath order it was clustered in (images
    are never deleted from a workspace, so that order holds)."""
    params = json.loads(row["params"])
    preprocess = params.get("preprocess", "l2")
    image_ids, labels = arrays["image_ids"], arrays["labels"]
    centroids = _load_centroids(
        workspace,
        row["centroids_file"],
        row["backbone"],
        preprocess,
        image_ids,
        labels,
        int(row["k"]),
    )
    return ClusterRun(
        id=int(row["id"]),
        backbone=row["backbone"],
        k=int(row["k"]),
        algorithm=row["algorithm"],
        random_state=int(row["seed"]),
        preprocess=preprocess,
        image_ids=image_ids,
        labels=labels,
        distances=arrays["distances"],
        silhouettes=arrays["silhouettes"],
        margins=arrays["margins"],
        centroids=centroids,
        seconds=float(row["seconds"]),
        created_at=row["created_at"],
        params=params,
    )


def _load_centroids(
    workspace: Workspace,
    relfile: str,
    backbone: str,
    preprocess: str,
    image_ids: np.ndarray,
    labels: np.ndarray,
    k: int,
) -> np.ndarray:
    """The run's centroids file, or (deleted or unreadable) its recomputation, stored again."""
    path = workspace.path / relfile
    try:
        centroids = np.load(path)
        if centroids.ndim == 2 and len(centroids) == k:
            return centroids
    except (OSError, ValueError):
        pass
    ids, space = spaces.space_of(workspace, backbone, preprocess)
    known = np.isin(image_ids, ids)
    points = _align(space, ids, image_ids[known])
    centroids = np.zeros((k, space.shape[1]), np.float32)
    counts = np.bincount(labels[known], minlength=k)
    np.add.at(centroids, labels[known], points)
    centroids /= np.maximum(counts, 1)[:, None]
    with contextlib.suppress(OSError):  # a read-only workspace still gets its centroids
        atomic_write(path, lambda fh: np.save(fh, centroids))
    return centroids


def find_run(
    workspace: Workspace,
    backbone: str,
    k: int,
    algorithm: str = "auto",
    random_state: int = 0,
    preprocess: str | None = None,
) -> ClusterRun | None:
    """The stored run with these inputs on the current feature set, or None (nothing computed).

    ``preprocess=None`` means what `cluster` would use now (the best stored space).
    """
    n, fsid = spaces.feature_state(workspace, backbone)
    preprocess = spaces.resolve_preprocess(workspace, backbone, preprocess, fsid)
    if not n:
        return None
    concrete = resolve_algorithm(algorithm, n)
    run_id = _find_run_id(workspace, backbone, k, concrete, random_state, preprocess, fsid)
    return None if run_id is None else load_run(workspace, run_id)


def _find_run_id(
    workspace: Workspace,
    backbone: str,
    k: int,
    algorithm: str,
    random_state: int,
    preprocess: str,
    fsid: str,
) -> int | None:
    with workspace.read() as conn:
        row = conn.execute(
            """
            SELECT id FROM clusterings
            WHERE backbone = ? AND k = ? AND algorithm = ? AND seed = ?
              AND json_extract(params, '$.preprocess') = ?
              AND json_extract(params, '$.feature_set') = ?
            ORDER BY id DESC LIMIT 1
            """,
            (backbone, k, algorithm, random_state, preprocess, fsid),
        ).fetchone()
    return None if row is None else int(row[0])


@dataclass(frozen=True)
class RunInfo:
    """What a stored run was made from, without its arrays (one ``clusterings`` row).

    The public reader of the ``clusterings`` table for the other modules (labels, export):
    they call `run_info` / `latest_run` instead of reading the table with their own SQL.
    """

    id: int
    backbone: str
    k: int
    algorithm: str
    random_state: int
    preprocess: str
    n_images: int
    seconds: float
    created_at: str
    params: dict[str, Any] = field(default_factory=dict)


#: Old name of `RunInfo`.
RunSummary = RunInfo


@contextlib.contextmanager
def _reading(source: Workspace | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The caller's open connection as is, or a read connection of the workspace."""
    if isinstance(source, sqlite3.Connection):
        yield source
    else:
        with source.read() as conn:
            yield conn


def _run_info(row: Any) -> RunInfo:
    params = json.loads(row["params"] or "{}")
    return RunInfo(
        id=int(row["id"]),
        backbone=row["backbone"],
        k=int(row["k"]),
        algorithm=row["algorithm"],
        random_state=int(row["seed"]),
        preprocess=params.get("preprocess", "l2"),
        n_images=int(row["n_images"]),
        seconds=float(row["seconds"]),
        created_at=row["created_at"],
        params=params,
    )


def _fetch_runs(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[RunInfo]:
    cur = conn.execute(
        f"SELECT id, backbone, k, algorithm, seed, params, n_images, seconds, created_at "
        f"FROM clusterings {where}",
        args,
    )
    cur.row_factory = sqlite3.Row
    return [_run_info(row) for row in cur.fetchall()]


def run_info(source: Workspace | sqlite3.Connection, run_id: int) -> RunInfo:
    """The parameters of stored run ``run_id``.

    Parameters
    ----------
    source : Workspace or sqlite3.Connection
        A workspace, or an open connection to its database (e.g. inside the caller's
        transaction, so the read sees the caller's own writes).
    run_id : int

    Raises
    ------
    UnknownCluster
        If no run has this id.
    """
    with _reading(source) as conn:
        runs = _fetch_runs(conn, "WHERE id = ?", (int(run_id),))
    if not runs:
        raise UnknownCluster(f"no clustering run with id {run_id}")
    return runs[0]


def latest_run(
    source: Workspace | sqlite3.Connection, backbone: str | None = None
) -> RunInfo | None:
    """The newest run (of ``backbone``, if given), or None when nothing was clustered yet.

    Newest means most recently created *or returned* by `cluster`: after
    ``cluster(k=50)`` hands back a run stored earlier, that run is the newest, so
    ``labels start`` starts from what was just shown.
    """
    where, args = ("WHERE backbone = ?", (backbone,)) if backbone is not None else ("", ())
    with _reading(source) as conn:
        runs = _fetch_runs(conn, f"{where} ORDER BY {_RECENCY_SQL} DESC, id DESC LIMIT 1", args)
    return runs[0] if runs else None


def list_runs(workspace: Workspace, backbone: str | None = None) -> list[RunInfo]:
    """Stored runs, newest first (newest as in `latest_run`)."""
    where, args = ("WHERE backbone = ?", (backbone,)) if backbone is not None else ("", ())
    with _reading(workspace) as conn:
        return _fetch_runs(conn, f"{where} ORDER BY {_RECENCY_SQL} DESC, id DESC", args)


def cluster_members(
    workspace: Workspace,
    run_id: int,
    cluster: int,
    *,
    most_typical_first: bool = True,
    misfits_only: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[int]:
    """Image ids of one cluster in typicality order, one page at a time (an indexed query)."""
    with workspace.read() as conn:
        arrays = _run_arrays(conn, run_id)
    if arrays is not None:
        return _members_of(arrays, cluster, most_typical_first, misfits_only, limit, offset)
    where = "a.run_id = ? AND a.cluster = ?"
    if misfits_only:
        where += f" AND {MISFIT_SQL}"
    direction = "ASC" if most_typical_first else "DESC"
    sql = (
        f"SELECT a.image_id FROM assignments AS a WHERE {where} "
        f"ORDER BY a.distance {direction}, a.image_id LIMIT ? OFFSET ?"
    )
    with workspace.read() as conn:
        rows = conn.execute(sql, (run_id, cluster, -1 if limit is None else limit, offset))
        return [int(r[0]) for r in rows]


def run_assignments(source: Workspace | sqlite3.Connection, run_id: int) -> dict[int, int]:
    """``{image id: cluster}`` of stored run ``run_id``: the public reader of ``assignments``
    for other modules (labels starts a session from it), through the caller's connection."""
    with _reading(source) as conn:
        arrays = _run_arrays(conn, run_id)
        if arrays is not None:
            return dict(zip(arrays["image_ids"].tolist(), arrays["labels"].tolist(), strict=True))
        rows = conn.execute(
            "SELECT image_id, cluster FROM assignments WHERE run_id = ?", (int(run_id),)
        ).fetchall()
    return {int(r[0]): int(r[1]) for r in rows}


def _members_of(
    arrays: dict[str, np.ndarray],
    cluster: int,
    most_typical_first: bool,
    misfits_only: bool,
    limit: int | None,
    offset: int,
) -> list[int]:
    """`cluster_members` over a run's arrays: the SQL's order (distance, then image id)."""
    rows = np.flatnonzero(arrays["labels"] == cluster)
    if misfits_only:
        keep = misfit_mask(
            arrays["distances"][rows], arrays["margins"][rows], arrays["silhouettes"][rows]
        )
        rows = rows[keep]
    distance = arrays["distances"][rows].astype(np.float64)
    ids = arrays["image_ids"][rows]
    order = np.lexsort((ids, distance if most_typical_first else -distance))
    stop = None if limit is None else offset + limit
    return [int(i) for i in ids[order][offset:stop]]


def store_partition(
    workspace: Workspace,
    backbone: str,
    assignment: Mapping[int, int],
    *,
    preprocess: str | None = None,
) -> int:
    """Store a partition made elsewhere as a clustering run of ``backbone``; returns its id.

    For a partition from another tool, or a deliberately wrong one in a test, so a labeling
    session can start from it like from any run (``algorithm`` is recorded as ``"manual"``).
    Centroids are the members' means in the ``preprocess`` space and distances, margins and
    silhouettes are measured against them; a margin is negative where another cluster's
    centre is nearer. Images left out of ``assignment`` are not in the run (as if ingested
    after it).

    Parameters
    ----------
    workspace : Workspace
    backbone : str
    assignment : mapping of int to int
        Image id -> cluster number, ``0..k-1``; every image needs a ``backbone`` vector.
    preprocess : {"l2", "pca", "pca-whiten", "umap"}, optional
        The space the run's numbers are measured in; default as in `cluster`.

    Raises
    ------
    InvalidParameter
        If an image has no vector or a cluster number is negative or out of range.
    """
    from imgcluster.metrics import sq_distances

    _n, fsid = spaces.feature_state(workspace, backbone)
    preprocess = spaces.resolve_preprocess(workspace, backbone, preprocess, fsid)
    ids, space = spaces.space_of(workspace, backbone, preprocess, feature_set_key=fsid)
    image_ids = np.array(sorted(assignment), dtype=np.int64)
    missing = np.setdiff1d(image_ids, ids)
    if len(missing):
        raise InvalidParameter(
            f"{len(missing)} images have no {backbone} vector (e.g. id {int(missing[0])})"
        )
    labels = np.array([assignment[int(i)] for i in image_ids], dtype=np.int64)
    k = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) == 0 or labels.min() < 0:
        raise InvalidParameter("assignment should map image ids to clusters 0..k-1")
    _check_k(k)
    x = _align(space, ids, image_ids)
    centroids = np.zeros((k, x.shape[1]), np.float32)
    np.add.at(centroids, labels, x)
    centroids /= np.maximum(np.bincount(labels, minlength=k), 1)[:, None]
    d2 = sq_distances(x, centroids)
    rows = np.arange(len(x))
    own = d2[rows, labels]
    d2[rows, labels] = np.inf
    other = d2.min(axis=1) if k > 1 else own
    distances = np.sqrt(own)
    result = KMeansResult(
        centroids=centroids,
        labels=labels,
        distances=distances.astype(np.float32),
        margins=(np.sqrt(other) - distances).astype(np.float32),
        inertia=float(own.sum()),
        n_iter=0,
    )
    silhouettes, silhouette_kind = silhouette_values(x, result)
    params = {
        "preprocess": preprocess,
        "feature_set": fsid,
        "dim": int(x.shape[1]),
        "silhouette": silhouette_kind,
        "inertia": result.inertia,
        "n_iter": 0,
    }
    return _store_run(
        workspace, backbone, image_ids, k, "manual", 0, params, result, silhouettes, 0.0
    )
