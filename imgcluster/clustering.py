"""KMeans clustering of feature vectors with an adjustable k, stored runs, typicality, k advice.

A run clusters every image that has a vector for one backbone, in a *clustering space* made from
the L2-normalised vectors by one of `PREPROCESSING`. It is stored in the workspace (the
``clusterings`` row, one ``assignments`` row per image, the centroids as a ``.npy`` in
``ws.runs_dir``) so the app's k slider and the CLI return to an earlier result instantly:
`cluster` first looks for a stored run with the same inputs (`find_run`).

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
On the clothing photos (k=10) it flags ~20% of the images, ~70% of which are outside their
cluster's majority class, against ~40% of all images (bench/quality.py).

Randomness comes only from ``seed``: the same vectors, k, algorithm, seed and preprocessing give
the same clusters, numbered by decreasing size.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcluster.errors import ImgclusterError, UnknownCluster
from imgcluster.features import FeatureMatrix, l2_normalize, load_features
from imgcluster.workspace import Workspace, atomic_write

if TYPE_CHECKING:
    from imgcluster.images import Progress

#: Ways to turn the stored (L2-normalised) vectors into the space KMeans runs in.
#: ``l2``: the vectors as stored. ``pca``: PCA to `PCA_COMPONENTS` dims (keeps Euclidean
#: geometry, several times faster). ``pca-whiten``: PCA with whitened components, L2-normalised
#: again. ``umap``: a `UMAP_COMPONENTS`-d cosine UMAP embedding (needs umap's slow first call).
PREPROCESSING = ("l2", "pca", "pca-whiten", "umap")

#: Default preprocessing, chosen by bench/quality.py and bench/cluster.py (bench/README.md):
#: on the clothing photos ``pca`` clusters as well as ``raw``/``l2`` (NMI within one standard
#: deviation for every backbone) and re-clusters 3-4x faster; ``umap`` scores ~0.01-0.02 NMI
#: higher on two backbones out of three but costs umap's ~30-60 s first call, so it cannot
#: answer the k slider; ``pca-whiten`` loses ~0.2 NMI.
DEFAULT_PREPROCESS = "pca"

PCA_COMPONENTS = 64
UMAP_COMPONENTS = 10

ALGORITHMS = ("auto", "kmeans", "minibatch")

#: ``algorithm="auto"`` uses exact KMeans up to this many images, MiniBatchKMeans above.
MINIBATCH_THRESHOLD = 20_000

K_MIN, K_MAX = 2, 200

#: Exact silhouette (O(n^2)) up to this many images; simplified silhouette above.
EXACT_SILHOUETTE_MAX_N = 4_000

MISFIT_SILHOUETTE = 0.0
MISFIT_RELATIVE_MARGIN = 0.05

#: SQL condition over an ``assignments`` row (alias ``a``) that is true for misfits.
MISFIT_SQL = (
    f"(a.silhouette < {MISFIT_SILHOUETTE} "
    f"OR a.margin < {MISFIT_RELATIVE_MARGIN} * (a.distance + a.margin))"
)


class NotEnoughImages(ImgclusterError, ValueError):
    """Fewer images with features than the clustering asks for."""


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
        raise ValueError(f"algorithm={algorithm!r} should be one of {ALGORITHMS}")
    if algorithm == "auto":
        return "kmeans" if n <= MINIBATCH_THRESHOLD else "minibatch"
    return algorithm


def fit_kmeans(
    vectors: np.ndarray, k: int, *, algorithm: str = "auto", seed: int = 0
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
    seed : int, default=0
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
        model: Any = KMeans(k, n_init=_n_init(n, k), random_state=seed)
    else:
        model = MiniBatchKMeans(
            k, n_init=3, batch_size=4096, max_no_improvement=20, random_state=seed
        )
    with _single_thread():
        model.fit(x)
    centroids = model.cluster_centers_.astype(np.float32)
    return _finish(x, centroids, int(getattr(model, "n_iter_", 0)))


def _single_thread() -> Any:
    """Run scikit-learn's OpenMP/BLAS code on one thread.

    Measured on 2 shared cores (bench/README.md): under load, threads spin-wait on each other;
    a k=2..15 KMeans sweep on 600 images took 11-15 s instead of 0.4 s, PCA of 100k vectors
    23-26 s instead of 8-10 s; one thread was as fast or faster at every size tried. The app's
    server and the UMAP worker always share the machine with the clustering.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _n_init(n: int, k: int) -> int:
    # Restarts pay off on small sets (less seed dependence) and cost too much on big ones:
    # the k slider must answer in under a second at 10k images.
    return 4 if n * k <= 100_000 else 1


def kmeans_with_fixed_centroids(
    vectors: np.ndarray,
    fixed_centroids: np.ndarray,
    n_new: int,
    *,
    seed: int = 0,
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
    seed : int, default=0
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
        raise ValueError(f"need at least one centroid (fixed={m}, n_new={n_new})")
    if len(x) < n_new:
        raise NotEnoughImages(f"n_samples={len(x)} should be >= n_new={n_new}")
    rng = np.random.default_rng(seed)
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
    """Squared Euclidean distances, ``(n, k)``, clipped at 0 against rounding."""
    c_sq = np.einsum("ij,ij->i", c, c)
    out = np.empty((len(x), len(c)), dtype=np.float32)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2.0 * (block @ c.T) + c_sq[None]
        out[start : start + chunk] = np.maximum(d2, 0.0)
    return out


def _finish(
    x: np.ndarray, centroids: np.ndarray, n_iter: int, *, sort_by_size: bool = True
) -> KMeansResult:
    """Final E-step: labels, own distance, margin and inertia from the centroids."""
    d2 = _sq_distances(x, centroids)
    labels = d2.argmin(axis=1)
    if sort_by_size:
        order = _size_order(labels, len(centroids))
        centroids = centroids[order]
        d2 = d2[:, order]
        labels = np.argsort(order)[labels]
    rows = np.arange(len(x))
    own = d2[rows, labels]
    second = np.partition(d2, 1, axis=1)[:, 1] if len(centroids) > 1 else own
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

        with _single_thread():
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


# -- preprocessing ----------------------------------------------------------------------------


def preprocess_vectors(vectors: np.ndarray, preprocess: str, *, seed: int = 0) -> np.ndarray:
    """Map L2-normalised vectors into the clustering space named by ``preprocess``.

    Parameters
    ----------
    vectors : ndarray of shape (n, d)
        Feature vectors (normalised here again, so raw vectors are fine too).
    preprocess : {"l2", "pca", "pca-whiten", "umap"}
        See `PREPROCESSING`.
    seed : int, default=0
        Random state of randomized PCA and UMAP.

    Returns
    -------
    ndarray of shape (n, d')
        float32 points to cluster.
    """
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess={preprocess!r} should be one of {PREPROCESSING}")
    x = l2_normalize(vectors)
    if preprocess == "l2":
        return x
    if preprocess in ("pca", "pca-whiten"):
        reduced = pca_reduce(x, PCA_COMPONENTS, whiten=preprocess == "pca-whiten", seed=seed)
        return l2_normalize(reduced) if preprocess == "pca-whiten" else reduced
    from imgcluster.projection import umap_embed

    return umap_embed(x, UMAP_COMPONENTS, seed=seed, min_dist=0.0)


def pca_reduce(
    vectors: np.ndarray, n_components: int, *, whiten: bool = False, seed: int = 0
) -> np.ndarray:
    """PCA to at most ``n_components`` dims (fewer when there are fewer points)."""
    from sklearn.decomposition import PCA

    x = np.asarray(vectors, dtype=np.float32)
    n_components = max(1, min(n_components, len(x) - 1, x.shape[1]))
    solver = "full" if len(x) <= 2_000 else "randomized"
    pca = PCA(n_components, whiten=whiten, svd_solver=solver, random_state=seed)
    with _single_thread():
        return pca.fit_transform(x).astype(np.float32)


class _SpaceCache:
    """Recently used clustering spaces, so a k change does not redo PCA/UMAP (thread-safe)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


_spaces = _SpaceCache()


def clustering_space(features: FeatureMatrix, preprocess: str, *, seed: int = 0) -> np.ndarray:
    """`preprocess_vectors` of a feature set, memoised by its fingerprint.

    ``l2`` is not memoised: it costs one pass over the vectors, and keeping full-width copies
    of a big set would hold gigabytes.
    """
    if preprocess == "l2":
        return preprocess_vectors(features.vectors, preprocess, seed=seed)
    key = (fingerprint(features), preprocess, str(seed))
    return _spaces.get(key, lambda: preprocess_vectors(features.vectors, preprocess, seed=seed))


def fingerprint(features: FeatureMatrix) -> str:
    """Identity of a feature set: backbone, image ids, content hashes and a sample of the values.

    Within a workspace, ids and content hashes say everything (vectors are keyed by content
    hash). The in-process caches outlive a workspace, though (the app opens several in one
    server, tests build many with the same ids), so a strided sample of about 1,000 vectors goes
    in too: cheap at 100k images, and different vectors for the same ids get another key.
    """
    digest = hashlib.sha256()
    digest.update(features.backbone.encode())
    digest.update(str(len(features)).encode())
    digest.update(np.ascontiguousarray(features.image_ids, dtype=np.int64).tobytes())
    digest.update("\n".join(features.sha256s).encode())
    stride = max(1, len(features) // 1000)
    digest.update(np.ascontiguousarray(features.vectors[::stride], dtype=np.float32).tobytes())
    return digest.hexdigest()[:24]


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
    seed: int
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


def cluster(
    workspace: Workspace,
    backbone: str,
    k: int,
    *,
    algorithm: str = "auto",
    seed: int = 0,
    preprocess: str = DEFAULT_PREPROCESS,
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
    seed : int, default=0
    preprocess : {"l2", "pca", "pca-whiten", "umap"}, default=`DEFAULT_PREPROCESS`
    progress : callable, optional
        ``(done, total)`` over the steps load, preprocess, fit, score, store.

    Returns
    -------
    ClusterRun
        The stored run. A second call with the same inputs on the same image set returns it
        from the workspace without recomputing.

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
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess={preprocess!r} should be one of {PREPROCESSING}")
    features = load_features(workspace, backbone)
    if len(features) < k:
        raise NotEnoughImages(
            f"{len(features)} images have {backbone} features, fewer than k={k}; "
            "run `imgcluster extract` first"
        )
    concrete = resolve_algorithm(algorithm, len(features))
    fp = fingerprint(features)
    step()
    existing = _find_run_id(workspace, backbone, k, concrete, seed, preprocess, fp)
    if existing is not None:
        if progress:
            progress(5, 5)
        return load_run(workspace, existing)
    start = time.perf_counter()
    space = clustering_space(features, preprocess, seed=seed)
    step()
    result = fit_kmeans(space, k, algorithm=concrete, seed=seed)
    step()
    silhouettes, silhouette_kind = silhouette_values(space, result)
    step()
    seconds = time.perf_counter() - start
    params = {
        "preprocess": preprocess,
        "fingerprint": fp,
        "dim": int(space.shape[1]),
        "silhouette": silhouette_kind,
        "inertia": result.inertia,
        "n_iter": result.n_iter,
    }
    run_id = _store_run(
        workspace, features, k, concrete, seed, params, result, silhouettes, seconds
    )
    step()
    return load_run(workspace, run_id)


def _check_k(k: int) -> None:
    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"k={k} should be between {K_MIN} and {K_MAX}")


def _stepper(progress: Progress | None, total: int) -> Callable[[], None]:
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return step


def _store_run(
    workspace: Workspace,
    features: FeatureMatrix,
    k: int,
    algorithm: str,
    seed: int,
    params: dict[str, Any],
    result: KMeansResult,
    silhouettes: np.ndarray,
    seconds: float,
) -> int:
    # The centroid file is in place before the row that names it is committed: a crash leaves
    # at most an orphan file, never a run without centroids.
    name = f"clustering-{uuid.uuid4().hex}.npy"
    atomic_write(workspace.runs_dir / name, lambda fh: np.save(fh, result.centroids))
    rows = zip(
        features.image_ids.tolist(),
        result.labels.tolist(),
        result.distances.tolist(),
        silhouettes.tolist(),
        result.margins.tolist(),
        strict=True,
    )
    with workspace.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO clusterings(backbone, k, algorithm, seed, params, centroids_file, "
            "n_images, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                features.backbone,
                k,
                algorithm,
                seed,
                json.dumps(params),
                f"runs/{name}",
                len(features),
                seconds,
            ),
        )
        run_id = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO assignments(run_id, image_id, cluster, distance, silhouette, margin) "
            f"VALUES ({run_id}, ?, ?, ?, ?, ?)",
            rows,
        )
    return run_id


def load_run(workspace: Workspace, run_id: int) -> ClusterRun:
    """A stored run, its arrays in the images' relative-path order.

    Raises
    ------
    UnknownCluster
        If no run has this id.
    """
    with workspace.read() as conn:
        row = conn.execute("SELECT * FROM clusterings WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownCluster(f"no clustering run with id {run_id}")
        cur = conn.execute(
            """
            SELECT a.image_id, a.cluster, a.distance, a.silhouette, a.margin
            FROM assignments AS a JOIN images AS i ON i.id = a.image_id
            WHERE a.run_id = ? ORDER BY i.relpath
            """,
            (run_id,),
        )
        cur.row_factory = None  # plain tuples: 5x faster than sqlite3.Row for 100k rows
        rows = cur.fetchall()
    table = np.array(rows, dtype=np.float64).reshape(-1, 5)
    params = json.loads(row["params"])
    centroids = np.load(workspace.path / row["centroids_file"])
    return ClusterRun(
        id=int(row["id"]),
        backbone=row["backbone"],
        k=int(row["k"]),
        algorithm=row["algorithm"],
        seed=int(row["seed"]),
        preprocess=params.get("preprocess", "l2"),
        image_ids=table[:, 0].astype(np.int64),
        labels=table[:, 1].astype(np.int64),
        distances=table[:, 2].astype(np.float32),
        silhouettes=np.nan_to_num(table[:, 3]).astype(np.float32),
        margins=table[:, 4].astype(np.float32),
        centroids=centroids,
        seconds=float(row["seconds"]),
        created_at=row["created_at"],
        params=params,
    )


def find_run(
    workspace: Workspace,
    backbone: str,
    k: int,
    algorithm: str = "auto",
    seed: int = 0,
    preprocess: str = DEFAULT_PREPROCESS,
) -> ClusterRun | None:
    """The stored run with these inputs on the current image set, or None (nothing computed)."""
    features = load_features(workspace, backbone)
    if not len(features):
        return None
    concrete = resolve_algorithm(algorithm, len(features))
    run_id = _find_run_id(workspace, backbone, k, concrete, seed, preprocess, fingerprint(features))
    return None if run_id is None else load_run(workspace, run_id)


def _find_run_id(
    workspace: Workspace,
    backbone: str,
    k: int,
    algorithm: str,
    seed: int,
    preprocess: str,
    fp: str,
) -> int | None:
    with workspace.read() as conn:
        row = conn.execute(
            """
            SELECT id FROM clusterings
            WHERE backbone = ? AND k = ? AND algorithm = ? AND seed = ?
              AND json_extract(params, '$.preprocess') = ?
              AND json_extract(params, '$.fingerprint') = ?
            ORDER BY id DESC LIMIT 1
            """,
            (backbone, k, algorithm, seed, preprocess, fp),
        ).fetchone()
    return None if row is None else int(row[0])


@dataclass(frozen=True)
class RunSummary:
    """One line of `list_runs`: what a run was made from, without its arrays."""

    id: int
    backbone: str
    k: int
    algorithm: str
    seed: int
    preprocess: str
    n_images: int
    seconds: float
    created_at: str


def list_runs(workspace: Workspace, backbone: str | None = None) -> list[RunSummary]:
    """Stored runs, newest first."""
    sql = "SELECT * FROM clusterings"
    args: tuple[str, ...] = ()
    if backbone is not None:
        sql += " WHERE backbone = ?"
        args = (backbone,)
    with workspace.read() as conn:
        rows = conn.execute(sql + " ORDER BY id DESC", args).fetchall()
    return [
        RunSummary(
            id=int(r["id"]),
            backbone=r["backbone"],
            k=int(r["k"]),
            algorithm=r["algorithm"],
            seed=int(r["seed"]),
            preprocess=json.loads(r["params"]).get("preprocess", "l2"),
            n_images=int(r["n_images"]),
            seconds=float(r["seconds"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]


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


# -- k suggestions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KSuggestion:
    """Quality of each k in a range; ``best`` lists the few highest-silhouette k, best first."""

    ks: list[int]
    silhouette: list[float]
    inertia: list[float]
    best: list[int]


def suggest_k(
    source: Workspace | np.ndarray,
    k_min: int = 2,
    k_max: int = 40,
    *,
    backbone: str | None = None,
    seed: int = 0,
    sample_size: int = 3_000,
    n_best: int = 3,
    progress: Progress | None = None,
) -> KSuggestion:
    """Silhouette and inertia of KMeans for each k in ``k_min..k_max``.

    The vectors are reduced by PCA (`PCA_COMPONENTS` dims); above ``sample_size`` images a
    seeded random sample is clustered and scored, so the curve costs seconds even for 100k
    images. Inertia is per image, so curves of different sizes compare.

    Parameters
    ----------
    source : Workspace or ndarray of shape (n, d)
        A workspace (then ``backbone`` is required) or the vectors themselves.
    k_min, k_max : int, default=2, 40
        Range of k, clipped to ``[2, n - 1]``.
    backbone : str, optional
    seed : int, default=0
    sample_size : int, default=3000
    n_best : int, default=3
    progress : callable, optional
        ``(done, total)`` over the k values.

    Returns
    -------
    KSuggestion
    """
    from sklearn.metrics import silhouette_score

    if isinstance(source, Workspace):
        if backbone is None:
            raise ValueError("backbone is required when suggesting k for a workspace")
        vectors = load_features(source, backbone).vectors
    else:
        vectors = np.asarray(source, dtype=np.float32)
    n = len(vectors)
    k_max = min(k_max, n - 1)
    if n < 3 or k_max < max(2, k_min):
        raise NotEnoughImages(f"{n} images are too few to compare k in {k_min}..{k_max}")
    k_min = max(2, k_min)
    if n > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
        vectors = vectors[rows]
    space = preprocess_vectors(vectors, "pca", seed=seed)
    ks = list(range(k_min, k_max + 1))
    scores: list[float] = []
    inertias: list[float] = []
    for i, k in enumerate(ks, start=1):
        result = fit_kmeans(space, k, algorithm="kmeans", seed=seed)
        if len(np.unique(result.labels)) > 1:
            with _single_thread():
                scores.append(float(silhouette_score(space, result.labels)))
        else:
            scores.append(math.nan)
        inertias.append(result.inertia / len(space))
        if progress:
            progress(i, len(ks))
    ranked = sorted(
        (k for k, s in zip(ks, scores, strict=True) if math.isfinite(s)),
        key=lambda k: -scores[ks.index(k)],
    )
    return KSuggestion(ks=ks, silhouette=scores, inertia=inertias, best=ranked[:n_best])
