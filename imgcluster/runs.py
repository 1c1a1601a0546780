"""Stored clustering runs: the ``clusterings`` and ``assignments`` tables and the run files.

A run is one ``clusterings`` row (what it was made from: backbone, k, algorithm, random state,
the space and the feature set in ``params``) and two files in ``workspace.runs_dir`` written
before the row that names them: the centroids (``.npy``, in the run's clustering space) and the
per-image arrays (``.npz``: image ids, cluster, distance, silhouette, margin). Runs stored
before the arrays file existed keep one ``assignments`` row per image and are still read.
This module owns both tables; the others read them through `run_info`, `latest_run`,
`list_runs`, `run_assignments`, `load_run` and `cluster_members`. `imgcluster.clustering` makes
runs and stores them with `store_run`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgcluster import spaces
from imgcluster.errors import UnknownCluster, WorkspaceCorrupt, WorkspaceReadOnly
from imgcluster.kmeans import MISFIT_SQL, KMeansResult, misfit_mask
from imgcluster.workspace import Workspace, atomic_write

__all__ = [
    "ARRAYS_KEY",
    "ClusterRun",
    "RunInfo",
    "align_rows",
    "clear_cache",
    "cluster_members",
    "find_run_id",
    "latest_run",
    "list_runs",
    "load_run",
    "mark_used",
    "run_assignments",
    "run_cluster_arrays",
    "run_from_result",
    "run_info",
    "store_run",
    "typicality_order",
]


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


def align_rows(space: np.ndarray, ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``space`` (aligned with ``ids``) for the image ids ``wanted``, in that order."""
    if len(ids) == len(wanted) and np.array_equal(ids, wanted):
        return space
    order = np.argsort(ids)
    pos = order[np.searchsorted(ids, wanted, sorter=order)]
    return space[pos]


def run_from_result(
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


#: Recency of a run: the ``used`` sequence number stamped when `cluster` creates or returns it
#: (so a stored run that `cluster` hands back again becomes the newest, issue 14 §9), or its id
#: for runs stored before the stamp existed.
_RECENCY_SQL = "COALESCE(json_extract(params, '$.used'), id)"


def _next_used(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute(f"SELECT COALESCE(MAX({_RECENCY_SQL}), 0) + 1 FROM clusterings").fetchone()[0]
    )


def mark_used(workspace: Workspace, run_id: int) -> None:
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


def store_run(
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
    legacy = {
        "image_ids": table[:, 0].astype(np.int64),
        "labels": table[:, 1].astype(np.int64),
        "distances": table[:, 2].astype(np.float32),
        "silhouettes": np.nan_to_num(table[:, 3]).astype(np.float32),
        "margins": table[:, 4].astype(np.float32),
    }
    return _run_of(workspace, row, legacy)


def _run_of(workspace: Workspace, row: Any, arrays: dict[str, np.ndarray]) -> ClusterRun:
    """A run from its row and per-image arrays (from its file: rows in the relpath order it was
    clustered in, which holds since images are never deleted; or from legacy rows)."""
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
    points = align_rows(space, ids, image_ids[known])
    centroids = np.zeros((k, space.shape[1]), np.float32)
    counts = np.bincount(labels[known], minlength=k)
    np.add.at(centroids, labels[known], points)
    centroids /= np.maximum(counts, 1)[:, None]
    with contextlib.suppress(OSError):  # a read-only workspace still gets its centroids
        atomic_write(path, lambda fh: np.save(fh, centroids))
    return centroids


def find_run_id(
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


def run_cluster_arrays(
    source: Workspace | sqlite3.Connection, run_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids, clusters)`` of stored run ``run_id`` as int64 arrays sorted by image id:
    `run_assignments` without a dict of every image (at 1M images building that dict and
    sorting its items costs seconds; labels start a session from these arrays)."""
    with _reading(source) as conn:
        arrays = _run_arrays(conn, run_id)
        if arrays is not None:
            ids = np.asarray(arrays["image_ids"], np.int64)
            clusters = np.asarray(arrays["labels"], np.int64)
        else:
            ids, clusters = _row_run_arrays(conn, run_id)
    order = np.argsort(ids, kind="stable")
    return ids[order], clusters[order]


#: A run stored as ``assignments`` rows with at least this many images keeps a copy of its
#: (image id, cluster) columns in a file once read: reading 1M rows back costs 3-5 s each
#: time a process starts labeling from it, the file ~0.05 s. Derived data: a run never
#: changes, and the file is named after the run's unique centroids file.
ROW_RUN_COPY_MIN_N = 50_000


def _row_run_arrays(conn: sqlite3.Connection, run_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids, clusters)`` of a run stored as rows (from its kept copy when there is)."""
    row = conn.execute(
        "SELECT centroids_file FROM clusterings WHERE id = ?", (int(run_id),)
    ).fetchone()
    if row is None:
        raise UnknownCluster(f"no clustering run with id {run_id}")
    copy = None
    if row[0]:
        copy = _db_folder(conn) / str(Path(row[0]).with_suffix(""))
        copy = copy.with_name(copy.name + "-assignments.npz")
        if copy.exists():
            with contextlib.suppress(WorkspaceCorrupt):
                kept = _arrays.get(copy)
                return kept["image_ids"], kept["labels"]
    table = np.array(
        conn.execute(
            "SELECT image_id, cluster FROM assignments WHERE run_id = ?", (int(run_id),)
        ).fetchall(),
        dtype=np.int64,
    ).reshape(-1, 2)
    ids, clusters = table[:, 0], table[:, 1]
    if copy is not None and len(ids) >= ROW_RUN_COPY_MIN_N:
        # a read-only workspace reads the rows each time
        with contextlib.suppress(OSError, WorkspaceReadOnly):
            atomic_write(copy, lambda fh: np.savez(fh, image_ids=ids, labels=clusters))
    return ids, clusters


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


def clear_cache() -> None:
    """Forget the memoised run arrays (what a fresh process would see)."""
    with _arrays._lock:
        _arrays._items.clear()
