"""The 2-D map of a feature set: UMAP (cosine, seeded), with PCA as the instant stand-in.

A map depends only on the feature set, never on k, so it is made once per feature set and
stored by `imgcluster.spaces` (which also owns the refined clustering space and the background
worker that makes both). UMAP's numba compilation costs up to a minute in a fresh process, so
the app never waits for it: `start_background_projection` starts the worker, and
`get_projection` returns the stored PCA map, marked not ready, until the UMAP map is stored.
Neither loads a vector once the map is stored (the Clusters page calls both on every rerun and
every poll).

For a million points a browser cannot draw every dot: `density_image` renders the map's density
server-side as an image, `point_sample` picks the points to draw for hover, and `select_box`
returns every image inside a box, not only the drawn ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from imgcluster import spaces
from imgcluster.errors import InvalidParameter
from imgcluster.space_worker import SpaceJob, space_status, start_background
from imgcluster.spaces import MAP_PCA, MAP_UMAP, UMAP_MIN_N, pca_2d, umap_embed
from imgcluster.workspace import Workspace

__all__ = [
    "METHODS",
    "Projection",
    "ProjectionJob",
    "compute_projection",
    "density_image",
    "get_projection",
    "pca_2d",
    "point_sample",
    "projection_status",
    "select_box",
    "start_background_projection",
    "umap_embed",
]

METHODS = (MAP_UMAP, MAP_PCA)

#: UMAP settings of the 2-D map (see `imgcluster.spaces`).
UMAP_N_NEIGHBORS = spaces.MAP_N_NEIGHBORS
UMAP_MIN_DIST = spaces.MAP_MIN_DIST

#: The worker's job handle (old name).
ProjectionJob = SpaceJob


class Projection(NamedTuple):
    """2-D coordinates aligned with ``image_ids`` (the `load_features` order).

    ``ready`` is False while ``method`` is the PCA stand-in for a UMAP map still being made.
    """

    coords: np.ndarray  # float32 (n, 2)
    method: str
    ready: bool
    image_ids: np.ndarray  # int64 (n,)


def compute_projection(workspace: Workspace, backbone: str, method: str = MAP_UMAP) -> Projection:
    """Compute (or load) and store the ``method`` map of the current feature set, blocking.

    The app should call `start_background_projection` instead; the worker runs this.
    """
    if method not in METHODS:
        raise InvalidParameter(f"method={method!r} should be one of {METHODS}")
    stored = spaces.compute_space(workspace, backbone, method)
    return Projection(stored.coords, method, True, stored.image_ids)


def get_projection(workspace: Workspace, backbone: str) -> Projection:
    """The best stored map, never waiting for UMAP.

    Returns the UMAP map if stored (``ready=True``); otherwise the PCA map (computed and
    stored on first use, well under a second) with ``ready=False``. Start the UMAP worker with
    `start_background_projection`; poll this function to pick its result up.

    Examples
    --------
    >>> ws = Workspace("ws")                                          # doctest: +SKIP
    >>> coords, method, ready, ids = get_projection(ws, "efficientnet-lite0")  # doctest: +SKIP
    """
    n, fsid = spaces.feature_state(workspace, backbone)  # memoised per revision
    if not n:
        return Projection(np.zeros((0, 2), np.float32), MAP_PCA, True, np.zeros(0, np.int64))
    umap_map = spaces.load_space(workspace, backbone, MAP_UMAP, fsid)
    if umap_map is not None:
        return Projection(umap_map.coords, MAP_UMAP, True, umap_map.image_ids)
    pca_map = spaces.compute_space(workspace, backbone, MAP_PCA, fsid=fsid)
    n = len(pca_map.image_ids)
    return Projection(pca_map.coords, MAP_PCA, n < UMAP_MIN_N, pca_map.image_ids)


def start_background_projection(
    workspace: Workspace, backbone: str, *, retry: bool = False
) -> SpaceJob | None:
    """Make sure the UMAP map (and the refined clustering space) of the current feature set are
    stored or being made; never blocks, loads no vectors. See
    `imgcluster.space_worker.start_background`.
    """
    return start_background(workspace, backbone, retry=retry)


def projection_status(workspace: Workspace, backbone: str) -> str:
    """``"ready"``, ``"running"``, ``"failed: <last log line>"`` or ``"not started"``."""
    status = space_status(workspace, backbone, MAP_UMAP)
    return "ready" if status.state == "unavailable" else str(status)


# -- maps too big for the browser -------------------------------------------------------------


class DensityImage(NamedTuple):
    """A 2-D histogram of the map as an image, and where it sits in map coordinates."""

    counts: np.ndarray  # (height, width) int64, row 0 at the top (largest y)
    extent: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max


def density_image(coords: np.ndarray, *, width: int = 512, height: int = 512) -> DensityImage:
    """Points per pixel of the map (numpy's 2-D histogram): what to draw instead of 1M dots.

    Show it with e.g. ``np.log1p(counts)`` as a heatmap over ``extent``; it costs one pass over
    the coordinates (~0.1 s per million points).
    """
    xy = np.asarray(coords, dtype=np.float32).reshape(-1, 2)
    if not len(xy):
        return DensityImage(np.zeros((height, width), np.int64), (0.0, 1.0, 0.0, 1.0))
    x_min, y_min = xy.min(axis=0).tolist()
    x_max, y_max = xy.max(axis=0).tolist()
    x_max, y_max = max(x_max, x_min + 1e-6), max(y_max, y_min + 1e-6)
    counts, _, _ = np.histogram2d(
        xy[:, 1], xy[:, 0], bins=(height, width), range=((y_min, y_max), (x_min, x_max))
    )
    return DensityImage(counts[::-1].astype(np.int64), (x_min, x_max, y_min, y_max))


def point_sample(n: int, size: int = 20_000, *, random_state: int = 0) -> np.ndarray:
    """Sorted row indices of at most ``size`` points to draw for hover (seeded, so the same
    dots come back on every rerun)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(random_state).choice(n, size, replace=False))


def select_box(
    projection: Projection, x_range: tuple[float, float], y_range: tuple[float, float]
) -> np.ndarray:
    """Image ids of every point inside the box (edges included), drawn or not."""
    x0, x1 = sorted(x_range)
    y0, y1 = sorted(y_range)
    xy = projection.coords
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    return projection.image_ids[inside]
