"""Fused feature sets, test-time flip and suggested names, with the real EfficientNet-Lite0 and
Lite2 on real clothing photos (issue 13 §2, §3, §5).

One workspace of 24 photos (6 classes x 4) is extracted once as the fusion
``efficientnet-lite0+efficientnet-lite2``; member extractors loaded on their own are the
reference the fusion must reproduce.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgcluster.backbones import RECOMMENDED_FUSION, list_feature_sets, split_feature_set
from imgcluster.cli import cli
from imgcluster.errors import UnknownBackbone
from imgcluster.features import (
    CACHE_ENV,
    FeatureExtractor,
    class_scores,
    extract,
    feature_count,
    feature_set_id,
    feature_top_classes,
    l2_normalize,
    load_extractor,
    load_features,
    load_top_classes,
    suggest_names,
)
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import CLOTHING, read_truth

LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"
FUSED = f"{LITE0}+{LITE2}"
CLASSES = ("shoes", "pants", "hat", "dress", "skirt", "t-shirt")
FOOTWEAR = {"clog", "cowboy boot", "Loafer", "running shoe", "sandal", "sock", "shoe shop"}

pytestmark = pytest.mark.slow  # two networks converted once per module (~20-40 s)


@pytest.fixture(scope="module")
def fused(model_cache: Path) -> FeatureExtractor:
    return load_extractor(FUSED, runtime="tflite")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict[str, str]]:
    """A workspace of real photos (not yet extracted) and the true class of each relpath."""
    if not (CLOTHING / "labels.csv").exists():
        pytest.skip(f"{CLOTHING} not present (it lives in ../shared beside the project)")
    rows = [{"path": p, "label": c} for p, c in read_truth(CLOTHING).items()]
    base = tmp_path_factory.mktemp("fusion")
    truth = {}
    for label in CLASSES:
        for row in [r for r in rows if r["label"] == label][:4]:
            target = base / "photos" / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CLOTHING / row["path"], target)
            truth[row["path"]] = label
    ws = Workspace(base / "ws", create=True)
    ingest(ws, base / "photos")
    return ws, truth


@pytest.fixture(scope="module")
def extracted(photos, fused: FeatureExtractor):
    ws, truth = photos
    report = extract(ws, fused, batch_size=8)
    return ws, truth, report


def test_fused_vectors_are_the_normalised_concatenation_of_the_members(
    extracted, model_cache: Path
) -> None:
    ws, _truth, report = extracted
    assert report.extracted == report.total == 24 and not report.failed
    fm = load_features(ws, FUSED)
    assert fm.vectors.shape == (24, 2560)
    paths = [ws.collection_root / r for r in fm.relpaths]
    # Each member on its own, as a separate extractor that decodes the files itself.
    alone = [load_extractor(name, runtime="tflite").transform(paths) for name in (LITE0, LITE2)]
    expected = l2_normalize(np.concatenate([l2_normalize(v) for v in alone], axis=1))
    np.testing.assert_allclose(fm.vectors, expected, atol=1e-5)
    # The members are stored under their own names and serve alone without recomputation.
    np.testing.assert_allclose(load_features(ws, LITE0).vectors, l2_normalize(alone[0]), atol=1e-5)
    assert extract(ws, LITE0, runtime="tflite").extracted == 0
    with ws.read() as conn:
        assert feature_count(conn, FUSED) == 24
        assert feature_set_id(conn, FUSED) != feature_set_id(conn, LITE0)


def test_the_fused_extractor_transforms_like_the_store(extracted, fused) -> None:
    ws, _truth, _report = extracted
    fm = load_features(ws, FUSED)
    direct = fused.transform([ws.collection_root / r for r in fm.relpaths[:3]])
    np.testing.assert_allclose(direct, fm.vectors[:3], atol=1e-5)
    assert fused.output_dim_ == 2560
    batch = fused.transform_batch([ws.collection_root / fm.relpaths[0], b"not an image"])
    assert batch.ok.tolist() == [True, False]
    assert batch.failures[0][0] == 1 and batch.failures[0][1].startswith("not an image")
    assert set(batch.member_vectors) == {LITE0, LITE2}


def test_only_the_missing_member_runs_when_one_is_already_stored(
    tmp_path: Path, photos, fused, model_cache: Path
) -> None:
    ws_src, _truth = photos
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, ws_src.collection_root)
    extract(ws, LITE0, runtime="tflite", batch_size=8)
    with ws.read() as conn:
        shards_before = conn.execute("SELECT COUNT(*) FROM feature_shards").fetchone()[0]
    report = extract(ws, fused, batch_size=8)
    assert (report.extracted, report.reused) == (24, 0)  # 24 contents lacked a Lite2 vector
    with ws.read() as conn:
        by_backbone = dict(
            conn.execute("SELECT backbone, SUM(n_rows) FROM feature_shards GROUP BY backbone")
        )
        shards_after = conn.execute("SELECT COUNT(*) FROM feature_shards").fetchone()[0]
    assert by_backbone == {LITE0: 24, LITE2: 24}  # Lite0 was not computed again
    assert shards_after == shards_before + 3


def test_fusion_names_are_checked_and_offered(tmp_path: Path) -> None:
    assert split_feature_set(FUSED) == (LITE0, LITE2)
    with pytest.raises(UnknownBackbone, match="alexnet"):
        split_feature_set(f"{LITE0}+alexnet")
    with pytest.raises(UnknownBackbone, match="twice"):
        split_feature_set(f"{LITE0}+{LITE0}")
    offered = {f.name: f for f in list_feature_sets()}
    assert offered[RECOMMENDED_FUSION].members == (LITE0, LITE2)
    assert offered[RECOMMENDED_FUSION].output_dim == 2560
    assert "best quality" in offered[RECOMMENDED_FUSION].description


def test_cli_extracts_a_fusion_by_name(extracted, model_cache: Path) -> None:
    ws, _truth, _report = extracted
    result = CliRunner().invoke(
        cli, ["extract", "-w", str(ws.path), "--backbone", FUSED], env={CACHE_ENV: str(model_cache)}
    )
    assert result.exit_code == 0, result.output
    assert "reused     24" in result.stdout


# -- test-time flip ----------------------------------------------------------------------------


def test_flip_averages_each_vector_with_its_mirror_images(model_cache: Path) -> None:
    rng = np.random.default_rng(0)
    # 224x224: the centre crop is symmetric, so mirroring commutes with fitting the input.
    pixels = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    image, mirror = Image.fromarray(pixels), Image.fromarray(pixels[:, ::-1].copy())
    plain = load_extractor(LITE0, runtime="tflite")
    flipped = load_extractor(LITE0, runtime="tflite", flip=True)
    expected = plain.transform([image, mirror]).mean(axis=0)
    got = flipped.transform([image, mirror])
    np.testing.assert_allclose(got[0], expected, atol=1e-4)
    np.testing.assert_allclose(got[1], expected, atol=1e-4)  # mirror-invariant
    assert flipped.fingerprint_ == plain.fingerprint_ + ";flip"


# -- suggested names ---------------------------------------------------------------------------


def test_suggested_names_come_from_the_real_head_and_name_the_shoes_footwear(extracted) -> None:
    ws, truth, _report = extracted
    images = {im.relpath: im.id for im in ws.images()}
    groups = {
        i: [images[r] for r, label in truth.items() if label == name]
        for i, name in enumerate(CLASSES)
    }
    names = suggest_names(ws, FUSED, groups)
    assert set(names) == set(groups)
    shoes = names[CLASSES.index("shoes")].split(" / ")
    assert shoes[0] in FOOTWEAR, names
    assert 2 <= len(shoes) <= 3 and len(set(shoes)) == len(shoes)
    # Probabilities are stored per content, from the head of the weights file.
    ids, top = load_top_classes(ws, LITE0)
    assert len(ids) == 24 and top.shape == (24, 10)
    assert np.all(np.diff(top[:, 5:], axis=1) <= 0) and np.all(top[:, 5:].sum(axis=1) <= 1 + 1e-5)
    assert suggest_names(ws, FUSED, {99: []}) == {}
    # Scores summed from the top classes equal the mean of the dense probability rows, and a
    # caller's preloaded table gives the same names.
    dense = np.zeros((len(ids), 1000), dtype=np.float64)
    for row, entry in enumerate(top):
        dense[row, entry[:5].astype(int)] = entry[5:]
    position = {int(i): row for row, i in enumerate(ids)}
    scores = class_scores(ws, FUSED, groups)
    for label_id, members in groups.items():
        expected = dense[[position[i] for i in members]].mean(axis=0)
        np.testing.assert_allclose(scores[label_id], expected, atol=1e-6)
    assert suggest_names(ws, FUSED, groups, top=feature_top_classes(ws, FUSED)) == names
