"""The app's guards against hostile input: folder picker roots, zip uploads, names as HTML."""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from imgcluster.errors import InvalidPath
from imgcluster.uploads import UploadRejected, extract_zip, safe_relpath, save_uploads
from imgcluster_app import common


def _png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes], **kwargs: object) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kwargs) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# -- folder picker ----------------------------------------------------------------------------


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    (allowed / "photos" / "shoes").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.png").write_bytes(_png())
    return allowed, outside


def test_picker_accepts_relative_and_absolute_paths_inside_the_root(roots):
    allowed, _ = roots
    assert common.resolve_under("photos/shoes", [allowed]) == allowed / "photos" / "shoes"
    assert common.resolve_under(str(allowed / "photos"), [allowed]) == allowed / "photos"
    # `..` that stays inside is fine: the check runs on the resolved path.
    assert common.resolve_under("photos/shoes/..", [allowed]) == allowed / "photos"


@pytest.mark.parametrize("text", ["..", "../secret", "photos/../../secret", "/", "/etc"])
def test_picker_refuses_paths_that_leave_the_root(roots, text):
    allowed, _ = roots
    with pytest.raises(InvalidPath, match="outside the folders"):
        common.resolve_under(text, [allowed])


def test_picker_refuses_absolute_path_of_another_folder(roots):
    allowed, outside = roots
    with pytest.raises(InvalidPath, match="outside the folders"):
        common.resolve_under(str(outside), [allowed])


def test_picker_refuses_symlink_pointing_out_of_the_root(roots):
    allowed, outside = roots
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidPath, match="outside the folders"):
        common.resolve_under("link", [allowed])
    with pytest.raises(InvalidPath, match="outside the folders"):
        common.resolve_under(str(allowed / "link"), [allowed])


@pytest.mark.parametrize("text", ["", "   ", "no/such/folder", "a\x00b"])
def test_picker_refuses_empty_missing_and_nul(roots, text):
    allowed, _ = roots
    with pytest.raises(InvalidPath):
        common.resolve_under(text, [allowed])


def test_allowed_roots_come_from_the_environment(roots, monkeypatch):
    allowed, outside = roots
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", f"{allowed}{os.pathsep}{outside}")
    assert common.allowed_roots() == [allowed.resolve(), outside.resolve()]
    monkeypatch.delenv("IMGCLUSTER_ALLOWED_ROOTS")
    assert Path.cwd().resolve() in common.allowed_roots()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_workspace_names_are_plain_folder_names(name, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_WORKSPACES", str(tmp_path))
    with pytest.raises(InvalidPath):
        common.new_workspace_dir(name)


def test_open_workspace_path_stays_inside_home_or_roots(tmp_path, monkeypatch):
    from imgcluster.workspace import Workspace

    home = tmp_path / "home"
    monkeypatch.setenv("IMGCLUSTER_WORKSPACES", str(home))
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()
    inside = Workspace(home / "a", create=True)
    elsewhere = Workspace(tmp_path / "elsewhere", create=True)
    assert common.open_workspace_path("a") == inside.path
    with pytest.raises(InvalidPath):
        common.open_workspace_path(str(elsewhere.path))
    with pytest.raises(InvalidPath):
        common.open_workspace_path("../elsewhere")


# -- names are text, never markup -------------------------------------------------------------


def test_md_escape_neutralises_markdown_and_html():
    hostile = "<img src=x onerror=alert(1)> ![t](http://evil/t.png) [a](javascript:x) :red[x]\n# h"
    escaped = common.md_escape(hostile)
    # Every character Markdown or Streamlit directives could act on is backslash-escaped.
    assert re.search(r"(?<!\\)[<>\[\]()!:#*_`]", escaped) is None
    assert "\n" not in escaped
    assert common.plot_text("<b>x</b>&") == "&lt;b&gt;x&lt;/b&gt;&amp;"


# -- uploads ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/passwd.png", "absolute"),
        ("\\windows\\x.png", "absolute"),
        ("C:/x.png", "absolute"),
        ("../x.png", "climbs out"),
        ("a/../../x.png", "climbs out"),
        ("a\\..\\..\\x.png", "climbs out"),
        ("a\x00.png", "NUL"),
    ],
)
def test_safe_relpath_refuses_escapes(name, reason):
    with pytest.raises(UploadRejected, match=reason):
        safe_relpath(name)


def test_safe_relpath_keeps_folders_and_cleans_control_characters():
    assert safe_relpath("shoes/./red\nboot.png").as_posix() == "shoes/red_boot.png"


def test_zip_slip_and_absolute_entries_are_refused_and_nothing_escapes(tmp_path):
    target = tmp_path / "ws" / "uploads"
    archive = _zip(
        {
            "good/a.png": _png(),
            "../evil.png": _png(),
            "/abs.png": _png(),
            "good/../../evil2.png": _png(),
            "notes.txt": b"hello",
            "__MACOSX/good/._a.png": b"meta",
        }
    )
    report = extract_zip(archive, target, prefix="batch")
    assert report.saved == ["batch/good/a.png"]
    reasons = dict(report.rejected)
    assert set(reasons) == {
        "../evil.png",
        "/abs.png",
        "good/../../evil2.png",
        "notes.txt",
        "__MACOSX/good/._a.png",
    }
    assert "not an image file" in reasons["notes.txt"]
    assert _files_under(tmp_path) == {"ws/uploads/batch/good/a.png"}


def test_zip_symlink_entries_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    buf.seek(0)
    report = extract_zip(buf, tmp_path / "up")
    assert report.saved == []
    assert report.rejected == [("link.png", "symbolic link")]
    assert not any(p.is_symlink() for p in (tmp_path / "up").rglob("*"))


def test_zip_bomb_entries_are_refused_by_ratio_and_by_counted_size(tmp_path):
    bomb = _zip({"bomb.png": b"\0" * 5_000_000}, compression=zipfile.ZIP_DEFLATED)
    report = extract_zip(bomb, tmp_path / "up")
    assert report.saved == []
    assert "zip bomb" in report.rejected[0][1]
    # A size limit that is enforced on the bytes actually read, whatever the header claims.
    big = _zip({"big.png": os.urandom(3000)})
    report = extract_zip(big, tmp_path / "up2", max_file_bytes=1000)
    assert report.saved == [] and "limit" in report.rejected[0][1]
    assert _files_under(tmp_path / "up2") == set()


def test_zip_total_size_and_entry_count_limits(tmp_path):
    many = _zip({f"{i}.png": _png() for i in range(5)})
    with pytest.raises(UploadRejected, match="entries"):
        extract_zip(many, tmp_path / "a", max_entries=4)
    many.seek(0)
    one = len(_png())
    report = extract_zip(many, tmp_path / "b", max_total_bytes=2 * one)
    assert len(report.saved) == 2
    assert all("limit" in reason for _name, reason in report.rejected)


def test_corrupt_zip_is_one_clear_rejection(tmp_path):
    report = save_uploads([("broken.zip", io.BytesIO(b"PK\x03\x04 not really"))], tmp_path / "up")
    assert report.saved == []
    assert report.rejected[0][0] == "broken.zip"
    assert "not a readable zip" in report.rejected[0][1]


def test_uploaded_images_keep_base_names_and_never_overwrite(tmp_path):
    target = tmp_path / "up"
    report = save_uploads(
        [
            ("a.png", io.BytesIO(_png())),
            ("../../a.png", io.BytesIO(_png())),
            ("a.png", io.BytesIO(_png((0, 0, 255)))),
            ("run.sh", io.BytesIO(b"#!/bin/sh")),
        ],
        target,
    )
    assert report.saved == ["a.png", "a-1.png"]
    assert [name for name, _reason in report.rejected] == ["../../a.png", "run.sh"]
    assert _files_under(tmp_path) == {"up/a.png", "up/a-1.png"}
