"""KMeans on points of a clustering space: fits, fixed-centroid re-clustering, per-point scores.

The pure-array half of clustering (no workspace): `fit_kmeans` (clusters numbered by decreasing
size, every point's own centroid its nearest), `kmeans_with_fixed_centroids` (re-cluster around
labels that must stay), `assign`, `silhouette_values` and the misfit rule (`misfit_mask`,
`MISFIT_SQL`; defined in `imgcluster.clustering`'s docstring). `imgcluster.clustering` stores
runs of these; `imgcluster.labels` re-clusters with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imgcluster.errors import InvalidParameter, NotEnoughImages
from imgcluster.spaces import single_thread

__all__ = [
    "ALGORITHMS",
    "EXACT_SILHOUETTE_MAX_N",
    "MINIBATCH_THRESHOLD",
    "MISFIT_RELATIVE_MARGIN",
    "MISFIT_SILHOUETTE",
    "MISFIT_SQL",
    "KMeansResult",
    "assign",
    "fit_kmeans",
    "kmeans_with_fixed_centroids",
    "misfit_mask",
    "resolve_algorithm",
    "silhouette_values",
]

ALGORITHMS = ("auto", "kmeans", "minibatch")

#: ``algorithm="auto"`` uses exact KMeans up to this many images, MiniBatchKMeans above.
MINIBATCH_THRESHOLD = 20_000

#: MiniBatchKMeans is fitted on a seeded sample of this many points above it, then every point
#: joins its nearest centroid: scikit-learn draws each mini-batch with ``choice(n, p=...)``,
#: O(n) per batch (at 1M, 471 batches cost ~5 s of CPU, most of a k change), while a fit
#: converges on far fewer points than 1M (bench/README.md, "1M").
MINIBATCH_FIT_SAMPLE = 100_000

#: Exact silhouette (O(n^2)) up to this many images; simplified silhouette above.
EXACT_SILHOUETTE_MAX_N = 4_000

MISFIT_SILHOUETTE = 0.0
MISFIT_RELATIVE_MARGIN = 0.05

#: SQL condition over an ``assignments`` row (alias ``a``) that is true for misfits.
MISFIT_SQL = (
    f"(a.silhouette < {MISFIT_SILHOUETTE} "
    f"OR a.margin < {MISFIT_RELATIVE_MARGIN} * (a.distance + a.margin))"
)

# -- pure-array API ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansResult:
    """Centroids and the per-point numbers of one fit (clusters numbered by decreasing size)."""

    centroids: np.ndarray  # (k, d) float32
    labels: np.ndarray  # (n,) int64
    distances: np.ndarray  # (n,) float32, to own centroid
    margins: np.ndarray  # (n,) float32, 2nd-nearest minus own
    inertia: float
    n_iter: int


def resolve_algorithm(algorithm: str, n: int) -> str:
    """The concrete algorithm ``"auto"`` means for ``n`` points."""
    if algorithm not in ALGORITHMS:
        raise InvalidParameter(f"algorithm={algorithm!r} should be one of {ALGORITHMS}")
    if algorithm == "auto":
        return "kmeans" if n <= MINIBATCH_THRESHOLD else "minibatch"
    return algorithm


def fit_kmeans(
    vectors: np.ndarray, k: int, *, algorithm: str = "auto", random_state: int = 0
) -> KMeansResult:
    """Cluster rows of ``vectors`` into ``k`` groups, deterministically.

    Parameters
    ----------
    vectors : ndarray of shape (n, d)
        Points in the space to cluster (no preprocessing is applied here).
    k : int
        Number of clusters, ``1 <= k <= n``.
    algorithm : {"auto", "kmeans", "minibatch"}, default="auto"
        Exact Lloyd KMeans, or MiniBatchKMeans (``auto`` above `MINIBATCH_THRESHOLD` points).
    random_state : int, default=0
        Random state of k-means++ seeding and mini-batch sampling.

    Returns
    -------
    KMeansResult
        Labels are re-derived from the final centroids (one extra E-step), so every point's
        own centroid is its nearest and margins are never negative, even for MiniBatchKMeans.

    Raises
    ------
    NotEnoughImages
        If there are fewer points than ``k``.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    if k < 1 or n < k:
        raise NotEnoughImages(f"n_samples={n} should be >= n_clusters={k} >= 1")
    algorithm = resolve_algorithm(algorithm, n)
    if algorithm == "kmeans":
        model: Any = KMeans(k, n_init=_n_init(n, k), random_state=random_state)
    else:
        # compute_labels=False: `_finish` labels every point from the centroids anyway; the
        # model's own final pass over all points is the same work again (~1 s at 1M).
        model = MiniBatchKMeans(
            k,
            n_init=3,
            batch_size=4096,
            max_no_improvement=20,
            random_state=random_state,
            compute_labels=False,
        )
    fit_x = x
    if algorithm == "minibatch" and n > MINIBATCH_FIT_SAMPLE:
        rows = np.random.default_rng(random_state).choice(n, MINIBATCH_FIT_SAMPLE, replace=False)
        fit_x = x[np.sort(rows)]
    with single_thread():
        model.fit(fit_x)
    centroids = model.cluster_centers_.astype(np.float32)
    return _finish(x, centroids, int(getattr(model, "n_iter_", 0)))


def _n_init(n: int, k: int) -> int:
    # Restarts pay off on small sets (less seed dependence) and cost too much on big ones:
    # the k slider must answer in under a second at 10k images.
    return 4 if n * k <= 100_000 else 1


def kmeans_with_fixed_centroids(
    vectors: np.ndarray,
    fixed_centroids: np.ndarray,
    n_new: int,
    *,
    random_state: int = 0,
    max_iter: int = 100,
) -> KMeansResult:
    """KMeans where some centroids are given and stay put; only ``n_new`` more are learned.

    Used to re-cluster the images nobody has confirmed yet around the labels that exist: the
    confirmed labels' centroids are fixed seeds, new centroids are placed by k-means++
    seeding conditioned on the fixed ones (far from every existing centroid), then Lloyd
    iterations move only the new centroids while every point joins its nearest centroid.

    Parameters
    ----------
    vectors : ndarray of shape (n, d)
        The points to assign (e.g. the unconfirmed images).
    fixed_centroids : ndarray of shape (m, d)
        Centroids that must not move (``m`` may be 0).
    n_new : int
        Number of centroids to learn (may be 0: plain nearest-centroid assignment).
    random_state : int, default=0
        Random state of the seeding.
    max_iter : int, default=100
        Lloyd iterations at most.

    Returns
    -------
    KMeansResult
        ``centroids[:m]`` are ``fixed_centroids`` unchanged, ``centroids[m:]`` the new ones;
        ``labels`` index into ``centroids`` (here clusters keep this order, not sorted by size).
        A new centroid that ends up with no points is moved to the worst-served point.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    fixed = np.asarray(fixed_centroids, dtype=np.float32).reshape(-1, x.shape[1])
    m = len(fixed)
    if n_new < 0 or m + n_new < 1:
        raise InvalidParameter(f"need at least one centroid (fixed={m}, n_new={n_new})")
    if len(x) < n_new:
        raise NotEnoughImages(f"n_samples={len(x)} should be >= n_new={n_new}")
    rng = np.random.default_rng(random_state)
    centroids = np.concatenate([fixed, _seed_new_centroids(x, fixed, n_new, rng)])
    labels = np.full(len(x), -1, dtype=np.int64)
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        d2 = _sq_distances(x, centroids)
        new_labels = d2.argmin(axis=1)
        if n_new:
            _fill_empty(x, centroids, new_labels, d2, m)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(m, m + n_new):
            members = labels == j
            if members.any():
                centroids[j] = x[members].mean(axis=0)
    return _finish(x, centroids, n_iter, sort_by_size=False)


def _seed_new_centroids(
    x: np.ndarray, fixed: np.ndarray, n_new: int, rng: np.random.Generator
) -> np.ndarray:
    """k-means++ seeding that treats ``fixed`` as already chosen centres."""
    chosen: list[np.ndarray] = []
    if n_new == 0:
        return np.zeros((0, x.shape[1]), np.float32)
    if len(fixed):
        closest = _sq_distances(x, fixed).min(axis=1)
    else:
        first = x[rng.integers(len(x))]
        chosen.append(first)
        closest = _sq_distances(x, first[None]).ravel()
    while len(chosen) < n_new:
        total = float(closest.sum())
        if total <= 0:  # every point already sits on a centre: any point will do
            idx = int(rng.integers(len(x)))
        else:
            idx = int(rng.choice(len(x), p=closest / total))
        chosen.append(x[idx])
        closest = np.minimum(closest, _sq_distances(x, x[idx][None]).ravel())
    return np.array(chosen, dtype=np.float32)


def _fill_empty(
    x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, d2: np.ndarray, first_free: int
) -> None:
    """Move each empty learnable centroid onto the point farthest from its own centroid."""
    counts = np.bincount(labels, minlength=len(centroids))
    for j in np.flatnonzero(counts[first_free:] == 0) + first_free:
        own = d2[np.arange(len(x)), labels]
        worst = int(own.argmax())
        centroids[j] = x[worst]
        labels[worst] = j
        d2[worst] = 0.0


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row and the distance to it (chunked: bounded memory)."""
    d2 = _sq_distances(np.asarray(vectors, np.float32), np.asarray(centroids, np.float32))
    labels = d2.argmin(axis=1)
    return labels, np.sqrt(d2[np.arange(len(labels)), labels])


def _sq_distances(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Squared Euclidean distances, ``(n, k)``: `imgcluster.metrics.sq_distances`."""
    from imgcluster.metrics import sq_distances

    return sq_distances(x, c, chunk)


def _finish(
    x: np.ndarray, centroids: np.ndarray, n_iter: int, *, sort_by_size: bool = True
) -> KMeansResult:
    """Final E-step: labels, own distance, margin and inertia from the centroids.

    Block by block (`_nearest_two`): the ``(n, k)`` distance matrix is never held (at 1M x 200
    it would be 800 MB, and reordering and partitioning it cost seconds).
    """
    labels, own, second = _nearest_two(x, centroids)
    if sort_by_size:
        order = _size_order(labels, len(centroids))
        centroids = centroids[order]
        labels = np.argsort(order)[labels]
    distances = np.sqrt(own)
    margins = np.maximum(np.sqrt(second) - distances, 0.0)
    return KMeansResult(
        centroids=np.ascontiguousarray(centroids, np.float32),
        labels=labels.astype(np.int64),
        distances=distances.astype(np.float32),
        margins=margins.astype(np.float32),
        inertia=float(own.sum()),
        n_iter=n_iter,
    )


def _nearest_two(
    x: np.ndarray, centroids: np.ndarray, chunk: int = 16_384
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: nearest centroid, squared distance to it and to the second nearest (the own
    one again when there is a single centroid)."""
    n = len(x)
    labels = np.empty(n, np.int64)
    own = np.empty(n, np.float32)
    second = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        d2 = _sq_distances(x[start : start + chunk], centroids)
        rows = np.arange(len(d2))
        best = d2.argmin(axis=1)
        labels[start : start + chunk] = best
        own[start : start + chunk] = d2[rows, best]
        if d2.shape[1] > 1:
            second[start : start + chunk] = np.partition(d2, 1, axis=1)[:, 1]
        else:
            second[start : start + chunk] = d2[rows, best]
    return labels, own, second


def _size_order(labels: np.ndarray, k: int) -> np.ndarray:
    """Old cluster numbers by decreasing size; ties by first member, so numbering is stable."""
    counts = np.bincount(labels, minlength=k)
    first = np.full(k, len(labels))
    np.minimum.at(first, labels, np.arange(len(labels)))
    return np.lexsort((first, -counts))


def silhouette_values(vectors: np.ndarray, result: KMeansResult) -> tuple[np.ndarray, str]:
    """Per-point silhouette: exact for small sets, simplified (centroid) above.

    Returns the values and ``"exact"`` or ``"simplified"``. Points of a singleton cluster
    get 0, as in scikit-learn.
    """
    k = len(result.centroids)
    n = len(vectors)
    if k < 2:
        return np.zeros(n, np.float32), "exact"
    # scikit-learn defines the silhouette only for 2 <= distinct labels <= n - 1.
    if n <= EXACT_SILHOUETTE_MAX_N and 1 < len(np.unique(result.labels)) < n:
        from sklearn.metrics import silhouette_samples

        with single_thread():
            values = silhouette_samples(vectors, result.labels)
        return values.astype(np.float32), "exact"
    second = result.distances + result.margins
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(second > 0, result.margins / second, 0.0)
    return values.astype(np.float32), "simplified"


def misfit_mask(distances: np.ndarray, margins: np.ndarray, silhouettes: np.ndarray) -> np.ndarray:
    """True for the images a grid should flag (the definition in the module docstring)."""
    second = distances + margins
    return (silhouettes < MISFIT_SILHOUETTE) | (margins < MISFIT_RELATIVE_MARGIN * second)
