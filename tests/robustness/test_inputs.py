"""Ingest a collection of hostile entries: each gets a recorded reason or a correct result.

The corpus (`corpus.make_corpus`) is generated in a temporary folder and ingested once per
module by the real ``imgcluster ingest`` in a subprocess without root's permission override.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.workspace import Workspace
from tests.robustness.corpus import Case, make_corpus, restore_permissions
from tests.robustness.helpers import can_enforce_permissions, imgcluster
from tests.robustness.invariants import problems

COLOR_TOLERANCE = 24  # JPEG thumbnails of solid colours drift a little


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root without following links: type, size, mtime, and small files' hash."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = None
            if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 22 and os.access(path, os.R_OK):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            key = os.fsencode(path.relative_to(root)).hex()
            seen[key] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                digest,
            )
    return seen


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "photos"
    cases = make_corpus(root, permissions=can_enforce_permissions())
    before = _snapshot(root)
    result = imgcluster("ingest", str(root), "--workspace", str(base / "ws"))
    ws = Workspace(base / "ws")
    yield root, cases, ws, before, result
    restore_permissions(root)


def _check(case: Case, ws: Workspace) -> str | None:
    """Why ``case`` did not get its expected outcome, or None."""
    record = ws.image_by_relpath(case.relpath)
    if case.status == "absent":
        return None if record is None else f"recorded as {record.status}"
    if record is None:
        return "no row"
    if record.status != case.status:
        return f"status {record.status} ({record.skip_reason}), expected {case.status}"
    if case.status == "skipped":
        if not (record.skip_reason or "").startswith(case.reason):
            return f"reason {record.skip_reason!r}, expected {case.reason!r}..."
        return None
    if case.fmt and record.format != case.fmt:
        return f"format {record.format}, expected {case.fmt}"
    with Image.open(ws.thumbnail_path(record.sha256)) as thumb:
        if thumb.mode != "RGB":
            return f"thumbnail mode {thumb.mode}"
        if case.size and thumb.size != case.size:
            return f"thumbnail size {thumb.size}, expected {case.size}"
        mean = np.asarray(thumb, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    if case.color and np.abs(mean - case.color).max() > COLOR_TOLERANCE:
        return f"colour {tuple(mean.round())}, expected {case.color}"
    return None


def test_corpus_is_broad(ingested) -> None:
    _root, cases, *_ = ingested
    assert len({case.kind for case in cases}) >= 40


def test_ingest_of_hostile_collection_succeeds(ingested) -> None:
    *_, result = ingested
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_every_entry_has_a_reason_or_a_correct_result(ingested) -> None:
    _root, cases, ws, *_ = ingested
    wrong = {f"{case.kind} [{case.relpath!r}]": why for case in cases if (why := _check(case, ws))}
    assert wrong == {}


def test_nothing_unexpected_is_recorded(ingested) -> None:
    _root, cases, ws, *_ = ingested
    expected = {case.relpath for case in cases if case.status != "absent"}
    assert {record.relpath for record in ws.images(status=None)} == expected


def test_no_partial_state(ingested) -> None:
    _root, _cases, ws, *_ = ingested
    assert problems(ws) == []
    counts = ws.image_counts()
    assert counts["ok"] + counts["skipped"] == len(ws.images(status=None))


def test_sources_are_only_read(ingested) -> None:
    root, _cases, _ws, before, _result = ingested
    assert _snapshot(root) == before


def test_reingest_changes_nothing(ingested) -> None:
    root, _cases, ws, _before, _result = ingested
    rows = ws.images(status=None)
    again = imgcluster("ingest", str(root), "--workspace", str(ws.path))
    assert again.returncode == 0, again.stderr
    assert "new        0" in again.stdout
    assert ws.images(status=None) == rows
    assert problems(ws) == []


def test_files_swapped_between_scan_and_read(tmp_path: Path) -> None:
    """Ingest lists the folder first and reads later; files that change in between get a
    reason, and a file swapped for a link out of the collection is not read through it."""
    from imgcluster.images import ingest
    from tests.robustness.corpus import GREEN, RED, encode, solid

    root = tmp_path / "photos"
    root.mkdir()
    for name in ("kept.png", "deleted.png", "to_link.png", "to_fifo.png", "to_folder.png"):
        (root / name).write_bytes(encode(solid(RED, (12, 12)), "PNG"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(solid(GREEN, (13, 13)), "PNG"))
    secret_hash = hashlib.sha256(secret.read_bytes()).hexdigest()

    def swap(done: int, total: int) -> None:
        if done == 0:  # called after the scan, before any file is read
            (root / "deleted.png").unlink()
            (root / "to_link.png").unlink()
            (root / "to_link.png").symlink_to(secret)
            (root / "to_fifo.png").unlink()
            os.mkfifo(root / "to_fifo.png")
            (root / "to_folder.png").unlink()
            (root / "to_folder.png").mkdir()

    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root, progress=swap)
    reasons = dict(ws.skipped())
    assert set(reasons) == {"deleted.png", "to_link.png", "to_fifo.png", "to_folder.png"}
    assert reasons["deleted.png"].startswith("unreadable: no such file")
    assert reasons["to_link.png"].startswith("unreadable")
    assert reasons["to_fifo.png"].startswith("not a regular file")
    assert reasons["to_folder.png"].startswith("not a regular file")
    assert ws.image_by_relpath("kept.png").status == "ok"
    assert not ws.thumbnail_path(secret_hash).exists()
    assert problems(ws) == []
