"""A workspace inside its own collection (issue 14 §5) and files that change, move or lie (§8).

Real photos, real folders, real re-ingests: the workspace's thumbnails never come back as
photos, a same-size replacement with its mtime put back is found, a deleted labeled file keeps
its row (and so its label) and comes back whole, a moved collection is relocated by content,
and whatever ingest does not consider is counted with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgcluster.errors import InvalidPath
from imgcluster.images import ingest, relocate
from imgcluster.paths import EXPORT_MARKER
from imgcluster.workspace import Workspace
from tests.conftest import SAMPLE_DATA
from tests.robustness.helpers import imgcluster
from tests.robustness.invariants import problems

N = 10


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for path in sorted((SAMPLE_DATA / "images").glob("*.jpg"))[:N]:
        shutil.copy2(path, root / path.name)
    return root


# -- §5 a workspace inside its collection -----------------------------------------------------


def test_workspace_inside_the_collection_is_skipped_every_scan(photos: Path) -> None:
    ws = Workspace(photos / "ws", create=True)
    counts = []
    for _ in range(3):
        report = ingest(ws, photos)
        counts.append(report.ok)
        assert ("ws/", "an imgcluster workspace, not photos") in report.skipped_folders
    assert counts == [N, N, N]  # once 60 -> 120 -> 180
    assert problems(ws) == []


def test_cli_ingest_dot_does_not_ingest_its_own_thumbnails(photos: Path) -> None:
    for _ in range(2):
        result = imgcluster("ingest", ".", "-w", "ws", cwd=photos)
        assert result.returncode == 0, result.stderr
        assert f"ok         {N}\n" in result.stdout
        assert "skipped folder ws/: an imgcluster workspace" in result.stdout


def test_export_folders_are_never_scanned(photos: Path) -> None:
    export = photos / "my-export" / "shirts"
    export.mkdir(parents=True)
    shutil.copy(next(photos.glob("*.jpg")), export / "copy.jpg")
    (photos / "my-export" / EXPORT_MARKER).write_text("imgcluster export\n")
    ws = Workspace(photos.parent / "ws", create=True)
    report = ingest(ws, photos)
    assert report.ok == N
    assert ("my-export/", "an imgcluster export, not photos") in report.skipped_folders


def test_a_collection_inside_the_workspace_or_a_workspace_itself_is_refused(
    photos: Path,
) -> None:
    ws = Workspace(photos.parent / "ws", create=True)
    ingest(ws, photos)
    with pytest.raises(InvalidPath, match="is inside the workspace"):
        Workspace(photos.parent / "ws2", create=True).set_collection_root(ws.path / "thumbs")
    with pytest.raises(InvalidPath, match="is an imgcluster workspace"):
        ingest(Workspace(photos.parent / "ws3", create=True), ws.path)


# -- §8 files that change, move or lie ----------------------------------------------------------


def test_same_size_replacement_with_mtime_kept_is_found(photos: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    a, b = sorted(photos.glob("*.jpg"))[:2]
    before = ws.image_by_relpath(a.name)
    st = a.stat()
    data = bytearray(b.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
    a.write_bytes(bytes(data))  # same size, other content
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    report = ingest(ws, photos)
    assert report.changed == 1 and report.unchanged == N - 1
    after = ws.image_by_relpath(a.name)
    assert after.sha256 != before.sha256


def test_touched_but_identical_files_count_as_unchanged(photos: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    for path in photos.glob("*.jpg"):
        os.utime(path)  # new times, same content (a restore, `touch`, `cp` without -p)
    report = ingest(ws, photos)
    assert (report.changed, report.unchanged, report.new) == (0, N, 0)


def test_deleted_file_keeps_its_row_and_comes_back_whole(photos: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    victim = sorted(photos.glob("*.jpg"))[3]
    before = ws.image_by_relpath(victim.name)
    saved = victim.read_bytes()
    victim.unlink()
    report = ingest(ws, photos)
    assert report.missing == 1
    gone = ws.image_by_relpath(victim.name)
    assert (gone.id, gone.status) == (before.id, "missing")  # the row (and its label) stays
    victim.write_bytes(saved)
    report = ingest(ws, photos)
    assert (report.missing, report.returned) == (0, 1)
    back = ws.image_by_relpath(victim.name)
    assert (back.id, back.status, back.sha256) == (before.id, "ok", before.sha256)


def test_moved_collection_is_relocated_by_content(photos: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    shutil.rmtree(photos)
    result = imgcluster("relocate", "--workspace", str(ws.path), str(moved))
    assert result.returncode == 0, result.stderr
    assert f"verified   {N} images" in result.stdout
    assert ws.collection_root == moved.resolve()
    assert ingest(ws, moved).unchanged == N


def test_relocate_refuses_other_content(photos: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    other = tmp_path / "other"
    other.mkdir()
    names = sorted(p.name for p in photos.glob("*.jpg"))
    shutil.copy(photos / names[1], other / names[0])  # same name, different photo
    with pytest.raises(InvalidPath, match="different content"):
        relocate(ws, other)
    assert ws.collection_root == photos.resolve()


def test_names_not_considered_are_counted_with_the_reason(photos: Path, tmp_path: Path) -> None:
    jpeg = next(photos.glob("*.jpg")).read_bytes()
    (photos / "a.jfif").write_bytes(jpeg)
    (photos / "b.jpe").write_bytes(jpeg)
    (photos / "c.jpg ").write_bytes(jpeg)
    (photos / "notes.txt").write_text("x")
    ws = Workspace(tmp_path / "ws", create=True)
    report = ingest(ws, photos)
    assert report.ok == N
    ignored = dict(report.ignored)
    assert sum(n for r, n in ignored.items() if r.startswith(".jfif file")) == 1
    assert sum(n for r, n in ignored.items() if r.startswith(".jpe file")) == 1
    assert ignored["name ends with a space or dot: rename the file to use it"] == 1
    assert ignored["not an image extension"] == 1
    assert report.n_ignored == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_named_for_what_they_are_and_unchanged_on_reingest(
    photos: Path, tmp_path: Path
) -> None:
    os.mkfifo(photos / "pipe.jpg")
    os.mkfifo(photos / "hidden_pipe")
    os.symlink(photos / "hidden_pipe", photos / "link_to_pipe.jpg")
    os.symlink(photos / "nothing_here.jpg", photos / "broken.jpg")
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    reasons = dict(ws.skipped())
    assert reasons["pipe.jpg"].startswith("not a regular file: a pipe (FIFO)")
    assert reasons["link_to_pipe.jpg"].startswith("symlink to a pipe (FIFO)")
    assert reasons["broken.jpg"].startswith("broken symlink")
    report = ingest(ws, photos)
    assert (report.changed, report.new) == (0, 0)
    assert report.unchanged == N + 3
