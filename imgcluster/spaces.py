"""The vector spaces of a feature set: L2 vectors, PCA, UMAP; stored, cached, made in background.

Clustering (`imgcluster.clustering`) and the 2-D map (`imgcluster.projection`) both start here,
so neither imports the other. A space depends only on the feature set, never on k, so it is
keyed by the feature set's identity (`imgcluster.features.feature_set_id`: one SQL query, no
vectors loaded) and made once:

* **instant spaces** (``l2``, ``pca``, ``pca-whiten``) are computed in process in well under a
  second and memoised (`space_of`);
* **UMAP spaces** cost umap's numba compilation on first use plus the fit, so they are made by
  a background process (`imgcluster.space_worker.start_background`) and stored in the
  workspace (table ``projections``, owned by this module, one ``.npz`` of coordinates and image
  ids per space in ``runs/``): never recomputed for the same feature set, in this process or
  another. Two are made: `REFINED`, the clustering space (10-d cosine UMAP of the L2 vectors,
  ``min_dist=0``), and `MAP_UMAP`, the 2-D map. Until they are stored, PCA serves
  (`best_preprocess`).

numba compiles umap's functions on their first call in every process (~30-60 s); its on-disk
cache lives under the project's cache folder (`imgcluster.settings.numba_cache_dir`), set as
``NUMBA_CACHE_DIR`` before numba is imported, and `imgcluster.space_worker.warm_numba_cache`
fills it in the background when the server starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from imgcluster import settings
from imgcluster.errors import InvalidParameter, NotEnoughImages
from imgcluster.features import (
    FeatureMatrix,
    FeatureRows,
    feature_count,
    feature_rows,
    feature_set_id,
    features_version,
    l2_normalize,
)
from imgcluster.workspace import Workspace, atomic_write

if TYPE_CHECKING:
    from imgcluster.images import Progress

__all__ = [
    "DEFAULT_PREPROCESS",
    "MAP_PCA",
    "MAP_UMAP",
    "PCA_COMPONENTS",
    "PREPROCESSING",
    "REFINED",
    "StoredSpace",
    "best_preprocess",
    "compute_space",
    "exact_knn",
    "feature_state",
    "feature_state_and_revision",
    "l2_normalize",
    "load_space",
    "pca_reduce",
    "preprocess_vectors",
    "resolve_preprocess",
    "single_thread",
    "space_of",
    "umap_embed",
]

#: Ways to turn the stored (L2-normalised) vectors into the space KMeans runs in.
#: ``l2``: the vectors as stored. ``pca``: PCA to `PCA_COMPONENTS` dims (keeps Euclidean
#: geometry, several times faster). ``pca-whiten``: PCA with whitened components, L2-normalised
#: again. ``umap``: the refined space, `REFINED_COMPONENTS`-d cosine UMAP (stored, made in the
#: background).
PREPROCESSING = ("l2", "pca", "pca-whiten", "umap")

#: The space that is always there at once (the refined one replaces it when stored).
DEFAULT_PREPROCESS = "pca"

#: The refined clustering space's preprocessing name and its stored method name.
REFINED_PREPROCESS = "umap"
REFINED = "refined-umap"
#: Stored method names of the 2-D maps.
MAP_UMAP = "umap"
MAP_PCA = "pca"
#: The UMAP spaces the background worker makes, in that order (clusters first: they can move
#: to the refined space before labeling starts; the PCA map stands in for the 2-D one).
BACKGROUND_METHODS = (REFINED, MAP_UMAP)

PCA_COMPONENTS = 64

#: Above this many points PCA is fitted on a seeded sample of this size and applied to every
#: point block by block, read from the memory-mapped shards (`FeatureRows`): a full fit at 1M x
#: 1280 would centre a 5 GB copy (bench/README.md, "1M"). Up to it, PCA is fitted on all.
PCA_FIT_SAMPLE = 50_000

#: The refined space (bench/README.md, "Spaces"): 10-d cosine UMAP, 30 neighbours, min_dist 0,
#: 200 epochs. On the clothing photos 15 or 50 neighbours, 5 or 20 dims, min_dist 0.1 and
#: umap's default 500 epochs (below 10k points) all scored within 0.005 NMI (one standard
#: deviation over 10 seeds); 200 epochs costs less than half the layout time of 500.
REFINED_COMPONENTS = 10
REFINED_N_NEIGHBORS = 30
REFINED_MIN_DIST = 0.0
REFINED_N_EPOCHS = 200

#: The 2-D map.
MAP_N_NEIGHBORS = 15
MAP_MIN_DIST = 0.1

#: For big sets UMAP starts from a PCA reduction to `UMAP_PCA_DIMS` (then Euclidean, which on
#: the centred reduction of unit vectors stands in for cosine): neighbour search in 1280 dims
#: dominates otherwise.
UMAP_PCA_DIMS = 50
UMAP_PCA_MIN_N = 5_000
#: Above this many points UMAP is fitted on a seeded sample of this size and the rest is
#: placed by ``transform`` (bench/README.md: quality and time of both at 100k).
UMAP_FIT_SAMPLE = 50_000
#: Points placed by one ``transform`` call (memory bound at 1M; see `umap_embed`).
UMAP_TRANSFORM_CHUNK = 100_000
#: UMAP fits of this many points get an exact kNN graph (`exact_knn`); below the lower bound
#: umap computes all distances itself.
EXACT_KNN_MIN_N = 4_096
EXACT_KNN_MAX_N = UMAP_FIT_SAMPLE

#: Below this many images UMAP has too few neighbours to mean anything.
UMAP_MIN_N = 8

#: The random state of every stored space: one space per feature set, whatever the run's seed.
SPACE_RANDOM_STATE = 0


# -- array maths ------------------------------------------------------------------------------


def single_thread() -> Any:
    """Run scikit-learn's OpenMP/BLAS code on one thread.

    Measured on 2 shared cores (bench/README.md): under load, threads spin-wait on each other;
    a k=2..15 KMeans sweep on 600 images took 11-15 s instead of 0.4 s, PCA of 100k vectors
    23-26 s instead of 8-10 s; one thread was as fast or faster at every size tried. The app's
    server and the UMAP worker always share the machine with the clustering.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


Vectors = np.ndarray | FeatureRows


def _rows(vectors: Vectors) -> FeatureRows:
    """Any vectors as a `FeatureRows` (an array is served as it is, never copied)."""
    if isinstance(vectors, FeatureRows):
        return vectors
    x = np.asarray(vectors, dtype=np.float32)
    empty = np.zeros(0, np.int64)
    dim = x.shape[1] if x.ndim == 2 else 0
    return FeatureRows("", np.arange(len(x)), dim, empty, empty, matrix=x)


def _array(vectors: Vectors) -> np.ndarray:
    """Every row in memory (for sets small enough to fit on all)."""
    if isinstance(vectors, FeatureRows):
        return vectors.take(np.arange(len(vectors)))
    return np.asarray(vectors, dtype=np.float32)


def sample_rows(n: int, size: int, random_state: int = 0) -> np.ndarray:
    """Sorted seeded sample of ``size`` row indices out of ``n`` (all of them if fewer)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(random_state).choice(n, size, replace=False))


def pca_reduce(
    vectors: Vectors,
    n_components: int,
    *,
    whiten: bool = False,
    random_state: int = 0,
    normalize: bool = False,
) -> np.ndarray:
    """PCA to at most ``n_components`` dims (fewer when there are fewer points).

    Up to `PCA_FIT_SAMPLE` points PCA is fitted on all of them; above, on a seeded sample,
    and applied to every row block by block (`FeatureRows` are read from their shards that
    way), so memory is the output plus one block. ``normalize`` L2-normalises the rows first
    (block by block too).
    """
    if len(vectors) > PCA_FIT_SAMPLE:
        return _pca_sampled(_rows(vectors), n_components, whiten, random_state, normalize)
    from sklearn.decomposition import PCA

    x = _array(vectors)
    if normalize:
        x = l2_normalize(x)
    n_components = max(1, min(n_components, len(x) - 1, x.shape[1]))
    solver = "full" if len(x) <= 2_000 else "randomized"
    pca = PCA(n_components, whiten=whiten, svd_solver=solver, random_state=random_state)
    with single_thread():
        return pca.fit_transform(x).astype(np.float32)


def _pca_sampled(
    rows: FeatureRows, n_components: int, whiten: bool, random_state: int, normalize: bool
) -> np.ndarray:
    """PCA fitted on `PCA_FIT_SAMPLE` seeded rows, then ``(x - mean) @ components`` per block."""
    from sklearn.decomposition import PCA

    fit_x = rows.take(sample_rows(len(rows), PCA_FIT_SAMPLE, random_state))
    if normalize:
        fit_x = l2_normalize(fit_x)
    n_components = max(1, min(n_components, len(fit_x) - 1, fit_x.shape[1]))
    pca = PCA(n_components, whiten=whiten, svd_solver="randomized", random_state=random_state)
    with single_thread():
        pca.fit(fit_x)
    del fit_x
    basis = pca.components_.T.astype(np.float32)
    if whiten:
        basis /= np.sqrt(pca.explained_variance_).astype(np.float32)
    shift = pca.mean_.astype(np.float32) @ basis  # (x - m) B = x B - m B: no centred copy
    out = np.empty((len(rows), n_components), np.float32)
    with single_thread():
        for start, block in rows.blocks():
            if normalize:
                block = l2_normalize(block)
            out[start : start + len(block)] = block @ basis - shift
    return out


def pca_2d(vectors: Vectors, *, random_state: int = 0) -> np.ndarray:
    """The instant map: the two leading principal components (of a sample, above
    `PCA_FIT_SAMPLE` points: the map at 1M is fitted on a sample and applied to all)."""
    if len(vectors) < 3:
        return np.zeros((len(vectors), 2), np.float32)
    coords = pca_reduce(vectors, 2, random_state=random_state, normalize=True)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def _configure_numba_cache() -> None:
    """Point numba's on-disk cache at the project's cache folder (before numba is imported;
    if it already is, its config is updated in place)."""
    folder = settings.numba_cache_dir()
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(folder))
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None and not getattr(numba_config, "CACHE_DIR", ""):
        numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _import_umap() -> Any:
    _configure_numba_cache()
    # umap imports TensorFlow for ParametricUMAP if it can: ~2 s and ~500 MB never used here.
    # A None entry in sys.modules makes that import fail, which umap handles.
    blocked = "tensorflow" not in sys.modules
    if blocked:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        with _numba_caching():
            import umap
    finally:
        if blocked and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return umap


@contextlib.contextmanager
def _numba_caching() -> Any:
    """While umap is imported, numba's ``njit``/``jit`` default to ``cache=True``.

    pynndescent caches its compiled code on disk, umap (0.5) does not: without this, every
    fresh process recompiles umap's layout and graph code (bench/README.md: ~10 s of the first
    call with a warm pynndescent cache). Functions numba cannot cache are compiled as before.
    """
    import numba

    originals = numba.njit, numba.jit

    def with_cache(decorator: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return wrapped

    numba.njit, numba.jit = with_cache(originals[0]), with_cache(originals[1])
    try:
        yield
    finally:
        numba.njit, numba.jit = originals


class _TqdmSink:
    """A file for umap's tqdm bar that turns ``n/total`` updates into a progress callback."""

    _pattern = re.compile(r"(\d+)/(\d+)")

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def write(self, text: str) -> int:
        for done, total in self._pattern.findall(text):
            self._progress(int(done), int(total))
        return len(text)

    def flush(self) -> None:
        return None


def umap_embed(
    vectors: Vectors,
    n_components: int = 2,
    *,
    random_state: int = 0,
    n_neighbors: int = MAP_N_NEIGHBORS,
    min_dist: float = MAP_MIN_DIST,
    n_epochs: int | None = None,
    fit_sample: int | None = UMAP_FIT_SAMPLE,
    progress: Progress | None = None,
) -> np.ndarray:
    """Seeded cosine UMAP of L2-normalised vectors; float32 ``(n, n_components)``.

    Big sets are reduced by PCA first (`UMAP_PCA_MIN_N`), and above ``fit_sample`` points UMAP
    is fitted on a seeded sample and the others are placed by ``transform``. A fixed
    ``random_state`` makes umap single-threaded but reproducible. ``progress`` gets
    ``(epochs done, epochs)`` of the fit.
    """
    import warnings

    metric = "cosine"
    if len(vectors) >= UMAP_PCA_MIN_N and _rows(vectors).dim > UMAP_PCA_DIMS:
        # Normalised block by block inside: no full-size normalised copy of a big set.
        x = pca_reduce(vectors, UMAP_PCA_DIMS, random_state=random_state, normalize=True)
        metric = "euclidean"
    else:
        x = l2_normalize(_array(vectors))
    umap = _import_umap()
    tqdm_kwds = None
    if progress is not None:
        tqdm_kwds = {"file": _TqdmSink(progress), "disable": False, "mininterval": 0.5}
        tqdm_kwds["bar_format"] = "{n}/{total}\n"
    sample = None
    if fit_sample is not None and len(x) > fit_sample:
        sample = sample_rows(len(x), fit_sample, random_state)
    fit_x = x if sample is None else x[sample]
    n_neighbors = max(2, min(n_neighbors, len(fit_x) - 1))
    # Exact neighbours when no ``transform`` follows (that needs pynndescent's index).
    knn = (None, None, None)
    if sample is None and EXACT_KNN_MIN_N <= len(fit_x) <= EXACT_KNN_MAX_N:
        knn = (*_shared_knn(fit_x, n_neighbors, metric), None)
    model = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        n_epochs=n_epochs,
        random_state=random_state,
        init="spectral" if len(fit_x) > n_components + 1 else "random",
        tqdm_kwds=tqdm_kwds,
        precomputed_knn=knn,
    )
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state": determinism is the point.
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        # Our exact graph comes without pynndescent's index: no ``transform`` is made from it.
        warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
        fitted = model.fit_transform(fit_x).astype(np.float32)
        if sample is None:
            return fitted
        out = np.empty((len(x), n_components), np.float32)
        rest = np.setdiff1d(np.arange(len(x)), sample)
        out[sample] = fitted
        # In chunks: umap's transform of 950k points at once (1M) builds its graph and layout
        # for all of them together; each point is placed against the fitted sample only (not
        # the other new points), so chunks change the peak memory and the random draws only.
        for part in np.array_split(rest, max(1, -(-len(rest) // UMAP_TRANSFORM_CHUNK))):
            out[part] = model.transform(x[part]).astype(np.float32)
        return out


def exact_knn(x: np.ndarray, n_neighbors: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``n_neighbors`` nearest rows of every row (itself first), as umap's kNN graph.

    Why not pynndescent (umap's own search above 4,096 points): its search code takes the
    distance function as an argument, which numba cannot cache on disk, so every fresh process
    recompiled it (bench/README.md: ~60 s of CPU of a 10k fit with a warm cache), while exact
    search on the <= 50-d PCA reduction is a few blocked matrix products (~1 s at 10k).
    ``metric`` is ``"cosine"`` (rows L2-normalised) or ``"euclidean"``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    indices = np.empty((n, n_neighbors), np.int32)
    distances = np.empty((n, n_neighbors), np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    step = max(1, 2**23 // n)  # ~32 MB of distances per block
    with single_thread():
        for start in range(0, n, step):
            block = x[start : start + step]
            rows = np.arange(len(block))
            if metric == "cosine":
                d = 1.0 - block @ x.T
            else:
                d = norms[start : start + step, None] - 2.0 * (block @ x.T) + norms[None, :]
            d[rows, rows + start] = -np.inf  # itself first, even among duplicates
            part = np.argpartition(d, n_neighbors - 1, axis=1)[:, :n_neighbors]
            part_d = np.take_along_axis(d, part, axis=1)
            order = np.argsort(part_d, axis=1, kind="stable")
            part, part_d = np.take_along_axis(part, order, 1), np.take_along_axis(part_d, order, 1)
            part_d = np.maximum(part_d, 0.0)
            indices[start : start + step] = part
            distances[start : start + step] = part_d if metric == "cosine" else np.sqrt(part_d)
    return indices, distances


#: The last exact kNN graph: the worker makes the refined space (30 neighbours) and then the
#: 2-D map (15) of the same vectors, whose graph is the first 15 columns of the same search.
_last_knn: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


def _shared_knn(x: np.ndarray, n_neighbors: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """`exact_knn`, reusing the last graph of the same points when it has enough neighbours.

    Copies are returned: umap marks disconnected edges in the arrays it is given."""
    import hashlib

    key = (x.shape, metric, hashlib.blake2b(np.ascontiguousarray(x).data).hexdigest())
    cached = _last_knn.get(key)
    if cached is None or cached[0].shape[1] < n_neighbors:
        cached = exact_knn(x, n_neighbors, metric)
        _last_knn.clear()
        _last_knn[key] = cached
    return cached[0][:, :n_neighbors].copy(), cached[1][:, :n_neighbors].copy()


def preprocess_vectors(vectors: Vectors, preprocess: str, *, random_state: int = 0) -> np.ndarray:
    """Map vectors into the clustering space named by ``preprocess`` (blocking, not stored).

    Parameters
    ----------
    vectors : ndarray of shape (n, d), or FeatureRows
        Feature vectors (normalised here again, so raw vectors are fine too). Above
        `PCA_FIT_SAMPLE` rows the PCA spaces are fitted on a sample and applied block by
        block (no full-size copy is made).
    preprocess : {"l2", "pca", "pca-whiten", "umap"}
        See `PREPROCESSING`.
    random_state : int, default=0
        Random state of randomized PCA and UMAP.

    Returns
    -------
    ndarray of shape (n, d')
        float32 points to cluster.
    """
    if preprocess not in PREPROCESSING:
        raise InvalidParameter(f"preprocess={preprocess!r} should be one of {PREPROCESSING}")
    if preprocess == "l2":
        return l2_normalize(_array(vectors))
    if preprocess in ("pca", "pca-whiten"):
        whiten = preprocess == "pca-whiten"
        reduced = pca_reduce(
            vectors, PCA_COMPONENTS, whiten=whiten, random_state=random_state, normalize=True
        )
        return l2_normalize(reduced) if whiten else reduced
    return umap_embed(
        vectors,
        REFINED_COMPONENTS,
        random_state=random_state,
        n_neighbors=REFINED_N_NEIGHBORS,
        min_dist=REFINED_MIN_DIST,
        n_epochs=REFINED_N_EPOCHS,
    )


# -- the feature set's identity and the in-process cache ---------------------------------------


def feature_set(workspace: Workspace, backbone: str) -> str:
    """`imgcluster.features.feature_set_id` of the workspace's ``backbone`` vectors."""
    return feature_state(workspace, backbone)[1]


_states: dict[tuple[Any, ...], tuple[int, str]] = {}
_states_lock = threading.Lock()


def feature_state(workspace: Workspace, backbone: str) -> tuple[int, str]:
    """``(feature_count, feature_set_id)`` of ``backbone``, memoised.

    Both are joins over every image (~14 s each at 1M rows under load, bench/README.md
    "1M"), and a k change, a map poll or a label move needs them. They are recomputed only
    when the images (`imgcluster.workspace.images_version`: ingest stamps every change) or
    the stored vectors (`imgcluster.features.features_version`) changed: label writes, which
    bump the revision, do not change them. The revision is checked first (free).
    """
    return feature_state_and_revision(workspace, backbone)[:2]


def _db_key(workspace: Workspace) -> tuple[str, int | None]:
    try:
        inode: int | None = os.stat(workspace.db_path).st_ino
    except OSError:
        inode = None
    return str(workspace.db_path), inode


def feature_state_and_revision(workspace: Workspace, backbone: str) -> tuple[int, str, int]:
    """`feature_state` and the workspace revision it was checked at."""
    from imgcluster.workspace import images_version

    db = _db_key(workspace)
    revision = workspace.revision
    by_revision = (*db, "revision", revision, backbone)
    with _states_lock:
        found = _states.get(by_revision)
    if found is not None:
        return (*found, revision)
    with workspace.read() as conn:
        version = features_version(conn, backbone)
    by_content = (*db, "content", images_version(workspace), version)
    with _states_lock:
        found = _states.get(by_content)
    if found is None:
        with workspace.read() as conn:
            found = (feature_count(conn, backbone), feature_set_id(conn, backbone))
    with _states_lock:
        if len(_states) > 64:
            _states.clear()
        _states[by_content] = found
        _states[by_revision] = found
    return (*found, revision)


class _SpaceCache:
    """Recently used spaces, so a k change does not redo PCA or reread UMAP (thread-safe)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: tuple[str, ...], make: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
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


_cache = _SpaceCache()


def space_of(
    workspace: Workspace,
    backbone: str,
    preprocess: str,
    *,
    features: FeatureMatrix | None = None,
    feature_set_key: str | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image ids and their points in the ``preprocess`` space of the current feature set.

    Memoised per (database, feature set, preprocess); the refined space (``"umap"``) is read
    from the workspace when stored and computed (blocking, with ``progress``) and stored when
    not. ``l2`` is not memoised: one pass over the vectors, and full-width copies of a big set
    would hold gigabytes. Pass ``features`` when the caller has loaded them already; otherwise
    the PCA spaces are computed from the memory-mapped shards block by block (`feature_rows`),
    so the 5 GB matrix of 1M vectors is never held.
    """
    if preprocess not in PREPROCESSING:
        raise InvalidParameter(f"preprocess={preprocess!r} should be one of {PREPROCESSING}")
    fsid = feature_set_key or feature_set(workspace, backbone)

    if preprocess == "l2":
        if features is not None:
            return features.image_ids, l2_normalize(features.vectors)
        return _l2_space(feature_rows(workspace, backbone))

    def make() -> tuple[np.ndarray, np.ndarray]:
        if preprocess == REFINED_PREPROCESS:
            stored = compute_space(workspace, backbone, REFINED, progress=progress, fsid=fsid)
            return stored.image_ids, stored.coords
        kept = _stored_pca(workspace, backbone, preprocess, fsid)
        if kept is not None:
            return kept
        # Read from the shards block by block (no 5 GB matrix at 1M) unless already loaded.
        started = time.perf_counter()
        source = features.vectors if features is not None else feature_rows(workspace, backbone)
        ids = features.image_ids if features is not None else source.image_ids
        space = preprocess_vectors(source, preprocess, random_state=SPACE_RANDOM_STATE)
        _keep_pca(workspace, backbone, preprocess, fsid, ids, space, time.perf_counter() - started)
        return ids, space

    return _cache.get((str(workspace.db_path), backbone, fsid, preprocess), make)


#: From this many vectors on, a PCA clustering space is stored in the workspace once computed
#: (`space_of`): at 1M images computing it again costs ~25 s (reading 5 GB of vectors), and
#: every fresh process that starts labeling or moves images needs it; reading it back costs
#: a read of n x 64 float32 (256 MB at 1M). Below, recomputing is cheap and no file is kept.
STORE_PCA_MIN_N = 50_000


def _pca_method(preprocess: str) -> str:
    """The ``projections.method`` of a stored clustering space (not a map: `METHODS`)."""
    return f"space-{preprocess}"


def _stored_pca(
    workspace: Workspace, backbone: str, preprocess: str, fsid: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """A PCA space kept by `_keep_pca` for this feature set, or None."""
    with workspace.read() as conn:
        found = _stored_file(conn, workspace, backbone, _pca_method(preprocess), fsid)
    if found is None:
        return None
    try:
        # Mapped copy-on-write: pages are read when used (a start from a kept geometry reads
        # none of them), and the array behaves as an ordinary writable one.
        coords = np.load(found[0], mmap_mode="c")
        ids = np.load(_ids_file(found[0]))
    except (OSError, ValueError):
        return None  # unreadable (a disk problem): compute it again, it is derived data
    if coords.dtype != np.float32 or coords.ndim != 2 or len(coords) != len(ids):
        return None
    threading.Thread(target=_page_in, args=(coords,), daemon=True).start()
    return ids, coords


def _page_in(coords: np.ndarray) -> None:
    """Touch one value per page of a mapped space in the background, so the first
    computation over it (a move's distance columns at 1M) does not pay the page faults."""
    step = max(1, 4096 // max(1, coords.strides[0]))
    with contextlib.suppress(Exception):  # best effort: the pages load on use anyway
        float(np.asarray(coords[::step, 0]).sum())


def _ids_file(coords_file: Path) -> Path:
    return coords_file.with_name(coords_file.stem + "-ids.npy")


def _keep_pca(
    workspace: Workspace,
    backbone: str,
    preprocess: str,
    fsid: str,
    ids: np.ndarray,
    space: np.ndarray,
    seconds: float,
) -> None:
    """Store a computed PCA space (bit for bit: float32 only) when it is worth a file."""
    if len(ids) < STORE_PCA_MIN_N or space.dtype != np.float32 or not fsid:
        return
    method = _pca_method(preprocess)
    # Two plain .npy files (an .npz is a zip: reading 256 MB back through it cost ~2 s).
    relfile = f"runs/space-{backbone}-{method}-{fsid}.npy"
    path = workspace.path / relfile
    atomic_write(_ids_file(path), lambda fh: np.save(fh, np.asarray(ids, np.int64)))
    atomic_write(path, lambda fh: np.save(fh, space))
    with workspace.transaction(bump_revision=False) as conn:  # derived data: no revision
        conn.execute(
            "INSERT INTO projections(backbone, method, fingerprint, params, file, seconds) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(backbone, method, fingerprint) DO UPDATE "
            "SET params = excluded.params, file = excluded.file, seconds = excluded.seconds",
            (
                backbone,
                method,
                fsid,
                json.dumps({"random_state": SPACE_RANDOM_STATE}),
                relfile,
                seconds,
            ),
        )


def _l2_space(rows: FeatureRows) -> tuple[np.ndarray, np.ndarray]:
    """Ids and normalised vectors, filled block by block from the shards: one full-size
    array (`load_features` and then `l2_normalize` would hold two)."""
    out = np.empty((len(rows), rows.dim), np.float32)
    for start, block in rows.blocks():
        out[start : start + len(block)] = l2_normalize(block)
    return rows.image_ids, out


# -- stored spaces ----------------------------------------------------------------------------


class StoredSpace(NamedTuple):
    """Coordinates of one stored space, rows aligned with ``image_ids`` (`load_features` order)."""

    coords: np.ndarray  # float32 (n, d)
    image_ids: np.ndarray  # int64 (n,)
    method: str
    params: dict[str, Any]


METHODS = (REFINED, MAP_UMAP, MAP_PCA)


def _stored_file(
    conn: sqlite3.Connection, workspace: Workspace, backbone: str, method: str, fsid: str
) -> tuple[Path, dict[str, Any]] | None:
    row = conn.execute(
        "SELECT file, params FROM projections WHERE backbone = ? AND method = ? "
        "AND fingerprint = ?",
        (backbone, method, fsid),
    ).fetchone()
    if row is None:
        return None
    path = workspace.path / row[0]
    return (path, json.loads(row[1] or "{}")) if path.exists() else None


def is_stored(workspace: Workspace, backbone: str, method: str, fsid: str | None = None) -> bool:
    """Whether ``method``'s space of the current feature set is stored (no vectors read)."""
    key = fsid or feature_set(workspace, backbone)
    with workspace.read() as conn:
        return _stored_file(conn, workspace, backbone, method, key) is not None


def load_space(
    workspace: Workspace, backbone: str, method: str, fsid: str | None = None
) -> StoredSpace | None:
    """The stored ``method`` space of the current feature set, or None (nothing computed)."""
    if method not in METHODS:
        raise InvalidParameter(f"method={method!r} should be one of {METHODS}")
    key = fsid or feature_set(workspace, backbone)
    with workspace.read() as conn:
        found = _stored_file(conn, workspace, backbone, method, key)
    if found is None:
        return None
    path, params = found
    with np.load(path) as data:
        return StoredSpace(data["coords"], data["image_ids"], method, params)


def _store(
    workspace: Workspace,
    backbone: str,
    method: str,
    fsid: str,
    space: StoredSpace,
    seconds: float,
) -> None:
    relfile = f"runs/space-{backbone}-{method}-{fsid}.npz"

    def write(fh: Any) -> None:
        np.savez(fh, coords=space.coords.astype(np.float32), image_ids=space.image_ids)

    atomic_write(workspace.path / relfile, write)
    # Derived data every reader would compute alike: no revision bump (caches stay valid).
    with workspace.transaction(bump_revision=False) as conn:
        conn.execute(
            "INSERT INTO projections(backbone, method, fingerprint, params, file, seconds) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(backbone, method, fingerprint) DO UPDATE "
            "SET params = excluded.params, file = excluded.file, seconds = excluded.seconds",
            (backbone, method, fsid, json.dumps(space.params), relfile, seconds),
        )


def _make(method: str, features: FeatureRows, progress: Progress | None) -> StoredSpace:
    x = features
    rs = SPACE_RANDOM_STATE
    if method == MAP_PCA or (method == MAP_UMAP and len(x) < UMAP_MIN_N):
        return StoredSpace(pca_2d(x, random_state=rs), features.image_ids, method, {})
    if method == REFINED and len(x) < UMAP_MIN_N:
        coords = preprocess_vectors(x, DEFAULT_PREPROCESS, random_state=rs)
        return StoredSpace(coords, features.image_ids, method, {"fallback": DEFAULT_PREPROCESS})
    dims, n_neighbors, min_dist, n_epochs = (
        (REFINED_COMPONENTS, REFINED_N_NEIGHBORS, REFINED_MIN_DIST, REFINED_N_EPOCHS)
        if method == REFINED
        else (2, MAP_N_NEIGHBORS, MAP_MIN_DIST, None)
    )
    coords = umap_embed(
        x,
        dims,
        random_state=rs,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        n_epochs=n_epochs,
        progress=progress,
    )
    params = {
        "random_state": rs,
        "n_components": dims,
        "n_neighbors": n_neighbors,
        "min_dist": min_dist,
        "n_epochs": n_epochs,
        "pca_dims": UMAP_PCA_DIMS if len(x) >= UMAP_PCA_MIN_N else None,
        "fit_sample": UMAP_FIT_SAMPLE if len(x) > UMAP_FIT_SAMPLE else None,
    }
    return StoredSpace(coords, features.image_ids, method, params)


def compute_space(
    workspace: Workspace,
    backbone: str,
    method: str,
    *,
    progress: Progress | None = None,
    fsid: str | None = None,
) -> StoredSpace:
    """Load, or compute (blocking) and store, ``method``'s space of the current feature set.

    What the background worker and the CLI run; the app calls `start_background` instead.
    A space already stored (by any process) is returned as it is, never recomputed.
    """
    key = fsid or feature_set(workspace, backbone)
    stored = load_space(workspace, backbone, method, key)
    if stored is not None:
        return stored
    features = feature_rows(workspace, backbone)  # vectors read from the shards as needed
    if not len(features):
        raise NotEnoughImages(
            f"no image has {backbone} features in {workspace.path}; run `imgcluster extract` first"
        )
    start = time.perf_counter()
    space = _make(method, features, progress)
    _store(workspace, backbone, method, key, space, time.perf_counter() - start)
    return space


def best_preprocess(workspace: Workspace, backbone: str, fsid: str | None = None) -> str:
    """The space `imgcluster.clustering.cluster` uses by default: ``"umap"`` once the refined
    space of the current feature set (``fsid`` when the caller has it) is stored,
    `DEFAULT_PREPROCESS` until then."""
    key = fsid or feature_set(workspace, backbone)
    stored = is_stored(workspace, backbone, REFINED, key)
    return REFINED_PREPROCESS if stored else DEFAULT_PREPROCESS


def resolve_preprocess(
    workspace: Workspace, backbone: str, preprocess: str | None, fsid: str | None = None
) -> str:
    """``preprocess`` checked, or (None) the `best_preprocess` of the current feature set."""
    if preprocess is None:
        return best_preprocess(workspace, backbone, fsid)
    if preprocess not in PREPROCESSING:
        raise InvalidParameter(f"preprocess={preprocess!r} should be one of {PREPROCESSING}")
    return preprocess


#: Names that moved to `imgcluster.space_worker` (the process side), still importable from here.
_MOVED = frozenset(
    {
        "SpaceJob",
        "SpaceStatus",
        "space_status",
        "start_background",
        "warm_numba_cache",
        "_progress_writer",
        "_read_progress",
        "_worker",
        "_warm",
    }
)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): space_worker imports this module, so importing it back at module level
    # would make an import circle.
    if name in _MOVED:
        from imgcluster import space_worker

        return getattr(space_worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
