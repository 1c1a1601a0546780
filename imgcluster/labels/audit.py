"""The audit log: every operation recorded row by row, undo/redo, stale-state checks.

Each operation is one transaction (`operation`) that records, in one ``audit_log`` row, who,
when, the operation and its arguments, and the exact before/after of every label and image row
it changed (`Recorder`). `undo` writes the "before" values back and `redo` the "after" values,
each as a new audit row, so the log is a complete replayable record (applying every row's
"after" values in id order rebuilds the current state) and undo survives a restart. A start
row lists its labels but names its images by reference (``changes["start"]``: the run, and
the run's images left out), every one ``(its cluster's label, 0, "normal", None, 0)``: at 1M
images the list alone was ~60 MB of JSON (`start_reference`, `started_images`).

Undo is per actor (an annotator undoes their own steps, newest first). An undo whose rows were
changed since by someone else is refused with `StaleState` rather than overwrite their work; a
new operation by the actor clears what they could redo, as in every editor.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgcluster import settings
from imgcluster.errors import ImgclusterError, NothingToUndo, StaleState
from imgcluster.labels import geometry, queries
from imgcluster.labels._store import (
    NOW,
    chunked_rows,
    image_state,
    image_states,
    label_state,
    label_states,
    n_images,
    relpaths,
    session_base,
    session_row,
    session_rows,
)
from imgcluster.labels.names import clean_actor, name_key
from imgcluster.labels.results import Applied, HistoryEntry, ImageState, LabelState
from imgcluster.workspace import Workspace

__all__ = ["history", "redo", "undo"]


def actor_name(actor: str | None) -> str:
    """The sanitised actor, or the login name when none is given."""
    return clean_actor(actor, default="") or clean_actor(settings.default_actor("unknown"))


@dataclass
class Op:
    """One write transaction on the active session; recorders register the image rows they
    change (``changes``: image id -> new row, None = deleted), so the geometry is refreshed
    once, before the commit."""

    workspace: Workspace
    conn: sqlite3.Connection
    session: sqlite3.Row
    changes: dict[int, ImageState | None] = field(default_factory=dict)
    before: dict[int, ImageState | None] = field(default_factory=dict)
    full_geometry: bool = False

    @property
    def sid(self) -> int:
        return int(self.session["id"])

    def recorder(self) -> Recorder:
        return Recorder(self.conn, self.sid, self)


@contextlib.contextmanager
def operation(workspace: Workspace, expected: int | None, *, moves: bool = True) -> Iterator[Op]:
    """One write transaction on the active session, checking a version precondition.

    ``moves=False`` for operations that never move images (rename, confirm, delete): they
    skip preparing the clustering space, which is otherwise loaded before the write lock.
    """
    pending = counts = None
    if moves:
        with workspace.read() as conn:
            active = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        if active is not None and not geometry.has_state(workspace, int(active["id"])):
            geometry.session_space(workspace, active["backbone"], active["run_id"])
    with workspace.transaction() as conn:
        session = session_row(conn)
        if expected is not None and int(session["version"]) != int(expected):
            raise StaleState(
                f"the labels changed since this view was loaded (version {expected}, now "
                f"{session['version']}); reload and try again"
            )
        op = Op(workspace, conn, session)
        yield op
        if op.changes or op.full_geometry:
            pending = geometry.refresh(
                workspace, conn, session, None if op.full_geometry else op.changes
            )
        if op.changes:
            counts = queries.carry_counts(workspace, conn, session, op.before, op.changes)
    geometry.publish(pending)
    queries.publish_counts(counts)


class Recorder:
    """Applies row changes inside the open transaction and remembers before/after of each."""

    def __init__(self, conn: sqlite3.Connection, sid: int, op: Op | None = None) -> None:
        self.conn = conn
        self.sid = sid
        self.op = op
        self.labels: dict[int, list[LabelState | None]] = {}
        self.images: dict[int, list[ImageState | None]] = {}
        self.started: dict[str, Any] | None = None  # a start's images, by reference

    def create_label(self, name: str, cluster: int | None) -> int:
        cur = self.conn.execute(
            "INSERT INTO labels(session_id, name, name_key, cluster) VALUES (?, ?, ?, ?)",
            (self.sid, name, name_key(name), cluster),
        )
        label_id = int(cur.lastrowid or 0)
        self.labels[label_id] = [None, (name, cluster)]
        return label_id

    def set_label(self, label_id: int, after: LabelState | None) -> None:
        before = label_states(self.conn, [label_id]).get(label_id)
        self._write_label(label_id, after)
        entry = self.labels.setdefault(label_id, [before, None])
        entry[1] = after

    def apply_labels(
        self, changes: Sequence[tuple[int, LabelState | None, LabelState | None]]
    ) -> None:
        # Deletions first, so a name freed by one label can be taken by another (the unique
        # index only covers live labels).
        for label_id, before, after in sorted(changes, key=lambda c: c[2] is not None):
            self._write_label(label_id, after)
            self.labels.setdefault(label_id, [before, None])[1] = after

    def _write_label(self, label_id: int, after: LabelState | None) -> None:
        if after is None:
            self.conn.execute(
                f"UPDATE labels SET deleted_at = {NOW} WHERE id = ? AND deleted_at IS NULL",
                (label_id,),
            )
        else:
            self.conn.execute(
                "UPDATE labels SET name = ?, name_key = ?, cluster = ?, deleted_at = NULL "
                "WHERE id = ?",
                (after[0], name_key(after[0]), after[1], label_id),
            )

    def set_images(
        self, before: Mapping[int, ImageState], after: Mapping[int, ImageState | None]
    ) -> None:
        """Write ``after`` rows (None deletes); ``before`` must hold their current values.

        In a session with implicit start rows (`session_base`), a row equal to its image's
        start row is deleted from ``image_labels`` instead (so an undo back to the start
        leaves no row behind); an image of the start cannot leave the session."""
        changed = {i: a for i, a in after.items() if before.get(i) != a}
        base = session_base(self.conn, self.sid) if changed else None
        start = {} if base is None else base.states(list(changed))
        if any(a is None for i, a in changed.items() if i in start):
            raise ImgclusterError(
                f"{n_images(sum(1 for i, a in changed.items() if a is None and i in start))} "
                "of the session's start cannot leave it; move them to a label instead"
            )
        upserts = [
            (self.sid, i, *a) for i, a in changed.items() if a is not None and start.get(i) != a
        ]
        deletes = [
            (self.sid, i)
            for i, a in changed.items()
            if (a is None and i in before) or (a is not None and start.get(i) == a)
        ]
        self.conn.executemany(
            "INSERT INTO image_labels(session_id, image_id, label_id, confirmed, state, "
            "confidence, by_hand) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(session_id, image_id) DO UPDATE "
            "SET label_id = excluded.label_id, confirmed = excluded.confirmed, "
            "state = excluded.state, confidence = excluded.confidence, "
            f"by_hand = excluded.by_hand, updated_at = {NOW}",
            upserts,
        )
        self.conn.executemany(
            "DELETE FROM image_labels WHERE session_id = ? AND image_id = ?", deletes
        )
        if upserts or deletes:
            self.conn.execute(
                "UPDATE label_sessions SET images_version = images_version + 1 WHERE id = ?",
                (self.sid,),
            )
        for i, a in after.items():
            b = before.get(i)
            entry = self.images.setdefault(i, [b, None])
            entry[1] = a
            if self.op is not None and b != a:
                self.op.changes[i] = a
                self.op.before.setdefault(i, b)

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": [[i, _json(b), _json(a)] for i, (b, a) in self.labels.items() if b != a],
            "images": [[i, _json(b), _json(a)] for i, (b, a) in self.images.items() if b != a],
        }
        if self.started is not None:
            out["start"] = self.started
        return out


def start_reference(run_id: int, left_out: Sequence[int]) -> dict[str, Any]:
    """What a start row records instead of its image rows: the run whose assignments they
    are, and the run's images the session left out (files gone or skipped when it started)."""
    return {"run_id": int(run_id), "left_out": [int(i) for i in left_out]}


def started_images(conn: sqlite3.Connection, changes: Mapping[str, Any]) -> dict[int, ImageState]:
    """The image rows a start row made (``changes``: its parsed payload), from the run it
    references: what a replay of the log applies for it. Empty for other rows; a start row
    from before references lists its images in ``changes["images"]`` instead."""
    from imgcluster.runs import run_cluster_arrays

    started = changes.get("start")
    if not started:
        return {}
    label_of = {
        int(after[1]): int(i)
        for i, _b, after in changes["labels"]
        if after and after[1] is not None
    }
    ids, clusters = run_cluster_arrays(conn, int(started["run_id"]))
    left_out = set(started.get("left_out", []))
    return {
        i: (label_of[c], 0, "normal", None, 0)
        for i, c in zip(ids.tolist(), clusters.tolist(), strict=True)
        if i not in left_out
    }


def _json(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def record(
    conn: sqlite3.Connection,
    sid: int,
    actor: str,
    op: str,
    summary: str,
    args: dict[str, Any],
    rec: Recorder,
    *,
    kind: str = "do",
    target: int | None = None,
    status: str | None = "done",
) -> int:
    """Append the audit row and bump the session version (the ``expected`` token)."""
    if kind == "do" and status is not None:
        # A new step ends what this actor could redo, as in every editor.
        conn.execute(
            "UPDATE audit_log SET status = 'dropped' WHERE session_id = ? AND actor = ? "
            "AND status = 'undone'",
            (sid, actor),
        )
    cur = conn.execute(
        "INSERT INTO audit_log(session_id, actor, op, kind, target_id, status, summary, args, "
        "changes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            sid,
            actor,
            op,
            kind,
            target,
            status if kind == "do" else None,
            summary,
            json.dumps(args, ensure_ascii=False),
            json.dumps(rec.payload(), ensure_ascii=False, separators=(",", ":")),
        ),
    )
    conn.execute("UPDATE label_sessions SET version = version + 1 WHERE id = ?", (sid,))
    return int(cur.lastrowid or 0)


# -- undo / redo ------------------------------------------------------------------------------


def undo(workspace: Workspace, *, actor: str = "cli") -> Applied:
    """Undo the actor's newest operation that is not undone yet.

    Raises
    ------
    NothingToUndo
        If the actor has no such operation in this session.
    StaleState
        If someone changed the same images or labels since; nothing is changed.
    """
    return _undo_redo(workspace, actor_name(actor), "undo")


def redo(workspace: Workspace, *, actor: str = "cli") -> Applied:
    """Redo the actor's most recently undone operation (until they do something new)."""
    return _undo_redo(workspace, actor_name(actor), "redo")


def _undo_redo(workspace: Workspace, actor: str, kind: str) -> Applied:
    with operation(workspace, None) as op:
        conn, sid = op.conn, op.sid
        if kind == "undo":
            row = conn.execute(
                "SELECT * FROM audit_log WHERE session_id = ? AND actor = ? AND kind = 'do' "
                "AND status = 'done' ORDER BY id DESC LIMIT 1",
                (sid, actor),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT * FROM audit_log WHERE session_id = ? AND actor = ? AND kind = 'do' "
                "AND status = 'undone' ORDER BY undo_seq DESC LIMIT 1",
                (sid, actor),
            ).fetchone()
        if row is None:
            raise NothingToUndo(f"{actor} has nothing to {kind} in this labeling session")
        changes = json.loads(row["changes"])
        labels = [(int(i), label_state(b), label_state(a)) for i, b, a in changes["labels"]]
        images = [(int(i), image_state(b), image_state(a)) for i, b, a in changes["images"]]
        if kind == "undo":  # write "before" over "after"
            labels = [(i, a, b) for i, b, a in labels]
            images = [(i, a, b) for i, b, a in images]
        _check_unchanged(conn, sid, row, kind, labels, images)
        rec = op.recorder()
        try:
            rec.apply_labels(labels)
        except sqlite3.IntegrityError:
            raise StaleState(
                f"cannot {kind} “{row['summary']}”: a label it would restore has had its name "
                "taken by another label since; rename that one first"
            ) from None
        rec.set_images({i: b for i, b, _ in images}, {i: a for i, _, a in images})
        _check_no_orphans(conn, sid, row, kind, [i for i, _, a in labels if a is None])
        _check_targets_live(conn, row, kind, {a[0] for _, _, a in images if a is not None})
        summary = f"{kind} {row['summary']}"
        entry = record(
            conn,
            sid,
            actor,
            row["op"],
            summary,
            {"entry": row["id"]},
            rec,
            kind=kind,
            target=row["id"],
            status=None,
        )
        if kind == "undo":
            conn.execute(
                "UPDATE audit_log SET status = 'undone', undo_seq = ? WHERE id = ?",
                (entry, row["id"]),
            )
        else:
            conn.execute("UPDATE audit_log SET status = 'done' WHERE id = ?", (row["id"],))
    return Applied(entry, kind, summary, len(images), tuple(i for i, _, _ in labels))


def _check_unchanged(
    conn: sqlite3.Connection,
    sid: int,
    row: sqlite3.Row,
    kind: str,
    labels: list[tuple[int, LabelState | None, LabelState | None]],
    images: list[tuple[int, ImageState | None, ImageState | None]],
) -> None:
    """Refuse an undo/redo whose rows no longer hold what the step left (someone changed them)."""
    now_labels = label_states(conn, [i for i, _, _ in labels])
    now_images = image_states(conn, sid, image_ids=[i for i, _, _ in images])
    bad_labels = [i for i, expect, _ in labels if now_labels.get(i) != expect]
    bad_images = [i for i, expect, _ in images if now_images.get(i) != expect]
    if not bad_labels and not bad_images:
        return
    later = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT actor FROM audit_log WHERE session_id = ? AND id > ?",
            (sid, row["undo_seq"] if kind == "redo" and row["undo_seq"] else row["id"]),
        )
    ]
    parts = []
    if bad_images:
        parts.append(f"{n_images(len(bad_images))} ({relpaths(conn, bad_images)})")
    if bad_labels:
        parts.append(f"{len(bad_labels)} label(s)")
    raise StaleState(
        f"cannot {kind} “{row['summary']}”: {' and '.join(parts)} changed since "
        f"(by {', '.join(later) or 'another step'}); nothing was changed"
    )


def _check_no_orphans(
    conn: sqlite3.Connection, sid: int, row: sqlite3.Row, kind: str, removed: list[int]
) -> None:
    """Refuse to remove a label that someone else has put images into since the step."""
    if not removed:
        return
    rows = session_rows(conn, sid)
    labs, counts = np.unique(rows.label[np.isin(rows.label, removed)], return_counts=True)
    used = list(zip(labs.tolist(), counts.tolist(), strict=True))
    if used:
        names = dict(
            chunked_rows(conn, "SELECT id, name FROM labels WHERE id IN ({})", [u[0] for u in used])
        )
        detail = ", ".join(f"{names[u[0]]!r} ({n_images(u[1])})" for u in used)
        raise StaleState(
            f"cannot {kind} “{row['summary']}”: it would remove label {detail}, which received "
            "other images since; move them out first. Nothing was changed"
        )


def _check_targets_live(
    conn: sqlite3.Connection, row: sqlite3.Row, kind: str, label_ids: set[int]
) -> None:
    """Refuse to put images back into a label that was deleted or merged away since."""
    gone = sorted(label_ids - set(label_states(conn, sorted(label_ids))))
    if gone:
        names = [r[0] for r in chunked_rows(conn, "SELECT name FROM labels WHERE id IN ({})", gone)]
        raise StaleState(
            f"cannot {kind} “{row['summary']}”: it would put images back into "
            f"{', '.join(map(repr, names))}, deleted or merged away since; nothing was changed"
        )


# -- reading the log --------------------------------------------------------------------------


def history(
    workspace: Workspace, limit: int = 50, *, actor: str | None = None
) -> list[HistoryEntry]:
    """Audit rows of the active session, newest first (optionally one actor's)."""
    with workspace.read() as conn:
        session = session_row(conn)
        sql = (
            "SELECT id, at, actor, op, kind, summary, status, target_id, "
            "json_array_length(changes, '$.images') "
            "+ COALESCE(json_extract(changes, '$.start.n_images'), 0), "
            "json_array_length(changes, '$.labels') "
            "FROM audit_log WHERE session_id = ?"
        )
        args: list[Any] = [session["id"]]
        if actor is not None:
            sql += " AND actor = ?"
            args.append(actor_name(actor))
        rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
    return [HistoryEntry(*tuple(r)) for r in rows]
