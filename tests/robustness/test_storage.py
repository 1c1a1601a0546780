"""State and storage faults (issue 14 §7): damaged databases, read-only and full disks, leftovers.

Each damaged database is made from a real ingested workspace the way it happens in the field
(truncation, bit flips, a lowered ``user_version``, a ``.dump`` restore, no permission), then
opened through the library and the real CLI: refused with one line naming the file, exit 1,
no traceback, and the file itself never re-created or changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imgcluster.check import check
from imgcluster.errors import WorkspaceCorrupt, WorkspaceReadOnly
from imgcluster.images import ensure_thumbnail, ingest
from imgcluster.workspace import DB_NAME, SCHEMA_VERSION, Workspace
from tests.conftest import SAMPLE_DATA
from tests.robustness.helpers import can_enforce_permissions, imgcluster, unprivileged
from tests.robustness.invariants import problems

N_PHOTOS = 12


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real workspace of 12 ingested photos, checkpointed into one database file."""
    base = tmp_path_factory.mktemp("storage")
    photos = base / "photos"
    photos.mkdir()
    for path in sorted((SAMPLE_DATA / "images").glob("*.jpg"))[:N_PHOTOS]:
        shutil.copy(path, photos / path.name)
    ws = Workspace(base / "ws", create=True)
    ingest(ws, photos)
    with ws.read() as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ws.path


@pytest.fixture()
def copy(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pristine workspace (same collection) to damage."""
    dest = tmp_path / "ws"
    shutil.copytree(pristine, dest)
    for leftover in ("-wal", "-shm"):
        (dest / (DB_NAME + leftover)).unlink(missing_ok=True)
    return dest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_refusal(ws: Path, *args: str) -> str:
    result = imgcluster(*args, "--workspace", str(ws))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(ws) in lines[0]
    return lines[0]


def _truncate_to_zero(db: Path) -> None:
    db.write_bytes(b"")


def _truncate_half(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _bit_flip(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = 4096
    for offset in range(page, len(data), 997):  # every page after the header, many bytes
        data[offset] ^= 0x5A
    db.write_bytes(bytes(data))


def _foreign(db: Path) -> None:
    db.write_bytes(b"PK\x03\x04 not a database at all" * 100)


DAMAGE = {
    "empty": _truncate_to_zero,
    "half-truncated": _truncate_half,
    "bit-flipped": _bit_flip,
    "not-sqlite": _foreign,
}


@pytest.mark.slow  # 3 CLI processes per kind
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_database_is_refused_never_recreated(pristine: Path, copy: Path, kind: str) -> None:
    db = copy / DB_NAME
    DAMAGE[kind](db)
    before = _digest(db)
    # Opening it (the CLI's ingest creates workspaces, so create=True too) must refuse...
    for create in (False, True):
        with pytest.raises(WorkspaceCorrupt, match=str(db)) if kind != "bit-flipped" else _any():
            ws = Workspace(copy, create=create)
            ws.images()  # a bit flip may only show when pages are read
    # ...in the real CLI with one line naming it, for a read and for an ingest...
    line = _assert_one_line_refusal(copy, "labels", "list")
    assert "check" in line or "backup" in line
    _assert_one_line_refusal(copy, "ingest", str(pristine.parent / "photos"))
    # ...and leave the damaged file as it was (never re-created over the labels).
    assert _digest(db) == before
    report = check(copy)
    assert not report.ok and report.problems


class _any:
    """A context that accepts success or any ImgclusterError (bit flips land anywhere)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from imgcluster.errors import ImgclusterError

        return kind is None or issubclass(kind, (ImgclusterError, sqlite3.DatabaseError))


@pytest.mark.slow  # 3 CLI processes
def test_lowered_user_version_is_refused_and_check_repairs_it(copy: Path) -> None:
    db = copy / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 2}")
    conn.close()
    line = _assert_one_line_refusal(copy, "labels", "list")
    assert "user_version" in line or "schema version" in line
    result = imgcluster("check", "--workspace", str(copy))
    assert result.returncode == 1 and "--repair" in result.stdout, result.stdout
    result = imgcluster("check", "--workspace", str(copy), "--repair")
    assert result.returncode == 0, (result.stdout, result.stderr)
    ws = Workspace(copy)
    assert len(ws.images()) == N_PHOTOS
    assert problems(ws) == []


def test_dump_restore_is_refused_then_repaired_without_loss(copy: Path, tmp_path: Path) -> None:
    db = copy / DB_NAME
    src = sqlite3.connect(db)
    script = "\n".join(src.iterdump())  # what `sqlite3 db .dump` writes (no user_version)
    src.close()
    db.unlink()
    restored = sqlite3.connect(db)
    restored.executescript(script)
    restored.close()
    with pytest.raises(WorkspaceCorrupt, match="dump"):
        Workspace(copy)
    assert check(copy, repair=True).ok
    assert len(Workspace(copy).images()) == N_PHOTOS


@pytest.mark.skipif(not can_enforce_permissions(), reason="cannot drop root's override")
def test_unreadable_database_is_one_line(copy: Path) -> None:
    db = copy / DB_NAME
    db.chmod(0)
    try:
        line = _assert_one_line_refusal(copy, "labels", "list")
        assert str(db) in line
    finally:
        db.chmod(0o644)


@pytest.mark.skipif(not can_enforce_permissions(), reason="cannot drop root's override")
@pytest.mark.slow  # 2 processes
def test_read_only_workspace_browses_with_edits_disabled(copy: Path) -> None:
    for path in [copy, *copy.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        code = (
            "from imgcluster.workspace import Workspace\n"
            "from imgcluster.errors import WorkspaceReadOnly\n"
            f"ws = Workspace({str(copy)!r})\n"
            "assert ws.read_only\n"
            "print(len(ws.images()), ws.image_counts()['ok'])\n"
            "try:\n"
            "    ws.set_meta('x', 'y')\n"
            "except WorkspaceReadOnly as exc:\n"
            "    print('refused:', exc)\n"
        )
        result = subprocess.run(
            unprivileged([sys.executable, "-c", code]), capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{N_PHOTOS} {N_PHOTOS}\n"), result.stdout
        assert "edits are disabled" in result.stdout
        line = _assert_one_line_refusal(copy, "labels", "rename", "a", "b")
        assert "read-only" in line or "edits are disabled" in line
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_read_only_uri_mode_opens_for_reading(copy: Path) -> None:
    ws = Workspace(copy, read_only=True)
    assert len(ws.images()) == N_PHOTOS
    with pytest.raises(WorkspaceReadOnly, match="edits are disabled"):
        ws.set_meta("x", "y")


@pytest.mark.slow  # a real CLI ingest of 120 photos
def test_full_disk_during_ingest_is_one_line_and_nothing_half_written(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "images", photos)
    ws = Workspace(tmp_path / "ws", create=True)
    # RLIMIT_FSIZE: a write past 60 kB of any file fails with EFBIG, as on a full disk (the
    # database's write-ahead log outgrows it after a few batches; thumbnails stay below).
    command = ["prlimit", "--fsize=60000", sys.executable, "-m", "imgcluster.cli"]
    if not shutil.which("prlimit"):
        pytest.skip("prlimit not installed")
    result = subprocess.run(
        [*command, "ingest", str(photos), "--workspace", str(ws.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "full" in lines[0] and str(ws.path) in lines[0]
    again = Workspace(ws.path)
    assert problems(again) == []
    assert not list(ws.path.rglob("*.tmp"))
    report = ingest(again, photos)  # with room again, it completes
    assert report.ok == len(list(photos.glob("*.jpg")))


def test_leftover_tmp_files_are_cleaned_at_the_next_ingest(pristine: Path, copy: Path) -> None:
    thumbs = copy / "thumbs"
    folder = next(p for p in thumbs.iterdir() if p.is_dir())
    leftovers = [folder / f".{'ab' * 32}.jpg.x{i}.tmp" for i in range(3)]
    for path in leftovers:
        path.write_bytes(b"\xff\xd8 half a thumbnail")
    report = ingest(Workspace(copy), pristine.parent / "photos")
    assert report.cleaned == 3
    assert not any(p.exists() for p in leftovers)


@pytest.mark.slow  # a real CLI ingest killed mid-run
def test_killed_ingest_leaves_no_tmp_after_the_next_start(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "images", photos)
    ws_path = tmp_path / "ws"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcluster.cli", "ingest", str(photos), "-w", str(ws_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline_rows = 0
    while proc.poll() is None and deadline_rows < 400:
        if (ws_path / "thumbs").is_dir() and len(list((ws_path / "thumbs").glob("*/*"))) > 10:
            break
        deadline_rows += 1
        subprocess.run(["sleep", "0.01"], check=False)
    proc.kill()
    proc.wait()
    ws = Workspace(ws_path, create=True)
    report = ingest(ws, photos)
    assert not list(ws_path.rglob("*.tmp"))
    assert report.ok == len(list(photos.glob("*.jpg")))
    assert problems(ws) == []


def test_deleted_thumbnail_is_regenerated_on_demand(copy: Path) -> None:
    ws = Workspace(copy)
    image = ws.images()[0]
    thumb = ws.thumbnail_path(image.sha256)
    original = thumb.read_bytes()
    thumb.unlink()
    assert ensure_thumbnail(ws, image.sha256) == thumb
    assert thumb.is_file() and len(thumb.read_bytes()) > 0
    assert abs(len(thumb.read_bytes()) - len(original)) < len(original)
    os.utime(thumb)


@pytest.mark.slow  # clustering + labeling + export imports (~90 s seen at load 25)
def test_read_only_workspace_lists_labels_and_exports(tmp_path: Path) -> None:
    import numpy as np

    from imgcluster.clustering import cluster
    from imgcluster.export import export_workspace
    from imgcluster.labels import list_labels, start_session
    from tests.conftest import synthetic_workspace

    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(size=(10, 16)) + 5, rng.normal(size=(10, 16)) - 5])
    ws = synthetic_workspace(tmp_path, vectors)
    start_session(ws, cluster(ws, "synthetic", 2).id, actor="test")
    before = _digest(ws.db_path)
    read_only = Workspace(ws.path, read_only=True)
    assert sorted(label.count for label in list_labels(read_only)) == [10, 10]
    result = export_workspace(read_only, tmp_path / "out")
    assert result.n_files == 20
    assert _digest(ws.db_path) == before


def test_deleted_database_is_not_recreated_beside_the_old_files(copy: Path) -> None:
    (copy / DB_NAME).unlink()
    with pytest.raises(WorkspaceCorrupt, match=r"database imgcluster\.sqlite is gone"):
        Workspace(copy, create=True)
    assert not (copy / DB_NAME).exists()
