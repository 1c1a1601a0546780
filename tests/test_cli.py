"""The `imgcluster` command on real folders: summaries, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner
from PIL import Image

from imgcluster.cli import cli


def test_ingest_sample_photos_reports_120_ok(sample_photos: Path, tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    result = CliRunner().invoke(cli, ["ingest", str(sample_photos), "--workspace", ws])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if line[:1] != " ")
    assert lines["found"].strip() == "120"
    assert lines["ok"].strip() == "120"
    assert lines["skipped"].strip() == "0"
    again = CliRunner().invoke(cli, ["ingest", str(sample_photos), "--workspace", ws])
    assert "new        0   changed 0   unchanged 120" in again.output


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
    assert "not considered 0" not in result.output


def test_ingest_counts_what_it_did_not_consider(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    Image.new("RGB", (8, 8)).save(photos / "b.jfif", format="JPEG")
    (photos / "notes.txt").write_text("x")
    result = CliRunner().invoke(cli, ["ingest", str(photos), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert "not considered 2" in result.output
    assert "rename the file to .jpg" in result.output


def test_check_says_whole_or_what_to_do(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photos / "a.png")
    ws = tmp_path / "ws"
    assert CliRunner().invoke(cli, ["ingest", str(photos), "-w", str(ws)]).exit_code == 0
    result = CliRunner().invoke(cli, ["check", "-w", str(ws)])
    assert result.exit_code == 0, result.output
    assert "the workspace is whole" in result.output
    for thumb in (ws / "thumbs").rglob("*.jpg"):
        thumb.unlink()
    result = CliRunner().invoke(cli, ["check", "-w", str(ws)])
    assert result.exit_code == 1 and "thumbnails are missing" in result.output
    result = CliRunner().invoke(cli, ["check", "-w", str(ws), "--repair"])
    assert result.exit_code == 0, result.output
    assert "1 thumbnails regenerated" in result.output
    (ws / "imgcluster.sqlite").write_bytes(b"")
    result = CliRunner().invoke(cli, ["check", "-w", str(ws)])
    assert result.exit_code == 1 and "is empty (0 bytes)" in result.output


def test_cli_choices_come_from_the_library() -> None:
    from imgcluster.backbones import DEFAULT_BACKBONE
    from imgcluster.clustering import ALGORITHMS, K_MAX, PREPROCESSING
    from imgcluster.export import MODES
    from imgcluster.labels import ORDERS

    def option(path: list[str], name: str) -> click.Option:
        command = cli
        for part in path:
            command = command.commands[part]
        return next(p for p in command.params if p.name == name)

    assert tuple(option(["cluster"], "algorithm").type.choices) == tuple(ALGORITHMS)
    assert tuple(option(["cluster"], "preprocess").type.choices) == tuple(PREPROCESSING)
    assert option(["cluster"], "k").type.max == K_MAX
    assert option(["cluster"], "backbone").default == DEFAULT_BACKBONE
    assert tuple(option(["export"], "mode").type.choices) == tuple(MODES)
    assert tuple(option(["labels", "show"], "order").type.choices) == tuple(ORDERS)


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
