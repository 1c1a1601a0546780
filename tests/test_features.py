"""The feature store and the extraction pipeline, with the real EfficientNet-Lite0 on real images.

The network is converted to TFLite once per module into a private cache folder and shared by
the tests (as the app shares one extractor); the Keras runtime is built once for the tests
that compare against it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgcluster.cli import cli
from imgcluster.errors import FeaturesDamaged, FeaturesMismatch, ImgclusterError, UnknownBackbone
from imgcluster.features import (
    CACHE_ENV,
    FeatureExtractor,
    delete_features,
    extract,
    feature_counts,
    fit_to_square,
    load_extractor,
    load_features,
    missing_hashes,
    save_vectors,
)
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import CLOTHING, PROJECT, read_truth
from tests.conftest import FMNIST as SAMPLE_DATA  # 180 grey PNGs, fmnist_NNNNN.png

LITE0 = "efficientnet-lite0"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor(model_cache: Path) -> FeatureExtractor:
    return load_extractor(LITE0, runtime="tflite")


@pytest.fixture(scope="module")
def keras_extractor(model_cache: Path) -> FeatureExtractor:
    return load_extractor(LITE0, runtime="keras")


def _copy_images(target: Path, n_sample: int = 14, n_photos: int = 0) -> Path:
    """A collection of real images: grayscale sample PNGs, plus real JPEG photos if present."""
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted((SAMPLE_DATA / "images").glob("*.png"))[:n_sample]:
        shutil.copy(src, target / src.name)
    if n_photos and (CLOTHING / "labels.csv").exists():
        for relpath in _clothing_slice(n_photos):
            dst = target / "photos" / relpath
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CLOTHING / relpath, dst)
    return target


def _clothing_slice(per_class: int, classes=("shoes", "pants", "hat", "dress")) -> list[str]:
    truth = read_truth(CLOTHING)
    return [path for c in classes for path in [p for p, t in truth.items() if t == c][:per_class]]


def _workspace(tmp_path: Path, **kwargs: int) -> Workspace:
    root = _copy_images(tmp_path / "images", **kwargs)
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    return ws


def _stored_rows(ws: Workspace) -> tuple[int, int, int]:
    """(feature rows, sum of shard sizes, shards): every computed vector lands in one shard."""
    with ws.read() as conn:
        rows = conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        computed, shards = conn.execute(
            "SELECT COALESCE(SUM(n_rows), 0), COUNT(*) FROM feature_shards"
        ).fetchone()
    return rows, computed, shards


def _distinct_ok(ws: Workspace) -> set[str]:
    return {im.sha256 for im in ws.images("ok")}


# -- the store --------------------------------------------------------------------------------


def test_store_round_trip_keeps_relpath_order_normalises_and_shares_duplicates(
    tmp_path: Path,
) -> None:
    root = _copy_images(tmp_path / "images", n_sample=6)
    shutil.copy(root / "fmnist_00000.png", root / "zz_copy.png")
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    hashes = sorted(_distinct_ok(ws))
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(len(hashes), 5)).astype(np.float32) * 7
    # Two shards, written out of order.
    save_vectors(ws, "toy", hashes[3:], raw[3:])
    save_vectors(ws, "toy", hashes[:3], raw[:3])
    assert missing_hashes(ws, "toy") == []

    fm = load_features(ws, "toy")
    assert fm.relpaths == [im.relpath for im in ws.images("ok")]
    assert len(fm) == 7 and fm.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fm.vectors, axis=1), 1.0, rtol=1e-6)
    expected = {h: v / np.linalg.norm(v) for h, v in zip(hashes, raw, strict=True)}
    for sha, vector in zip(fm.sha256s, fm.vectors, strict=True):
        np.testing.assert_allclose(vector, expected[sha], rtol=1e-5)
    first, copy = fm.relpaths.index("fmnist_00000.png"), fm.relpaths.index("zz_copy.png")
    np.testing.assert_array_equal(fm.vectors[first], fm.vectors[copy])
    assert feature_counts(ws) == {"toy": 7}

    assert delete_features(ws, "toy") == 6
    assert feature_counts(ws) == {}
    assert list(ws.features_dir("toy").glob("*.npy")) == []
    assert len(missing_hashes(ws, "toy")) == 6


# -- extraction -------------------------------------------------------------------------------


def test_extract_gives_unit_vectors_for_every_image_and_computes_duplicates_once(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    root = _copy_images(tmp_path / "images", n_sample=10, n_photos=3)
    shutil.copy(root / "fmnist_00000.png", root / "copy_a.png")
    shutil.copy(root / "fmnist_00000.png", root / "copy_b.png")
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    n_images, n_distinct = len(ws.images("ok")), len(_distinct_ok(ws))
    assert n_images == n_distinct + 2

    calls: list[tuple[int, int]] = []
    report = extract(ws, extractor, batch_size=4, progress=lambda d, t: calls.append((d, t)))

    assert report.runtime == "tflite"
    assert (report.total, report.extracted, report.shared, report.reused) == (
        n_images,
        n_distinct,
        2,
        0,
    )
    assert report.failed == [] and report.without_vector == 0
    assert _stored_rows(ws)[:2] == (n_distinct, n_distinct)  # each content computed once
    assert calls[0] == (0, n_distinct) and calls[-1] == (n_distinct, n_distinct)
    fm = load_features(ws, LITE0)
    assert fm.relpaths == [im.relpath for im in ws.images("ok")]
    assert fm.vectors.shape == (n_images, 1280)
    np.testing.assert_allclose(np.linalg.norm(fm.vectors, axis=1), 1.0, rtol=1e-5)
    copies = [fm.relpaths.index(r) for r in ("copy_a.png", "copy_b.png", "fmnist_00000.png")]
    assert np.array_equal(fm.vectors[copies[0]], fm.vectors[copies[2]])
    assert np.array_equal(fm.vectors[copies[1]], fm.vectors[copies[2]])
    # Distinct images get distinct vectors (the network is not collapsing everything).
    assert len({v.tobytes() for v in fm.vectors}) == n_distinct

    again = extract(ws, extractor)
    assert (again.extracted, again.reused) == (0, n_images)
    assert _stored_rows(ws)[1] == n_distinct


def test_stored_vectors_are_the_extractors_on_the_decoded_file(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    ws = _workspace(tmp_path, n_sample=3, n_photos=1)
    extract(ws, extractor)
    fm = load_features(ws, LITE0)
    paths = [ws.source_path(r) for r in fm.relpaths]
    direct = extractor.transform(paths)
    unit = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(fm.vectors, unit, atol=1e-6)
    # PIL images and prepared arrays go the same way.
    with Image.open(paths[0]) as img:  # a grayscale PNG, made RGB on the way
        assert img.mode == "L"
        from_pil = extractor.transform([img])
    np.testing.assert_allclose(from_pil[0], direct[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"should be \(n, 224, 224, 3\)"):
        extractor.transform(np.zeros((1, 100, 100, 3), np.uint8))
    assert extractor.transform([]).shape == (0, 1280)


def test_photos_of_a_class_are_closer_to_each_other_than_to_other_classes(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    if not (CLOTHING / "labels.csv").exists():
        pytest.skip(f"{CLOTHING} not present (it lives in ../shared beside the project)")
    ws = _workspace(tmp_path, n_sample=0, n_photos=5)
    extract(ws, extractor)
    fm = load_features(ws, LITE0)
    labels = np.array([Path(r).parts[1] for r in fm.relpaths])
    sim = fm.vectors @ fm.vectors.T
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    different = labels[:, None] != labels[None, :]
    assert sim[same].mean() > sim[different].mean() + 0.05


def test_interrupted_extraction_resumes_without_recomputing(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    ws = _workspace(tmp_path, n_sample=14)
    n = len(_distinct_ok(ws))

    class Stop(Exception):
        pass

    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 8:
            raise Stop

    with pytest.raises(Stop):
        extract(ws, extractor, batch_size=4, progress=stop_after_two_batches)
    assert _stored_rows(ws) == (8, 8, 2)
    assert len(missing_hashes(ws, LITE0)) == n - 8

    report = extract(ws, extractor, batch_size=4)
    assert (report.extracted, report.reused) == (n - 8, 8)
    rows, computed, _ = _stored_rows(ws)
    assert rows == computed == n  # nothing computed twice, nothing missing
    assert len(load_features(ws, LITE0)) == n


@pytest.mark.slow  # a child process imports TensorFlow and loads the model: ~5 s of CPU
def test_killed_process_loses_at_most_the_batch_in_flight(
    tmp_path: Path, extractor: FeatureExtractor, model_cache: Path
) -> None:
    ws = _workspace(tmp_path, n_sample=14)
    n = len(_distinct_ok(ws))
    # SIGKILL from inside the progress callback: no cleanup handler runs, like `kill -9`.
    script = textwrap.dedent(
        """
        import os, signal, sys
        from imgcluster.features import extract
        from imgcluster.workspace import Workspace

        def progress(done, total):
            if done >= 8:
                os.kill(os.getpid(), signal.SIGKILL)

        extract(Workspace(sys.argv[1]), batch_size=4, progress=progress)
        """
    )
    env = {**os.environ, CACHE_ENV: str(model_cache)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ws.path)],
        env=env,
        capture_output=True,
        timeout=300,
        cwd=PROJECT,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _stored_rows(ws) == (8, 8, 2)
    assert not list(ws.features_dir(LITE0).glob(".*.tmp"))

    report = extract(ws, extractor, batch_size=4)
    assert report.extracted == n - 8
    rows, computed, _ = _stored_rows(ws)
    assert rows == computed == n


def test_vanished_or_changed_files_are_reported_not_fatal(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    root = _copy_images(tmp_path / "images", n_sample=8)
    shutil.copy(root / "fmnist_00002.png", root / "zz_copy.png")
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    by_path = {im.relpath: im.sha256 for im in ws.images("ok")}

    (root / "fmnist_00000.png").unlink()
    Image.new("RGB", (50, 50), (200, 10, 10)).save(root / "fmnist_00003.png")
    # The first file of a duplicate pair vanishes: its identical copy stands in.
    (root / "fmnist_00002.png").unlink()

    report = extract(ws, extractor)
    failed = dict(report.failed)
    assert set(failed) == {"fmnist_00000.png", "fmnist_00003.png", "fmnist_00002.png"}
    assert failed["fmnist_00000.png"].startswith("missing:")
    assert failed["fmnist_00003.png"].startswith("changed:")
    assert report.failure_counts() == {"missing": 2, "changed": 1}
    assert report.without_vector == 2
    # Nothing is stored for the lost contents; they stay on the work list for a re-ingest.
    assert set(missing_hashes(ws, LITE0)) == {
        by_path["fmnist_00000.png"],
        by_path["fmnist_00003.png"],
    }
    fm = load_features(ws, LITE0)
    assert "zz_copy.png" in fm.relpaths and "fmnist_00003.png" not in fm.relpaths


# -- runtimes ---------------------------------------------------------------------------------


@pytest.mark.slow  # loads the Keras runtime too (the fast lane runs the TFLite one): ~5 s
def test_tflite_vectors_match_keras(
    tmp_path: Path,
    extractor: FeatureExtractor,
    keras_extractor: FeatureExtractor,
    model_cache: Path,
) -> None:
    assert (extractor.runtime_, keras_extractor.runtime_) == ("tflite", "keras")
    assert extractor.fingerprint_ == keras_extractor.fingerprint_
    root = _copy_images(tmp_path / "images", n_sample=4, n_photos=1)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    pixels = np.stack([extractor.read(p) for p in paths])
    lite, reference = extractor.transform(pixels), keras_extractor.transform(pixels)
    assert lite.shape == reference.shape == (len(paths), 1280)
    assert np.abs(lite - reference).max() <= 1e-4
    (verdict,) = (model_cache / "tflite").glob(f"{LITE0}-*.json")
    assert json.loads(verdict.read_text())["ok"] is True


@pytest.mark.slow  # builds the Keras model again: ~3 s
def test_auto_runtime_falls_back_to_keras_when_the_conversion_failed_its_check(
    tmp_path: Path,
    extractor: FeatureExtractor,
    monkeypatch: pytest.MonkeyPatch,
    model_cache: Path,
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(model_cache, cache)
    (verdict,) = (cache / "tflite").glob(f"{LITE0}-*.json")
    verdict.write_text(json.dumps({"ok": False, "reason": "differs by 3"}))
    monkeypatch.setenv(CACHE_ENV, str(cache))

    with pytest.raises(ImgclusterError, match="differs by 3"):
        load_extractor(LITE0, runtime="tflite")
    with pytest.warns(UserWarning, match=r"differs by 3.*Keras runtime"):
        fallback = load_extractor(LITE0, runtime="auto")
    assert fallback.runtime_ == "keras"
    with pytest.raises(ValueError, match="runtime='gpu'"):
        load_extractor(LITE0, runtime="gpu")  # type: ignore[arg-type]


def test_vectors_from_other_resizing_are_not_mixed_in(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    ws = _workspace(tmp_path, n_sample=4)
    extract(ws, extractor)
    root = ws.collection_root
    Image.new("L", (40, 40), 90).save(root / "new.png")
    ingest(ws, root)
    with pytest.raises(FeaturesMismatch, match="other weights, resizing or flip"):
        extract(ws, LITE0, nearest_resize=True)
    delete_features(ws, LITE0)
    report = extract(ws, LITE0, nearest_resize=True)
    assert report.extracted == 5 and report.runtime == "tflite"


# -- command line -----------------------------------------------------------------------------


def test_cli_extract_summary_and_exit_codes(tmp_path: Path, model_cache: Path) -> None:
    ws = _workspace(tmp_path, n_sample=6)
    (ws.collection_root / "fmnist_00000.png").unlink()
    runner = CliRunner()
    env = {CACHE_ENV: str(model_cache)}

    result = runner.invoke(cli, ["extract", "-w", str(ws.path), "--batch-size", "2"], env=env)
    assert result.exit_code == 0, result.output
    assert "extracted  5" in result.stdout
    assert "failed     1" in result.stdout
    assert "1  missing" in result.stdout
    assert "fmnist_00000.png: missing" in result.stderr
    assert "images/s (tflite" in result.stdout

    again = runner.invoke(cli, ["extract", "-w", str(ws.path)], env=env)
    assert again.exit_code == 0 and "reused     5" in again.stdout

    bad = runner.invoke(cli, ["extract", "-w", str(ws.path), "--backbone", "alexnet"], env=env)
    assert bad.exit_code == 1 and "unknown backbone 'alexnet'" in bad.output
    usage = runner.invoke(cli, ["extract", "-w", str(ws.path), "--batch-size", "0"], env=env)
    assert usage.exit_code == 2
    with pytest.raises(UnknownBackbone):
        extract(ws, "alexnet")


# -- damaged stores, hostile sources, concurrency (issue 14 §3, §7, §9) ------------------------


def _shard_files(ws: Workspace) -> list[Path]:
    with ws.read() as conn:
        rows = conn.execute(
            "SELECT file FROM feature_shards WHERE backbone = ? ORDER BY id", (LITE0,)
        ).fetchall()
    return [ws.path / row[0] for row in rows]


def test_damaged_shards_give_one_line_then_extract_recomputes_exactly_them(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    ws = _workspace(tmp_path, n_sample=12)
    extract(ws, extractor, batch_size=3)
    before = load_features(ws, LITE0)
    deleted, truncated, reshaped, kept = _shard_files(ws)
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[:200])
    np.save(reshaped, np.ones((2, 7), np.float32))  # np.save keeps the name: same file
    with pytest.raises(FeaturesDamaged, match=r"feature shard .* `imgcluster extract") as info:
        load_features(ws, LITE0)
    assert "\n" not in str(info.value)

    report = extract(ws, extractor, batch_size=3)
    assert len(report.repaired) == 3
    assert {Path(f).name for f, _p in report.repaired} == {
        p.name for p in (deleted, truncated, reshaped)
    }
    assert (report.extracted, report.reused) == (9, 3)  # the kept shard is not recomputed
    after = load_features(ws, LITE0)
    assert after.relpaths == before.relpaths
    np.testing.assert_allclose(after.vectors, before.vectors, atol=1e-6)
    assert kept in _shard_files(ws)
    assert extract(ws, extractor).extracted == 0


def test_a_huge_sparse_file_swapped_in_is_refused_from_its_size_not_read(
    tmp_path: Path, extractor: FeatureExtractor
) -> None:
    ws = _workspace(tmp_path, n_sample=3)
    victim = ws.collection_root / "fmnist_00002.png"
    with open(victim, "r+b") as fh:  # 20 GB sparse: reading it whole would exhaust memory
        fh.truncate(20 << 30)
    report = extract(ws, extractor)
    assert dict(report.failed) == {"fmnist_00002.png": dict(report.failed)["fmnist_00002.png"]}
    assert dict(report.failed)["fmnist_00002.png"].startswith("file too large: 21,474,836,480")
    assert report.extracted == 2


def test_extreme_aspect_ratio_is_cropped_before_resizing_within_a_small_memory_cap() -> None:
    """An 89000x1 image resized on its short side to 256 then cropped needs a 22,784,000x256
    intermediate (~17 GB); cropping first needs the 224x224 output alone. Under a 1.5 GB
    address-space cap the old order fails with MemoryError; this must pass."""
    script = textwrap.dedent(
        """
        import resource
        from PIL import Image
        from imgcluster.backbones import get_backbone
        from imgcluster.features import fit_to_square

        backbone = get_backbone("efficientnet-lite0")
        wide = Image.new("RGB", (89000, 1), (250, 20, 20))
        images = [wide, Image.new("RGB", (1, 8000), (0, 0, 255))]
        resource.setrlimit(resource.RLIMIT_AS, (1500 << 20, 1500 << 20))
        for image in images:
            out = fit_to_square(image, backbone)
            assert out.shape == (224, 224, 3), out.shape
            assert tuple(out[100, 100]) == image.getpixel((0, 0)), out[100, 100]
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=PROJECT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_fitting_matches_resize_then_crop_exactly_on_photos_and_closely_on_extreme_shapes(
    extractor: FeatureExtractor,
) -> None:
    backbone = extractor.backbone_
    shapes = {(400, 533): 0, (533, 400): 0, (224, 300): 0, (300, 224): 0, (640, 360): 0}
    # Cropped first: the same picture (an upscaled 17 px wide strip differs at the crop edge).
    shapes |= {(1000, 250): 1, (17, 900): 1}
    for size, tolerance in shapes.items():
        rng = np.random.default_rng(sum(size))
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        scale = 224 / 0.875 / min(size)
        new = (max(224, round(size[0] * scale)), max(224, round(size[1] * scale)))
        left, top = (new[0] - 224) // 2, (new[1] - 224) // 2
        old = image.resize(new, backbone.resample, reducing_gap=3.0)
        expected = np.asarray(old.crop((left, top, left + 224, top + 224))).astype(int)
        got = fit_to_square(image, backbone).astype(int)
        error = np.abs(got - expected).max() if tolerance == 0 else np.abs(got - expected).mean()
        assert error <= tolerance, size


@pytest.mark.slow
def test_two_concurrent_extractions_do_the_work_once(tmp_path: Path, model_cache: Path) -> None:
    ws = _workspace(tmp_path, n_sample=24)
    n = len(_distinct_ok(ws))
    env = {**os.environ, CACHE_ENV: str(model_cache)}
    command = [sys.executable, "-m", "imgcluster.cli", "extract", "-w", str(ws.path)]
    procs = [
        subprocess.Popen(
            [*command, "--batch-size", "4"],
            env=env,
            cwd=PROJECT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rows, computed, _shards = _stored_rows(ws)
    assert rows == computed == n  # every content computed once in all, none twice
    assert sorted("reused     0" in out for out, _err in outputs) == [False, True]
