"""Feature extraction on the hostile corpus, and on files that change between ingest and
extraction: deleted, replaced by another image, truncated, swapped for a folder or for a link
out of the collection. Each ends as a reported reason or a correct vector, never as a crash or a
vector stored under content it does not belong to. Uses the real efficientnet-lite0.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.features import extract, load_extractor, load_features
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import PROJECT
from tests.robustness.corpus import BLUE, GREEN, RED, encode, exif, make_corpus, solid
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


# -- seeded fuzz: mutated real images never escape a batch (issue 14 §2) ----------------------

FUZZ_SEED = 20261201
FUZZ_ITERATIONS = 2000
REASON = re.compile(r"^[a-z][a-z0-9 -]*(: .+)?$")


def _seed_images() -> dict[str, bytes]:
    """One real photo re-encoded small in each format, with EXIF where the format carries it
    (malformed EXIF is where exceptions used to escape)."""
    photo = sorted((PROJECT / "sample_data" / "images").glob("*.jpg"))[0]
    with Image.open(photo) as img:
        small = img.convert("RGB").resize((64, 48))
    tags = exif(orientation=6, description_bytes=64)
    return {
        "JPEG": encode(small, "JPEG", quality=80, exif=tags),
        "PNG": encode(small, "PNG"),
        "WEBP": encode(small, "WEBP", quality=70, exif=tags),
        "TIFF": encode(small, "TIFF", exif=tags),
        "GIF": encode(small.convert("P"), "GIF"),
    }


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation: flipped bytes, a truncation, an inserted, deleted or repeated run."""
    buf = bytearray(data)
    kind = int(rng.integers(5))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
    elif kind == 1:
        del buf[int(rng.integers(1, len(buf))) :]
    elif kind == 2:
        at = int(rng.integers(len(buf)))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 3:
        at = int(rng.integers(len(buf)))
        del buf[at : at + int(rng.integers(1, 64))]
    else:
        at, n = int(rng.integers(len(buf))), int(rng.integers(1, 128))
        buf[at:at] = buf[at : at + n] * int(rng.integers(2, 5))
    return bytes(buf)


@pytest.mark.slow  # 3,000 mutated decodes through the network: ~4 s
def test_seeded_fuzz_of_mutated_images_never_escapes_the_batch(extractor) -> None:
    rng = np.random.default_rng(FUZZ_SEED)
    seeds = list(_seed_images().items())
    outcomes = {"ok": 0, "failed": 0}
    kinds: set[str] = set()
    for start in range(0, FUZZ_ITERATIONS, 100):
        blobs = [_mutate(seeds[(start + i) % len(seeds)][1], rng) for i in range(100)]
        result = extractor.transform_batch(blobs)  # must not raise, whatever the bytes
        assert len(result.ok) == 100
        assert result.vectors.shape == (int(result.ok.sum()), 1280)
        assert np.isfinite(result.vectors).all()
        failed = {index for index, _reason in result.failures}
        assert failed == {i for i in range(100) if not result.ok[i]}
        for _index, reason in result.failures:
            assert REASON.match(reason) and "\n" not in reason, reason
            kinds.add(reason.split(":", 1)[0])
        outcomes["ok"] += int(result.ok.sum())
        outcomes["failed"] += len(failed)
    print(f"\nfuzz: {FUZZ_ITERATIONS} mutated images, {outcomes}, failure kinds {sorted(kinds)}")
    assert outcomes["ok"] > 0 and outcomes["failed"] > 0  # the mutations hit both outcomes


def test_extract_over_an_ingested_mutated_collection_never_raises(tmp_path: Path, extractor):
    """End to end: whatever ingest accepted of 150 mutated files, extract stores a vector for it
    or reports the file, and the store stays consistent."""
    rng = np.random.default_rng(FUZZ_SEED + 1)
    root = tmp_path / "photos"
    root.mkdir()
    for i, (fmt, data) in enumerate(list(_seed_images().items()) * 30):
        suffix = {"JPEG": "jpg", "WEBP": "webp", "TIFF": "tif"}.get(fmt, fmt.lower())
        (root / f"{i:03d}.{suffix}").write_bytes(_mutate(data, rng))
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    report = extract(ws, extractor, batch_size=16)
    stored = set(load_features(ws, BACKBONE).relpaths)
    failed = {relpath for relpath, _reason in report.failed}
    assert {im.relpath for im in ws.images("ok")} == stored | failed
    assert problems(ws) == []


def test_same_size_same_mtime_replacement_leads_to_its_fix(tmp_path: Path, extractor) -> None:
    """Extract's content check catches a replacement that keeps size and mtime; its message
    says to run ingest, and ingest then picks the new content up (issue 14 §8)."""
    root = tmp_path / "photos"
    root.mkdir()
    first = encode(solid(RED, (32, 32)), "PNG")
    (root / "a.png").write_bytes(first)
    (root / "b.png").write_bytes(encode(solid(BLUE, (32, 32)), "PNG"))
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    ingested = ws.image_by_relpath("a.png").sha256
    before = os.stat(root / "a.png")
    other = bytearray(encode(solid(GREEN, (32, 32)), "PNG"))
    other = bytes(other[: len(first)]) + b"\0" * max(0, len(first) - len(other))
    assert len(other) == len(first)
    (root / "a.png").write_bytes(other)
    os.utime(root / "a.png", ns=(before.st_atime_ns, before.st_mtime_ns))

    report = extract(ws, extractor)
    (reason,) = [r for rel, r in report.failed if rel == "a.png"]
    assert reason.startswith("changed:") and "imgcluster ingest" in reason
    ingest(ws, root)
    record = ws.image_by_relpath("a.png")
    assert record.sha256 != ingested or record.status != "ok"  # the replacement was seen
    again = extract(ws, extractor)
    assert not [rel for rel, _r in again.failed if rel == "a.png"]
    assert problems(ws) == []
