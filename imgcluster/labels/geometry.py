"""Typicality and misfits: each image's place relative to the labels as they are now.

Every labeled image with features has, in the session run's clustering space
(`imgcluster.clustering.clustering_space`): its ``distance`` to its label's centroid (mean
of the label's ``normal`` images), the ``margin`` to the nearest *other* label's centroid, a
``silhouette`` (exact up to `~imgcluster.clustering.EXACT_SILHOUETTE_MAX_N` normal images,
the simplified centroid one above) and a ``poor_fit`` flag by the clustering module's own rule
(`~imgcluster.clustering.misfit_mask`). "Other" labels are only those with at least
`MISFIT_MIN_LABEL_SIZE` normal images: a label of two hand-picked images has a centre that may
sit on another label's centre, and comparing against it would flag that whole label.

These numbers are derived data in their own table, ``label_geometry``, owned here:

* written only by operations that move images (or change whether they are ``normal``), in
  the operation's own transaction; reads never write, and a rename or a confirm touches
  no geometry;
* refreshed incrementally: the in-process state keeps each label's centroid sum and every
  image's distance to every centroid, so a move of 20 images recomputes the two centroids it
  changed and one column of distances each, then writes only the rows whose numbers changed;
* the in-process state is trusted only while it matches the table: each refresh stores a new
  random ``geometry_token`` in the session row, and a state whose token differs (another
  process wrote, a transaction rolled back, features were added) is rebuilt from the table.

All in-process caches of the labels package live here, in `_CACHE`: feature matrices keyed on
(database path, feature-set identity), geometry states keyed on (database path, session), label
counts keyed on (database path, session, images version).
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcluster.labels._store import chunked_rows, image_states
from imgcluster.metrics import centroid_sums, exact_silhouette, sq_distances

if TYPE_CHECKING:
    from imgcluster.features import FeatureMatrix
    from imgcluster.workspace import Workspace

__all__ = [
    "MISFIT_MIN_LABEL_SIZE",
    "label_geometry",
    "refresh_geometry",
    "session_features",
    "session_space",
]

#: Labels with fewer ``normal`` images than this are not compared against when telling
#: misfits: a few hand-picked images make a centre that is no group's yet.
MISFIT_MIN_LABEL_SIZE = 5

_TOLERANCE = 1e-5  # a stored number closer than this to the new one is not rewritten


# -- the one cache ----------------------------------------------------------------------------


class _Cache:
    """Small thread-safe LRU maps, one per kind of derived data."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, OrderedDict[tuple, Any]] = {}
        self._sizes = {"features": 1, "geometry": 4, "counts": 16}

    def get(self, kind: str, key: tuple) -> Any:
        with self._lock:
            items = self._maps.setdefault(kind, OrderedDict())
            if key in items:
                items.move_to_end(key)
                return items[key]
        return None

    def put(self, kind: str, key: tuple, value: Any) -> None:
        with self._lock:
            items = self._maps.setdefault(kind, OrderedDict())
            items[key] = value
            items.move_to_end(key)
            while len(items) > self._sizes.get(kind, 4):
                items.popitem(last=False)

    def get_or_make(self, kind: str, key: tuple, make: Callable[[], Any]) -> Any:
        value = self.get(kind, key)
        if value is None:
            value = make()
            self.put(kind, key, value)
        return value

    def pop(self, kind: str, key: tuple) -> Any:
        with self._lock:
            return self._maps.setdefault(kind, OrderedDict()).pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


_CACHE = _Cache()


# -- features and the clustering space ---------------------------------------------------------


def _feature_key(conn: sqlite3.Connection, backbone: str) -> str:
    """The cheap identity of the session backbone's stored vectors (one SQL query)."""
    from imgcluster.features import feature_set_id

    return feature_set_id(conn, backbone)


def session_features(
    workspace: Workspace, backbone: str, feature_key: str | None = None
) -> FeatureMatrix:
    """The stored vectors of ``backbone`` (`load_features`), memoised per feature set
    (``feature_key``: its `imgcluster.features.feature_set_id`, when the caller has it)."""
    from imgcluster.features import load_features

    if feature_key is None:
        with workspace.read() as conn:
            feature_key = _feature_key(conn, backbone)
    key = (str(workspace.db_path), backbone, feature_key)
    return _CACHE.get_or_make("features", key, lambda: load_features(workspace, backbone))


def session_space(
    workspace: Workspace, backbone: str, run_id: int, conn: sqlite3.Connection | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Image ids with features, their points in the run's clustering space
    (`imgcluster.spaces.space_of`, memoised there), and the identity of that space.

    Call it once outside a write transaction before an operation that moves images
    (`imgcluster.labels.audit.operation` does): computing a space that is not stored yet
    must not happen while this process holds the write lock.
    """
    from imgcluster.clustering import run_info
    from imgcluster.spaces import space_of

    if conn is None:
        with workspace.read() as own:
            run, key = run_info(own, run_id), _feature_key(own, backbone)
    else:
        run, key = run_info(conn, run_id), _feature_key(conn, backbone)
    try:
        ids, space = space_of(workspace, backbone, run.preprocess, feature_set_key=key)
    except ValueError:
        # A space of no vectors (labels before any extraction) cannot be fitted: no
        # geometry then. Anything else is a real error.
        if len(session_features(workspace, backbone, key)):
            raise
        ids, space = np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    if not len(ids):
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32), key
    return ids, space, f"{key}:{run.preprocess}"


def space_rows(
    workspace: Workspace, session: sqlite3.Row, image_ids: Iterable[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The given images that have features (all with features if None), and their points."""
    ids, space, _key = session_space(workspace, session["backbone"], session["run_id"])
    if image_ids is None:
        return ids, space
    wanted = np.asarray(list(image_ids), dtype=np.int64)
    rows = np.flatnonzero(np.isin(ids, wanted))
    return ids[rows], space[rows]


# -- the maths --------------------------------------------------------------------------------


def label_geometry(space: np.ndarray, label_ids: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Per row: distance to own label centroid, margin, silhouette, misfit flag, nearest other
    label id (NaN where undefined): what the table holds, computed from scratch.

    Parameters
    ----------
    space : ndarray of shape (n, d)
    label_ids : ndarray of shape (n,)
        Each row's label id.
    normal : ndarray of bool, shape (n,)
        Rows whose state is ``normal`` (only they make centroids).
    """
    state = _State.build(space, np.asarray(label_ids, np.int64), np.asarray(normal, bool))
    return state.outputs()


@dataclass
class _State:
    """Centroid sums per label column and every row's distance to every centroid."""

    space: np.ndarray
    label_of: np.ndarray  # label id per row, -1 = no label
    normal: np.ndarray
    columns: dict[int, int]
    column_labels: list[int]
    sums: np.ndarray  # (n_columns, d) float64
    counts: np.ndarray  # (n_columns,)
    dist: np.ndarray  # (n, n_columns) float32, NaN for columns without a normal image

    @classmethod
    def build(cls, space: np.ndarray, label_of: np.ndarray, normal: np.ndarray) -> _State:
        labels = sorted({int(v) for v in np.unique(label_of) if v >= 0})
        columns = {lab: i for i, lab in enumerate(labels)}
        keys = np.asarray(labels, np.int64)
        col = np.where(label_of >= 0, np.searchsorted(keys, label_of), -1).astype(np.int64)
        mask = normal & (col >= 0)
        d = space.shape[1] if space.ndim == 2 else 1
        if labels:
            sums, counts = centroid_sums(space, np.maximum(col, 0), len(labels), mask)
        else:
            sums, counts = np.zeros((0, d)), np.zeros(0, np.int64)
        state = cls(
            space=space,
            label_of=label_of.copy(),
            normal=normal.copy(),
            columns=columns,
            column_labels=labels,
            sums=sums,
            counts=counts,
            dist=np.full((len(space), len(labels)), np.nan, np.float32),
        )
        state._recompute_columns(list(range(len(labels))))
        return state

    def _recompute_columns(self, cols: list[int]) -> None:
        live = [c for c in cols if self.counts[c] > 0]
        for c in cols:
            if self.counts[c] <= 0:
                self.dist[:, c] = np.nan
        if live and len(self.space):
            centroids = (self.sums[live] / self.counts[live, None]).astype(np.float32)
            self.dist[:, live] = np.sqrt(sq_distances(self.space, centroids))

    def _column(self, label_id: int) -> int:
        if label_id not in self.columns:
            self.columns[label_id] = len(self.column_labels)
            self.column_labels.append(label_id)
            self.sums = np.vstack([self.sums, np.zeros((1, self.sums.shape[1]))])
            self.counts = np.append(self.counts, 0)
            self.dist = np.hstack([self.dist, np.full((len(self.space), 1), np.nan, np.float32)])
        return self.columns[label_id]

    def columns_of(self, label_ids: np.ndarray) -> np.ndarray:
        """Column of each label id (-1 for ids without one), vectorised."""
        if not self.column_labels:
            return np.full(len(label_ids), -1, np.int64)
        keys = np.asarray(self.column_labels, np.int64)
        order = np.argsort(keys)
        pos = np.minimum(np.searchsorted(keys[order], label_ids), len(keys) - 1)
        found = keys[order][pos] == label_ids
        return np.where(found, order[pos], -1).astype(np.int64)

    def update(self, rows: np.ndarray, new_labels: np.ndarray, new_normal: np.ndarray) -> None:
        """Move ``rows`` to ``new_labels`` (-1 = unlabeled): adjust the sums of the labels
        they leave and join, then recompute only those labels' distance columns."""
        old_labels, old_normal = self.label_of[rows], self.normal[rows]
        keep = (old_labels != new_labels) | (old_normal != new_normal)
        rows, new_labels, new_normal = rows[keep], new_labels[keep], new_normal[keep]
        old_labels, old_normal = old_labels[keep], old_normal[keep]
        for lab in np.unique(new_labels[new_labels >= 0]).tolist():
            self._column(int(lab))
        touched: set[int] = set()
        n_cols = len(self.column_labels)
        for sign, labs, norm in ((-1.0, old_labels, old_normal), (1.0, new_labels, new_normal)):
            cols = self.columns_of(labs)
            use = (cols >= 0) & norm
            if use.any():
                sums, counts = centroid_sums(self.space[rows[use]], cols[use], n_cols)
                self.sums += sign * sums
                self.counts += int(sign) * counts
                touched.update(np.unique(cols[use]).tolist())
        self.label_of[rows] = new_labels
        self.normal[rows] = new_normal
        for c in touched:
            if self.counts[c] <= 0:  # exact zero, not float residue
                self.sums[c] = 0.0
                self.counts[c] = 0
        self._recompute_columns(sorted(touched))

    def outputs(self) -> np.ndarray:
        """(n, 5): distance, margin, silhouette, poor fit, nearest other label (NaN = none)."""
        from imgcluster.clustering import EXACT_SILHOUETTE_MAX_N, misfit_mask

        n = len(self.space)
        out = np.full((n, 5), np.nan)
        out[:, 3] = 0
        if not n or not self.column_labels:
            return out
        col = self.columns_of(self.label_of)
        has = self.counts > 0
        rows = np.arange(n)
        safe = np.maximum(col, 0)
        own = np.where((col >= 0) & has[safe], self.dist[rows, safe], np.nan)
        out[:, 0] = own
        reference = self.counts >= MISFIT_MIN_LABEL_SIZE
        masked = np.where(reference[None, :], self.dist, np.inf)
        labeled = np.flatnonzero(col >= 0)
        masked[labeled, col[labeled]] = np.inf
        masked = np.nan_to_num(masked, nan=np.inf)
        other_col = masked.argmin(axis=1)
        other = masked[rows, other_col]
        defined = ~np.isnan(own) & np.isfinite(other)
        if not defined.any():
            return out
        margin = np.where(defined, other - own, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            top = np.maximum(own, other)
            silhouette = np.where(top > 0, margin / top, 0.0)
        normal = self.normal & (col >= 0)
        if 0 < int(normal.sum()) <= EXACT_SILHOUETTE_MAX_N:
            silhouette[normal] = exact_silhouette(
                self.space[normal], col[normal], self.counts, reference
            )
        silhouette[~defined] = np.nan
        out[:, 1] = margin
        out[:, 2] = silhouette
        out[defined, 3] = misfit_mask(own[defined], margin[defined], silhouette[defined])
        out[defined, 4] = np.asarray(self.column_labels)[other_col[defined]]
        return out


@dataclass
class _Entry:
    """A geometry state and the table contents it stands for."""

    token: str
    space_key: str
    ids: np.ndarray
    state: _State
    out: np.ndarray  # what label_geometry holds, per row (NaN rows: no geometry row)


# -- refresh (inside an operation's transaction) ----------------------------------------------


@dataclass
class Pending:
    """A refreshed state, published to the cache once its transaction committed."""

    key: tuple
    entry: _Entry


def refresh(
    workspace: Workspace,
    conn: sqlite3.Connection,
    session: sqlite3.Row,
    moved: Iterable[int] | None,
) -> Pending | None:
    """Bring ``label_geometry`` up to date after images moved (``moved``: their ids; None =
    recompute everything). Runs inside the caller's write transaction."""
    sid = int(session["id"])
    ids, space, space_key = session_space(workspace, session["backbone"], session["run_id"], conn)
    key = (str(workspace.db_path), sid)
    token = conn.execute(
        "SELECT geometry_token FROM label_sessions WHERE id = ?", (sid,)
    ).fetchone()[0]
    # Taken out: the state is updated in place, and only a committed refresh puts it back.
    entry = _CACHE.pop("geometry", key)
    if (
        moved is not None
        and entry is not None
        and entry.token == token
        and entry.space_key == space_key
        and token is not None
    ):
        new_entry = _incremental(conn, sid, entry, moved)
    else:
        new_entry = _full(conn, sid, ids, space, space_key)
    new_entry.token = uuid.uuid4().hex
    conn.execute(
        "UPDATE label_sessions SET geometry_token = ? WHERE id = ?", (new_entry.token, sid)
    )
    return Pending(key, new_entry)


def has_state(workspace: Workspace, session_id: int) -> bool:
    """Whether this process holds a geometry state for the session (its space is loaded)."""
    return _CACHE.get("geometry", (str(workspace.db_path), int(session_id))) is not None


def publish(pending: Pending | None) -> None:
    if pending is not None:
        _CACHE.put("geometry", pending.key, pending.entry)


def _incremental(conn: sqlite3.Connection, sid: int, entry: _Entry, moved: Iterable[int]) -> _Entry:
    moved_ids = np.unique(np.asarray(list(moved), dtype=np.int64))
    pos = np.searchsorted(entry.ids, moved_ids)
    pos = np.minimum(pos, max(len(entry.ids) - 1, 0))
    found = (len(entry.ids) > 0) & (entry.ids[pos] == moved_ids) if len(entry.ids) else pos < 0
    rows = pos[found]
    states = image_states(conn, sid, image_ids=moved_ids[found].tolist())
    new_labels = np.array([states[i][0] if i in states else -1 for i in moved_ids[found].tolist()])
    new_normal = np.array(
        [i in states and states[i][2] == "normal" for i in moved_ids[found].tolist()], bool
    )
    state = entry.state  # taken out of the cache by `refresh`: mutating it is safe
    prior = state.label_of.copy()
    state.update(rows, new_labels.astype(np.int64), new_normal)
    out = state.outputs()
    _write(conn, sid, entry.ids, state.label_of, entry.out, out, prior_labels=prior)
    return _Entry(entry.token, entry.space_key, entry.ids, state, out)


def _full(
    conn: sqlite3.Connection, sid: int, ids: np.ndarray, space: np.ndarray, space_key: str
) -> _Entry:
    states = image_states(conn, sid)
    label_of = np.array([states[i][0] if i in states else -1 for i in ids.tolist()], np.int64)
    normal = np.array([i in states and states[i][2] == "normal" for i in ids.tolist()], bool)
    state = _State.build(space, label_of, normal)
    out = state.outputs()
    stored = np.full((len(ids), 5), np.nan)
    stored_labels = np.full(len(ids), -1, np.int64)
    extra: list[int] = []
    if len(ids):
        conn_rows = conn.execute(
            "SELECT image_id, label_id, distance, margin, silhouette, poor_fit, alt_label_id "
            "FROM label_geometry WHERE session_id = ?",
            (sid,),
        ).fetchall()
        if conn_rows:
            table = np.array(
                [[np.nan if v is None else v for v in tuple(r)] for r in conn_rows], np.float64
            )
            image_ids = table[:, 0].astype(np.int64)
            pos = np.minimum(np.searchsorted(ids, image_ids), len(ids) - 1)
            hit = ids[pos] == image_ids
            stored[pos[hit]] = table[hit, 2:]
            stored_labels[pos[hit]] = table[hit, 1].astype(np.int64)
            extra = image_ids[~hit].tolist()
    else:
        extra = [
            int(r[0])
            for r in conn.execute(
                "SELECT image_id FROM label_geometry WHERE session_id = ?", (sid,)
            )
        ]
    if extra:  # rows of images that lost their features: no geometry any more
        conn.executemany(
            "DELETE FROM label_geometry WHERE session_id = ? AND image_id = ?",
            [(sid, i) for i in extra],
        )
    _write(conn, sid, ids, label_of, stored, out, prior_labels=stored_labels)
    return _Entry("", space_key, ids, state, out)


def _write(
    conn: sqlite3.Connection,
    sid: int,
    ids: np.ndarray,
    label_of: np.ndarray,
    old: np.ndarray,
    new: np.ndarray,
    *,
    prior_labels: np.ndarray,
) -> None:
    """Write the rows whose numbers (or label) changed; delete the rows of images that lost
    their label. ``old`` / ``prior_labels``: what the table holds now, per row."""
    if not len(ids):
        return
    same_nan = np.isnan(old) == np.isnan(new)
    close = np.isclose(np.nan_to_num(old), np.nan_to_num(new), rtol=0, atol=_TOLERANCE)
    changed = ~(same_nan & close).all(axis=1) | (prior_labels != label_of)
    gone = ids[(label_of < 0) & (prior_labels >= 0)].tolist()
    rows = np.flatnonzero(changed & (label_of >= 0))
    values = new[rows]
    missing = np.isnan(values)
    floats = values[:, :3].astype(object)
    floats[missing[:, :3]] = None
    alt = np.where(missing[:, 4], -1, np.nan_to_num(values[:, 4])).astype(np.int64).tolist()
    upserts = list(
        zip(
            [sid] * len(rows),
            ids[rows].tolist(),
            label_of[rows].tolist(),
            *(floats[:, j].tolist() for j in range(3)),
            values[:, 3].astype(np.int64).tolist(),
            [None if a < 0 else a for a in alt],
            strict=True,
        )
    )
    conn.executemany(
        "INSERT INTO label_geometry(session_id, image_id, label_id, distance, margin, "
        "silhouette, poor_fit, alt_label_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(session_id, image_id) DO UPDATE SET label_id = excluded.label_id, "
        "distance = excluded.distance, margin = excluded.margin, "
        "silhouette = excluded.silhouette, poor_fit = excluded.poor_fit, "
        "alt_label_id = excluded.alt_label_id",
        upserts,
    )
    if gone:
        chunked_rows(
            conn,
            f"DELETE FROM label_geometry WHERE session_id = {int(sid)} AND image_id IN ({{}})",
            gone,
        )


def refresh_geometry(workspace: Workspace) -> None:
    """Recompute every image's geometry in the active session from scratch (e.g. after
    extracting features for images labeled before they had any). Not needed after ordinary
    operations: they keep it current."""
    from imgcluster.labels._store import session_row

    pending = None
    with workspace.transaction(bump_revision=False) as conn:
        session = session_row(conn)
        pending = refresh(workspace, conn, session, None)
        # misfit counts may change: the cached label counts are keyed on this version
        conn.execute(
            "UPDATE label_sessions SET images_version = images_version + 1 WHERE id = ?",
            (session["id"],),
        )
    publish(pending)
