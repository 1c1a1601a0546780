"""Distance maths shared by clustering and labels: squared distances, silhouettes, kNN votes.

Pure numpy (scipy for one sparse sum), no workspace and no import of another imgcluster
module, so `imgcluster.clustering` and `imgcluster.labels` can both build on it without an
import circle. Every function works in bounded memory (chunked over rows), because the callers
run it on 100k to 1M points.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "centroid_sums",
    "exact_silhouette",
    "find_sorted",
    "knn_scores",
    "knn_vote",
    "sq_distances",
]


def sq_distances(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Squared Euclidean distances of every row of ``x`` to every row of ``c``.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    c : ndarray of shape (k, d)
    chunk : int, default=8192
        Rows of ``x`` per block: the temporary is ``chunk x k``, never ``n x k x d``.

    Returns
    -------
    ndarray of shape (n, k), float32
        Clipped at 0 (the expansion ``|x|^2 - 2 x.c + |c|^2`` can round below it).
    """
    c_sq = np.einsum("ij,ij->i", c, c)
    out = np.empty((len(x), len(c)), dtype=np.float32)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2.0 * (block @ c.T) + c_sq[None]
        out[start : start + chunk] = np.maximum(d2, 0.0)
    return out


def centroid_sums(
    x: np.ndarray, groups: np.ndarray, n_groups: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of rows (float64) and counts, over the rows where ``mask`` holds.

    One sparse product: ``np.add.at`` is about 10x slower at 100k rows.
    """
    from scipy.sparse import csr_matrix

    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(x))
    onehot = csr_matrix(
        (np.ones(len(rows), np.float32), (groups[rows], rows)), shape=(n_groups, len(x))
    )
    sums = np.asarray(onehot @ x, dtype=np.float64).reshape(n_groups, x.shape[1])
    counts = np.bincount(groups[rows], minlength=n_groups).astype(np.int64)
    return sums, counts


def exact_silhouette(
    x: np.ndarray, members: np.ndarray, counts: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Silhouette of each row of ``x``, the nearest other group chosen among ``reference``.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    members : ndarray of shape (n,)
        Group index of each row, in ``0..len(counts)-1``.
    counts : ndarray of shape (n_groups,)
        Rows per group (``np.bincount(members)``).
    reference : ndarray of bool, shape (n_groups,)
        Groups that may be a row's "other" group (labels too small to have a real centre
        are left out by the labels module).

    Returns
    -------
    ndarray of shape (n,)
        With every group a reference this equals `sklearn.metrics.silhouette_samples`:
        ``a`` is the mean distance to the other members of the own group (a group of one
        gets 0), ``b`` the smallest mean distance to another group's members. NaN where no
        other reference group exists. Cost ``n^2 d``: meant for a few thousand rows.
    """
    n, n_groups = len(x), len(counts)
    # Dense: a BLAS product beats a sparse one at this size.
    onehot = np.zeros((n, n_groups))
    onehot[np.arange(n), members] = 1.0
    x64 = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    totals = np.empty((n, n_groups))
    for start in range(0, n, 1024):
        block = x64[start : start + 1024]
        d2 = sq[start : start + 1024, None] - 2.0 * (block @ x64.T) + sq[None]
        d = np.sqrt(np.maximum(d2, 0.0))
        d[np.arange(len(block)), np.arange(start, start + len(block))] = 0.0
        totals[start : start + 1024] = d @ onehot
    rows = np.arange(n)
    own_count = counts[members]
    a = totals[rows, members] / np.maximum(own_count - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = totals / counts[None, :]
    means[:, ~reference] = np.inf
    means[rows, members] = np.inf
    b = means.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(a, b), 0.0)
    s[own_count == 1] = 0.0
    s[~np.isfinite(b)] = np.nan
    return s


def knn_vote(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_labels: np.ndarray,
    k: int,
    *,
    skip_self: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-distance-weighted vote of the ``k`` nearest references for each query.

    Parameters
    ----------
    queries : ndarray of shape (m, d)
    refs : ndarray of shape (r, d)
    ref_labels : ndarray of shape (r,)
        Integer label of each reference.
    k : int
        Neighbours per query (at most ``r``).
    skip_self : ndarray of shape (m,), optional
        Row of ``refs`` that is the query itself (-1 for none): left out of its own vote,
        so a labeled image does not vote for its current label.

    Returns
    -------
    winners : ndarray of shape (m,)
        The label with the largest weight.
    confidence : ndarray of shape (m,)
        The winner's share of the weight (1 = every neighbour agrees).
    """
    scores = knn_scores(queries, refs, ref_labels, k, skip_self=skip_self)
    labels = np.unique(ref_labels)
    best = scores.argmax(axis=1) if len(labels) else np.zeros(len(queries), np.int64)
    winners = labels[best] if len(labels) else np.zeros(len(queries), np.int64)
    confidence = scores[np.arange(len(queries)), best] if len(labels) else np.zeros(len(queries))
    return winners.astype(np.int64), confidence.astype(np.float64)


def knn_scores(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_labels: np.ndarray,
    k: int,
    *,
    skip_self: np.ndarray | None = None,
) -> np.ndarray:
    """Each query's weighted vote share per label (columns: ``np.unique(ref_labels)``)."""
    labels, ref_col = np.unique(ref_labels, return_inverse=True)
    out = np.zeros((len(queries), len(labels)))
    if not len(refs) or not len(queries):
        return out
    extra = 0 if skip_self is None else 1
    take = max(1, min(int(k) + extra, len(refs)))
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    for start in range(0, len(queries), 2048):
        block = queries[start : start + 2048]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2 * block @ refs.T + ref_sq[None]
        if skip_self is not None:
            own = skip_self[start : start + 2048]
            has = own >= 0
            d2[np.flatnonzero(has), own[has]] = np.inf
        nearest = np.argpartition(d2, take - 1, axis=1)[:, :take]
        dist = np.take_along_axis(d2, nearest, axis=1)
        if extra:  # drop the farthest of the k+1: the query itself was pushed to infinity
            keep = np.argsort(dist, axis=1)[:, : max(1, take - extra)]
            nearest = np.take_along_axis(nearest, keep, axis=1)
            dist = np.take_along_axis(dist, keep, axis=1)
        weights = 1.0 / (np.sqrt(np.maximum(dist, 0.0)) + 1e-6)
        weights[~np.isfinite(dist)] = 0.0
        rows = np.repeat(np.arange(len(block)), nearest.shape[1])
        np.add.at(
            out[start : start + len(block)], (rows, ref_col[nearest].ravel()), weights.ravel()
        )
    totals = out.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, out / totals, 0.0)


def find_sorted(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` sits in ``sorted_ids`` (ascending, unique): the positions of
    those found (in ``wanted``'s order) and the mask of which were found. One `searchsorted`
    instead of a dict per id (a dict of 1M ids costs about a second)."""
    wanted = np.asarray(wanted, np.int64)
    if not len(sorted_ids) or not len(wanted):
        return np.zeros(0, np.int64), np.zeros(len(wanted), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    found = sorted_ids[pos] == wanted
    return pos[found], found
