"""The 2-D map: PCA stand-in at once, UMAP from a background worker, stored once per feature set.

The UMAP worker is the real background process (`imgcluster.space_worker.start_background`) on real
EfficientNet-Lite0 features of ../shared/datasets/clothing (its numba compilation is what makes
it slow, so it runs once for the module).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from imgcluster import projection as P
from imgcluster._process import is_locked
from imgcluster.features import feature_set_id, load_features, save_vectors
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests._clothing import BACKBONE as LITE0
from tests._clothing import clothing_truth, clothing_workspace
from tests.conftest import FMNIST as SAMPLE_DATA  # 6 classes x 30 grey PNGs

BACKBONE = "synthetic"


def _rows(ws: Workspace) -> list[tuple[str, str, float]]:
    with ws.read() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT method, fingerprint, seconds FROM projections ORDER BY id"
            ).fetchall()
        ]


@pytest.fixture(scope="module")
def sample_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("projection") / "ws", create=True)
    ingest(ws, SAMPLE_DATA / "images")
    images = ws.images()
    rng = np.random.default_rng(0)
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], rng.normal(size=(len(images), 64)))
    return ws


def test_pca_map_is_instant_stored_and_not_ready(sample_ws: Workspace) -> None:
    projection = P.get_projection(sample_ws, BACKBONE)
    features = load_features(sample_ws, BACKBONE)

    assert projection.method == "pca" and projection.ready is False
    assert projection.coords.shape == (180, 2) and np.isfinite(projection.coords).all()
    np.testing.assert_array_equal(projection.image_ids, features.image_ids)
    with sample_ws.read() as conn:
        fsid = feature_set_id(conn, BACKBONE)
    assert [r[:2] for r in _rows(sample_ws)] == [("pca", fsid)]

    again = P.get_projection(sample_ws, BACKBONE)
    np.testing.assert_array_equal(again.coords, projection.coords)
    assert len(_rows(sample_ws)) == 1  # loaded, not recomputed
    assert P.projection_status(sample_ws, BACKBONE) == "not started"


def test_tiny_sets_get_pca_as_the_final_map(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, SAMPLE_DATA / "images")
    images = ws.images()[: P.UMAP_MIN_N - 1]
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], np.eye(len(images), 16))
    assert P.start_background_projection(ws, BACKBONE) is None
    projection = P.get_projection(ws, BACKBONE)
    assert projection.ready and projection.method == "pca"
    assert projection.coords.shape == (len(images), 2)
    assert P.get_projection(ws, "no-such-backbone").coords.shape == (0, 2)


def test_unknown_method_is_refused(sample_ws: Workspace) -> None:
    with pytest.raises(ValueError, match="method='tsne'"):
        P.compute_projection(sample_ws, BACKBONE, "tsne")


# -- the UMAP worker on real features ---------------------------------------------------------


@pytest.fixture(scope="module")
def umap_ws(tmp_path_factory: pytest.TempPathFactory, clothing_dir: Path) -> Workspace:
    """The shared clothing workspace after the background worker stored its UMAP map."""
    ws = clothing_workspace(tmp_path_factory, clothing_dir)
    start = time.monotonic()
    job = P.start_background_projection(ws, LITE0)
    assert job is not None and job.process is not None
    assert time.monotonic() - start < 5, "starting the worker must not wait for UMAP"
    assert P.projection_status(ws, LITE0) == "running"
    # While it runs the app keeps getting the PCA map, and asking again starts nothing new.
    waiting = P.get_projection(ws, LITE0)
    assert waiting.method == "pca" and not waiting.ready
    assert P.start_background_projection(ws, LITE0) is job
    assert job.wait(timeout=600), "UMAP worker did not finish in 10 minutes"
    assert job.returncode == 0, job.log_path.read_text()[-2000:]
    assert not is_locked(job.lock_path)
    return ws


@pytest.mark.slow
def test_background_umap_is_stored_and_picked_up(umap_ws: Workspace) -> None:
    projection = P.get_projection(umap_ws, LITE0)
    features = load_features(umap_ws, LITE0)
    assert projection.method == "umap" and projection.ready
    assert projection.coords.shape == (600, 2) and projection.coords.dtype == np.float32
    assert np.isfinite(projection.coords).all()
    np.testing.assert_array_equal(projection.image_ids, features.image_ids)
    assert P.projection_status(umap_ws, LITE0) == "ready"


@pytest.mark.slow
def test_stored_umap_is_never_recomputed(umap_ws: Workspace) -> None:
    rows = _rows(umap_ws)
    assert P.start_background_projection(umap_ws, LITE0) is None
    first = P.get_projection(umap_ws, LITE0)
    second = P.compute_projection(umap_ws, LITE0, "umap")  # would take a minute if it ran
    np.testing.assert_array_equal(first.coords, second.coords)
    assert _rows(umap_ws) == rows


@pytest.mark.slow
def test_umap_map_puts_same_garments_together(umap_ws: Workspace, clothing_dir: Path) -> None:
    projection = P.get_projection(umap_ws, LITE0)
    features = load_features(umap_ws, LITE0)
    truth = clothing_truth(clothing_dir)
    classes = np.array([truth[r] for r in features.relpaths])
    coords = projection.coords
    d = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(d, np.inf)
    neighbours = np.argsort(d, axis=1)[:, :5]
    agreement = (classes[neighbours] == classes[:, None]).mean()
    # 10 balanced classes: random neighbours agree 10% of the time.
    assert agreement > 0.4
