"""The `imgcluster` command on real folders: summaries, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from imgcluster.cli import cli


def test_ingest_clothing_reports_600_ok(clothing_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["ingest", str(clothing_dir), "--workspace", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if line[:1] != " ")
    assert lines["found"].strip() == "600"
    assert lines["ok"].strip() == "600"
    assert lines["skipped"].strip() == "0"


def test_ingest_summary_lists_skip_reasons(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    (photos / "b.jpg").write_text("not a photo")
    (photos / "c.jpg").write_bytes(b"")
    result = CliRunner().invoke(cli, ["ingest", str(photos), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert "      1  not an image" in result.output
    assert "      1  empty file" in result.output


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "missing"), "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_user_errors_exit_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["ingest", str(empty), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert "Error: no usable image found" in result.output
    assert "Traceback" not in result.output

    other = tmp_path / "other"
    other.mkdir()
    result = CliRunner().invoke(cli, ["ingest", str(other), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "already labels" in result.output
