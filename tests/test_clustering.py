"""Clustering: determinism, stored runs, typicality and misfits, k suggestions, the CLI.

Array-level tests use tiny hand-made blobs; workspace tests ingest sample_data's 180 PNGs and
inject one vector per image from its true class (the CNN is not under test there); the last
group clusters real EfficientNet-Lite0 features of ../shared/datasets/clothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import (
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
    v_measure_score,
)

from imgcluster import clustering as C
from imgcluster import runs
from imgcluster.cli import cli
from imgcluster.errors import UnknownCluster
from imgcluster.features import load_features, save_vectors
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests._clothing import BACKBONE as LITE0
from tests._clothing import clothing_truth, clothing_workspace
from tests.conftest import FMNIST as SAMPLE_DATA  # 6 classes x 30 grey PNGs
from tests.conftest import read_truth

BACKBONE = "synthetic"


def blobs(sizes: list[int], *, dim: int = 8, spread: float = 0.05, random_state: int = 0):
    """Well-separated Gaussian blobs; returns (points, true blob of each, blob centres)."""
    rng = np.random.default_rng(random_state)
    centres = np.eye(dim)[: len(sizes)] * 3.0
    truth = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[truth] + rng.normal(scale=spread, size=(len(truth), dim))
    order = rng.permutation(len(truth))  # members of a blob are not contiguous
    return points[order].astype(np.float32), truth[order], centres.astype(np.float32)


# -- pure arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["kmeans", "minibatch"])
def test_fit_kmeans_finds_blobs_numbered_by_size_and_is_deterministic(algorithm: str) -> None:
    x, truth, _ = blobs([20, 50, 30])
    result = C.fit_kmeans(x, 3, algorithm=algorithm, random_state=3)
    again = C.fit_kmeans(x, 3, algorithm=algorithm, random_state=3)

    assert v_measure_score(truth, result.labels) == 1.0
    assert np.bincount(result.labels).tolist() == [50, 30, 20]
    np.testing.assert_array_equal(result.labels, again.labels)
    np.testing.assert_array_equal(result.centroids, again.centroids)
    own = np.linalg.norm(x - result.centroids[result.labels], axis=1)
    np.testing.assert_allclose(result.distances, own, atol=1e-4)
    all_d = np.linalg.norm(x[:, None] - result.centroids[None], axis=2)
    second = np.sort(all_d, axis=1)[:, 1]
    np.testing.assert_allclose(result.margins, second - own, atol=1e-4)
    assert (result.margins > 0).all()


def test_fit_kmeans_refuses_more_clusters_than_points() -> None:
    x, _, _ = blobs([2, 2])
    with pytest.raises(C.NotEnoughImages, match="n_samples=4 should be >= n_clusters=5"):
        C.fit_kmeans(x, 5)


def test_auto_algorithm_switches_to_minibatch_for_big_sets() -> None:
    assert C.resolve_algorithm("auto", C.MINIBATCH_THRESHOLD) == "kmeans"
    assert C.resolve_algorithm("auto", C.MINIBATCH_THRESHOLD + 1) == "minibatch"
    with pytest.raises(ValueError, match="algorithm='faiss'"):
        C.resolve_algorithm("faiss", 10)


def test_fixed_centroids_stay_put_and_new_ones_take_the_new_group() -> None:
    x, truth, centres = blobs([30, 30, 25, 15], random_state=1)
    fixed = centres[:2] + 0.1  # the confirmed labels' centroids, not exactly the blob means
    result = C.kmeans_with_fixed_centroids(x, fixed, 2, random_state=5)
    again = C.kmeans_with_fixed_centroids(x, fixed, 2, random_state=5)

    np.testing.assert_array_equal(result.centroids[:2], fixed)
    np.testing.assert_array_equal(result.labels, again.labels)
    assert (result.labels[truth == 0] == 0).all()
    assert (result.labels[truth == 1] == 1).all()
    assert v_measure_score(truth, result.labels) == 1.0  # blobs 2 and 3 each got a new centroid
    np.testing.assert_allclose(result.centroids[2:].sum(0), (centres[2] + centres[3]), atol=0.05)


def test_fixed_centroids_without_new_ones_is_nearest_centroid_assignment() -> None:
    x, truth, centres = blobs([10, 10, 10], random_state=2)
    result = C.kmeans_with_fixed_centroids(x, centres, 0)
    np.testing.assert_array_equal(result.labels, truth)
    np.testing.assert_array_equal(result.centroids, centres)


def test_new_centroids_never_end_up_empty() -> None:
    x, _, centres = blobs([40, 2], random_state=3)  # one real new group of 2 points, 3 asked for
    result = C.kmeans_with_fixed_centroids(x, centres[:1], 3, random_state=0)
    assert set(np.unique(result.labels)) == {0, 1, 2, 3}


def test_misfit_rule_flags_negative_silhouette_and_thin_margins() -> None:
    distances = np.array([0.1, 0.5, 0.5, 0.5], np.float32)
    margins = np.array([0.5, 0.5, 0.01, 0.5], np.float32)
    silhouettes = np.array([0.8, 0.3, 0.3, -0.1], np.float32)
    assert C.misfit_mask(distances, margins, silhouettes).tolist() == [False, False, True, True]


# -- workspace runs (sample_data, vectors injected from the true class) -----------------------


def _truth() -> dict[str, str]:
    return read_truth(SAMPLE_DATA, strip="images/")


def _inject(ws: Workspace, *, outlier: str | None = None) -> None:
    """One vector per image: its class's blob; ``outlier`` sits halfway between two classes."""
    truth = _truth()
    classes = sorted(set(truth.values()))
    rng = np.random.default_rng(0)
    centres = np.eye(32)[: len(classes)] * 2.0
    images = ws.images()
    vectors = []
    for im in images:
        if im.relpath == outlier:
            vectors.append((centres[0] + centres[1]) / 2)
        else:
            cls = truth.get(im.relpath, classes[0])
            vectors.append(centres[classes.index(cls)] + rng.normal(scale=0.25, size=32))
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], np.array(vectors))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample_data copied (so images can be added) and ingested, with injected vectors."""
    base = tmp_path_factory.mktemp("clustering")
    shutil.copytree(SAMPLE_DATA / "images", base / "images")
    ws = Workspace(base / "ws", create=True)
    ingest(ws, base / "images")
    _inject(ws, outlier=ws.images()[7].relpath)
    return base


@pytest.fixture
def ws(template: Path, tmp_path: Path) -> Workspace:
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    ws = Workspace(tmp_path / "ws")
    with ws.transaction() as conn:  # the copied workspace points at the template's images
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'collection_root'", (str(tmp_path / "images"),)
        )
    return ws


def _count_runs(ws: Workspace) -> int:
    with ws.read() as conn:
        return conn.execute("SELECT COUNT(*) FROM clusterings").fetchone()[0]


def test_cluster_recovers_classes_and_stores_the_run(ws: Workspace) -> None:
    run = C.cluster(ws, BACKBONE, 6)
    truth = _truth()
    relpaths = load_features(ws, BACKBONE).relpaths
    assert v_measure_score([truth[r] for r in relpaths], run.labels) > 0.95
    assert run.k == 6 and run.algorithm == "kmeans" and run.preprocess == C.DEFAULT_PREPROCESS
    assert len(run) == 180 and run.sizes.sum() == 180
    assert list(run.sizes) == sorted(run.sizes, reverse=True)
    with ws.read() as conn:
        centroids_file = conn.execute(
            "SELECT centroids_file FROM clusterings WHERE id = ?", (run.id,)
        ).fetchone()[0]
    assigned = C.run_assignments(ws, run.id)
    assert len(assigned) == 180
    assert assigned == dict(zip(run.image_ids.tolist(), run.labels.tolist(), strict=True))
    np.testing.assert_array_equal(np.load(ws.path / centroids_file), run.centroids)


def test_same_request_returns_the_stored_run_without_recomputing(ws: Workspace) -> None:
    first = C.cluster(ws, BACKBONE, 6, random_state=1)
    revision = ws.revision
    again = C.cluster(ws, BACKBONE, 6, random_state=1)
    found = C.find_run(ws, BACKBONE, 6, random_state=1)

    assert again.id == first.id and found is not None and found.id == first.id
    assert _count_runs(ws) == 1 and ws.revision == revision  # nothing was written
    for name in ("image_ids", "labels", "distances", "silhouettes", "margins", "centroids"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert C.find_run(ws, BACKBONE, 7, random_state=1) is None
    assert C.find_run(ws, BACKBONE, 6, random_state=2) is None
    assert C.find_run(ws, BACKBONE, 6, random_state=1, preprocess="l2") is None


def test_other_k_seed_or_preprocessing_make_new_runs_listed_newest_first(ws: Workspace) -> None:
    a = C.cluster(ws, BACKBONE, 6)
    b = C.cluster(ws, BACKBONE, 4)
    c = C.cluster(ws, BACKBONE, 6, preprocess="l2")
    listed = C.list_runs(ws)
    assert [r.id for r in listed] == [c.id, b.id, a.id]
    assert [(r.k, r.preprocess) for r in listed] == [(6, "l2"), (4, "pca"), (6, "pca")]
    assert C.list_runs(ws, backbone="other") == []


def test_a_new_image_makes_the_stored_run_stale(ws: Workspace, tmp_path: Path) -> None:
    before = C.cluster(ws, BACKBONE, 6)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "images" / "zz_new.png")
    ingest(ws, tmp_path / "images")
    _inject(ws)  # vectors for the new content only; the others keep theirs
    assert C.find_run(ws, BACKBONE, 6) is None
    after = C.cluster(ws, BACKBONE, 6)
    assert after.id != before.id and len(after) == len(before) + 1


def test_typicality_order_and_sql_paging_agree(ws: Workspace) -> None:
    run = C.cluster(ws, BACKBONE, 6)
    for c in range(run.k):
        rows = C.typicality_order(run, c)
        assert (run.labels[rows] == c).all() and len(rows) == run.sizes[c]
        assert (np.diff(run.distances[rows]) >= 0).all()
        members = C.cluster_members(ws, run.id, c)
        assert members == run.members(c).tolist()
        assert C.cluster_members(ws, run.id, c, limit=5, offset=5) == members[5:10]
        assert C.cluster_members(ws, run.id, c, most_typical_first=False)[0] == members[-1]
    whole = C.typicality_order(run)
    assert sorted(whole.tolist()) == list(range(len(run)))
    with pytest.raises(UnknownCluster, match="cluster=6"):
        C.typicality_order(run, 6)


def test_the_in_between_image_is_a_misfit_and_sql_agrees(ws: Workspace) -> None:
    run = C.cluster(ws, BACKBONE, 6)
    outlier_id = ws.images()[7].id
    row = int(np.flatnonzero(run.image_ids == outlier_id)[0])
    assert run.misfits[row]
    assert run.margins[row] < 0.1 * run.margins.mean()
    assert run.misfits.sum() <= 3  # clean blobs: nearly nobody else
    flagged = set()
    for c in range(run.k):
        flagged |= set(C.cluster_members(ws, run.id, c, misfits_only=True))
    assert flagged == set(run.image_ids[run.misfits].tolist())
    # The stored values are the exact silhouettes of the run's space, row for row.
    space = C.preprocess_vectors(load_features(ws, BACKBONE).vectors, run.preprocess)
    np.testing.assert_allclose(run.silhouettes, silhouette_samples(space, run.labels), atol=1e-5)
    assert run.params["silhouette"] == "exact"


def test_bad_requests_fail_with_clear_errors(ws: Workspace) -> None:
    with pytest.raises(ValueError, match="k=1 should be between 2 and 200"):
        C.cluster(ws, BACKBONE, 1)
    with pytest.raises(C.NotEnoughImages, match="0 images have efficientnet-lite2 features"):
        C.cluster(ws, "efficientnet-lite2", 5)
    with pytest.raises(ValueError, match="preprocess='tsne'"):
        C.cluster(ws, BACKBONE, 5, preprocess="tsne")
    with pytest.raises(UnknownCluster, match="no clustering run with id 999"):
        C.load_run(ws, 999)
    assert C.find_run(ws, "efficientnet-lite2", 5) is None


def test_suggest_k_finds_the_six_classes(ws: Workspace) -> None:
    steps: list[tuple[int, int]] = []
    result = C.suggest_k(ws, 2, 12, backbone=BACKBONE, progress=lambda d, t: steps.append((d, t)))
    assert result.ks == list(range(2, 13))
    assert result.best[0] == 6 and len(result.best) == 3
    # The curve is the silhouette of a k=6 KMeans in the PCA space, as sklearn computes it.
    space = C.preprocess_vectors(load_features(ws, BACKBONE).vectors, "pca")
    six = C.fit_kmeans(space, 6, algorithm="kmeans", random_state=0)
    assert result.silhouette[result.ks.index(6)] == pytest.approx(
        silhouette_score(space, six.labels), abs=1e-6
    )
    # Clean blobs: (nearly) the same partition under every random state at the true k; the
    # one in-between image may switch sides.
    assert result.stability[result.ks.index(6)] > 0.95
    assert result.space == "pca" and "k=6" in result.advice
    assert result.inertia[-1] < result.inertia[0]
    assert steps[-1] == (11, 11)
    # Sampling kicks in above sample_size and still finds the classes.
    sampled = C.suggest_k(load_features(ws, BACKBONE).vectors, 4, 8, sample_size=120)
    assert sampled.best[0] == 6
    with pytest.raises(ValueError, match="backbone is required"):
        C.suggest_k(ws)


def test_cli_cluster_prints_sizes_and_reuses_the_run(ws: Workspace) -> None:
    runner = CliRunner()
    args = ["cluster", "--workspace", str(ws.path), "--k", "6", "--backbone", BACKBONE]
    args += ["--preprocess", "pca"]
    first = runner.invoke(cli, args)
    second = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "k=6" in first.output and "cluster  images  misfits" in first.output
    sizes = [int(line.split()[1]) for line in first.output.splitlines()[-6:]]
    assert sum(sizes) == 180
    assert second.output.splitlines()[0] == first.output.splitlines()[0]  # same run id
    assert _count_runs(ws) == 1


def test_cli_suggest_k_prints_table_and_best(ws: Workspace) -> None:
    result = CliRunner().invoke(
        cli, ["suggest-k", "-w", str(ws.path), "--backbone", BACKBONE, "--min", "3", "--max", "8"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["k", "silhouette", "inertia", "stability"]
    assert len(lines) == 1 + 6 + 2
    assert lines[-2].startswith("best k: 6") and "confidence" in lines[-1]


def test_cli_errors_are_one_line_exit_1(ws: Workspace) -> None:
    runner = CliRunner()
    no_features = runner.invoke(cli, ["cluster", "-w", str(ws.path), "--k", "5"])
    assert no_features.exit_code == 1
    assert "features" in no_features.output and "Traceback" not in no_features.output
    bad_k = runner.invoke(cli, ["cluster", "-w", str(ws.path), "--k", "1"])
    assert bad_k.exit_code == 2
    bad_range = runner.invoke(cli, ["suggest-k", "-w", str(ws.path), "--min", "9", "--max", "3"])
    assert bad_range.exit_code == 2


# -- real features: EfficientNet-Lite0 on the clothing photos ---------------------------------


@pytest.fixture(scope="module")
def clothing_ws(tmp_path_factory: pytest.TempPathFactory, clothing_dir: Path) -> Workspace:
    return clothing_workspace(tmp_path_factory, clothing_dir)


def _classes(ws: Workspace, run: C.ClusterRun, clothing_dir: Path) -> np.ndarray:
    truth = clothing_truth(clothing_dir)
    with ws.read() as conn:
        rel = dict(conn.execute("SELECT id, relpath FROM images").fetchall())
    return np.array([truth[rel[int(i)]] for i in run.image_ids])


@pytest.mark.slow
def test_real_features_cluster_by_garment_deterministically(
    clothing_ws: Workspace, clothing_dir: Path
) -> None:
    run = C.cluster(clothing_ws, LITE0, 10, random_state=0)
    classes = _classes(clothing_ws, run, clothing_dir)
    # bench/quality.py measures ~0.55; a broken pipeline (shuffled rows, wrong space) is ~0.
    assert normalized_mutual_info_score(classes, run.labels) > 0.45
    assert run.params["dim"] == C.PCA_COMPONENTS and run.params["silhouette"] == "exact"

    # Recomputing from scratch (no stored run, no memoised space) gives the same clusters.
    space = C.preprocess_vectors(load_features(clothing_ws, LITE0).vectors, run.preprocess)
    fresh = C.fit_kmeans(space, 10, random_state=0)
    np.testing.assert_array_equal(fresh.labels, run.labels)
    np.testing.assert_allclose(fresh.centroids, run.centroids, rtol=1e-5, atol=1e-6)

    reloaded = C.load_run(clothing_ws, run.id)
    for name in ("image_ids", "labels", "distances", "silhouettes", "margins", "centroids"):
        np.testing.assert_array_equal(getattr(reloaded, name), getattr(run, name))


@pytest.mark.slow
def test_real_features_typical_images_are_cleaner_than_atypical(
    clothing_ws: Workspace, clothing_dir: Path
) -> None:
    run = C.cluster(clothing_ws, LITE0, 10, random_state=0)
    classes = _classes(clothing_ws, run, clothing_dir)
    majority = {
        c: max(set(classes[run.labels == c]), key=list(classes[run.labels == c]).count)
        for c in range(run.k)
    }
    wrong = np.array([classes[i] != majority[c] for i, c in enumerate(run.labels)])
    typical = np.concatenate([C.typicality_order(run, c)[:5] for c in range(run.k)])
    atypical = np.concatenate([C.typicality_order(run, c)[-5:] for c in range(run.k)])
    assert wrong[typical].mean() < wrong[atypical].mean()
    assert wrong[typical].mean() < wrong.mean()
    # Flagged misfits are wrong more often than images in general.
    assert run.misfits.any() and wrong[run.misfits].mean() > wrong.mean()


@pytest.mark.slow
def test_real_features_k_suggestions_are_a_sane_curve(clothing_ws: Workspace) -> None:
    result = C.suggest_k(clothing_ws, 2, 15, backbone=LITE0)
    assert result.ks == list(range(2, 16))
    assert np.isfinite(result.silhouette).all() and np.isfinite(result.inertia).all()
    assert all(0 < s < 1 for s in result.silhouette)
    # best: the stable ks by silhouette, so its head is the best-scoring stable k.
    stable = [k for k, a in zip(result.ks, result.stability, strict=True) if a >= C.STABLE_ARI]
    assert result.best[0] == max(stable, key=lambda k: result.silhouette[result.ks.index(k)])
    assert len(set(result.best)) == 3 and result.confidence in ("high", "medium", "low")
    inertia = np.array(result.inertia)
    assert (np.diff(inertia) < 1e-6).mean() > 0.8 and inertia[-1] < 0.8 * inertia[0]


def test_minibatch_on_a_big_set_is_fitted_on_a_sample_and_assigns_every_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.metrics import adjusted_rand_score

    from imgcluster import kmeans as K
    from imgcluster.metrics import sq_distances

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 4
    truth = rng.integers(8, size=20_000)
    x = (centres[truth] + rng.normal(size=(20_000, 16))).astype(np.float32)
    monkeypatch.setattr(K, "MINIBATCH_FIT_SAMPLE", 2_000)
    result = K.fit_kmeans(x, 8, algorithm="minibatch", random_state=0)
    assert adjusted_rand_score(truth, result.labels) > 0.99
    d2 = sq_distances(x, result.centroids)
    assert np.array_equal(result.labels, d2.argmin(axis=1))  # every point joins its nearest
    assert np.allclose(result.distances**2, d2.min(axis=1), rtol=1e-4, atol=1e-4)
    second = np.sort(d2, axis=1)[:, 1]
    assert np.allclose(result.margins, np.sqrt(second) - result.distances, atol=1e-3)
    sizes = np.bincount(result.labels, minlength=8)
    assert np.all(np.diff(sizes) <= 0)  # numbered by decreasing size
    again = K.fit_kmeans(x, 8, algorithm="minibatch", random_state=0)
    assert np.array_equal(again.labels, result.labels)


def test_a_run_is_stored_as_one_arrays_file_and_a_lost_one_is_one_clear_error(
    ws: Workspace,
) -> None:
    from imgcluster.errors import WorkspaceCorrupt

    run = C.cluster(ws, BACKBONE, 4)
    relfile = run.params[runs.ARRAYS_KEY]
    with np.load(ws.path / relfile) as data:
        assert np.array_equal(data["image_ids"], run.image_ids)
        assert np.array_equal(data["labels"], run.labels)
    (ws.path / relfile).unlink()
    runs.clear_cache()  # what a fresh process would see
    with pytest.raises(WorkspaceCorrupt, match="cluster again"):
        C.load_run(ws, run.id)


def test_a_run_stored_as_rows_by_an_older_version_reads_as_it_was_stored(ws: Workspace) -> None:
    """Workspaces from before the arrays file keep one ``assignments`` row per image: the same
    run rewritten that way reads back with the same arrays, members and assignments."""
    import json
    import sqlite3

    run = C.cluster(ws, BACKBONE, 4)
    relfile = run.params[runs.ARRAYS_KEY]
    members = C.cluster_members(ws, run.id, 0, limit=5)
    conn = sqlite3.connect(ws.db_path)
    with conn:
        conn.executemany(
            "INSERT INTO assignments(run_id, image_id, cluster, distance, silhouette, margin) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (run.id, int(i), int(c), float(d), float(s), float(m))
                for i, c, d, s, m in zip(
                    run.image_ids,
                    run.labels,
                    run.distances,
                    run.silhouettes,
                    run.margins,
                    strict=True,
                )
            ],
        )
        params = {k: v for k, v in run.params.items() if k != runs.ARRAYS_KEY}
        conn.execute("UPDATE clusterings SET params = ? WHERE id = ?", (json.dumps(params), run.id))
    conn.close()
    (ws.path / relfile).unlink()
    runs.clear_cache()

    old = C.load_run(ws, run.id)
    assert runs.ARRAYS_KEY not in old.params
    for name in ("image_ids", "labels", "distances", "silhouettes", "margins"):
        assert np.array_equal(getattr(old, name), getattr(run, name)), name
    assert C.cluster_members(ws, run.id, 0, limit=5) == members
    assert C.run_assignments(ws, run.id) == dict(
        zip(run.image_ids.tolist(), run.labels.tolist(), strict=True)
    )
    # a big row run keeps a copy of its columns once read (1M rows cost seconds to read)
    order = np.argsort(run.image_ids)
    expected = (run.image_ids[order], run.labels[order])
    for threshold, copies in ((10**9, 0), (1, 1)):
        runs.clear_cache()
        runs.ROW_RUN_COPY_MIN_N, saved = threshold, runs.ROW_RUN_COPY_MIN_N
        try:
            got = runs.run_cluster_arrays(ws, run.id)
        finally:
            runs.ROW_RUN_COPY_MIN_N = saved
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert len(list(ws.runs_dir.glob("*-assignments.npz"))) == copies
    with sqlite3.connect(ws.db_path) as conn:  # the copy is read, not the rows
        conn.execute("DELETE FROM assignments WHERE run_id = ?", (run.id,))
    runs.clear_cache()
    got = runs.run_cluster_arrays(ws, run.id)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_find_sorted_positions_and_mask_agree_with_a_dict_lookup() -> None:
    """The one sorted-id lookup the labels, names and app share: random ids, some absent,
    repeated, out of range, and both sides empty."""
    from imgcluster.metrics import find_sorted

    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(0, 5_000, 2_000))
    wanted = np.concatenate([rng.integers(-10, 5_100, 3_000), ids[:5], ids[:5]])
    pos, found = find_sorted(ids, wanted)
    where = {int(i): p for p, i in enumerate(ids.tolist())}
    assert found.tolist() == [int(w) in where for w in wanted]
    assert pos.tolist() == [where[int(w)] for w in wanted if int(w) in where]
    assert [len(a) for a in find_sorted(ids[:0], wanted)] == [0, len(wanted)]
    assert [len(a) for a in find_sorted(ids, wanted[:0])] == [0, 0]
