"""The annotator's loop in the library (issue 12 §4, §6, "Getting to done"; issue 11 §4).

A move is no review: moved images stay unconfirmed and keep their misfit flags, Split still
works on them; empty labels hide and go in one step; progress and the next label to review;
search by file name or folder; `follow_k` and `Session.n_edits`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgcluster import labels as L
from imgcluster.clustering import cluster
from imgcluster.workspace import Workspace
from tests.test_labels import (  # noqa: F401  (fixtures)
    BACKBONE,
    _assignment_by_class,
    _label_of,
    _manual_run,
    template,
    ws,
)


def test_a_move_confirms_nothing_and_keeps_misfit_flags(ws: Workspace) -> None:  # noqa: F811
    """Issue 12 §4: 4 images of class A sit in B's cluster; moving them (with B's own images)
    to a third label marks them "by hand" but confirms nothing, so their misfit flags stay
    and Split still sees them."""
    assignment = _assignment_by_class(ws)
    a_ids = [i for i, c in assignment.items() if c == 0][:4]
    for i in a_ids:
        assignment[i] = 1
    L.start_session(ws, _manual_run(ws, assignment), actor="alice", replace=True)
    b_ids = [i for i, c in assignment.items() if c == 1 and i not in a_ids]
    L.move(ws, [*a_ids, *b_ids], "from the map", actor="alice")
    summary = {s.name: s for s in L.list_labels(ws)}["from the map"]
    assert (summary.count, summary.confirmed, summary.by_hand) == (34, 0, 34)
    flagged = {r.image_id for r in L.misplaced(ws, "from the map")}
    assert flagged == set(a_ids)  # the misfits are still pointed at
    assert summary.misfits == 4
    applied = L.split(ws, "from the map", 2, actor="alice")  # not "0 unconfirmed images"
    assert applied.n_images > 0
    # Only an explicit confirm of given images confirms them.
    shown = [r.image_id for r in L.label_images(ws, "from the map", limit=5)]
    confirmed = L.confirm_images(ws, shown, actor="alice")
    assert confirmed.n_images == 5
    rows = {r.image_id: r.confirmed for r in L.current_labels(ws)}
    assert sum(rows.values()) == 5 and all(rows[i] for i in shown)


def test_empty_labels_hide_and_go_in_one_undoable_step(ws: Workspace) -> None:  # noqa: F811
    members = {lab: [p for p, q in _label_of(ws).items() if q == lab] for lab in ("cluster_04",)}
    L.move(ws, members["cluster_04"], "cluster_05", actor="alice")
    L.move(ws, [1], "temporary", actor="alice")
    L.move(ws, [1], "cluster_00", actor="alice")
    visible = {s.name for s in L.list_labels(ws)}
    everything = {s.name for s in L.list_labels(ws, include_empty=True)}
    assert everything - visible == {"cluster_04", "temporary"}
    applied = L.delete_empty_labels(ws, actor="alice")
    assert applied.summary.startswith("delete 2 empty labels")
    assert {s.name for s in L.list_labels(ws, include_empty=True)} == visible
    assert L.delete_empty_labels(ws, actor="alice").entry_id is None
    L.undo(ws, actor="alice")
    assert {s.name for s in L.list_labels(ws, include_empty=True)} == everything


def test_progress_and_the_next_label_to_review(ws: Workspace) -> None:  # noqa: F811
    start = L.progress(ws)
    assert (start.images, start.reviewed, start.confirmed, start.by_hand) == (180, 0, 0, 0)
    first = L.next_label_to_review(ws)
    assert first is not None and first.unreviewed == 30
    L.confirm(ws, first.id, actor="alice")
    paths = [p for p, lab in sorted(_label_of(ws).items()) if lab == "cluster_01"]
    L.move(ws, paths[:10], "cluster_02", actor="alice")  # cluster_02: 40, 10 by hand
    L.set_state(ws, paths[10:12], "unsure", actor="alice")
    now = L.progress(ws)
    assert (now.confirmed, now.by_hand, now.unsure, now.reviewed) == (30, 10, 2, 42)
    assert now.fraction_reviewed == pytest.approx(42 / 180)
    per_label = {s.name: s for s in now.labels}
    assert (per_label["cluster_02"].count, per_label["cluster_02"].unreviewed) == (40, 30)
    # Largest unreviewed first: cluster_02's 30 ties cluster_03's 30; the older wins.
    nxt = L.next_label_to_review(ws)
    assert nxt is not None and nxt.name == "cluster_02"
    for s in L.list_labels(ws):
        L.confirm(ws, s.id, actor="alice")
    assert L.next_label_to_review(ws) is None or L.next_label_to_review(ws).unreviewed == 0


def test_search_a_label_by_file_name_or_folder(ws: Workspace) -> None:  # noqa: F811
    rows = L.label_images(ws, "cluster_00", limit=100, order="relpath")
    needle = rows[3].relpath[-9:-4]  # a piece of one file name
    expected = [r.relpath for r in rows if needle in r.relpath]
    for order in L.ORDERS:
        found = L.label_images(ws, "cluster_00", limit=100, order=order, search=needle)
        assert sorted(r.relpath for r in found) == sorted(expected)
    assert L.label_images(ws, "cluster_00", search="no such file") == []
    # LIKE wildcards in the search are literal characters
    assert L.label_images(ws, "cluster_00", search="%") == []
    assert L.label_images(ws, "cluster_00", search="_", limit=100)  # fmnist_NNNNN has one


def test_follow_k_and_n_edits(template: Path, tmp_path: Path) -> None:  # noqa: F811
    shutil.copytree(template, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    first = L.follow_k(workspace, BACKBONE, 6, actor="alice")
    assert first.status == "started" and first.session.n_edits == 0
    assert L.follow_k(workspace, BACKBONE, 6, actor="alice").status == "same"
    moved = L.follow_k(workspace, BACKBONE, 4, actor="alice")  # untouched labels follow k
    assert moved.status == "restarted" and len(L.list_labels(workspace)) == 4
    L.rename(workspace, "cluster_00", "mine", actor="alice")
    assert L.active_session(workspace).n_edits == 1
    kept = L.follow_k(workspace, BACKBONE, 6, actor="alice")  # edits: nothing changes, ask
    assert (kept.status, kept.session_k, kept.k) == ("kept", 4, 6)
    assert "mine" in {s.name for s in L.list_labels(workspace)}
    L.undo(workspace, actor="alice")
    assert L.active_session(workspace).n_edits == 2  # an undo is a recorded step too
    assert L.follow_k(workspace, BACKBONE, 6).status == "kept"
    run = cluster(workspace, BACKBONE, 6)
    assert kept.run_id != run.id
