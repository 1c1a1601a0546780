"""A hostile zip uploaded through the app's upload path, then ingested: nothing escapes the
upload folder, no bomb is inflated, every refused entry has a reason, and the workspace built
from what was saved is consistent.

The upload extraction lives in the library (``imgcluster/uploads.py``), which is what the app's
"New from uploads" and "Add" buttons call.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from imgcluster import uploads
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.robustness.corpus import BLUE, GREEN, RED, encode, solid
from tests.robustness.invariants import problems

PNG = encode(solid(RED, (16, 16)), "PNG")
JPEG = encode(solid(BLUE, (16, 16)), "JPEG")
BOMB_BYTES = 20 << 20  # inflates to 20 MiB (under the per-file limit) from about 20 KiB


@functools.cache
def _lying_bomb() -> bytes:
    """A deflated entry of BOMB_BYTES zeros whose headers claim 1,000 bytes.

    The ratio check reads those headers, so only the size counted while inflating (and the
    CRC check at the declared end) stands between this entry and the disk.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.png", b"\0" * BOMB_BYTES)
    data = bytearray(buf.getvalue())
    real = struct.pack("<I", BOMB_BYTES)
    fake = struct.pack("<I", 1000)
    assert data.count(real) == 2  # uncompressed size in the local header and central directory
    return bytes(data.replace(real, fake))


def _renamed_local_header() -> bytes:
    """An entry whose local header says ``../escape.png`` while the directory says ``ok.png``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("aa/aaaaaa.png", PNG)
    data = buf.getvalue()
    first = data.index(b"aa/aaaaaa.png")
    return data[:first] + b"../escape.png" + data[first + 13 :]


@functools.cache
def _hostile_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good/red.png", PNG)
        zf.writestr("good/blue.jpg", JPEG)
        zf.writestr("../../slip.png", PNG)
        zf.writestr("good/../../../slip2.png", PNG)
        zf.writestr("/etc/cron.d/abs.png", PNG)
        zf.writestr("..\\..\\backslash.png", PNG)
        zf.writestr("C:/drive.png", PNG)
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("bomb.png", b"\0" * BOMB_BYTES)
        zf.writestr("inner.zip", b"PK\x05\x06" + b"\0" * 18)
        zf.writestr("script.sh", b"#!/bin/sh\nrm -rf ~\n")
        zf.writestr("corrupt.jpg", JPEG[: len(JPEG) // 3])
        zf.writestr("<img src=x onerror=alert(1)>.png", encode(solid(GREEN, (9, 9)), "PNG"))
        zf.writestr("new\nline.png", encode(solid(GREEN, (8, 8)), "PNG"))
        zf.writestr("taken.png", PNG)
        zf.writestr("taken.png/inside.png", PNG)  # a folder where a file already is
        zf.writestr("twice.png", PNG)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": exactly what is being tested
            zf.writestr("twice.png", JPEG)
    return buf.getvalue()


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()
    }


@pytest.fixture()
def uploaded(tmp_path: Path):
    ws = Workspace(tmp_path / "ws", create=True)
    target = ws.path / "uploads"
    before = _files(tmp_path)
    files = [
        ("hostile.zip", io.BytesIO(_hostile_zip())),
        ("liar.zip", io.BytesIO(_lying_bomb())),
        ("renamed.zip", io.BytesIO(_renamed_local_header())),
        ("truncated.zip", io.BytesIO(_hostile_zip()[:5000])),
        ("single.png", io.BytesIO(PNG)),
        ("../../climbing.png", io.BytesIO(PNG)),
        ("page.html", io.BytesIO(b"<script>alert(1)</script>")),
    ]
    report = uploads.save_uploads(files, target)
    return tmp_path, ws, target, before, report


def test_nothing_is_written_outside_the_upload_folder(uploaded) -> None:
    tmp_path, _ws, target, before, _report = uploaded
    outside = {f for f in _files(tmp_path) - before if not f.startswith("ws/uploads/")}
    assert outside == set()
    assert not any(p.is_symlink() for p in target.rglob("*"))
    assert not list(target.rglob(".upload.*"))  # no temporary leftovers


def test_bombs_are_not_inflated(uploaded) -> None:
    _tmp, _ws, target, _before, report = uploaded
    assert report.bytes_written < 1 << 20
    assert sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) < 1 << 20
    reasons = {name: reason for name, reason in report.rejected}
    assert "zip bomb" in reasons["bomb.png"]
    assert "liar.png" in reasons  # headers lie about the size: refused while inflating


def test_every_refused_entry_has_a_reason(uploaded) -> None:
    _tmp, _ws, _target, _before, report = uploaded
    refused = {name for name, reason in report.rejected if reason}
    assert refused >= {
        "../../slip.png",
        "good/../../../slip2.png",
        "/etc/cron.d/abs.png",
        "..\\..\\backslash.png",
        "C:/drive.png",
        "link.png",
        "bomb.png",
        "inner.zip",
        "script.sh",
        "liar.png",
        "page.html",
        "../../climbing.png",
        "truncated.zip",
        "aa/aaaaaa.png",  # its local header is named ../escape.png
    }
    assert len(report.rejected) == len(refused)
    assert not any("escape" in rel for rel in report.saved)


def test_reasons_name_no_server_path(uploaded) -> None:
    """Reasons are shown in the browser: they may quote the upload's own names, never where
    the server keeps things (an OSError's text carries the absolute path)."""
    tmp_path, _ws, _target, _before, report = uploaded
    for name, reason in report.rejected:
        assert str(tmp_path) not in reason and "/tmp" not in reason, (name, reason)
        assert "Errno" not in reason, (name, reason)
    reasons = dict(report.rejected)
    # "taken.png" was saved as a file; a later entry cannot use it as a folder.
    assert reasons["taken.png/inside.png"].startswith("duplicate name")


def test_saved_files_are_plain_files_under_the_target(uploaded) -> None:
    _tmp, _ws, target, _before, report = uploaded
    assert report.saved
    for rel in report.saved:
        path = target / rel
        assert path.is_file() and not path.is_symlink()
        assert path.resolve().is_relative_to(target.resolve())
        assert "\n" not in rel
    assert "single.png" in report.saved


def test_ingest_of_the_upload_is_consistent(uploaded) -> None:
    _tmp, ws, target, _before, report = uploaded
    ingest_report = ingest(ws, target)
    assert ingest_report.found == len(report.saved)
    assert problems(ws) == []
    skipped = dict(ws.skipped())
    assert skipped == {"hostile/corrupt.jpg": skipped.get("hostile/corrupt.jpg")}
    assert skipped["hostile/corrupt.jpg"].startswith("corrupt image")
    assert ws.image_counts()["ok"] == len(report.saved) - 1


def test_upload_limits_hold_for_many_small_entries(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(30):
            zf.writestr(f"{i:02d}.png", os.urandom(2000))
    buf.seek(0)
    report = uploads.save_uploads([("many.zip", buf)], tmp_path / "up", max_total_bytes=20_000)
    assert len(report.saved) == 10
    assert report.bytes_written <= 20_000
    assert len(report.rejected) == 20
