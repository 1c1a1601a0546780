"""Labels: every operation, undo/redo across restarts, the audit log, names, concurrency.

The workspace is real (sample_data's 180 PNGs ingested into a SQLite file); the CNN is not
under test here, so each image gets a synthetic vector from its true class (a Gaussian blob),
and the clustering is the real `imgcluster.clustering.cluster`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import v_measure_score

from imgcluster import labels as L
from imgcluster.cli import cli
from imgcluster.clustering import cluster, store_partition
from imgcluster.errors import (
    ImgclusterError,
    InvalidLabelName,
    NoLabelSession,
    NothingToUndo,
    StaleState,
    UnknownCluster,
    UnknownImage,
    UnknownLabel,
)
from imgcluster.features import save_vectors
from imgcluster.images import ingest, relocate
from imgcluster.labels import queries
from imgcluster.labels._store import image_states
from imgcluster.labels.audit import started_images
from imgcluster.workspace import Workspace
from tests.conftest import FMNIST as SAMPLE_DATA  # 6 classes x 30 grey PNGs
from tests.conftest import PROJECT, read_truth
from tests.robustness.invariants import audit_mismatches

BACKBONE = "synthetic"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with sample_data ingested, class-blob vectors and one k=6 run (built once)."""
    path = tmp_path_factory.mktemp("labels-template") / "ws"
    ws = Workspace(path, create=True)
    ingest(ws, SAMPLE_DATA / "images")
    truth = _truth()
    classes = sorted(set(truth.values()))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(classes), 32)) * 2.0
    images = ws.images()
    vectors = np.array(
        [centres[classes.index(truth[im.relpath])] + rng.normal(size=32) * 0.7 for im in images]
    )
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], vectors)
    run = cluster(ws, BACKBONE, 6)
    assert v_measure_score([truth[r] for r in _relpaths(ws, run.image_ids)], run.labels) == 1.0
    return path


@pytest.fixture
def ws(template: Path, tmp_path: Path) -> Workspace:
    """A fresh copy of the template with labeling started by alice."""
    shutil.copytree(template, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    L.start_session(workspace, actor="alice")
    return workspace


def _truth() -> dict[str, str]:
    return read_truth(SAMPLE_DATA, strip="images/")


def _relpaths(ws: Workspace, ids) -> list[str]:
    by_id = {im.id: im.relpath for im in ws.images()}
    return [by_id[int(i)] for i in ids]


def _state(ws: Workspace) -> tuple[dict, dict]:
    """Live labels ``{id: (name, cluster)}`` and image rows ``{id: (label, confirmed, state,
    confidence, by_hand)}`` of the active session, straight from SQLite."""
    with ws.read() as conn:
        sid = conn.execute("SELECT id FROM label_sessions WHERE active = 1").fetchone()[0]
        labels = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT id, name, cluster FROM labels WHERE session_id = ? AND deleted_at IS NULL",
                (sid,),
            )
        }
        # image_labels holds the rows that differ from the start; the rest are implicit
        images = image_states(conn, sid)
    return labels, images


def _replay(ws: Workspace) -> tuple[dict, dict]:
    """Rebuild the state from nothing by applying each audit row's "after" values in order,
    checking after each row that no image points at a deleted label."""
    labels: dict = {}
    images: dict = {}
    with ws.read() as conn:
        sid = conn.execute("SELECT id FROM label_sessions WHERE active = 1").fetchone()[0]
        for (changes,) in conn.execute(
            "SELECT changes FROM audit_log WHERE session_id = ? ORDER BY id", (sid,)
        ):
            payload = json.loads(changes)
            images.update(started_images(conn, payload))  # a start's rows, by reference
            for label_id, _before, after in payload["labels"]:
                if after is None:
                    labels.pop(label_id, None)
                else:
                    labels[label_id] = tuple(after)
            for image_id, _before, after in payload["images"]:
                if after is None:
                    images.pop(image_id, None)
                else:
                    images[image_id] = tuple(after)
            # after every step, every image is in a label that exists
            assert {row[0] for row in images.values()} <= set(labels), payload
    return labels, images


def _label_of(ws: Workspace) -> dict[str, str]:
    """relpath -> current label name."""
    return {row.relpath: row.label for row in L.current_labels(ws)}


def _by_class(ws: Workspace) -> dict[str, list[str]]:
    """True class -> relpaths, sorted."""
    out: dict[str, list[str]] = {}
    for relpath, cls in sorted(_truth().items()):
        out.setdefault(cls, []).append(relpath)
    return out


def _majority_label(ws: Workspace, cls: str) -> str:
    label_of = _label_of(ws)
    return Counter(label_of[p] for p in _by_class(ws)[cls]).most_common(1)[0][0]


def _manual_run(ws: Workspace, assignment: dict[int, int]) -> int:
    """Store a clustering run with the given ``{image_id: cluster}`` (e.g. a deliberately
    wrong one), through the library."""
    return store_partition(ws, BACKBONE, assignment, preprocess="pca")


def _own_collection(ws: Workspace, tmp_path: Path) -> Path:
    """Give this test's workspace its own copy of the images (relocated by content), so the
    test can add files and ingest them without touching the shared fixture folder."""
    root = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "images", root)
    relocate(ws, root)
    return root


def _add_images(ws: Workspace, root: Path, files: dict[str, bytes]) -> None:
    """Write ``relpath -> content`` into the collection and ingest it (no features yet)."""
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    ingest(ws, root)


def _new_png() -> bytes:
    """A picture none of the fixture's images has (a content with no vector)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (250, 3, 140)).save(buf, format="PNG")
    return buf.getvalue()


def _assignment_by_class(ws: Workspace) -> dict[int, int]:
    classes = sorted(set(_truth().values()))
    ids = {im.relpath: im.id for im in ws.images()}
    return {ids[p]: classes.index(c) for p, c in _truth().items()}


# -- sessions ---------------------------------------------------------------------------------


def test_start_makes_one_unconfirmed_label_per_cluster(ws: Workspace) -> None:
    labels = L.list_labels(ws)
    assert [lab.name for lab in labels] == [f"cluster_{c:02d}" for c in range(6)]
    assert [lab.count for lab in labels] == [30] * 6
    assert sum(lab.confirmed for lab in labels) == 0
    rows = L.current_labels(ws)
    assert len(rows) == 180 and len({r.image_id for r in rows}) == 180
    # label cluster_0c holds exactly the run's cluster c
    assert all(r.label == f"cluster_{r.cluster:02d}" for r in rows)
    session = L.active_session(ws)
    assert session is not None and session.created_by == "alice"
    [start] = L.history(ws)
    assert (start.op, start.actor, start.n_images, start.n_labels) == ("start", "alice", 180, 6)


def test_start_refuses_over_active_session_and_replace_keeps_the_old(ws: Workspace) -> None:
    L.rename(ws, "cluster_00", "kept", actor="alice")
    old = L.active_session(ws)
    with pytest.raises(ImgclusterError, match="is active"):
        L.start_session(ws, actor="bob")
    new_id = L.start_session(ws, actor="bob", replace=True)
    assert new_id != old.id
    assert "kept" not in {lab.name for lab in L.list_labels(ws)}
    with ws.read() as conn:
        assert conn.execute(
            "SELECT name FROM labels WHERE session_id = ? AND name = 'kept'", (old.id,)
        ).fetchone()


def test_replacing_an_untouched_session_deletes_it(ws: Workspace) -> None:
    old = L.active_session(ws).id
    L.start_session(ws, actor="alice", replace=True)
    with ws.read() as conn:
        for table in ("label_sessions", "labels", "image_labels", "audit_log"):
            column = "id" if table == "label_sessions" else "session_id"
            sql = f"SELECT COUNT(*) FROM {table} WHERE {column} = ?"
            assert conn.execute(sql, (old,)).fetchone()[0] == 0, table
    assert len(L.current_labels(ws)) == 180


def test_operations_without_session_say_how_to_start(template: Path, tmp_path: Path) -> None:
    shutil.copytree(template, tmp_path / "ws")
    fresh = Workspace(tmp_path / "ws")
    assert L.active_session(fresh) is None
    with pytest.raises(NoLabelSession, match="labels start"):
        L.list_labels(fresh)
    with pytest.raises(UnknownCluster, match="no clustering run with id 99"):
        L.start_session(fresh, 99)


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("  Shoes  ", "Shoes"),
        ("sneakers 👟", "sneakers 👟"),
        ("👨‍👩‍👧 family", "👨‍👩‍👧 family"),  # zero-width joiners are part of the emoji
        ("连衣裙", "连衣裙"),
        ("a/b", "a/b"),  # free text: export maps it to a safe folder name
        ("../x", "../x"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # NFC: combining accent composed
        ("x" * L.MAX_NAME_LENGTH, "x" * L.MAX_NAME_LENGTH),
    ],
)
def test_accepted_names(ws: Workspace, typed: str, stored: str) -> None:
    assert L.validate_name(typed) == stored
    L.rename(ws, "cluster_01", typed, actor="alice")
    assert stored in {lab.name for lab in L.list_labels(ws)}


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("", "empty"),
        ("   \t ", "empty"),
        ("x" * (L.MAX_NAME_LENGTH + 1), "101 characters long; the limit is 100"),
        ("two\nlines", "control character"),
        ("nul\x00", "control character"),
        ("tab\there", "control character"),
        (None, "must be text"),
    ],
)
def test_refused_names_say_why(ws: Workspace, typed: object, reason: str) -> None:
    with pytest.raises(InvalidLabelName, match=reason):
        L.rename(ws, "cluster_01", typed, actor="alice")  # type: ignore[arg-type]
    assert L.list_labels(ws)[1].name == "cluster_01"


def test_names_are_unique_case_insensitively(ws: Workspace) -> None:
    L.rename(ws, "cluster_00", "Shoes", actor="alice")
    for clash in ("shoes", "SHOES", " Shoes ", "ｓｈｏｅｓ"):
        with pytest.raises(InvalidLabelName, match="already exists; merge"):
            L.rename(ws, "cluster_01", clash, actor="alice")
    # moving to a differently-cased name reuses the label instead of creating a twin
    L.move(ws, [1], "SHOES", actor="alice")
    assert [lab.name for lab in L.list_labels(ws)].count("Shoes") == 1
    # a label may change its own case
    L.rename(ws, "shoes", "SHOES", actor="alice")
    assert "SHOES" in {lab.name for lab in L.list_labels(ws)}


# -- operations -------------------------------------------------------------------------------


def test_rename_by_name_or_id_and_a_hash_string_is_a_name(ws: Workspace) -> None:
    first = L.list_labels(ws)[0]
    L.rename(ws, "CLUSTER_00", "a", actor="alice")
    L.rename(ws, first.id, "b", actor="alice")
    assert L.list_labels(ws)[0].name == "b"
    # "#<id>" is CLI syntax: in the library a string is always a name
    with pytest.raises(UnknownLabel, match=rf"no label '#{first.id}'"):
        L.rename(ws, f"#{first.id}", "c", actor="alice")
    with pytest.raises(UnknownLabel, match=r"no label 'a'.*renamed or merged"):
        L.rename(ws, "a", "d", actor="alice")
    assert issubclass(UnknownLabel, ImgclusterError)


def test_merge_moves_images_keeps_flags_and_deletes_sources(ws: Workspace) -> None:
    before = _label_of(ws)
    a_images = [p for p, lab in before.items() if lab == "cluster_01"]
    L.confirm_images(ws, a_images[:1], actor="alice")  # confirmed inside a source
    L.set_state(ws, a_images[1:2], "unsure", actor="alice")
    applied = L.merge(ws, ["cluster_01", "cluster_02"], actor="alice")
    assert applied.n_images == 30
    names = [lab.name for lab in L.list_labels(ws)]
    assert "cluster_02" not in names and "cluster_01" in names
    rows = {r.relpath: r for r in L.current_labels(ws)}
    moved = [p for p, lab in before.items() if lab in ("cluster_01", "cluster_02")]
    assert {rows[p].label for p in moved} == {"cluster_01"}
    assert rows[a_images[0]].confirmed and rows[a_images[1]].state == "unsure"
    assert sum(r.confirmed for r in rows.values()) == 1


def test_merge_into_a_new_name_or_an_existing_label(ws: Workspace) -> None:
    L.merge(ws, ["cluster_01", "cluster_02"], into="tops", actor="alice")
    L.merge(ws, ["cluster_03"], into="tops", actor="alice")  # into an existing label
    summary = {lab.name: lab.count for lab in L.list_labels(ws)}
    assert summary["tops"] == 90 and "cluster_03" not in summary
    with pytest.raises(UnknownLabel, match="nothing to merge"):
        L.merge(ws, ["tops"], actor="alice")
    with pytest.raises(UnknownLabel):
        L.merge(ws, ["tops", "no such label"], actor="alice")


def test_split_separates_a_mixed_label_and_keeps_decisions(ws: Workspace) -> None:
    truth = _truth()
    L.merge(ws, ["cluster_00", "cluster_01"], into="mixed", actor="alice")
    members = [p for p, lab in _label_of(ws).items() if lab == "mixed"]
    keep = members[:3]
    L.confirm_images(ws, keep, actor="alice")  # confirmed: must not move
    L.set_state(ws, members[3:4], "excluded", actor="alice")
    applied = L.split(ws, "mixed", 2, actor="alice", random_state=0)
    label_of = _label_of(ws)
    assert {label_of[p] for p in keep} == {"mixed"}
    assert label_of[members[3]] == "mixed"
    parts = members[4:]
    assert {label_of[p] for p in parts} == {"mixed", "mixed_2"}
    assert applied.n_images == Counter(label_of[p] for p in parts)["mixed_2"]
    # the unconfirmed images split exactly along the two true classes
    assert v_measure_score([truth[p] for p in parts], [label_of[p] for p in parts]) == 1.0
    assert Counter(label_of[p] for p in members)["mixed"] >= 30  # the largest part stays


def test_move_marks_by_hand_creates_the_label_and_keeps_state(ws: Workspace) -> None:
    paths = sorted(_label_of(ws))[:3]
    L.set_state(ws, paths[:1], "excluded", actor="alice")
    applied = L.move(ws, paths, "New label ✨", actor="bob")
    assert applied.summary == "move 3 images to 'New label ✨' (new label)"
    rows = {r.relpath: r for r in L.current_labels(ws)}
    # moving is a decision about a label, not a review of each image: nothing is confirmed
    assert all(rows[p].label == "New label ✨" and not rows[p].confirmed for p in paths)
    assert rows[paths[0]].state == "excluded"
    shown = L.label_images(ws, "New label ✨", order="relpath")
    assert [r.by_hand for r in shown] == [True] * 3
    summary = {s.name: s for s in L.list_labels(ws)}["New label ✨"]
    assert (summary.count, summary.by_hand, summary.confirmed) == (3, 3, 0)
    again = L.move(ws, paths, "new LABEL ✨", actor="bob")
    assert again.entry_id is None and again.n_images == 0
    with pytest.raises(UnknownLabel):
        L.move(ws, paths, "does not exist", create=False, actor="bob")
    # an absolute path inside the collection is understood too
    L.move(ws, [str(SAMPLE_DATA / "images" / paths[1])], "cluster_05", actor="bob")
    assert _label_of(ws)[paths[1]] == "cluster_05"


def test_move_with_an_unknown_path_changes_nothing(ws: Workspace) -> None:
    before = _state(ws)
    with pytest.raises(UnknownImage, match=r"nope\.png"):
        L.move(ws, [sorted(_label_of(ws))[0], "nope.png"], "x", actor="alice")
    assert _state(ws) == before


def test_move_from_a_stale_view_is_refused_whole(ws: Workspace) -> None:
    shown = {r.relpath: r.label for r in L.current_labels(ws)}
    selection = sorted(p for p, lab in shown.items() if lab == "cluster_02")[:5]
    version = L.active_session(ws).version
    L.move(ws, selection[:1], "cluster_03", actor="bob")  # bob acts meanwhile
    before = _state(ws)
    with pytest.raises(StaleState, match=r"1 image .* changed label since"):
        L.move(
            ws, selection, "cluster_04", actor="alice", expected={p: shown[p] for p in selection}
        )
    with pytest.raises(StaleState, match="changed since this view"):
        L.move(ws, selection, "cluster_04", actor="alice", expected=version)
    assert _state(ws) == before
    # the images bob did not touch can still be moved from alice's view
    L.move(
        ws,
        selection[1:],
        "cluster_04",
        actor="alice",
        expected={p: shown[p] for p in selection[1:]},
    )
    assert {_label_of(ws)[p] for p in selection[1:]} == {"cluster_04"}


def test_set_state_exclude_unsure_normal(ws: Workspace) -> None:
    paths = sorted(_label_of(ws))[:4]
    L.set_state(ws, paths[:2], "excluded", actor="alice")
    L.set_state(ws, paths[2:], "unsure", actor="alice")
    rows = {r.relpath: r for r in L.current_labels(ws)}
    assert [rows[p].state for p in paths] == ["excluded", "excluded", "unsure", "unsure"]
    counts = {lab.name: (lab.excluded, lab.unsure) for lab in L.list_labels(ws)}
    assert sum(e for e, _ in counts.values()) == 2 and sum(u for _, u in counts.values()) == 2
    L.set_state(ws, paths, "normal", actor="alice")
    assert {r.state for r in L.current_labels(ws)} == {"normal"}
    assert L.set_state(ws, paths, "normal", actor="alice").entry_id is None
    with pytest.raises(ValueError, match="should be one of"):
        L.set_state(ws, paths, "deleted", actor="alice")


def test_confirm_a_label_and_refuse_a_stale_one(ws: Workspace) -> None:
    members = [r.image_id for r in L.current_labels(ws) if r.label == "cluster_00"]
    L.set_state(ws, members[:1], "unsure", actor="alice")
    L.move(ws, members[1:2], "cluster_01", actor="bob")
    with pytest.raises(StaleState, match="changed since it was shown"):
        L.confirm(ws, "cluster_00", actor="alice", expected=members)
    applied = L.confirm(ws, "cluster_00", actor="alice", expected=members[:1] + members[2:])
    assert applied.n_images == 28  # unsure stays open
    summary = {lab.name: lab for lab in L.list_labels(ws)}["cluster_00"]
    assert (summary.count, summary.confirmed, summary.unsure) == (29, 28, 1)


def test_delete_only_empty_labels_and_undo_restores_the_same_id(ws: Workspace) -> None:
    with pytest.raises(ImgclusterError, match="still has 30 images"):
        L.delete_label(ws, "cluster_05", actor="alice")
    L.merge(ws, ["cluster_04", "cluster_05"], actor="alice")
    L.move(ws, sorted(_label_of(ws))[:1], "temp", actor="alice")
    L.undo(ws, actor="alice")  # the move; the label "temp" is gone
    L.move(ws, [1], "empty soon", actor="alice")
    L.move(ws, [1], "cluster_00", actor="alice")
    empty = {lab.name: lab for lab in L.list_labels(ws, include_empty=True)}["empty soon"]
    assert empty.count == 0
    assert "empty soon" not in {lab.name for lab in L.list_labels(ws)}  # hidden by default
    L.delete_label(ws, "empty soon", actor="alice")
    assert "empty soon" not in {lab.name for lab in L.list_labels(ws, include_empty=True)}
    L.undo(ws, actor="alice")
    restored = {lab.name: lab.id for lab in L.list_labels(ws, include_empty=True)}
    assert restored["empty soon"] == empty.id


# -- undo / redo / audit ----------------------------------------------------------------------


def _some_steps(ws: Workspace, actor: str = "alice") -> None:
    """One of each operation."""
    paths = sorted(_label_of(ws))
    L.rename(ws, "cluster_00", "shoes 👟", actor=actor)
    L.move(ws, paths[:4], "mixed bag", actor=actor)
    L.confirm_images(ws, paths[20:23], actor=actor)
    L.merge(ws, ["cluster_01", "cluster_02"], into="tops", actor=actor)
    L.split(ws, "tops", 3, actor=actor)
    L.set_state(ws, paths[10:12], "excluded", actor=actor)
    L.confirm(ws, "shoes 👟", actor=actor)
    L.recluster_unconfirmed(ws, 2, actor=actor)
    L.move(ws, paths[:4], "shoes 👟", actor=actor)
    L.delete_label(ws, "mixed bag", actor=actor)


def test_undo_and_redo_every_step_across_a_reopen(ws: Workspace) -> None:
    initial = _state(ws)
    _some_steps(ws)
    final = _state(ws)
    steps = sum(1 for h in L.history(ws, 100) if h.kind == "do" and h.status == "done")
    assert steps >= 7
    reopened = Workspace(ws.path)  # a restart: nothing but the SQLite file carries over
    for _ in range(steps):
        L.undo(reopened, actor="alice")
    assert _state(reopened) == initial
    with pytest.raises(NothingToUndo):
        L.undo(reopened, actor="alice")
    # redo from another process (the CLI), as after a server restart
    runner = CliRunner()
    for _ in range(steps):
        result = runner.invoke(cli, ["labels", "redo", "-w", str(ws.path), "--actor", "alice"])
        assert result.exit_code == 0, result.output
    assert _state(Workspace(ws.path)) == final
    assert _replay(ws) == final


def test_a_new_step_drops_what_could_be_redone(ws: Workspace) -> None:
    L.rename(ws, "cluster_00", "a", actor="alice")
    L.undo(ws, actor="alice")
    L.rename(ws, "cluster_01", "b", actor="alice")
    with pytest.raises(NothingToUndo, match="nothing to redo"):
        L.redo(ws, actor="alice")
    statuses = {h.summary: h.status for h in L.history(ws) if h.kind == "do"}
    assert statuses["rename 'cluster_00' to 'a'"] == "dropped"


def test_undo_is_per_actor_and_never_overwrites_someone_elses_change(ws: Workspace) -> None:
    image = sorted(_label_of(ws))[0]
    original = _label_of(ws)[image]
    L.move(ws, [image], "cluster_03", actor="alice")
    L.move(ws, [image], "cluster_04", actor="bob")
    L.rename(ws, "cluster_05", "bob's", actor="bob")
    before = _state(ws)
    with pytest.raises(StaleState, match=rf"1 image \({image}\) changed since \(by bob\)"):
        L.undo(ws, actor="alice")
    assert _state(ws) == before
    assert "bob's" in L.undo(ws, actor="bob").summary  # bob's newest step, not alice's
    L.undo(ws, actor="bob")
    L.undo(ws, actor="alice")  # now possible: the image is where alice left it
    assert _label_of(ws)[image] == original
    assert _state(ws) == _replay(ws)


def test_undo_refuses_to_remove_a_label_that_got_other_images(ws: Workspace) -> None:
    paths = sorted(_label_of(ws))
    L.move(ws, paths[:1], "alice's new", actor="alice")
    L.move(ws, paths[1:2], "alice's new", actor="bob")
    with pytest.raises(StaleState, match=r"would remove label .alice's new. \(1 image\)"):
        L.undo(ws, actor="alice")
    assert _label_of(ws)[paths[0]] == "alice's new"


def test_undo_refuses_to_put_images_back_into_a_label_merged_away(ws: Workspace) -> None:
    image = next(p for p, lab in sorted(_label_of(ws).items()) if lab == "cluster_03")
    L.move(ws, [image], "cluster_04", actor="alice")
    L.merge(ws, ["cluster_05", "cluster_03"], actor="bob")
    with pytest.raises(StaleState, match="back into 'cluster_03', deleted or merged away"):
        L.undo(ws, actor="alice")
    assert _label_of(ws)[image] == "cluster_04"


def test_undo_refuses_to_restore_a_name_taken_since(ws: Workspace) -> None:
    L.rename(ws, "cluster_00", "shoes", actor="alice")
    L.rename(ws, "shoes", "boots", actor="bob")
    L.rename(ws, "cluster_01", "shoes", actor="bob")
    with pytest.raises(StaleState):
        L.undo(ws, actor="alice")


def test_audit_log_records_who_when_what_before_and_after(ws: Workspace) -> None:
    image = sorted(_label_of(ws))[0]
    old_label = _label_of(ws)[image]
    L.move(ws, [image], "sandals", actor="carol")
    entry = L.history(ws, 1)[0]
    assert (entry.actor, entry.op, entry.kind, entry.status) == ("carol", "move", "do", "done")
    assert entry.at.endswith("Z") and entry.n_images == 1 and entry.n_labels == 1
    with ws.read() as conn:
        row = conn.execute(
            "SELECT args, changes FROM audit_log WHERE id = ?", (entry.id,)
        ).fetchone()
    changes = json.loads(row["changes"])
    ids = {lab.name: lab.id for lab in L.list_labels(ws)}
    image_id = ws.image_by_relpath(image).id
    assert changes["labels"] == [[ids["sandals"], None, ["sandals", None]]]
    assert changes["images"] == [
        [image_id, [ids[old_label], 0, "normal", None, 0], [ids["sandals"], 0, "normal", None, 1]]
    ]
    assert json.loads(row["args"]) == {"images": [image_id], "to": ids["sandals"], "created": True}
    undo_entry = L.undo(ws, actor="carol")
    top = L.history(ws, 1)[0]
    assert (top.id, top.kind, top.target_id) == (undo_entry.entry_id, "undo", entry.id)
    assert [h.status for h in L.history(ws) if h.id == entry.id] == ["undone"]


# -- queries ----------------------------------------------------------------------------------


def test_label_images_pages_in_typicality_order(ws: Workspace) -> None:
    pages = [L.label_images(ws, "cluster_00", offset=o, limit=7) for o in range(0, 35, 7)]
    rows = [r for page in pages for r in page]
    assert len(rows) == 30 and len({r.image_id for r in rows}) == 30
    distances = [r.distance for r in rows]
    assert distances == sorted(distances) and distances[0] > 0
    by_path = L.label_images(ws, "cluster_00", limit=100, order="relpath")
    assert [r.relpath for r in by_path] == sorted(r.relpath for r in rows)
    with pytest.raises(ValueError):
        L.label_images(ws, "cluster_00", order="random")


def test_misplaced_finds_wrongly_clustered_images(ws: Workspace) -> None:
    """A run that put 4 images of class A in class B's cluster: those 4 are the misfits of
    B, and each points at A's label as the place it looks like it belongs."""
    assignment = _assignment_by_class(ws)
    a_ids = [i for i, c in assignment.items() if c == 0][:4]
    for i in a_ids:
        assignment[i] = 1
    L.start_session(ws, _manual_run(ws, assignment), actor="alice", replace=True)
    found = L.misplaced(ws, "cluster_01", limit=10)
    assert {r.image_id for r in found} == set(a_ids)
    assert {r.nearest_other for r in found} == {"cluster_00"}
    assert all(r.misfit and r.silhouette < 0 for r in found)
    summary = {lab.name: lab.misfits for lab in L.list_labels(ws)}
    assert summary["cluster_01"] == 4
    # moving them where they belong is a decision: no misfits left anywhere
    L.move(ws, a_ids, "cluster_00", actor="alice")
    assert L.misplaced(ws, None) == []
    assert sum(lab.misfits for lab in L.list_labels(ws)) == 0


def test_moving_the_most_typical_images_out_does_not_flag_the_rest(ws: Workspace) -> None:
    """Reported: moving the 2 most typical images of a label into a new label made every
    remaining image a misfit, because the tiny label's centre sits on the old label's centre
    (and its 2 members are, on average, closer to everyone than the label's own members)."""
    label = "cluster_00"
    before = next(s for s in L.list_labels(ws) if s.name == label)
    assert before.count == 30 and before.misfits == 0
    typical = [r.image_id for r in L.label_images(ws, label, limit=2)]
    L.move(ws, typical, "the two best", actor="alice")
    after = {s.name: s for s in L.list_labels(ws)}
    assert after[label].count == 28
    assert after[label].misfits == 0
    assert all(r.nearest_other != "the two best" for r in L.label_images(ws, label, limit=100))
    # Once it has grown to the minimum size it is compared against again.
    more = [r.image_id for r in L.label_images(ws, label, limit=L.MISFIT_MIN_LABEL_SIZE - 2)]
    L.move(ws, more, "the two best", actor="alice")
    rest = L.label_images(ws, label, limit=100)
    assert any(r.nearest_other == "the two best" for r in rest)


def test_exact_silhouette_matches_sklearn_when_every_label_is_big_enough() -> None:
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 5)) * 3
    labels_ = np.repeat(np.arange(4), [12, 9, 20, 7])
    space = (centres[labels_] + rng.normal(size=(len(labels_), 5))).astype(np.float32)
    normal = np.ones(len(labels_), bool)
    out = L.label_geometry(space, labels_ + 100, normal)
    np.testing.assert_allclose(out[:, 2], silhouette_samples(space, labels_), atol=1e-4)
    # A label below the minimum size is nobody's "other" label: no image compares against it.
    tiny = labels_.copy()
    tiny[:2] = 9
    out = L.label_geometry(space, tiny + 100, normal)
    assert not np.isin(out[:, 4], [109]).any()
    assert np.isfinite(out[2:, 2]).all()


def test_nearest_neighbours_by_cosine_without_the_image_and_its_duplicates(
    ws: Workspace, tmp_path: Path
) -> None:
    from imgcluster.features import load_features

    truth = _truth()
    features = load_features(ws, BACKBONE)
    query = features.relpaths[7]
    sha = features.sha256s[7]
    cosine = features.vectors @ features.vectors[7]
    order = [features.relpaths[r] for r in np.argsort(-cosine, kind="stable") if r != 7]
    root = _own_collection(ws, tmp_path)
    # an exact copy of the image, and one of its best match
    files = {"zz/copy.png": query, "zz/twin.png": order[0]}
    _add_images(ws, root, {new: (root / old).read_bytes() for new, old in files.items()})
    assert {im.sha256 for im in ws.images() if im.relpath == "zz/copy.png"} == {sha}

    found = L.nearest_neighbours(ws, query, limit=12)
    assert len(found) == 12
    paths = [n.relpath for n in found]
    assert query not in paths and "zz/copy.png" not in paths
    assert set(paths) == {"zz/twin.png", *order[:11]}  # the twin ties with the best match
    assert {"zz/twin.png", order[0]} <= set(paths[:2])
    sims = [n.similarity for n in found]
    assert sims == sorted(sims, reverse=True) and all(s < 1.0 for s in sims)
    assert sims[0] == pytest.approx(float(cosine[features.relpaths.index(order[0])]), abs=1e-5)
    assert all(truth[n.relpath] == truth[query] for n in found if n.relpath != "zz/twin.png")
    labels_now = _label_of(ws)
    for n in found:
        assert n.label == labels_now.get(n.relpath)  # twin.png has no label: None
    assert next(n for n in found if n.relpath == "zz/twin.png").label_id is None
    # By id gives the same; limits hold; no features, no neighbours.
    image_id = {im.relpath: im.id for im in ws.images()}[query]
    assert [n.image_id for n in L.nearest_neighbours(ws, image_id, limit=3)] == [
        n.image_id for n in found[:3]
    ]
    _add_images(ws, root, {"late.png": _new_png()})
    assert L.nearest_neighbours(ws, "late.png") == []
    with pytest.raises(UnknownImage):
        L.nearest_neighbours(ws, "no/such.png")


def test_app_queries_use_indexes(ws: Workspace) -> None:
    """The app's reads must stay fast at 100k-1M images: a page in typicality or misfit
    order is sorted from the in-process geometry and its rows fetched by primary key, counts
    group over an index (no scan of the table)."""
    from imgcluster.labels import queries

    with ws.read() as conn:

        def plan(sql: str, *args: object) -> str:
            return " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

        by_id = plan(f"{queries.IMAGE_SELECT} WHERE il.session_id = 1 AND il.image_id IN (1, 2)")
        counts = plan(
            "SELECT label_id, COUNT(*) FROM image_labels WHERE session_id = ? GROUP BY label_id",
            1,
        )
    assert "SCAN" not in by_id, by_id
    assert "INDEX" in counts and "TEMP B-TREE" not in counts
    with pytest.raises(L.ImgclusterError):
        L.page_sql("typicality")  # only the path order is paged in SQL


def test_pages_put_images_without_features_last(ws: Workspace, tmp_path: Path) -> None:
    """An image labeled by hand before its features exist still appears, after the rest."""
    _add_images(ws, _own_collection(ws, tmp_path), {"late.png": _new_png()})
    L.move(ws, ["late.png"], "cluster_00", actor="alice")
    rows = [r for o in range(0, 35, 6) for r in L.label_images(ws, "cluster_00", offset=o, limit=6)]
    assert len(rows) == 31 and rows[-1].relpath == "late.png" and rows[-1].distance is None
    assert L.label_images(ws, "cluster_00", offset=30, limit=6)[0].relpath == "late.png"
    assert L.label_images(ws, "cluster_00", offset=31) == []


# -- re-clustering and suggestions ------------------------------------------------------------


def test_recluster_keeps_confirmed_labels_and_adds_exactly_n_new(ws: Workspace) -> None:
    L.merge(ws, ["cluster_00", "cluster_01"], into="two classes", actor="alice")
    L.confirm(ws, "cluster_02", actor="alice")
    L.move(ws, sorted(_label_of(ws))[:5], "hand-picked", actor="alice")
    confirmed_before = {r.relpath: r.label for r in L.current_labels(ws) if r.confirmed}
    n_labels = len(L.list_labels(ws, include_empty=True))
    applied = L.recluster_unconfirmed(ws, 3, random_state=1, actor="alice")
    assert len(L.list_labels(ws, include_empty=True)) == n_labels + 3
    assert len(applied.labels) == 3
    after = {r.relpath: r for r in L.current_labels(ws)}
    assert all(after[p].label == lab and after[p].confirmed for p, lab in confirmed_before.items())
    assert {lab.name for lab in L.list_labels(ws)} >= {"cluster_06", "cluster_07", "cluster_08"}
    # undo puts every image back and removes the new labels
    L.undo(ws, actor="alice")
    assert len(L.list_labels(ws, include_empty=True)) == n_labels


def test_recluster_lets_unconfirmed_images_join_a_labeled_group(ws: Workspace) -> None:
    by_class = _by_class(ws)
    cls_a, cls_b = sorted(by_class)[:2]
    label_a, label_b = _majority_label(ws, cls_a), _majority_label(ws, cls_b)
    L.merge(ws, [label_b, label_a], into="mixed", actor="alice")  # A hides inside B, unconfirmed
    L.move(ws, by_class[cls_a][:5], cls_a, actor="alice")  # a person labels 5 of A
    L.recluster_unconfirmed(ws, 0, actor="alice")
    label_of = _label_of(ws)
    assert Counter(label_of[p] for p in by_class[cls_a]) == Counter({cls_a: 30})
    assert Counter(label_of[p] for p in by_class[cls_b]) == Counter({"mixed": 30})


def test_suggest_labels_for_new_images(ws: Workspace) -> None:
    """Images ingested after the run (features, no label) get their neighbours' label."""
    assignment = _assignment_by_class(ws)
    late = sorted(assignment)[::15]  # 12 images the run never saw
    run = _manual_run(ws, {i: c for i, c in assignment.items() if i not in late})
    L.start_session(ws, run, actor="alice", replace=True)
    for lab in L.list_labels(ws):
        L.confirm(ws, lab.id, actor="alice")
    suggestions = L.suggest_for_new_images(ws, k=5, actor="alice")
    assert sorted(s.image_id for s in suggestions) == sorted(late)
    truth = _truth()
    for s in suggestions:
        assert s.label == f"cluster_{sorted(set(truth.values())).index(truth[s.relpath]):02d}"
        assert 0.5 < s.confidence <= 1.0
    rows = {r.image_id: r for r in L.current_labels(ws)}
    assert all(not rows[i].confirmed for i in late)
    shown = {r.image_id: r for r in L.label_images(ws, suggestions[0].label, limit=100)}
    assert shown[suggestions[0].image_id].confidence == pytest.approx(suggestions[0].confidence)
    assert L.suggest_for_new_images(ws, actor="alice") == []
    L.undo(ws, actor="alice")
    assert len(L.current_labels(ws)) == 180 - len(late)


# -- CLI --------------------------------------------------------------------------------------


def test_cli_labels_commands(template: Path, tmp_path: Path) -> None:
    shutil.copytree(template, tmp_path / "ws")
    w = ["-w", str(tmp_path / "ws")]
    runner = CliRunner(env={"USER": "dave"})  # --actor defaults to $USER

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, ["labels", *args, *w])
        assert result.exit_code == code, result.output
        return result.output

    assert "6 labels, 180 images" in run("start")
    assert "cluster_05" in run("list")
    assert "rename 'cluster_00' to 'shoes'" in run("rename", "cluster_00", "shoes")
    first = sorted(_truth())[0]
    assert "move 1 image to 'boots' (new label)" in run("move", "--to", "boots", first)
    assert "mark 1 image excluded" in run("exclude", first)
    assert "confirm 'shoes'" in run("confirm", "shoes")
    assert "merge 'cluster_01', 'cluster_02' into 'tops'" in run(
        "merge", "cluster_01", "cluster_02", "--into", "tops"
    )
    assert "split 'tops' into 'tops', 'tops_2'" in run("split", "tops", "--n", "2")
    assert "undo split" in run("undo")
    assert "redo split" in run("redo")
    sizes = {lab.name: lab.count for lab in L.list_labels(Workspace(tmp_path / "ws"))}
    shown = run("show", "tops_2", "--limit", "100").splitlines()
    assert len(shown) == sizes["tops_2"] and all(".png\t" in line for line in shown)
    history = run("history")
    assert "dave" in history and "start labeling" in history
    assert "no label 'nope'" in run("rename", "nope", "x", code=1)
    assert "not in the workspace" in run("move", "--to", "shoes", "missing.png", code=1)
    assert "already exists" in run("rename", "tops", "SHOES", code=1)
    assert "empty" in run("rename", "tops", "  ", code=1)


# -- concurrency ------------------------------------------------------------------------------


_NAMES = ["shoes", "Shoes", "tops", "bags 👜", "鞋子", "a/b", "../x", "dresses", "hats", "misc"]


def _worker(path: str, actor: str, seed: int, n_ops: int, out: str) -> None:
    """One annotator doing random operations; writes what succeeded and what was refused."""
    import random

    from imgcluster.clustering import NotEnoughImages

    rng = random.Random(seed)
    ws = Workspace(path)
    image_ids = [im.id for im in ws.images()]
    done: list[int] = []
    refused: Counter[str] = Counter()
    for _ in range(n_ops):
        labels = L.list_labels(ws)
        lab = rng.choice(labels)
        op = rng.choices(
            [
                "move",
                "state",
                "rename",
                "merge",
                "split",
                "confirm",
                "delete",
                "undo",
                "redo",
                "recluster",
            ],
            weights=[30, 10, 10, 7, 3, 8, 5, 16, 10, 1],
        )[0]
        try:
            if op == "move":
                chosen = rng.sample(image_ids, rng.randint(1, 6))
                target = rng.choice([rng.choice(labels).id, rng.choice(_NAMES)])
                expected = None
                if rng.random() < 0.3:  # act on what the view showed a moment ago
                    expected = {
                        r.image_id: r.label for r in L.current_labels(ws) if r.image_id in chosen
                    }
                result = L.move(ws, chosen, target, actor=actor, expected=expected)
            elif op == "state":
                result = L.set_state(
                    ws, rng.sample(image_ids, rng.randint(1, 4)), rng.choice(L.STATES), actor=actor
                )
            elif op == "rename":
                result = L.rename(
                    ws, lab.id, f"{rng.choice(_NAMES)} {rng.randint(0, 9)}", actor=actor
                )
            elif op == "merge" and len(labels) > 3:
                a, b = rng.sample(labels, 2)
                result = L.merge(ws, [a.id, b.id], actor=actor)
            elif op == "split":
                result = L.split(ws, lab.id, 2, actor=actor, random_state=rng.randint(0, 9))
            elif op == "confirm":
                result = L.confirm(ws, lab.id, actor=actor)
            elif op == "delete":
                result = L.delete_label(ws, lab.id, actor=actor)
            elif op == "undo":
                result = L.undo(ws, actor=actor)
            elif op == "redo":
                result = L.redo(ws, actor=actor)
            elif op == "recluster":
                result = L.recluster_unconfirmed(ws, 1, random_state=rng.randint(0, 9), actor=actor)
            else:
                continue
        except (ImgclusterError, NotEnoughImages) as exc:
            refused[type(exc).__name__] += 1
            continue
        if result.entry_id is not None:
            done.append(result.entry_id)
    Path(out).write_text(json.dumps({"done": done, "refused": refused}))


@pytest.mark.slow  # two processes x 500 operations: ~5 s
def test_two_processes_doing_500_random_operations_each(ws: Workspace, tmp_path: Path) -> None:
    procs = []
    for actor, seed in (("p1", 1), ("p2", 2)):
        code = textwrap.dedent(
            f"""
            from tests.test_labels import _worker
            _worker({str(ws.path)!r}, {actor!r}, {seed}, 500, {str(tmp_path / actor)!r})
            """
        )
        # one BLAS thread each: two processes on a shared 2-core machine must not oversubscribe
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], cwd=PROJECT, env=env, stderr=subprocess.PIPE
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    results = {a: json.loads((tmp_path / a).read_text()) for a in ("p1", "p2")}

    labels, images = _state(ws)
    # every image has exactly one label, and it is a live one
    assert sorted(images) == sorted(im.id for im in ws.images())
    assert {row[0] for row in images.values()} <= set(labels)
    # the audit log replays to exactly this state
    assert _replay(ws) == (labels, images)
    # nothing lost: every step a process saw succeed is in the log, under its actor
    with ws.read() as conn:
        log = conn.execute(
            "SELECT id, actor FROM audit_log WHERE actor IN ('p1', 'p2') ORDER BY id"
        ).fetchall()
        version = conn.execute("SELECT version FROM label_sessions WHERE active = 1").fetchone()[0]
    by_actor = {a: [i for i, who in log if who == a] for a in ("p1", "p2")}
    for actor, result in results.items():
        assert by_actor[actor] == sorted(result["done"])
        assert len(result["done"]) > 150, result
    assert version == len(log) + 1  # + the session start
    # the two really ran concurrently: their steps interleave in the log
    switches = sum(1 for a, b in itertools.pairwise(log) if a[1] != b[1])
    assert switches > 20


# -- implicit start rows (issue 15 §3: starting labeling < 1 s at 1M images) -------------------


def _stored_rows(ws: Workspace) -> int:
    with ws.read() as conn:
        sid = conn.execute("SELECT id FROM label_sessions WHERE active = 1").fetchone()[0]
        return conn.execute(
            "SELECT COUNT(*) FROM image_labels WHERE session_id = ?", (sid,)
        ).fetchone()[0]


def _materialise(ws: Workspace, path: Path) -> Workspace:
    """A copy of ``ws`` whose session stores every row, as sessions started before the
    implicit start rows did (``base`` NULL)."""
    shutil.copytree(ws.path, path)
    copy = Workspace(path)
    with copy.transaction() as conn:
        sid = conn.execute("SELECT id FROM label_sessions WHERE active = 1").fetchone()[0]
        rows = image_states(conn, sid)
        conn.execute("UPDATE label_sessions SET base = NULL WHERE id = ?", (sid,))
        conn.executemany(
            "INSERT OR REPLACE INTO image_labels(session_id, image_id, label_id, confirmed, "
            "state, confidence, by_hand) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(sid, i, *r) for i, r in rows.items()],
        )
    return copy


def _everything_read(ws: Workspace) -> dict[str, object]:
    """What every reader of the session returns (pages in each order, with a search)."""
    out: dict[str, object] = {
        "labels": L.list_labels(ws, include_empty=True),
        "progress": L.progress(ws),
        "export": L.current_labels(ws, include_missing=True),
        "counts": L.label_state_counts(ws),
        "hashes": sorted(L.labeled_hashes(ws, states=("normal", "unsure"))),
        "unusable": L.unusable_labels(ws),
        "assignment": [a.tolist() for a in queries.label_arrays(ws)],
        "misplaced": L.misplaced(ws),
    }
    for summary in L.list_labels(ws):
        for order in L.ORDERS:
            out[f"{summary.id}/{order}"] = L.label_images(ws, summary.id, order=order, limit=500)
        out[f"{summary.id}/search"] = L.label_images(ws, summary.id, search="1", limit=500)
    return out


def test_start_stores_no_image_row_and_reads_as_stored_rows_do(
    ws: Workspace, tmp_path: Path
) -> None:
    """A started session keeps its rows implicit in the run: ``image_labels`` holds only the
    images an operation changed, and every reader (counts, pages in each order, export rows,
    the geometry) returns what a session storing every row returns."""
    assert _stored_rows(ws) == 0
    first, second = L.list_labels(ws)[:2]
    moved = [im.image_id for im in L.label_images(ws, first.id, limit=4)]
    L.move(ws, moved, second.id, actor="alice")
    L.set_state(ws, [L.label_images(ws, second.id, limit=1)[0].image_id], "excluded", actor="bob")
    L.confirm(ws, first.id, actor="alice")
    assert 0 < _stored_rows(ws) < len(ws.images())
    stored = _materialise(ws, tmp_path / "stored")
    assert _stored_rows(stored) == sum(s.count for s in L.list_labels(ws, include_empty=True))
    assert _everything_read(stored) == _everything_read(ws)
    assert audit_mismatches(ws) == [] and audit_mismatches(stored) == []
    # both go on alike: an undo on each leaves equal states
    L.undo(ws, actor="alice")
    L.undo(stored, actor="alice")
    assert _everything_read(stored) == _everything_read(ws)


def test_a_row_back_at_its_start_value_is_implicit_again(ws: Workspace) -> None:
    """Undoing a move deletes the rows it stored (they equal the start again), redo stores
    them again, and the audit log replays to the state at every step."""
    before = _state(ws)
    label_id = L.list_labels(ws)[0].id
    images = [im.image_id for im in L.label_images(ws, label_id, limit=5)]
    L.move(ws, images, "picked", actor="alice")
    assert _stored_rows(ws) == 5 and audit_mismatches(ws) == []
    L.undo(ws, actor="alice")
    assert _stored_rows(ws) == 0 and _state(ws)[1] == before[1]
    assert audit_mismatches(ws) == []
    L.redo(ws, actor="alice")
    assert _stored_rows(ws) == 5 and audit_mismatches(ws) == []
    L.move(ws, images, label_id, actor="alice")  # back by hand: by_hand differs, rows stay
    back = [r for r in L.label_images(ws, label_id, limit=500) if r.image_id in images]
    assert _stored_rows(ws) == 5 and len(back) == 5 and all(r.by_hand for r in back)


def test_a_session_that_stores_every_row_goes_on_working(ws: Workspace, tmp_path: Path) -> None:
    """Sessions started before the implicit rows (every row stored, ``base`` NULL) read and
    write as before: moves, undo, and a replay of the log that matches."""
    stored = _materialise(ws, tmp_path / "stored")
    n = _stored_rows(stored)
    label_id = L.list_labels(stored)[0].id
    images = [im.image_id for im in L.label_images(stored, label_id, limit=3)]
    L.move(stored, images, "picked", actor="alice")
    assert _stored_rows(stored) == n and audit_mismatches(stored) == []
    L.undo(stored, actor="alice")
    assert _stored_rows(stored) == n and audit_mismatches(stored) == []
    assert "picked" not in {s.name for s in L.list_labels(stored, include_empty=True)}
    assert _state(stored) == _state(_materialise(ws, tmp_path / "again"))


def test_label_arrays_are_the_usable_images_labels_without_a_row_object_each(
    ws: Workspace,
) -> None:
    """The app's map and charts read `label_arrays`: exactly `current_labels`' image -> label
    of the usable images, after a move, with a missing file left out."""
    first, second = L.list_labels(ws)[:2]
    moved = [im.image_id for im in L.label_images(ws, first.id, limit=3)]
    L.move(ws, moved, second.id, actor="alice")
    gone = ws.images()[5]
    with ws.transaction() as conn:  # what a rescan records for a deleted file
        conn.execute("UPDATE images SET status = 'missing' WHERE id = ?", (gone.id,))
    ids, label_ids = queries.label_arrays(ws)
    by_name = {s.name: s.id for s in L.list_labels(ws, include_empty=True)}
    expected = {r.image_id: by_name[r.label] for r in L.current_labels(ws)}
    assert gone.id not in set(ids.tolist()) and gone.id not in expected
    assert dict(zip(ids.tolist(), label_ids.tolist(), strict=True)) == expected
    assert np.all(np.diff(ids) > 0) and ids.dtype == label_ids.dtype == np.int64
    assert all(expected[i] == second.id for i in moved)
