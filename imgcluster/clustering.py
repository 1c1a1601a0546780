"""KMeans clustering of feature vectors with an adjustable k, typicality, k advice.

A run clusters every image that has a vector for one backbone, in a *clustering space* made from
the L2-normalised vectors by one of `PREPROCESSING` (the spaces are `imgcluster.spaces`'s). It is
stored in the workspace by `imgcluster.runs` (which owns the ``clusterings`` and
``assignments`` tables and the run files; its readers are re-exported here), so the app's k
slider and the CLI return to an earlier result instantly: `cluster` first looks for a stored
run with the same inputs on the same feature set (`find_run`).

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

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from imgcluster import spaces
from imgcluster.errors import (
    InvalidParameter,
    NotEnoughImages,
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
from imgcluster.runs import (
    ClusterRun,
    RunInfo,
    align_rows,
    cluster_members,
    find_run_id,
    latest_run,
    list_runs,
    load_run,
    mark_used,
    run_assignments,
    run_from_result,
    run_info,
    store_run,
    typicality_order,
)
from imgcluster.spaces import (
    DEFAULT_PREPROCESS,
    PCA_COMPONENTS,
    PREPROCESSING,
    REFINED_PREPROCESS,
    pca_reduce,
    preprocess_vectors,
)
from imgcluster.workspace import Workspace

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
    return align_rows(space, ids, features.image_ids)


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
    existing = find_run_id(workspace, backbone, k, concrete, random_state, preprocess, fsid)
    if existing is not None:
        mark_used(workspace, existing)
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
    run_id = store_run(
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
    return run_from_result(workspace, run_id, image_ids, result, silhouettes)


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
    run_id = find_run_id(workspace, backbone, k, concrete, random_state, preprocess, fsid)
    return None if run_id is None else load_run(workspace, run_id)


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
    x = align_rows(space, ids, image_ids)
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
    return store_run(
        workspace, backbone, image_ids, k, "manual", 0, params, result, silhouettes, 0.0
    )
