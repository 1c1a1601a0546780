"""Feature extraction on the hostile corpus, and on files that change between ingest and
extraction: deleted, replaced by another image, truncated, swapped for a folder or for a link
out of the collection. Each ends as a reported reason or a correct vector, never as a crash or a
vector stored under content it does not belong to. Uses the real efficientnet-lite0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.features import extract, load_extractor, load_features
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.robustness.corpus import BLUE, GREEN, RED, encode, make_corpus, solid
from tests.robustness.invariants import problems

BACKBONE = "efficientnet-lite0"

#: Files changed after ingest and the reason kind extraction must report (None: any reason).
MUTATED: dict[str, str | None] = {
    "gone.png": "missing",
    "swapped.png": "changed",
    "truncated_later.jpg": "changed",
    "now_a_folder.png": "unreadable",
    "dup_first.png": "missing",
}


@pytest.fixture(scope="module")
def extractor():
    return load_extractor(BACKBONE)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, extractor):
    base = tmp_path_factory.mktemp("extract")
    root = base / "photos"
    make_corpus(root, permissions=False)
    for name, color in (("gone.png", RED), ("swapped.png", GREEN), ("now_a_folder.png", BLUE)):
        (root / name).write_bytes(encode(solid(color, (40, 40)), "PNG"))
    (root / "truncated_later.jpg").write_bytes(encode(solid(BLUE, (64, 64)), "JPEG"))
    twin = encode(solid((90, 90, 10), (30, 30)), "PNG")
    (root / "dup_first.png").write_bytes(twin)
    (root / "dup_second.png").write_bytes(twin)
    ws = Workspace(base / "ws", create=True)
    ingest(ws, root)

    # Between ingest and extraction, the collection changes under the workspace.
    (root / "gone.png").unlink()
    (root / "dup_first.png").unlink()
    Image.new("RGB", (40, 40), (250, 250, 0)).save(root / "swapped.png")
    data = (root / "truncated_later.jpg").read_bytes()
    (root / "truncated_later.jpg").write_bytes(data[: len(data) // 2])
    (root / "now_a_folder.png").unlink()
    (root / "now_a_folder.png").mkdir()

    report = extract(ws, extractor, batch_size=8)
    return root, ws, report


def _vector(ws: Workspace, relpath: str) -> np.ndarray:
    features = load_features(ws, BACKBONE)
    return features.vectors[features.relpaths.index(relpath)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_changed_files_are_reported_not_fatal(extracted) -> None:
    _root, _ws, report = extracted
    kinds = {relpath: reason.split(":", 1)[0] for relpath, reason in report.failed}
    assert set(kinds) == set(MUTATED)
    assert {rel: kinds[rel] for rel, kind in MUTATED.items() if kind} == {
        rel: kind for rel, kind in MUTATED.items() if kind
    }


def test_store_is_consistent_and_only_changed_files_lack_vectors(extracted) -> None:
    _root, ws, _report = extracted
    assert problems(ws) == []
    features = load_features(ws, BACKBONE)
    without = {r.relpath for r in ws.images()} - set(features.relpaths)
    assert without == set(MUTATED) - {"dup_first.png"}  # its twin supplied the content


def test_no_vector_is_stored_for_content_read_after_a_change(extracted, extractor) -> None:
    root, ws, _report = extracted
    ingested_hash = ws.image_by_relpath("swapped.png").sha256
    features = load_features(ws, BACKBONE)
    assert ingested_hash not in features.sha256s
    expected = extractor.transform([root / "dup_second.png"])[0]
    assert np.allclose(_vector(ws, "dup_first.png"), _unit(expected), atol=1e-5)


@pytest.mark.parametrize(
    ("relpath", "same_as"),
    [
        ("rotated.jpg", solid(GREEN, (20, 60))),  # EXIF applied before the network sees it
        ("cmyk.jpg", solid((255, 0, 0), (40, 30))),
        ("palette.png", solid((255, 255, 255), (16, 16))),
        ("animated.gif", solid(RED, (10, 10))),
    ],
)
def test_odd_modes_give_the_vector_of_their_rgb_picture(
    extracted, extractor, relpath: str, same_as: Image.Image
) -> None:
    _root, ws, _report = extracted
    expected = _unit(extractor.transform([same_as])[0])
    assert float(_vector(ws, relpath) @ expected) > 0.99


@pytest.mark.parametrize(
    "relpath",
    [
        "one_pixel.png",
        "wide.png",
        "连衣裙/红色 连衣裙.jpg",
        "new\nline \"double\" 'single' `tick`.png",
        "x.jpg/inside.png",
        "alias.png",
    ],
)
def test_extreme_and_oddly_named_images_get_unit_vectors(extracted, relpath: str) -> None:
    _root, ws, _report = extracted
    vector = _vector(ws, relpath)
    assert np.isfinite(vector).all() and abs(float(np.linalg.norm(vector)) - 1) < 1e-4


def test_reingest_then_extract_completes_the_store(extracted, extractor) -> None:
    root, ws, _report = extracted
    ingest(ws, root)
    statuses = {r.relpath: r.status for r in ws.images(status=None) if r.relpath in MUTATED}
    assert statuses == {
        "gone.png": "missing",
        "dup_first.png": "missing",
        "swapped.png": "ok",  # re-validated: its new content is a fine image
        "truncated_later.jpg": "skipped",
        "now_a_folder.png": "missing",  # a folder is not an image file any more
    }
    report = extract(ws, extractor, batch_size=8)
    assert report.failed == [] and report.extracted == 1
    assert problems(ws, complete_features=BACKBONE) == []
    new = _unit(extractor.transform([Image.new("RGB", (40, 40), (250, 250, 0))])[0])
    assert np.allclose(_vector(ws, "swapped.png"), new, atol=1e-5)


def test_nothing_is_redone_on_a_second_run(extracted, extractor) -> None:
    _root, ws, _report = extracted
    with ws.read() as conn:
        before = conn.execute("SELECT COUNT(*) FROM feature_shards").fetchone()[0]
    report = extract(ws, extractor, batch_size=8)
    with ws.read() as conn:
        after = conn.execute("SELECT COUNT(*) FROM feature_shards").fetchone()[0]
    assert (report.extracted, after) == (0, before)


def test_links_swapped_in_after_ingest_are_reported_not_fatal(tmp_path: Path, extractor) -> None:
    """A file replaced by a link out of the collection (or by a link loop) must not be read,
    and must not abort the extraction of the other images either."""
    root = tmp_path / "photos"
    root.mkdir()
    for name, color in (
        ("a.png", RED),
        ("b_link_out.png", GREEN),
        ("c_loop.png", BLUE),
        ("d.png", GREEN),
    ):
        (root / name).write_bytes(encode(solid(color, (20 + len(name), 20)), "PNG"))
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    outside = tmp_path / "outside.png"
    shutil.copy(root / "b_link_out.png", outside)
    (root / "b_link_out.png").unlink()
    (root / "b_link_out.png").symlink_to(outside)
    (root / "c_loop.png").unlink()
    (root / "c_loop.png").symlink_to("c_loop.png")
    report = extract(ws, extractor, batch_size=8)
    assert {relpath for relpath, _reason in report.failed} == {"b_link_out.png", "c_loop.png"}
    assert set(load_features(ws, BACKBONE).relpaths) == {"a.png", "d.png"}
    assert problems(ws) == []


@pytest.mark.slow
def test_fifo_swapped_in_after_ingest_does_not_hang_extraction(tmp_path: Path) -> None:
    """A pipe named like an ingested image blocks a plain read forever."""
    root = tmp_path / "photos"
    root.mkdir()
    for i, color in enumerate((RED, GREEN)):
        (root / f"{i}.png").write_bytes(encode(solid(color, (20, 20)), "PNG"))
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    (root / "1.png").unlink()
    os.mkfifo(root / "1.png")
    result = _run_with_deadline(ws.path, 20)
    assert result is not None, "extraction blocked on a FIFO for 20 s"
    assert result.returncode == 0, result.stderr
    assert "1.png" in result.stderr
    assert problems(ws) == []


def _run_with_deadline(ws_path: Path, seconds: float):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcluster.cli", "extract", "--workspace", str(ws_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
