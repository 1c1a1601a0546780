"""Names that mean something else (issue 14 §6): invisible and look-alike names, ``#5``, actors.

Same real workspace as tests/test_labels.py (sample_data ingested, class-blob vectors, a real
k=6 clustering), one fresh copy per test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgcluster import labels as L
from imgcluster.cli import cli
from imgcluster.errors import ImgclusterError, InvalidLabelName, UnknownLabel
from imgcluster.workspace import Workspace
from tests.test_labels import template, ws  # noqa: F401  (fixtures)


@pytest.mark.parametrize(
    "invisible",
    [
        "\u200b",  # zero-width space
        "\ufeff",  # byte-order mark
        "\u2800",  # Braille blank
        "\u3164",  # Hangul filler
        "\u0301",  # a lone combining mark
        " \u200b\u200d\u2060 ",  # format characters around nothing
        "\u202e",  # right-to-left override alone
    ],
)
def test_invisible_names_are_refused(ws: Workspace, invisible: str) -> None:  # noqa: F811
    with pytest.raises(InvalidLabelName, match="invisible"):
        L.rename(ws, "cluster_00", invisible, actor="alice")
    with pytest.raises(InvalidLabelName):
        L.move(ws, [1], invisible, actor="alice")
    assert L.list_labels(ws)[0].name == "cluster_00"


def test_names_are_compared_by_their_normal_form(ws: Workspace) -> None:  # noqa: F811
    L.rename(ws, "cluster_00", "zerowidth", actor="alice")
    with pytest.raises(InvalidLabelName, match="already exists"):
        L.rename(ws, "cluster_01", "zero\u200bwidth", actor="alice")
    # the format character is stripped from the stored name, and lookups see through it
    assert L.validate_name("zero\u200bwidth") == "zerowidth"
    assert L.validate_name("\ufeffshoes\u200e") == "shoes"
    assert L.label_by_name(ws, "zero\u2060width").name == "zerowidth"
    # compatibility forms fold (NFKC): full-width letters are the ASCII name
    assert L.validate_name("ｓｈｏｅｓ") == "shoes"
    assert L.name_key("Ｓｈｏｅｓ") == L.name_key("shoes")
    # an emoji ZWJ sequence keeps its joiners (it is one picture)
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert L.validate_name(f"{family} family") == f"{family} family"


def test_a_name_like_an_id_is_refused_and_strings_are_names(ws: Workspace) -> None:  # noqa: F811
    first, second = L.list_labels(ws)[:2]
    for typed in (f"#{second.id}", "#5", " #12 "):
        with pytest.raises(InvalidLabelName, match="looks like a label id"):
            L.rename(ws, first.id, typed, actor="alice")
    assert L.validate_name("#5 shoes") == "#5 shoes"  # a name with words is fine
    # The library never reads "#<id>" as an id: a move to "#<id>" of an existing label
    # would create a label by that name, which the name rules refuse.
    with pytest.raises(InvalidLabelName):
        L.move(ws, [1], f"#{second.id}", actor="alice")
    assert L.label_by_id(ws, second.id).name == second.name
    with pytest.raises(UnknownLabel):
        L.label_by_name(ws, f"#{second.id}")
    with pytest.raises(UnknownLabel):
        L.label_by_id(ws, 10_000)
    assert issubclass(UnknownLabel, ImgclusterError)


def test_cli_hash_id_is_an_id(template: Path, tmp_path: Path) -> None:  # noqa: F811
    shutil.copytree(template, tmp_path / "ws")
    w = ["-w", str(tmp_path / "ws")]
    runner = CliRunner()
    started = runner.invoke(cli, ["labels", "start", *w])
    assert started.exit_code == 0, started.output
    # issue 14 §9: start says which run and k it starts from
    assert "from clustering run 1 (k=6" in started.output
    target = L.list_labels(Workspace(tmp_path / "ws"))[2]
    result = runner.invoke(cli, ["labels", "rename", f"#{target.id}", "by id", *w])
    assert result.exit_code == 0, result.output
    assert L.label_by_id(Workspace(tmp_path / "ws"), target.id).name == "by id"
    refused = runner.invoke(cli, ["labels", "rename", "by id", "#7", *w])
    assert refused.exit_code == 1 and "looks like a label id" in refused.output


def test_actor_names_are_sanitised_like_label_names(ws: Workspace) -> None:  # noqa: F811
    L.rename(ws, "cluster_00", "a", actor="eve\nINJECTED 2026-01-01 admin")
    L.rename(ws, "cluster_01", "b", actor="\u200bbob\u202e\t")
    actors = [h.actor for h in L.history(ws, 2)]
    assert actors == ["bob", "eve INJECTED 2026-01-01 admin"]
    assert all("\n" not in a and "\u200b" not in a for a in actors)
    assert L.clean_actor("\n\u200b ", default="someone") == "someone"
    # undo finds the step under the sanitised name
    assert L.undo(ws, actor="bob").summary == "undo rename 'cluster_01' to 'b'"


def test_forbidden_character_is_the_one_line_rule() -> None:
    assert L.forbidden_character("fine name 👟") is None
    assert L.forbidden_character("two\nlines") == "U+000A"
    assert L.forbidden_character("a\u2028b") == "LINE SEPARATOR"
    assert L.forbidden_character("nul\x00") is not None
