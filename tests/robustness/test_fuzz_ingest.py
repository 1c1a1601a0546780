"""Seeded mutation fuzz of the decoder and of ingest (issue 14 §2).

Real photos (the shipped sample) re-encoded as JPEG, PNG, WebP, TIFF and GIF, with EXIF where
the format carries it, are mutated (bit flips, byte runs, truncation, duplicated or dropped
spans, EXIF-targeted damage) with a fixed seed. Whatever the bytes, `open_rgb` may only raise
`ImageRejected`, and ingest of a folder of mutants never raises out of the batch: every file
ends as ok or skipped with a "<kind>: <detail>" reason, the good files beside them stay ok.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from imgcluster.errors import ImageRejected
from imgcluster.images import examine_file, ingest, open_rgb, scan
from imgcluster.workspace import Workspace
from tests.conftest import SAMPLE_DATA
from tests.robustness.invariants import problems

SEED = 20261201
ITERATIONS = 5_000  # about 1-2 s of CPU (48-px seeds decode in well under 1 ms)
_REASON = re.compile(r"^[a-z][a-z0-9 ()_-]*(: .+)?$", re.DOTALL)

# Pillow warns about the damaged TIFF/EXIF tags it skips; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    exif[0x010F] = "imgcluster fuzz"  # make
    exif[0x0132] = "2026:12:01 12:00:00"  # datetime
    exif[0x8769] = {0x9003: "2026:12:01 12:00:00", 0x920A: (35, 10)}  # Exif IFD
    return exif.tobytes()


def seeds() -> dict[str, bytes]:
    """One small real photo in each format (and AVIF named .jpg, when Pillow writes AVIF)."""
    source = sorted((SAMPLE_DATA / "images").glob("*.jpg"))[0]
    with Image.open(source) as img:
        photo = img.convert("RGB")
    photo.thumbnail((48, 48))
    exif = _exif()
    out: dict[str, bytes] = {}
    for ext, fmt, kwargs in [
        (".jpg", "JPEG", {"exif": exif, "quality": 80}),
        (".png", "PNG", {"exif": exif}),
        (".webp", "WEBP", {"exif": exif, "quality": 70}),
        (".tif", "TIFF", {"exif": exif}),
        (".gif", "GIF", {}),
    ]:
        buf = io.BytesIO()
        photo.save(buf, format=fmt, **kwargs)
        out[ext] = buf.getvalue()
    try:
        buf = io.BytesIO()
        photo.save(buf, format="AVIF", quality=50)
        out["avif.jpg"] = buf.getvalue()  # AVIF content named .jpg
    except (KeyError, OSError, ValueError):
        pass
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits; EXIF/TIFF-header bytes are hit more often than the rest."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        kind = rng.random()
        exif_at = buf.find(b"Exif")
        if exif_at < 0:
            exif_at = buf.find(b"II*\x00")
        if exif_at >= 0 and rng.random() < 0.4:
            pos = min(len(buf) - 1, exif_at + rng.randint(0, 120))
        else:
            pos = rng.randrange(len(buf))
        if kind < 0.45:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.65:
            buf[pos : pos + 4] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80]) for _ in range(4))
        elif kind < 0.75:
            del buf[pos:]
        elif kind < 0.85:
            span = buf[pos : pos + rng.randint(1, 64)]
            buf[pos:pos] = span
        else:
            del buf[pos : pos + rng.randint(1, 64)]
    return bytes(buf)


@pytest.mark.parametrize(
    ("seed", "iterations"),
    [
        (SEED, ITERATIONS),
        pytest.param(SEED + 7, 5 * ITERATIONS, marks=pytest.mark.slow),  # ~15 s: other mutants
    ],
)
def test_decoder_only_ever_rejects_a_mutated_file(seed: int, iterations: int) -> None:
    rng = random.Random(seed)
    corpus = seeds()
    names = sorted(corpus)
    escapes: list[str] = []
    rejected = 0
    for i in range(iterations):
        name = names[i % len(names)]
        data = mutate(corpus[name], rng)
        try:
            open_rgb(data)
        except ImageRejected as exc:
            rejected += 1
            assert _REASON.match(exc.reason), exc.reason
        except Exception as exc:
            escapes.append(f"{name} #{i}: {type(exc).__name__}: {exc}")
    assert not escapes, escapes[:5]
    assert rejected > iterations // 10  # the mutations did damage files


def test_ingest_of_mutants_among_good_files_never_aborts(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    corpus = seeds()
    root = tmp_path / "photos"
    root.mkdir()
    good = sorted((SAMPLE_DATA / "images").glob("*.jpg"))[:20]
    for path in good:
        (root / path.name).write_bytes(path.read_bytes())
    names = sorted(corpus)
    for i in range(300):
        name = names[i % len(names)]
        ext = ".jpg" if name.endswith(".jpg") else name
        (root / f"mutant_{i:03d}{ext}").write_bytes(mutate(corpus[name], rng))
    ws = Workspace(tmp_path / "ws", create=True)
    report = ingest(ws, root)
    assert report.found == 320
    assert report.ok + report.n_skipped == 320
    ok = {img.relpath for img in ws.images("ok")}
    assert {p.name for p in good} <= ok
    for relpath, reason in ws.skipped():
        assert _REASON.match(reason), (relpath, reason)
    assert problems(ws) == []


@pytest.mark.parametrize("name", ["exif-type", "exif-count"])
def test_malformed_exif_is_a_skip_or_ok_never_an_exception(tmp_path: Path, name: str) -> None:
    """Direct EXIF damage: a wrong type code and a huge count in the first IFD entry."""
    data = bytearray(seeds()[".jpg"])
    at = data.find(b"Exif\x00\x00") + 6
    assert at > 6
    entry = at + 8 + 2  # TIFF header (8), entry count (2), first entry
    if name == "exif-type":
        data[entry + 2 : entry + 4] = b"\x00\x63"[:: -1 if data[at] == ord("I") else 1]
    else:
        data[entry + 4 : entry + 8] = b"\xff\xff\xff\x7f"
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(bytes(data))
    (examined,) = [examine_file(f) for f in scan(tmp_path)]
    assert examined.ok or _REASON.match(examined.reason or ""), examined.reason
