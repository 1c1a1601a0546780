"""Derived geometry in its own table, kept current by the operations that move images.

Issue 11 §3: reads never write; a rename touches no geometry; a move refreshes it
incrementally, and the incremental result is exactly what a recomputation from scratch gives.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from imgcluster import labels as L
from imgcluster.labels import geometry
from imgcluster.workspace import Workspace
from tests.test_labels import template, ws  # noqa: F401  (fixtures)


def _table(workspace: Workspace) -> dict[int, tuple]:
    """What this process's geometry state says, per labeled image with features."""
    return geometry.snapshot(workspace)


def _token(workspace: Workspace) -> str:
    with workspace.read() as conn:
        return conn.execute(
            "SELECT geometry_token FROM label_sessions WHERE active = 1"
        ).fetchone()[0]


def _reads(workspace: Workspace) -> None:
    for summary in L.list_labels(workspace):
        L.label_images(workspace, summary.id, limit=10)
        L.label_images(workspace, summary.id, order="misfit", limit=10)
    L.misplaced(workspace)
    L.progress(workspace)
    L.current_labels(workspace)


def test_reads_never_write(ws: Workspace) -> None:  # noqa: F811
    watcher = ws.connect()  # data_version moves when another connection commits
    try:
        before = watcher.execute("PRAGMA data_version").fetchone()[0]
        revision = ws.revision
        _reads(ws)
        geometry._CACHE.clear()  # a cold process reads the same way
        _reads(ws)
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == before
        assert ws.revision == revision
        L.move(ws, [1], "cluster_03", actor="alice")  # the watcher does see a write
        assert watcher.execute("PRAGMA data_version").fetchone()[0] != before
    finally:
        watcher.close()


def test_a_rename_touches_no_geometry_and_a_confirm_no_distance(ws: Workspace) -> None:  # noqa: F811
    table, token = _table(ws), _token(ws)
    assert len(table) == 180 and token
    L.rename(ws, "cluster_00", "shoes", actor="alice")
    assert _token(ws) == token and _table(ws) == table
    L.confirm(ws, "cluster_01", actor="alice")  # flags change (no misfits), numbers do not
    assert _token(ws) != token and _table(ws) == table
    token = _token(ws)
    L.move(ws, [1], "cluster_02", actor="alice")
    assert _token(ws) != token


def _grid(workspace: Workspace) -> list:
    """Everything a reader sees of the geometry: label counts, every label's pages in both
    measure orders (also mid-label), the misplaced list."""
    seen: list = [L.list_labels(workspace, include_empty=True)]
    for summary in seen[0]:
        for order in ("typicality", "misfit"):
            seen.append(L.label_images(workspace, summary.id, order=order, limit=500))
            seen.append(L.label_images(workspace, summary.id, order=order, offset=3, limit=4))
    seen.append(L.misplaced(workspace, limit=500))
    return seen


def test_incremental_refresh_equals_a_full_recomputation(ws: Workspace) -> None:  # noqa: F811
    """After every step of a random session, this process's incrementally updated state and
    everything a reader sees equal, bit for bit, a state built from nothing (a cold
    process): same numbers, so the same page orders even between near-equal values."""
    rng = random.Random(4)
    ids = [im.id for im in ws.images()]
    for step in range(40):
        labels = L.list_labels(ws)
        choice = step % 8
        if choice == 0:
            L.move(ws, rng.sample(ids, rng.randint(1, 12)), rng.choice(labels).id, actor="a")
        elif choice == 1:
            L.move(ws, rng.sample(ids, 3), f"new {step}", actor="a")
        elif choice == 2:
            L.set_state(ws, rng.sample(ids, 4), rng.choice(L.STATES), actor="a")
        elif choice == 3 and len(labels) > 4:
            L.merge(ws, [labels[-1].id, labels[-2].id], actor="a")
        elif choice == 4:
            L.confirm_images(ws, rng.sample(ids, 5), actor="a")
        elif choice == 5:
            L.move(ws, rng.sample(ids, 40), rng.choice(labels).id, actor="a")
        elif choice == 6:
            L.undo(ws, actor="a")
        else:
            L.redo(ws, actor="a")  # the step just undone
        incremental, seen = _table(ws), _grid(ws)
        # the same numbers from nothing: no cached state, every row recomputed and compared
        geometry._CACHE.clear()
        assert _table(ws) == incremental, f"step {step}"
        assert _grid(ws) == seen, f"step {step}"
        # and a full rebuild inside a transaction (refresh_geometry) agrees too
        L.refresh_geometry(ws)
        assert _table(ws) == incremental, f"step {step}"


def test_another_writer_invalidates_this_process_state(ws: Workspace) -> None:  # noqa: F811
    """A write this process did not make (another annotator process) changes the token: the
    state held here is not used, the next read rebuilds from the rows."""
    before = L.label_images(ws, "cluster_00", limit=500)
    key = (str(ws.db_path), L.active_session(ws).id)
    held = geometry._CACHE.pop("geometry", key)
    assert held is not None
    moved = [im.image_id for im in before[:10]]
    L.move(ws, moved, "cluster_01", actor="other process")
    geometry._CACHE.put("geometry", key, held)  # as if this process never saw the move
    after = L.label_images(ws, "cluster_00", limit=500)
    assert {im.image_id for im in after} == {im.image_id for im in before} - set(moved)
    geometry._CACHE.clear()
    assert L.label_images(ws, "cluster_00", limit=500) == after


def test_label_geometry_matches_sklearn() -> None:
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(3)
    labels_ = np.repeat(np.arange(3), [10, 15, 8])
    space = (rng.normal(size=(3, 4))[labels_] * 3 + rng.normal(size=(33, 4))).astype(np.float32)
    out = L.label_geometry(space, labels_, np.ones(33, bool))
    np.testing.assert_allclose(out[:, 2], silhouette_samples(space, labels_), atol=1e-4)
    assert out[:, 0] == pytest.approx(
        np.linalg.norm(space - np.array([space[labels_ == c].mean(0) for c in labels_]), axis=1),
        abs=1e-4,
    )


def test_a_workspace_from_before_the_geometry_table_migrates(tmp_path) -> None:
    """A schema-4 workspace (geometry columns in image_labels, 4-value audit rows) opens, its
    stored geometry is not trusted (geometry is derived in-process now: without features
    there is none, and pages fall back to path order) and an old step can still be undone."""
    import json
    import sqlite3

    from imgcluster.workspace import MIGRATIONS, _split_sql

    before = [name for name, _ in MIGRATIONS].index("label_geometry")
    (tmp_path / "ws").mkdir()
    conn = sqlite3.connect(tmp_path / "ws" / "imgcluster.sqlite")
    for _name, sql in MIGRATIONS[:before]:
        for statement in _split_sql(sql):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {before}")
    conn.execute("INSERT INTO meta(key, value) VALUES ('collection_root', ?)", (str(tmp_path),))
    conn.executemany(
        "INSERT INTO images(id, relpath, sha256, status) VALUES (?, ?, ?, 'ok')",
        [(i, f"img{i}.png", f"{i:064d}") for i in (1, 2, 3)],
    )
    conn.execute(
        "INSERT INTO clusterings(id, backbone, k, algorithm, seed, params, n_images, seconds) "
        "VALUES (1, 'synthetic', 2, 'kmeans', 0, '{\"preprocess\": \"pca\"}', 3, 0)"
    )
    conn.execute(
        "INSERT INTO label_sessions(id, run_id, backbone, created_by, version, "
        "geometry_version) VALUES (1, 1, 'synthetic', 'old', 2, 2)"
    )
    conn.executemany(
        "INSERT INTO labels(id, session_id, name, name_key, cluster) VALUES (?, 1, ?, ?, ?)",
        [(1, "cluster_00", "cluster_00", 0), (2, "cluster_01", "cluster_01", 1)],
    )
    conn.executemany(
        "INSERT INTO image_labels(session_id, image_id, label_id, confirmed, distance, "
        "silhouette) VALUES (1, ?, ?, ?, ?, 0.5)",
        [(1, 1, 0, 0.25), (2, 1, 0, 0.5), (3, 2, 1, 0.75)],
    )
    start = {"labels": [], "images": []}
    moved = {"labels": [], "images": [[3, [1, 0, "normal", None], [2, 1, "normal", None]]]}
    conn.executemany(
        "INSERT INTO audit_log(session_id, actor, op, kind, status, summary, changes) "
        "VALUES (1, 'old', ?, 'do', ?, ?, ?)",
        [
            ("start", None, "start", json.dumps(start)),
            ("move", "done", "move 1 image to 'cluster_01'", json.dumps(moved)),
        ],
    )
    conn.commit()
    conn.close()

    old_ws = Workspace(tmp_path / "ws")
    assert old_ws.schema_version == len(MIGRATIONS)
    page = L.label_images(old_ws, "cluster_00")
    assert [(r.relpath, r.distance) for r in page] == [("img1.png", None), ("img2.png", None)]
    assert L.list_labels(old_ws)[1].confirmed == 1
    assert L.undo(old_ws, actor="old").summary == "undo move 1 image to 'cluster_01'"
    assert {r.relpath: r.label for r in L.current_labels(old_ws)}["img3.png"] == "cluster_00"


def test_images_extracted_after_the_state_was_built_get_labels_and_geometry(
    ws: Workspace,  # noqa: F811
    tmp_path,
) -> None:
    """The state held here stands for the features it was built from: an image that gets
    features later is still suggested a label, and then has its geometry (a rebuild, since
    the state did not know it), exactly as a cold process computes it."""
    from imgcluster.features import save_vectors
    from tests.test_labels import BACKBONE, _add_images, _new_png, _own_collection

    L.list_labels(ws)  # this process now holds a state without the new image
    _add_images(ws, _own_collection(ws, tmp_path), {"late.png": _new_png()})
    late = ws.image_by_relpath("late.png")
    neighbour = next(iter(geometry.snapshot(ws)))
    vector = geometry.session_features(ws, BACKBONE)
    row = int(np.flatnonzero(vector.image_ids == neighbour)[0])
    save_vectors(ws, BACKBONE, [late.sha256], vector.vectors[row : row + 1])
    suggested = L.suggest_for_new_images(ws, actor="alice")
    assert [s.image_id for s in suggested] == [late.id]
    held = _table(ws)
    assert held[late.id][1] is not None  # it has a distance now
    geometry._CACHE.clear()
    assert _table(ws) == held


def _by_name(workspace: Workspace, table: dict[int, tuple]) -> dict[int, tuple]:
    """A snapshot with label names for label ids (own label and nearest other label)."""
    names = {s.id: s.name for s in L.list_labels(workspace, include_empty=True)}
    return {i: (names[v[0]], *v[1:-1], names.get(v[-1])) for i, v in table.items()}


def test_a_start_reads_the_geometry_a_start_from_the_same_run_kept(
    ws: Workspace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A start from a run keeps its geometry (from `KEEP_START_MIN_N` images on); a later
    start from the same run and space reads it back, in its own label ids, bit for bit what
    a build from nothing gives, and moves update it exactly as they update a built one."""
    monkeypatch.setattr(geometry, "KEEP_START_MIN_N", 1)  # the sample is small; same rule
    run_id = L.active_session(ws).run_id
    L.start_session(ws, run_id, actor="a", replace=True)  # builds and keeps it
    kept = list(ws.runs_dir.glob("start-geometry-*"))
    assert len(kept) == 1 and (kept[0] / "scale.npy").exists()
    built = _by_name(ws, _table(ws))
    geometry._CACHE.clear()
    L.start_session(ws, run_id, actor="a", replace=True)  # reads the kept one
    read_back = _table(ws)
    assert _by_name(ws, read_back) == built
    geometry._CACHE.clear()
    assert _table(ws) == read_back  # = a build from nothing in this session's label ids
    L.start_session(ws, run_id, actor="a", replace=True)
    ids = [im.id for im in ws.images()]
    rng = random.Random(2)
    for step in range(4):
        L.move(ws, rng.sample(ids, 15), rng.choice(L.list_labels(ws)).id, actor="a")
        incremental = _table(ws)
        geometry._CACHE.clear()
        assert _table(ws) == incremental, f"step {step}"


def _same_state(updated: geometry._State, built: geometry._State) -> None:
    """Every output, and every live label's distance column, equal bit for bit (columns
    matched by label id: an updated state appends new labels' columns)."""
    np.testing.assert_array_equal(updated.out, built.out)
    np.testing.assert_array_equal(updated.other, built.other)
    labels_of = np.asarray([*updated.column_labels, -1])
    built_labels = np.asarray([*built.column_labels, -1])
    np.testing.assert_array_equal(labels_of[updated.other_col], built_labels[built.other_col])
    for lab, c in built.columns.items():
        np.testing.assert_array_equal(updated.dist[:, updated.columns[lab]], built.dist[:, c])


def test_updates_above_the_exact_silhouette_size_equal_a_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above `EXACT_SILHOUETTE_MAX_N` normal rows an update recomputes only the rows whose
    numbers can change (block by block, a busy block whole): after every step of a random
    sequence of moves, state changes, new and emptied labels, it equals a build from scratch
    bit for bit (small blocks, so both per-block paths and several product blocks run)."""
    from imgcluster.clustering import EXACT_SILHOUETTE_MAX_N

    monkeypatch.setattr(geometry, "_BLOCK", 512)
    monkeypatch.setattr(geometry, "_PRODUCT_BLOCK", 300)
    rng = np.random.default_rng(7)
    n = EXACT_SILHOUETTE_MAX_N + 1500
    centres = rng.normal(size=(12, 16)).astype(np.float32) * 3
    blob = rng.integers(0, 12, n)
    space = (centres[blob] + rng.normal(size=(n, 16)).astype(np.float32)).astype(np.float32)
    label_of = (blob % 8).astype(np.int64) + 10
    normal = np.ones(n, bool)
    state = geometry._State.build(space, label_of.copy(), normal.copy())
    paths: set[str] = set()
    outputs_at = state._outputs_at

    def spy(index: np.ndarray | slice, **kw: bool) -> None:
        paths.add("slice" if isinstance(index, slice) else "rows")
        outputs_at(index, **kw)

    monkeypatch.setattr(state, "_outputs_at", spy)
    for step in range(40):
        kind = step % 5
        if kind == 0:  # a few images of one label to another
            src = np.flatnonzero(label_of == 10 + step % 8)
            rows = rng.choice(src, min(len(src), int(rng.integers(1, 30))), replace=False)
            to = np.full(len(rows), 10 + (step + 3) % 8)
        elif kind == 1:  # many random images to one label
            rows = rng.choice(n, 400, replace=False)
            to = np.full(len(rows), 10 + step % 8)
        elif kind == 2:  # a new label: first 3 images (not a reference yet), then more
            rows = rng.choice(n, 3 if step % 10 == 2 else 8, replace=False)
            to = np.full(len(rows), 100 + step // 10)
        elif kind == 3:  # images leave labels (unlabeled) or their state changes
            rows = rng.choice(n, 20, replace=False)
            to = np.where(rng.random(len(rows)) < 0.5, -1, label_of[rows])
        else:  # empty a small label
            small = [lab for lab in np.unique(label_of) if 0 < (label_of == lab).sum() < 20]
            rows = np.flatnonzero(label_of == small[0]) if small else rng.choice(n, 2)
            to = np.full(len(rows), 10 + step % 8)
        rows = np.asarray(rows, np.int64)
        new_normal = np.where(to >= 0, rng.random(len(rows)) < 0.8, False)
        label_of[rows], normal[rows] = to, new_normal
        state.update(rows, to, new_normal, np.zeros(len(rows), bool))
        built = geometry._State.build(space, label_of.copy(), normal.copy())
        assert not built._exact_regime()
        _same_state(state, built)
    assert paths == {"slice", "rows"}  # both per-block paths ran (and the full one)


def test_an_update_leaving_the_exact_silhouette_size_recomputes_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to `EXACT_SILHOUETTE_MAX_N` normal rows silhouettes are exact; a change that
    crosses that size must not keep the exact values of rows it does not touch (a build
    gives the simplified ones there)."""
    monkeypatch.setattr("imgcluster.clustering.EXACT_SILHOUETTE_MAX_N", 300)
    monkeypatch.setattr(geometry, "_BLOCK", 8)  # untouched rows stay untouched
    rng = np.random.default_rng(5)
    n = 400
    centres = rng.normal(size=(8, 6)).astype(np.float32) * 3
    blob = rng.integers(0, 8, n)
    space = (centres[blob] + rng.normal(size=(n, 6)).astype(np.float32)).astype(np.float32)
    label_of = blob.astype(np.int64) + 1
    normal = np.arange(n) < 295
    state = geometry._State.build(space, label_of.copy(), normal.copy())
    assert state._exact_regime()
    rows = np.flatnonzero(~normal & (label_of == 1))[:10]  # excluded images back to normal
    normal[rows] = True
    state.update(rows, label_of[rows], normal[rows], np.zeros(len(rows), bool))
    built = geometry._State.build(space, label_of.copy(), normal.copy())
    assert not built._exact_regime()
    _same_state(state, built)
