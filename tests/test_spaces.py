"""The vector spaces: one cheap feature-set identity, the refined space made once (also across
processes), clusters moving to it only before labeling starts, run records, the 1M-point map
helpers.

Workspaces hold the 180 Fashion-MNIST PNGs with one injected vector per image from its true
class (the CNN is not under test here); the refined space is made by the real background worker
process running real umap.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import v_measure_score

from imgcluster import clustering as C
from imgcluster import projection as P
from imgcluster import space_worker as W
from imgcluster import spaces as S
from imgcluster.errors import FeaturesDamaged, UnknownCluster
from imgcluster.features import feature_set_id, load_features, save_vectors
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import FMNIST, read_truth

BACKBONE = "synthetic"


def _truth() -> dict[str, str]:
    return read_truth(FMNIST, strip="images/")


def _workspace(path: Path, n: int | None = None) -> Workspace:
    """FMNIST ingested, each image given a noisy vector of its class (first ``n`` images)."""
    ws = Workspace(path, create=True)
    ingest(ws, FMNIST / "images")
    truth = _truth()
    classes = sorted(set(truth.values()))
    images = ws.images()[:n]
    rng = np.random.default_rng(0)
    centres = np.eye(32)[: len(classes)] * 2.0
    vectors = [
        centres[classes.index(truth[im.relpath])] + rng.normal(scale=0.4, size=32) for im in images
    ]
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], np.array(vectors))
    return ws


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return _workspace(tmp_path / "ws")


def _rows(ws: Workspace) -> list[tuple[str, float]]:
    with ws.read() as conn:
        return [tuple(r) for r in conn.execute("SELECT method, seconds FROM projections")]


# -- identity and run records -----------------------------------------------------------------


def test_feature_set_id_changes_with_the_vectors_and_costs_no_vector_read(tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws", n=100)
    with ws.read() as conn:
        before = feature_set_id(conn, BACKBONE)
        assert feature_set_id(conn, BACKBONE) == before
    images = ws.images()
    save_vectors(ws, BACKBONE, [images[150].sha256], np.ones((1, 32)))
    with ws.read() as conn:
        after = feature_set_id(conn, BACKBONE)
        assert after != before
        assert feature_set_id(conn, "other") != after


def test_run_info_and_latest_run_read_the_runs_table(ws: Workspace) -> None:
    assert C.latest_run(ws) is None
    six = C.cluster(ws, BACKBONE, 6, random_state=2, preprocess="pca")
    info = C.run_info(ws, six.id)
    assert (info.id, info.backbone, info.k, info.random_state) == (six.id, BACKBONE, 6, 2)
    assert info.preprocess == "pca" and info.n_images == 180
    assert info.params["feature_set"] == six.params["feature_set"]
    with ws.read() as conn:  # a caller's open connection works too
        assert C.run_info(conn, six.id) == info
        assert C.latest_run(conn, BACKBONE) == info
    assert C.latest_run(ws, "other") is None
    with pytest.raises(UnknownCluster, match="no clustering run with id 999"):
        C.run_info(ws, 999)


def test_a_stored_run_that_cluster_returns_becomes_the_newest(ws: Workspace) -> None:
    fifty = C.cluster(ws, BACKBONE, 50, preprocess="pca")
    five = C.cluster(ws, BACKBONE, 5, preprocess="pca")
    assert C.latest_run(ws).id == five.id
    again = C.cluster(ws, BACKBONE, 50, preprocess="pca")  # stored: returned, not recomputed
    assert again.id == fifty.id and C.latest_run(ws).id == fifty.id
    assert [r.id for r in C.list_runs(ws)] == [fifty.id, five.id]
    revision = ws.revision
    C.cluster(ws, BACKBONE, 50, preprocess="pca")  # already the newest: nothing written
    assert ws.revision == revision


def test_a_deleted_centroids_file_is_recomputed(ws: Workspace) -> None:
    run = C.cluster(ws, BACKBONE, 6, preprocess="pca")
    with ws.read() as conn:
        (relfile,) = conn.execute(
            "SELECT centroids_file FROM clusterings WHERE id = ?", (run.id,)
        ).fetchone()
    (ws.path / relfile).unlink()
    again = C.cluster(ws, BACKBONE, 6, preprocess="pca")
    assert again.id == run.id
    np.testing.assert_allclose(again.centroids, run.centroids, atol=1e-4)
    assert (ws.path / relfile).exists()  # written back


def test_a_missing_or_wrong_shape_shard_is_one_clear_line(ws: Workspace) -> None:
    from click.testing import CliRunner

    from imgcluster.cli import cli

    (shard,) = [p for p in (ws.path / "features" / BACKBONE).glob("*.npy") if ".top" not in p.name]
    np.save(shard, np.zeros((3, 5), np.float32))
    with pytest.raises(FeaturesDamaged, match=shard.name):
        C.cluster(ws, BACKBONE, 6, preprocess="pca")
    shard.unlink()
    with pytest.raises(FeaturesDamaged, match="imgcluster extract"):
        C.suggest_k(ws, 2, 8, backbone=BACKBONE, preprocess="pca")
    args = ["cluster", "-w", str(ws.path), "--k", "6", "--backbone", BACKBONE]
    result = CliRunner().invoke(cli, [*args, "--preprocess", "pca"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert shard.name in result.output and len(result.output.strip().splitlines()) == 1


# -- the refined space ------------------------------------------------------------------------


@pytest.mark.slow
def test_refined_space_is_made_once_by_the_worker_and_reused_across_processes(
    ws: Workspace,
) -> None:
    assert W.space_status(ws, BACKBONE).state == "not started"
    assert S.best_preprocess(ws, BACKBONE) == "pca"
    assert C.cluster(ws, BACKBONE, 6).preprocess == "pca"  # never waits for UMAP

    job = W.start_background(ws, BACKBONE)
    assert job is not None and job.process is not None
    assert W.start_background(ws, BACKBONE) is job  # asking again starts nothing new
    assert W.space_status(ws, BACKBONE).state == "running"
    assert job.wait(timeout=600) and job.returncode == 0, job.log_path.read_text()[-2000:]

    assert W.space_status(ws, BACKBONE).state == "ready"
    assert sorted(m for m, _ in _rows(ws)) == sorted(["umap", S.REFINED])
    stored = S.load_space(ws, BACKBONE, S.REFINED)
    assert stored.coords.shape == (180, S.REFINED_COMPONENTS)
    np.testing.assert_array_equal(stored.image_ids, load_features(ws, BACKBONE).image_ids)
    rows = _rows(ws)
    # Another process (this one) reads the worker's space instead of computing it again.
    again = S.compute_space(ws, BACKBONE, S.REFINED)
    np.testing.assert_array_equal(again.coords, stored.coords)
    assert W.start_background(ws, BACKBONE) is None and _rows(ws) == rows

    run = C.cluster(ws, BACKBONE, 6)
    assert run.preprocess == "umap" and run.params["dim"] == S.REFINED_COMPONENTS
    truth = _truth()
    relpaths = load_features(ws, BACKBONE).relpaths
    assert v_measure_score([truth[r] for r in relpaths], run.labels) > 0.9

    # Once the spaces are stored, polling, the map and a k change read no vector: they still
    # work with the vector shards gone.
    shutil.rmtree(ws.path / "features")
    assert P.start_background_projection(ws, BACKBONE) is None
    assert P.projection_status(ws, BACKBONE) == "ready"
    assert P.get_projection(ws, BACKBONE).method == "umap"
    assert C.cluster(ws, BACKBONE, 7).preprocess == "umap"


@pytest.mark.slow
def test_labels_never_change_under_a_started_session_when_the_space_becomes_ready(
    ws: Workspace,
) -> None:
    from imgcluster import labels as L

    run = C.cluster(ws, BACKBONE, 6)
    assert run.preprocess == "pca"
    L.start_session(ws, run.id, actor="alice")
    before = L.current_labels(ws)
    S.compute_space(ws, BACKBONE, S.REFINED)  # what the background worker does
    assert S.best_preprocess(ws, BACKBONE) == "umap"
    assert L.current_labels(ws) == before  # nothing moved under the annotator
    assert C.latest_run(ws).id == run.id  # no new run was made behind the session's back


@pytest.mark.slow
def test_cli_cluster_makes_the_refined_space_once_and_clusters_in_it(ws: Workspace) -> None:
    from click.testing import CliRunner

    from imgcluster.cli import cli

    args = ["cluster", "-w", str(ws.path), "--k", "6", "--backbone", BACKBONE]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert ", umap, " in first.output.splitlines()[0]
    assert [m for m, _ in _rows(ws)] == [S.REFINED]
    again = CliRunner().invoke(cli, [*args[:-2], "--k", "7", "--backbone", BACKBONE])
    assert again.exit_code == 0 and ", umap, " in again.output.splitlines()[0]
    assert [m for m, _ in _rows(ws)] == [S.REFINED]  # made once, reused
    pca = CliRunner().invoke(cli, [*args, "--preprocess", "pca"])
    assert ", pca, " in pca.output.splitlines()[0]


def test_progress_reaches_the_status_file_format(tmp_path: Path) -> None:
    seen: dict[str, float] = {}
    write = W._progress_writer(tmp_path / "p.json", S.REFINED, seen)
    write(50, 200)
    assert W._read_progress(tmp_path / "p.json", S.REFINED) == pytest.approx(0.25)
    sink = S._TqdmSink(lambda done, total: seen.update(last=done / total))
    sink.write("\r120/200\n")  # what umap's tqdm bar writes with our bar_format
    assert seen["last"] == pytest.approx(0.6)


def test_numba_cache_dir_is_under_the_project_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    S._configure_numba_cache()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "cache" / "numba")
    assert (tmp_path / "cache" / "numba").is_dir()


@pytest.mark.slow
def test_warm_numba_cache_fills_the_cache_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)  # set by earlier tests' umap imports
    process = W.warm_numba_cache(block=True)
    assert process is not None and process.returncode == 0
    cached = list((tmp_path / "cache" / "numba").rglob("*.nbi"))
    # pynndescent caches on its own; umap's functions are cached because of _numba_caching.
    assert any("umap" in str(p) for p in cached) and any("pynndescent" in str(p) for p in cached)
    assert W.warm_numba_cache() is None  # the marker says it is done


# -- maps of a million points -----------------------------------------------------------------


def test_density_image_counts_every_point_and_box_selection_gets_all_inside() -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(100_000, 2)).astype(np.float32)
    ids = np.arange(100_000, dtype=np.int64) + 7
    image = P.density_image(coords, width=64, height=32)
    assert image.counts.shape == (32, 64) and image.counts.sum() == 100_000
    # Row 0 is the top of the map: a point at the largest y lands there.
    top = P.density_image(np.array([[0.0, 0.0], [1.0, 1.0]]), width=2, height=2)
    assert top.counts[0, 1] == 1 and top.counts[1, 0] == 1
    projection = P.Projection(coords, "umap", True, ids)
    inside = P.select_box(projection, (0.5, -0.5), (-1.0, 1.0))
    expected = ids[(np.abs(coords[:, 0]) <= 0.5) & (np.abs(coords[:, 1]) <= 1.0)]
    np.testing.assert_array_equal(inside, expected)
    sample = P.point_sample(len(coords), 1000)
    assert len(sample) == 1000 and (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, P.point_sample(len(coords), 1000))


def test_worker_names_moved_to_space_worker_still_import_from_spaces() -> None:
    assert S.start_background is W.start_background and S.SpaceJob is W.SpaceJob
    with pytest.raises(AttributeError, match="no_such_name"):
        S.no_such_name  # noqa: B018


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_knn_matches_brute_force_with_each_point_first(metric: str) -> None:
    """The kNN graph UMAP gets from 4,096 points on (no pynndescent: its search code is not
    cacheable by numba, so it recompiled in every process); duplicates still list themselves
    first, as umap expects."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    x = S.l2_normalize(rng.normal(size=(700, 12)).astype(np.float32))
    x[5] = x[6]  # an exact duplicate
    indices, distances = S.exact_knn(x, 8, metric)
    truth = NearestNeighbors(n_neighbors=8, metric=metric, algorithm="brute").fit(x)
    true_d, _ = truth.kneighbors(x)
    assert indices.shape == distances.shape == (700, 8)
    assert (indices[:, 0] == np.arange(700)).all() and (distances[:, 0] == 0).all()
    np.testing.assert_allclose(distances, true_d, atol=1e-3)
    assert indices[5, 1] == 6 and indices[6, 1] == 5
    assert (np.diff(distances, axis=1) >= 0).all()


def test_the_map_reuses_the_refined_spaces_knn_graph_without_sharing_its_arrays() -> None:
    """The worker's 2-D map (15 neighbours) takes the first columns of the refined space's
    30-neighbour search of the same points instead of searching again."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    first, _ = S._shared_knn(x, 30, "euclidean")
    first[:] = -1  # umap writes into the arrays it gets
    again, dist = S._shared_knn(x, 15, "euclidean")
    expected, expected_d = S.exact_knn(x, 15, "euclidean")
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_allclose(dist, expected_d)


# -- big sets: sample fits, shards read block by block (issue 15 §3/§4) ------------------------


def _sharded_workspace(path: Path, batches: int = 3) -> Workspace:
    """`_workspace`'s vectors stored in several shards, as an extraction in batches would."""
    ws = Workspace(path, create=True)
    ingest(ws, FMNIST / "images")
    truth = _truth()
    classes = sorted(set(truth.values()))
    images = ws.images()
    rng = np.random.default_rng(1)
    centres = np.eye(32)[: len(classes)] * 2.0
    vectors = np.array(
        [
            centres[classes.index(truth[im.relpath])] + rng.normal(scale=0.4, size=32)
            for im in images
        ]
    )
    # Shards in an order other than the relpath order, so rows come from several files.
    order = rng.permutation(len(images))
    for part in np.array_split(order, batches):
        save_vectors(ws, BACKBONE, [images[i].sha256 for i in part], vectors[part])
    return ws


def _blobs(n: int, dim: int = 40, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    truth = rng.integers(k, size=n)
    return (centres[truth] + rng.normal(size=(n, dim))).astype(np.float32), truth


def test_feature_rows_serve_load_features_rows_from_the_shards(tmp_path: Path) -> None:
    from imgcluster.features import feature_rows

    ws = _sharded_workspace(tmp_path / "ws")
    matrix = load_features(ws, BACKBONE)
    rows = feature_rows(ws, BACKBONE)
    assert len(rows.files) == 3
    assert np.array_equal(rows.image_ids, matrix.image_ids)
    pick = np.array([0, 5, 61, 120, len(matrix) - 1])
    assert np.array_equal(rows.take(pick), matrix.vectors[pick])
    blocks = list(rows.blocks(size=50))
    assert [start for start, _ in blocks] == list(range(0, len(matrix), 50))
    assert np.array_equal(np.concatenate([b for _, b in blocks]), matrix.vectors)


def test_pca_above_the_fit_sample_is_fitted_on_a_sample_and_applied_to_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from imgcluster.features import l2_normalize

    x, truth = _blobs(3_000)
    monkeypatch.setattr(S, "PCA_FIT_SAMPLE", 500)
    out = S.pca_reduce(x, 8, random_state=0, normalize=True)
    unit = l2_normalize(x)
    sample = S.sample_rows(len(x), 500, 0)
    assert len(sample) == 500 and np.all(np.diff(sample) > 0)
    expected = PCA(8, svd_solver="randomized", random_state=0).fit(unit[sample]).transform(unit)
    assert out.dtype == np.float32 and out.shape == (3_000, 8)
    assert np.allclose(out, expected, atol=1e-4)
    whitened = S.pca_reduce(x, 8, random_state=0, whiten=True)
    ref = PCA(8, whiten=True, svd_solver="randomized", random_state=0).fit(x[sample])
    assert np.allclose(whitened, ref.transform(x), atol=1e-3)
    found = KMeans(5, n_init=4, random_state=0).fit_predict(out)
    assert v_measure_score(truth, found) > 0.99
    # The input is never modified (no in-place centring of the caller's rows).
    assert np.array_equal(x, _blobs(3_000)[0])


def test_space_and_map_of_a_big_set_stream_the_shards_and_match_the_loaded_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _sharded_workspace(tmp_path / "ws")
    monkeypatch.setattr(S, "PCA_FIT_SAMPLE", 60)  # 180 images: fitted on 60, applied to all
    matrix = load_features(ws, BACKBONE)
    ids, space = S.space_of(ws, BACKBONE, "pca")
    assert np.array_equal(ids, matrix.image_ids)
    expected = S.preprocess_vectors(matrix.vectors, "pca", random_state=S.SPACE_RANDOM_STATE)
    assert np.allclose(space, expected, atol=1e-5)
    l2_ids, l2 = S.space_of(ws, BACKBONE, "l2")
    assert np.array_equal(l2_ids, matrix.image_ids)
    assert np.allclose(l2, matrix.vectors, atol=1e-6)
    proj = P.get_projection(ws, BACKBONE)
    assert np.array_equal(proj.image_ids, matrix.image_ids)
    assert np.allclose(proj.coords, S.pca_2d(matrix.vectors), atol=1e-5)
    run = C.cluster(ws, BACKBONE, 6, preprocess="pca")
    truth = _truth()
    relpath = {im.id: im.relpath for im in ws.images()}
    true = [truth[relpath[int(i)]] for i in run.image_ids]
    assert v_measure_score(true, run.labels) > 0.9


def test_cluster_returns_the_run_exactly_as_it_reads_back(ws: Workspace) -> None:
    run = C.cluster(ws, BACKBONE, 5)
    stored = C.load_run(ws, run.id)
    for name in ("image_ids", "labels", "distances", "silhouettes", "margins", "centroids"):
        assert np.array_equal(getattr(run, name), getattr(stored, name)), name
        assert getattr(run, name).dtype == getattr(stored, name).dtype, name
    assert (run.k, run.preprocess, run.created_at, run.params) == (
        stored.k,
        stored.preprocess,
        stored.created_at,
        stored.params,
    )


def test_feature_state_follows_new_vectors_and_outlives_other_writes(tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws", n=100)
    with ws.read() as conn:
        first = (100, feature_set_id(conn, BACKBONE))
    assert S.feature_state(ws, BACKBONE) == first
    C.cluster(ws, BACKBONE, 3)  # a write that bumps the revision and changes no vector
    assert S.feature_state(ws, BACKBONE) == first
    images = ws.images()
    save_vectors(ws, BACKBONE, [images[150].sha256], np.ones((1, 32)))
    with ws.read() as conn:
        assert S.feature_state(ws, BACKBONE) == (101, feature_set_id(conn, BACKBONE))


def test_a_big_pca_space_is_stored_once_and_read_back_bit_for_bit(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From `STORE_PCA_MIN_N` vectors on, the PCA clustering space is kept in the workspace
    (at 1M images computing it again costs ~25 s per process that starts labeling): a fresh
    process reads the same float32 array back instead of reading every vector."""
    monkeypatch.setattr(S, "STORE_PCA_MIN_N", 1)  # the sample is small; the rule is the same
    fsid = S.feature_set(ws, "synthetic")
    ids, space = S.space_of(ws, "synthetic", "pca")
    kept = sorted(p.name for p in ws.runs_dir.glob("space-*"))
    assert len(kept) == 2 and all(name.endswith(".npy") for name in kept), kept
    S._cache._items.clear()  # what a fresh process holds
    again_ids, again = S.space_of(ws, "synthetic", "pca")
    assert again.dtype == np.float32 and np.array_equal(again_ids, ids)
    assert again.tobytes() == space.tobytes()
    assert S._stored_pca(ws, "synthetic", "pca", fsid) is not None
    # other vectors make another feature set: the kept space is not used for it
    assert S._stored_pca(ws, "synthetic", "pca", fsid + "-other") is None
