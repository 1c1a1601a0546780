"""Typicality and misfits: each image's place relative to the labels as they are now.

Every labeled image with features has, in the session run's clustering space
(`imgcluster.clustering.clustering_space`): its ``distance`` to its label's centroid (mean
of the label's ``normal`` images), the ``margin`` to the nearest *other* label's centroid, a
``silhouette`` (exact up to `~imgcluster.clustering.EXACT_SILHOUETTE_MAX_N` normal images,
the simplified centroid one above) and a ``poor_fit`` flag by the clustering module's own rule
(`~imgcluster.clustering.misfit_mask`). "Other" labels are only those with at least
`MISFIT_MIN_LABEL_SIZE` normal images: a label of two hand-picked images has a centre that may
sit on another label's centre, and comparing against it would flag that whole label.

Where the numbers live, and why (issue 15 §3: a move of 1,000 images < 1 s at 1M):

* **In this process, not in SQLite.** A move changes two centroids, so the distance of every
  member of both labels and the margin of every image whose nearest other label is one of
  them change: tens of thousands of rows at 100k images, hundreds of thousands at 1M.
  Writing them (the former ``label_geometry`` table, upserted inside each move) cost 3-4 s
  of every move at 100k, 65% of it in ``executemany`` (profile in bench/README.md,
  "Labels"). Recomputing the same numbers in numpy costs a fraction of that: the clustering
  space is small (PCA-64, 256 MB at 1M) and a move recomputes only the changed labels'
  distance columns (one matrix product each) and the rows whose numbers can change.
* **State** (`_State`, one per session and process): each label's centroid sum and count, every
  image's distance to every centroid (n x labels float32, 80 MB at 1M with 20 labels), and
  the outputs (distance, margin, silhouette, poor fit, nearest other label) plus, mirrored
  from ``image_labels``, each image's label, ``normal`` and ``confirmed`` flags. Pages are
  sorted from it (a label's rows by distance or silhouette: an argsort of one label's rows),
  misfit counts are a bincount, the misplaced list a sort of the poor fits; SQL only fetches
  the page's rows by primary key.
* **Kept exactly equal to a recomputation from scratch** (tests/test_labels_geometry.py
  compares them after every step of a random session): every operation that changes image
  rows hands its after-values to `refresh` inside its transaction, which updates the flags,
  the sums of the labels rows left or joined, those labels' distance columns, and the
  outputs of every row whose own label or nearest other label changed or whose nearest other
  label could now be a changed one. A change of which labels are "other" candidates (a label
  crossing `MISFIT_MIN_LABEL_SIZE`), or the exact-silhouette regime, recomputes every row.
* **Invalidation across processes**: each committed change of image rows stores a new random
  ``geometry_token`` in the session row; a state is used only while its token equals the
  session's (read in the same read transaction as the rows a query returns), so another
  process's write, a rolled-back transaction or a new session make it rebuilt from the
  session's rows (`imgcluster.labels._store.session_rows`) and the space on the next read
  (a read builds, it never writes). A rename or a label delete changes no image row and
  keeps the token.
* **A start reads what a start kept**: the state a start builds (every image of the run in
  its cluster's label) is kept in the workspace from `KEEP_START_MIN_N` images on
  (`_StartKeeper`), so a later start from the same run and space (the app restarts untouched
  labels on a k change) reads it back instead of building it (0.1-0.3 s instead of 2-5 s
  at 1M), bit for bit the same numbers.
* **Feature set**: a state stands for the features it was built from. Operations trust it
  (checking the feature-set identity costs a join of every image: 6 s at 1M) unless they
  touch an image the state does not know; `refresh_geometry` rebuilds it after new features.

All in-process caches of the labels package live here, in `_CACHE`: feature matrices keyed on
(database path, feature-set identity), geometry states keyed on (database path, session), label
counts keyed on (database path, session, images version).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcluster.labels.results import ImageState
from imgcluster.metrics import exact_silhouette, find_sorted

if TYPE_CHECKING:
    from imgcluster.features import FeatureMatrix
    from imgcluster.workspace import Workspace

__all__ = [
    "MISFIT_MIN_LABEL_SIZE",
    "label_geometry",
    "poor_fit_ids",
    "refresh_geometry",
    "session_features",
    "session_space",
]

#: Labels with fewer ``normal`` images than this are not compared against when telling
#: misfits: a few hand-picked images make a centre that is no group's yet.
MISFIT_MIN_LABEL_SIZE = 5


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

_BLOCK = 16_384  # rows per block of the outputs (fixed: results do not depend on it)
#: Rows per matrix-vector product of a distance column (fixed: a row's product must be
#: computed the same way in a build and in an update; 1 MB of a PCA-64 space stays in cache
#: while every changed label's column is computed from it).
_PRODUCT_BLOCK = 4_096


def _fixed_point_scale(space: np.ndarray) -> float:
    """The power of two that puts coordinates on an int64 grid with room for a sum over every
    row (at most 2^-40 apart: far below float32 resolution at these magnitudes)."""
    n = max(len(space), 1)
    # max |x| without an |x| copy of the space (256 MB at 1M: ~1 s of page faults)
    top = max(float(space.max()), -float(space.min())) if space.size else 0.0
    bits = 62 - int(np.ceil(np.log2(n + 1))) - max(0, int(np.ceil(np.log2(top + 1e-30))))
    return float(2.0 ** min(bits, 40))


# -- features and the clustering space ---------------------------------------------------------


def _feature_key(workspace: Workspace, backbone: str) -> str:
    """The identity of the session backbone's stored vectors, memoised on the workspace's
    image and feature versions (`imgcluster.spaces.feature_state`): the join it stands for
    costs ~3 s per call at 1M images, and label writes never change it."""
    from imgcluster.spaces import feature_set

    return feature_set(workspace, backbone)


def session_features(
    workspace: Workspace, backbone: str, feature_key: str | None = None
) -> FeatureMatrix:
    """The stored vectors of ``backbone`` (`load_features`), memoised per feature set
    (``feature_key``: its `imgcluster.features.feature_set_id`, when the caller has it)."""
    from imgcluster.features import load_features

    if feature_key is None:
        feature_key = _feature_key(workspace, backbone)
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
            run = run_info(own, run_id)
    else:
        run = run_info(conn, run_id)
    key = _feature_key(workspace, backbone)
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
    """The given images that have features (all with features if None), and their points,
    in the current feature set (images extracted since the geometry state was built count:
    suggesting labels for them is what this is for)."""
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
    return state.out.copy()


@dataclass
class _State:
    """Centroid sums per label column, every row's distance to every centroid, and the
    outputs of every row, kept current by `update`."""

    space: np.ndarray
    label_of: np.ndarray  # label id per row, -1 = no label
    normal: np.ndarray
    confirmed: np.ndarray
    columns: dict[int, int]
    column_labels: list[int]
    col: np.ndarray  # column of each row's label, -1 = no label
    scale: float  # fixed-point scale of the sums (a power of two)
    sums: np.ndarray  # (n_columns, d) int64: sum of members' round(x * scale), exact
    counts: np.ndarray  # (n_columns,)
    dist: np.ndarray  # (n, n_columns) float32, NaN for columns without a normal image
    out: np.ndarray  # (n, 5): distance, margin, silhouette, poor fit, nearest other label
    other_col: np.ndarray  # column of the nearest other reference label, -1 = none
    other: np.ndarray  # distance to it, inf = none
    _x_sq: np.ndarray | None = None  # squared norm of each row of the space

    @classmethod
    def build(
        cls,
        space: np.ndarray,
        label_of: np.ndarray,
        normal: np.ndarray,
        confirmed: np.ndarray | None = None,
    ) -> _State:
        labels = sorted({int(v) for v in np.unique(label_of) if v >= 0})
        columns = {lab: i for i, lab in enumerate(labels)}
        keys = np.asarray(labels, np.int64)
        col = np.where(label_of >= 0, np.searchsorted(keys, label_of), -1).astype(np.int64)
        d = space.shape[1] if space.ndim == 2 else 1
        sums, counts = np.zeros((len(labels), d), np.int64), np.zeros(len(labels), np.int64)
        n = len(space)
        state = cls(
            space=space,
            label_of=label_of.astype(np.int64, copy=True),
            normal=normal.astype(bool, copy=True),
            confirmed=(np.zeros(n, bool) if confirmed is None else confirmed.astype(bool)),
            columns=columns,
            column_labels=labels,
            col=col,
            scale=_fixed_point_scale(space),
            sums=sums,
            counts=counts,
            dist=np.full((n, len(labels)), np.nan, np.float32),
            out=np.full((n, 5), np.nan),
            other_col=np.full(n, -1, np.int64),
            other=np.full(n, np.inf),
        )
        members = state.normal & (col >= 0)
        for c in range(len(labels)):
            rows = np.flatnonzero(members & (col == c))
            state.counts[c] = len(rows)
            state.sums[c] = state._fixed(rows).sum(axis=0)
        state._recompute_columns(list(range(len(labels))))
        state._outputs(None)
        return state

    def _fixed(self, rows: np.ndarray) -> np.ndarray:
        """``round(x * scale)`` of the given rows, int64 (exact sums in any order)."""
        block = np.asarray(self.space[rows], dtype=np.float64)
        return np.rint(block * self.scale).astype(np.int64).reshape(len(rows), self.sums.shape[1])

    # Every number is computed the same way whether one label changed or all were built: a
    # label's sum is an exact integer sum of its members' fixed-point coordinates (a float
    # running sum drifts in the last bits; integers do not, in any order), a distance column
    # comes from one matrix-vector product per fixed block of rows and that label's centroid
    # alone, on one thread, then the same elementwise steps. So an updated state equals a
    # state built from scratch (the test compares bit for bit), and page orders agree even
    # between near-equal values.
    #
    # One product per column, not one (rows, d) @ (d, columns) product: OpenBLAS picks its
    # kernel by the number of columns, and a column of a 2-column product differed in the
    # last bits from the same column of a 20-column one (H3_NOTES.md). One thread: on 2
    # shared cores OpenBLAS threads spin-wait on each other, and the products of one move of
    # 20 images took 0.05-1.2 s (one thread: 0.04-0.05 s at 1M).

    def _recompute_columns(self, cols: list[int]) -> None:
        """Distance column of each label column in ``cols`` (NaN without members)."""
        from imgcluster.spaces import single_thread

        live = [c for c in cols if self.counts[c] > 0]
        for c in cols:
            if self.counts[c] <= 0:
                self.dist[:, c] = np.nan
        if not live or not len(self.space):
            return
        centroids = (self.sums[live] / self.scale / self.counts[live, None]).astype(np.float32)
        with single_thread():
            if self._x_sq is None:  # row norms once per state (a pass over the space saved)
                self._x_sq = np.einsum("ij,ij->i", self.space, self.space)
            c_sq = np.array([np.dot(c, c) for c in centroids], np.float32)
            for start in range(0, len(self.space), _PRODUCT_BLOCK):
                block = self.space[start : start + _PRODUCT_BLOCK]
                x_sq = self._x_sq[start : start + _PRODUCT_BLOCK]
                d2 = np.empty((len(live), len(block)), np.float32)
                for j, column in enumerate(d2):
                    np.matmul(block, centroids[j], out=column)
                # elementwise: the same numbers whichever columns are computed together
                d2 *= -2.0
                d2 += x_sq[None, :]
                d2 += c_sq[:, None]
                np.maximum(d2, 0.0, out=d2)
                np.sqrt(d2, out=d2)
                self.dist[start : start + _PRODUCT_BLOCK, live] = d2.T

    def _column(self, label_id: int) -> int:
        if label_id not in self.columns:
            self.columns[label_id] = len(self.column_labels)
            self.column_labels.append(label_id)
            self.sums = np.vstack([self.sums, np.zeros((1, self.sums.shape[1]), np.int64)])
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

    def _exact_regime(self) -> bool:
        from imgcluster.clustering import EXACT_SILHOUETTE_MAX_N

        return 0 < int((self.normal & (self.col >= 0)).sum()) <= EXACT_SILHOUETTE_MAX_N

    def update(
        self,
        rows: np.ndarray,
        new_labels: np.ndarray,
        new_normal: np.ndarray,
        new_confirmed: np.ndarray,
    ) -> None:
        """Give ``rows`` their new label (-1 = unlabeled), ``normal`` and ``confirmed``: adjust
        the sums of the labels they leave and join, recompute those labels' distance
        columns, then the outputs of every row whose numbers can have changed."""
        self.confirmed[rows] = new_confirmed
        old_labels, old_normal = self.label_of[rows], self.normal[rows]
        keep = (old_labels != new_labels) | (old_normal != new_normal)
        rows, new_labels, new_normal = rows[keep], new_labels[keep], new_normal[keep]
        old_labels, old_normal = old_labels[keep], old_normal[keep]
        if not len(rows):
            return
        old_reference = self.counts >= MISFIT_MIN_LABEL_SIZE
        # stored silhouettes are exact ones while in that regime: leaving it recomputes all
        was_exact = self._exact_regime()
        for lab in np.unique(new_labels[new_labels >= 0]).tolist():
            self._column(int(lab))
        fixed = self._fixed(rows)
        touched: set[int] = set()
        for sign, labs, norm in ((-1, old_labels, old_normal), (1, new_labels, new_normal)):
            cols = self.columns_of(labs)
            use = (cols >= 0) & norm
            if use.any():
                np.add.at(self.sums, cols[use], sign * fixed[use])
                np.add.at(self.counts, cols[use], sign)
                touched.update(np.unique(cols[use]).tolist())
        self.label_of[rows] = new_labels
        self.normal[rows] = new_normal
        self.col[rows] = self.columns_of(new_labels)
        cols = sorted(touched)
        self._recompute_columns(cols)
        reference = self.counts >= MISFIT_MIN_LABEL_SIZE
        grown = len(reference) - len(old_reference)
        old_reference = np.concatenate([old_reference, np.zeros(grown, bool)])
        if (
            was_exact
            or self._exact_regime()
            or (reference != old_reference).any()
            or len(cols) * 2 >= len(self.column_labels)
        ):
            self._outputs(None)
            return
        self._outputs(self._affected(rows, np.asarray(cols, np.int64), reference))

    def _affected(self, moved: np.ndarray, cols: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Rows whose outputs can differ after ``cols`` changed: moved rows, members of those
        labels, rows whose nearest other label is one of them, and rows for which one of them
        is now at least as near as their nearest other label (ties pick the lower column).

        One lookup per row instead of `np.isin` and no (n, len(cols)) copy of distances: at
        1M rows this selection was ~0.07 s of a move of 20 images (H3_NOTES.md)."""
        changed = np.zeros(len(self.column_labels) + 1, bool)  # the last entry: column -1
        changed[cols] = True
        hit = changed[self.col]
        hit |= changed[self.other_col]
        hit[moved] = True
        # A row of a changed label is hit already, so its own column needs no masking here;
        # reference columns have normal members, so no NaN.
        for c in cols[reference[cols]].tolist():
            hit |= self.dist[:, c] <= self.other
        return np.flatnonzero(hit)

    def _outputs(self, rows: np.ndarray | None) -> None:
        """Recompute the outputs of ``rows`` (sorted; None = every row) from the distances,
        block by block of `_BLOCK` rows.

        A block where ``rows`` are many is recomputed whole, as a slice: gathering a third of
        a million rows by index cost more than a pass over every row (0.43 s against 0.16 s
        at 1M, H3_NOTES.md), and a row whose inputs did not change gets its same numbers
        back (every number of a row depends only on that row's distances and the counts).
        Blocks also keep the temporaries small (an (n, labels) copy was 80 MB at 1M)."""
        n = len(self.space)
        if rows is None and self._exact_regime():
            self._outputs_at(slice(None), exact=True)
            return
        if rows is None:
            for start in range(0, n, _BLOCK):
                self._outputs_at(slice(start, min(start + _BLOCK, n)))
            return
        rows = np.asarray(rows, np.int64)
        bounds = np.searchsorted(rows, np.arange(0, n + _BLOCK, _BLOCK))
        for b, start in enumerate(range(0, n, _BLOCK)):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            stop = min(start + _BLOCK, n)
            if hi == lo:
                continue
            if (hi - lo) * 4 >= stop - start:
                self._outputs_at(slice(start, stop))
            else:
                self._outputs_at(rows[lo:hi])

    def _outputs_at(self, index: np.ndarray | slice, *, exact: bool = False) -> None:
        """Recompute the outputs of the rows ``index`` selects (``exact``: every row, with
        exact silhouettes)."""
        from imgcluster.clustering import misfit_mask

        m = len(self.col[index])
        out = np.full((m, 5), np.nan)
        out[:, 3] = 0
        other_col = np.full(m, -1, np.int64)
        other_val = np.full(m, np.inf)
        if m and self.column_labels:
            col = self.col[index]
            dist = self.dist[index]
            has = self.counts > 0
            r = np.arange(m)
            safe = np.maximum(col, 0)
            own = np.where((col >= 0) & has[safe], dist[r, safe], np.nan)
            out[:, 0] = own
            reference = self.counts >= MISFIT_MIN_LABEL_SIZE
            # NaN columns (no normal image) are no reference: the mask turns them to inf
            masked = np.where(reference[None, :], dist, np.float32(np.inf))
            labeled = np.flatnonzero(col >= 0)
            masked[labeled, col[labeled]] = np.inf
            best = masked.argmin(axis=1)
            other = masked[r, best]
            finite = np.isfinite(other)
            other_col = np.where(finite, best, -1)
            other_val = other.astype(np.float64)
            defined = ~np.isnan(own) & finite
            if defined.any():
                margin = np.where(defined, other - own, np.nan)
                with np.errstate(invalid="ignore", divide="ignore"):
                    top = np.maximum(own, other)
                    silhouette = np.where(top > 0, margin / top, 0.0)
                if exact:
                    normal = self.normal & (self.col >= 0)
                    silhouette[normal] = exact_silhouette(
                        self.space[normal], self.col[normal], self.counts, reference
                    )
                silhouette[~defined] = np.nan
                out[:, 1] = margin
                out[:, 2] = silhouette
                out[defined, 3] = misfit_mask(own[defined], margin[defined], silhouette[defined])
                out[defined, 4] = np.asarray(self.column_labels)[best[defined]]
        self.out[index] = out
        self.other_col[index] = other_col
        self.other[index] = other_val


# -- the state of a session, as this process holds it -----------------------------------------


@dataclass
class _Entry:
    """A session's geometry state, the token of the ``image_labels`` contents it mirrors, and
    the feature set (space) it was built from. ``lock`` is held by readers while they use
    it and by `refresh` while it updates it in place."""

    token: str | None
    space_key: str
    ids: np.ndarray  # image id per row (the space's order)
    state: _State
    lock: threading.RLock = field(default_factory=threading.RLock)
    _order: np.ndarray | None = None
    _misfits: dict[int, int] | None = None

    def rows_of(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the given image ids, and which ids have one."""
        image_ids = np.asarray(image_ids, np.int64)
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        pos, found = find_sorted(self.ids[self._order], image_ids)
        return self._order[pos], found

    def geometry_of(self, image_ids: list[int]) -> dict[int, tuple]:
        """``{image id: (distance, silhouette, poor fit, nearest other label id)}`` for those
        that have features (None for undefined numbers)."""
        rows, found = self.rows_of(np.asarray(image_ids, np.int64))
        found_ids = np.asarray(image_ids, np.int64)[found].tolist()
        out = self.state.out[rows]
        result = {}
        for i, (dist, _margin, sil, poor, alt) in zip(found_ids, out.tolist(), strict=True):
            result[i] = (
                None if dist != dist else dist,  # NaN -> None
                None if sil != sil else sil,
                bool(poor),
                None if alt != alt else int(alt),
            )
        return result

    def misfit_counts(self) -> dict[int, int]:
        """Unconfirmed ``normal`` poor fits per label (images with features)."""
        if self._misfits is None:
            s = self.state
            mask = (s.out[:, 3] == 1) & s.normal & ~s.confirmed & (s.label_of >= 0)
            labs, n = np.unique(s.label_of[mask], return_counts=True)
            self._misfits = dict(zip(labs.tolist(), n.tolist(), strict=True))
        return self._misfits

    def ordered(self, label_id: int, order: str) -> np.ndarray:
        """Image ids of a label with a defined measure, in page order: ascending distance
        ("typicality") or silhouette ("misfit"), ties by image id."""
        s = self.state
        rows = np.flatnonzero(s.label_of == int(label_id))
        measure = s.out[rows, 0 if order == "typicality" else 2]
        rows, measure = rows[~np.isnan(measure)], measure[~np.isnan(measure)]
        return self.ids[rows[np.lexsort((self.ids[rows], measure))]]

    def label_size(self, label_id: int) -> int:
        """Rows of a label in the state (with features, measured or not)."""
        return int((self.state.label_of == int(label_id)).sum())

    def misplaced(self, label_id: int | None) -> np.ndarray:
        """Image ids of unconfirmed ``normal`` poor fits (of one label, or all), worst first."""
        s = self.state
        mask = (s.out[:, 3] == 1) & s.normal & ~s.confirmed & (s.label_of >= 0)
        if label_id is not None:
            mask &= s.label_of == int(label_id)
        rows = np.flatnonzero(mask)
        return self.ids[rows[np.lexsort((self.ids[rows], s.out[rows, 2]))]]

    def poor_fit_ids(self) -> np.ndarray:
        """Image ids flagged as poor fits (whatever their state or confirmation)."""
        return self.ids[(self.state.out[:, 3] == 1) & (self.state.label_of >= 0)]

    def apply(self, changes: Mapping[int, ImageState | None]) -> bool:
        """Mirror committed row changes; False if one of them is an image the state does not
        know (its features may be new: the caller rebuilds)."""
        image_ids = np.fromiter(changes, np.int64, len(changes))
        rows, found = self.rows_of(image_ids)
        unknown = [i for i, ok in zip(image_ids.tolist(), found.tolist(), strict=True) if not ok]
        if any(changes[i] is not None for i in unknown):
            return False
        after = [changes[i] for i in image_ids[found].tolist()]
        labels = np.array([-1 if a is None else a[0] for a in after], np.int64)
        normal = np.array([a is not None and a[2] == "normal" for a in after], bool)
        confirmed = np.array([a is not None and bool(a[1]) for a in after], bool)
        self.state.update(rows, labels, normal, confirmed)
        self._misfits = None
        return True


def _read_rows(
    conn: sqlite3.Connection, sid: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, ``normal`` and ``confirmed`` of each of ``ids`` from the session's rows
    (`imgcluster.labels._store.session_rows`: arrays, implicit start rows included; a dict
    of a million tuples costs seconds)."""
    from imgcluster.labels._store import session_rows

    table = session_rows(conn, sid)
    label_of = np.full(len(ids), -1, np.int64)
    normal = np.zeros(len(ids), bool)
    confirmed = np.zeros(len(ids), bool)
    if len(ids) and len(table.ids):
        pos, hit = table.find(ids)
        label_of[hit] = table.label[pos]
        normal[hit] = table.state[pos] == 0
        confirmed[hit] = table.confirmed[pos]
    return label_of, normal, confirmed


def _build(
    workspace: Workspace,
    conn: sqlite3.Connection,
    session: sqlite3.Row,
    token: str | None,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Entry:
    """A state from scratch: the session's space and its ``image_labels`` rows as ``conn``
    sees them (``known``: a start's rows, image ids sorted and their labels, when the caller
    just wrote them all)."""
    ids, space, space_key = session_space(workspace, session["backbone"], session["run_id"], conn)
    if known is None:
        label_of, normal, confirmed = _read_rows(conn, int(session["id"]), ids)
        return _Entry(token, space_key, ids, _State.build(space, label_of, normal, confirmed))
    label_of, normal, confirmed = _started_rows(ids, *known)
    kept = _StartKeeper(workspace, space_key, ids, label_of)
    state = kept.load(space)
    if state is None:
        state = _State.build(space, label_of, normal, confirmed)
        kept.save(state)
    return _Entry(token, space_key, ids, state)


#: From this many images on, the geometry a start builds is kept in the workspace (a few
#: arrays, ~140 MB at 1M images and 20 labels), so that a later start from the same run
#: and space (the app restarts untouched labels on a k change; `start --replace`) reads it
#: back (~0.3 s) instead of building it (2-5 s at 1M).
KEEP_START_MIN_N = 50_000

_KEPT = ("sums", "counts", "dist", "out", "other_col", "other", "x_sq", "column_ranks")


@dataclass
class _StartKeeper:
    """The kept geometry of a start, in label ranks (a later session's label ids differ;
    its labels are made in the same cluster order, so ranks match): named by a hash of the
    space's identity, its image ids and every row's label rank, so it is only ever used for
    exactly the inputs it was built from (and is then bit for bit what a build gives)."""

    workspace: Workspace
    space_key: str
    ids: np.ndarray
    label_of: np.ndarray

    def __post_init__(self) -> None:
        import hashlib

        self.labels = np.unique(self.label_of[self.label_of >= 0])
        self.ranks = np.where(
            self.label_of >= 0, np.searchsorted(self.labels, self.label_of), -1
        ).astype(np.int64)
        # "v2": distances by one product per column (`_State._recompute_columns`)
        digest = hashlib.sha1(b"v2:" + self.space_key.encode())
        digest.update(np.ascontiguousarray(self.ids, np.int64).tobytes())
        digest.update(self.ranks.tobytes())
        self.path = self.workspace.runs_dir / f"start-geometry-{digest.hexdigest()[:24]}"

    def load(self, space: np.ndarray) -> _State | None:
        # ``scale.npy`` is written last: without it the folder is incomplete
        if len(self.ids) < KEEP_START_MIN_N or not (self.path / "scale.npy").exists():
            return None
        try:
            # Read whole (~140 MB at 1M): mapped copy-on-write, the first move paid ~1 s of
            # page faults writing into them.
            kept: dict[str, Any] = {name: np.load(self.path / f"{name}.npy") for name in _KEPT}
            kept["scale"] = float(np.load(self.path / "scale.npy"))
        except (OSError, ValueError, EOFError):
            return None  # derived data: build it again
        labels = self.labels.tolist()
        if kept["column_ranks"].tolist() != list(range(len(labels))):
            return None
        out = kept["out"]
        alt = out[:, 4]
        defined = ~np.isnan(alt)
        alt[defined] = self.labels[alt[defined].astype(np.int64)]
        n = len(self.ids)
        col = self.ranks
        return _State(
            space=space,
            label_of=self.label_of.copy(),
            normal=self.label_of >= 0,
            confirmed=np.zeros(n, bool),
            columns={lab: i for i, lab in enumerate(labels)},
            column_labels=labels,
            col=col.copy(),
            scale=kept["scale"],
            sums=kept["sums"],
            counts=kept["counts"],
            dist=kept["dist"],
            out=out,
            other_col=kept["other_col"],
            other=kept["other"],
            _x_sq=kept["x_sq"],
        )

    def save(self, state: _State) -> None:
        if len(self.ids) < KEEP_START_MIN_N or state._x_sq is None:
            return
        from imgcluster.workspace import atomic_write

        out = state.out.copy()
        alt = out[:, 4]
        defined = ~np.isnan(alt)
        alt[defined] = np.searchsorted(self.labels, alt[defined].astype(np.int64))
        arrays = {
            "sums": state.sums,
            "counts": state.counts,
            "dist": state.dist,
            "out": out,
            "other_col": state.other_col,
            "other": state.other,
            "x_sq": state._x_sq,
            "column_ranks": np.searchsorted(self.labels, np.asarray(state.column_labels)),
            "scale": np.float64(state.scale),  # last: marks the folder complete
        }
        with contextlib.suppress(OSError):  # a read-only workspace builds it each time
            for name, array in arrays.items():
                atomic_write(self.path / f"{name}.npy", lambda fh, a=array: np.save(fh, a))


def _started_rows(
    ids: np.ndarray, image_ids: np.ndarray, label_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, ``normal`` and ``confirmed`` of each of ``ids`` when the session's rows are
    exactly ``image_ids`` (sorted) in ``label_ids``, all normal and unconfirmed: a start."""
    label_of = np.full(len(ids), -1, np.int64)
    pos, hit = find_sorted(image_ids, ids)
    label_of[hit] = label_ids[pos]
    return label_of, label_of >= 0, np.zeros(len(ids), bool)


@contextlib.contextmanager
def reading(
    workspace: Workspace, conn: sqlite3.Connection, session: sqlite3.Row
) -> Iterator[_Entry]:
    """The session's geometry as of ``conn``'s read transaction (``session``: its row, read
    in it), held while the caller uses it. Built (never written) when this process has no
    state of that token."""
    key = (str(workspace.db_path), int(session["id"]))
    token = session["geometry_token"]
    entry = _CACHE.get("geometry", key)
    if entry is not None:
        with entry.lock:
            if entry.token == token:
                yield entry
                return
    entry = _build(workspace, conn, session, token)
    current = _CACHE.get("geometry", key)
    if current is None or current.token != token:
        _CACHE.put("geometry", key, entry)
    with entry.lock:
        yield entry


def poor_fit_ids(workspace: Workspace, conn: sqlite3.Connection, session: sqlite3.Row) -> set[int]:
    """Ids of the session's images flagged as poor fits now (for `imgcluster.labels.gather`)."""
    with reading(workspace, conn, session) as entry:
        return set(entry.poor_fit_ids().tolist())


def snapshot(workspace: Workspace) -> dict[int, tuple]:
    """``{image id: (label id, distance, margin, silhouette, poor fit, nearest other label
    id)}`` of every labeled image with features in the active session: what this process
    holds (built if it holds nothing). For tests and `imgcluster check`-style comparisons."""
    from imgcluster.labels._store import session_row

    with workspace.read() as conn:
        session = session_row(conn)
        with reading(workspace, conn, session) as entry:
            s = entry.state
            rows = np.flatnonzero(s.label_of >= 0)
            return {
                int(entry.ids[r]): (int(s.label_of[r]), *(None if v != v else v for v in o))
                for r, o in zip(rows.tolist(), s.out[rows].tolist(), strict=True)
            }


# -- refresh (inside an operation's transaction) ----------------------------------------------


@dataclass
class Pending:
    """A refreshed state (None: none held) and its new token, published to the cache once
    its transaction committed."""

    key: tuple
    entry: _Entry | None
    token: str


def refresh(
    workspace: Workspace,
    conn: sqlite3.Connection,
    session: sqlite3.Row,
    changes: Mapping[int, ImageState | None] | None,
    *,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> Pending:
    """After image rows changed in the caller's write transaction (``changes``: their new
    values, None = rebuild from scratch): store a new token and bring this process's state
    up to date (incrementally when it holds the state of the token before). ``known``: with
    ``changes=None``, a new session's start rows (`_started_rows`)."""
    sid = int(session["id"])
    key = (str(workspace.db_path), sid)
    token = conn.execute(
        "SELECT geometry_token FROM label_sessions WHERE id = ?", (sid,)
    ).fetchone()[0]
    new_token = uuid.uuid4().hex
    conn.execute("UPDATE label_sessions SET geometry_token = ? WHERE id = ?", (new_token, sid))
    # Taken out: the state is updated in place, and only a committed refresh puts it back.
    entry = _CACHE.pop("geometry", key)
    if changes is None:
        return Pending(key, _build(workspace, conn, session, new_token, known), new_token)
    if entry is None or token is None or entry.token != token:
        return Pending(key, None, new_token)  # the next read builds it
    with entry.lock:
        entry.token = ""  # a reader holding it from before sees it as stale
        if entry.apply(changes):
            return Pending(key, entry, new_token)
    # images the state does not know got a label: rebuild if the features changed
    _ids, _space, space_key = session_space(workspace, session["backbone"], session["run_id"], conn)
    if space_key != entry.space_key:
        return Pending(key, _build(workspace, conn, session, new_token), new_token)
    with entry.lock:
        kept = {i: a for i, a in changes.items() if len(entry.rows_of(np.array([i]))[0])}
        entry.apply(kept)
    return Pending(key, entry, new_token)


def has_state(workspace: Workspace, session_id: int) -> bool:
    """Whether this process holds a geometry state for the session (its space is loaded)."""
    return _CACHE.get("geometry", (str(workspace.db_path), int(session_id))) is not None


def publish(pending: Pending | None) -> None:
    """Make a committed refresh's state the one reads use."""
    if pending is not None and pending.entry is not None:
        pending.entry.token = pending.token
        _CACHE.put("geometry", pending.key, pending.entry)


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
