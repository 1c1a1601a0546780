"""Ingest on real files made here: every bad input kind gets a reason or a correct RGB result."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.images import ImageRejected, ingest, open_rgb, scan
from imgcluster.workspace import Workspace


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    """One file of every awkward kind the foundation issue lists."""
    root = tmp_path / "photos"
    root.mkdir()
    good = Image.new("RGB", (64, 48), (200, 30, 30))
    (root / "good.jpg").write_bytes(_jpeg_bytes(good))
    noise = Image.effect_noise((256, 256), 50).convert("RGB")
    (root / "truncated.jpg").write_bytes(_jpeg_bytes(noise)[:2000])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file, not a photo\n")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    sixteen = np.full((20, 30), 40000, dtype=np.uint16)
    Image.fromarray(sixteen).save(root / "sixteen.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    rotated = Image.new("RGB", (60, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated.save(root / "rotated.jpg", exif=exif.tobytes())
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    (root / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    chinese = root / "连衣裙"
    chinese.mkdir()
    (chinese / "红色 连衣裙.jpg").write_bytes(_jpeg_bytes(good))
    (root / "copy_of_good.jpg").write_bytes((root / "good.jpg").read_bytes())
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_every_bad_kind_is_recorded_with_reason(bad_folder: Path, tmp_path: Path) -> None:
    before = _hashes(bad_folder)
    ws = Workspace(tmp_path / "ws", create=True)
    report = ingest(ws, bad_folder)

    reasons = dict(ws.skipped())
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["bomb.png"].startswith("image too large")
    assert "400 megapixels" in reasons["bomb.png"]
    assert len(reasons) == 4
    assert report.found == 12
    assert report.ok == 8
    assert report.skipped == {
        "corrupt image": 1,
        "empty file": 1,
        "not an image": 1,
        "image too large": 1,
    }
    # Source images are only ever read.
    assert _hashes(bad_folder) == before


def test_ok_images_have_thumbnails_and_metadata(bad_folder: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, bad_folder)
    records = {r.relpath: r for r in ws.images()}
    assert "连衣裙/红色 连衣裙.jpg" in records
    assert records["rotated.jpg"].width == 60  # the file's own size is recorded
    for record in records.values():
        thumb = ws.thumbnail_path(record.sha256)
        with Image.open(thumb) as img:
            assert max(img.size) <= 256
            assert img.mode == "RGB"
    with Image.open(ws.thumbnail_path(records["rotated.jpg"].sha256)) as img:
        assert img.size == (20, 60)  # upright after EXIF orientation


def test_cmyk_is_converted_to_rgb(bad_folder: Path) -> None:
    rgb = open_rgb(bad_folder / "cmyk.jpg").image
    assert rgb.mode == "RGB"
    r, g, b = np.asarray(rgb).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 K=0 is red


def test_sixteen_bit_png_is_scaled_not_clipped(bad_folder: Path) -> None:
    arr = np.asarray(open_rgb(bad_folder / "sixteen.png").image)
    assert arr.shape == (20, 30, 3)
    assert np.all(np.abs(arr.astype(int) - round(40000 / 65535 * 255)) <= 1)


def test_palette_transparency_becomes_white(bad_folder: Path) -> None:
    arr = np.asarray(open_rgb(bad_folder / "palette.png").image)
    assert arr.shape == (16, 16, 3)
    assert np.all(arr == 255)  # index 0 (blue) is transparent -> white background


def test_exif_orientation_is_applied(bad_folder: Path) -> None:
    decoded = open_rgb(bad_folder / "rotated.jpg")
    assert decoded.image.size == (20, 60)
    assert (decoded.width, decoded.height) == (60, 20)


def test_animated_gif_uses_first_frame(bad_folder: Path) -> None:
    arr = np.asarray(open_rgb(bad_folder / "animated.gif").image)
    assert tuple(arr[5, 5]) == (255, 0, 0)


def test_decompression_bomb_refused_from_header(bad_folder: Path) -> None:
    with pytest.raises(ImageRejected, match="400 megapixels"):
        open_rgb(bad_folder / "bomb.png")


def test_reingest_adds_nothing_and_finds_changes(bad_folder: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    first = ingest(ws, bad_folder)
    assert first.new == 12
    rows_before = [r for r in ws.images(status=None)]
    second = ingest(ws, bad_folder)
    assert (second.new, second.changed, second.unchanged) == (0, 0, 12)
    assert ws.images(status=None) == rows_before

    Image.new("RGB", (30, 30), (0, 0, 0)).save(bad_folder / "good.jpg")
    os.utime(bad_folder / "good.jpg", ns=(1, 1))
    (bad_folder / "cmyk.jpg").unlink()
    Image.new("RGB", (8, 8)).save(bad_folder / "new.png")
    third = ingest(ws, bad_folder)
    assert (third.new, third.changed, third.missing) == (1, 1, 1)
    assert ws.image_by_relpath("cmyk.jpg").status == "missing"
    assert ws.image_by_relpath("good.jpg").width == 30


def test_exact_duplicates_are_recorded(bad_folder: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    report = ingest(ws, bad_folder)
    records = {r.relpath: r for r in ws.images()}
    # "连衣裙/红色 连衣裙.jpg" and "copy_of_good.jpg" hold the same bytes as "good.jpg"
    first = min(
        (records[p] for p in ("good.jpg", "copy_of_good.jpg", "连衣裙/红色 连衣裙.jpg")),
        key=lambda r: r.id,
    )
    dups = {r.relpath for r in records.values() if r.duplicate_of == first.id}
    assert len(dups) == 2
    assert report.duplicates == 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unreadable_file_is_skipped_with_reason(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "fine.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "locked.png")
    (root / "locked.png").chmod(0)
    ws_path = tmp_path / "ws"
    code = textwrap.dedent(
        f"""
        from imgcluster.images import ingest
        from imgcluster.workspace import Workspace
        ws = Workspace({str(ws_path)!r}, create=True)
        ingest(ws, {str(root)!r})
        print(dict(ws.skipped()))
        """
    )
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        # root reads any file: drop the capabilities that bypass file permissions
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'locked.png': 'unreadable: permission denied'}"


def test_scan_does_not_follow_folder_symlinks_or_escape(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sub" / "a.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "escape.png").symlink_to(outside)
    found = {f.relpath: f.problem for f in scan(root)}
    assert found == {
        "escape.png": "symlink outside collection: points to a file outside the folder",
        "sub/a.png": None,
    }


def _ingest_in_process(ws_path: str, root: str) -> None:
    ingest(Workspace(ws_path, create=True), root)


@pytest.mark.slow  # two real CLI ingests of 120 photos at once
def test_two_processes_ingesting_at_once_stay_consistent(
    sample_photos: Path, tmp_path: Path
) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ws_path = str(tmp_path / "ws")
    procs = [
        ctx.Process(target=_ingest_in_process, args=(ws_path, str(sample_photos))) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    ws = Workspace(ws_path)
    with ws.read() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = conn.execute("SELECT COUNT(*), COUNT(DISTINCT relpath) FROM images").fetchone()
        assert tuple(counts) == (120, 120)
    assert ws.image_counts()["ok"] == 120
    assert (
        ws.images()[0].sha256
        == hashlib.sha256((sample_photos / ws.images()[0].relpath).read_bytes()).hexdigest()
    )
