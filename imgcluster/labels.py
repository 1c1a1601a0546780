"""Annotation state: clusters become editable labels, and no decision a person made is lost.

A *labeling session* starts from one clustering run: cluster ``c`` becomes the label
``cluster_0c`` and every clustered image gets that label, unconfirmed. People then rename,
merge, split, move, exclude, mark unsure, confirm and delete; each operation is

* **one transaction** (``BEGIN IMMEDIATE``, `Workspace.transaction`): two processes or browser
  tabs serialise, and an operation is applied completely or not at all;
* **audited**: one ``audit_log`` row with who, when, the operation and its arguments, and the
  exact before/after of every label and image row it changed;
* **undoable**: `undo` writes the "before" values back and `redo` the "after" values, each as a
  new audit row, so the log is a complete replayable record (applying every row's "after"
  values in id order rebuilds the current state) and undo survives a restart.

Undo is per actor (an annotator undoes their own steps, newest first). An undo whose rows were
changed since by someone else is refused with `StaleState` rather than overwrite their work;
a new operation by the actor clears what they could redo, as in every editor.

Stale views: operations act on the *current* state, read inside their transaction. A caller
that wants to act only on what it showed passes ``expected``: the session `Session.version` the
view was built from (any change since refuses), or for `move` / `set_state` a mapping of image to
the label it was shown in (only those images are checked), or for `confirm` the image ids the
label was shown with. A mismatch raises `StaleState` and changes nothing.

Label names
-----------
Names are free Unicode text, one line. `validate_name` NFC-normalises and trims them and refuses:
an empty or whitespace-only name; a name longer than `MAX_NAME_LENGTH` characters; control
characters (newline, tab, NUL...) and line/paragraph separators. Names are unique within a
session *case-insensitively and up to compatibility forms* (NFKC + casefold: ``Shoes`` =
``SHOES`` = ``ｓｈｏｅｓ``). Emoji, Chinese, spaces, ``a/b`` and ``../x`` are accepted: a label is
text, not a path; export maps every name to a safe, distinct folder name
(`imgcluster.export.safe_folder_name`). Functions taking a label accept its name (matched the
same case-insensitive way), its integer id, or ``"#<id>"``.

Geometry (typicality and misfits)
---------------------------------
Every image's ``distance`` to the centroid of its label, the ``margin`` to the nearest other
label's centroid and a ``silhouette`` are measured in the session run's clustering space
(`imgcluster.clustering.clustering_space`), against the labels *as they are now* (centroids
of each label's ``normal`` images). "Other" labels are only those with at least
`MISFIT_MIN_LABEL_SIZE` ``normal`` images: a label of two hand-picked images has a centre that
may sit on another label's centre, and comparing against it would flag that whole label. The
silhouette is exact up to
`~imgcluster.clustering.EXACT_SILHOUETTE_MAX_N` images and the simplified (centroid) one
above, and an image is a *misfit* by the clustering module's own rule
(`~imgcluster.clustering.misfit_mask`) when it is also unconfirmed and ``normal``. These numbers
are derived data: operations only mark them stale, and the next read recomputes them once
(without bumping the workspace revision), so a burst of moves costs one recomputation.

Examples
--------
On a workspace where ``sample_data/images`` was ingested, extracted and clustered:

>>> from imgcluster import labels                                     # doctest: +SKIP
>>> labels.start_session(ws, actor="ana")                             # doctest: +SKIP
1
>>> labels.rename(ws, "cluster_03", "sneakers 👟", actor="ana").summary  # doctest: +SKIP
"rename 'cluster_03' to 'sneakers 👟'"
>>> labels.move(ws, ["fmnist_00012.png"], "sandals", actor="ana")     # doctest: +SKIP
>>> labels.undo(ws, actor="ana").summary                              # doctest: +SKIP
"undo move 1 image to 'sandals' (new label)"
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcluster.errors import (
    ImgclusterError,
    InvalidLabelName,
    NoLabelSession,
    NothingToUndo,
    StaleState,
    UnknownCluster,
    UnknownImage,
)
from imgcluster.workspace import Workspace

if TYPE_CHECKING:
    from imgcluster.features import FeatureMatrix

#: Longest label name, in characters (code points after NFC).
MAX_NAME_LENGTH = 100

#: Image states: ``excluded`` images are not exported, ``unsure`` ones are flagged for review.
STATES = ("normal", "excluded", "unsure")

#: Labels with fewer ``normal`` images than this are not compared against when telling
#: misfits (see `_geometry`): a few hand-picked images make a centre that is no group's yet.
MISFIT_MIN_LABEL_SIZE = 5

#: Orders of `label_images`.
ORDERS = ("typicality", "misfit", "relpath")

#: How often a computation done outside the write lock (split, re-cluster, suggest) is redone
#: when another writer changed the session meanwhile, before giving up with `StaleState`.
_ATTEMPTS = 3

_SQL_CHUNK = 900  # stay under SQLite's bound-variable limit on old builds
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

#: One image's labeling state as the audit log records it: label id, confirmed, state,
#: confidence (only for suggestions). ``None`` = the image has no label in the session.
ImageState = tuple[int, int, str, float | None]
#: One label as the audit log records it: name and origin cluster. ``None`` = deleted/absent.
LabelState = tuple[str, int | None]


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """The active labeling session. ``version`` grows with every operation (an ``expected``
    token for stale-view checks)."""

    id: int
    run_id: int
    backbone: str
    version: int
    created_by: str
    created_at: str


@dataclass(frozen=True)
class LabelSummary:
    """One label with its counts (images of usable files only)."""

    id: int
    name: str
    count: int
    confirmed: int
    excluded: int
    unsure: int
    misfits: int


@dataclass(frozen=True)
class LabeledImage:
    """One image in a label grid. ``distance`` / ``silhouette`` are None without features."""

    image_id: int
    relpath: str
    sha256: str
    label: str
    confirmed: bool
    state: str
    distance: float | None
    silhouette: float | None
    misfit: bool
    label_id: int = 0
    confidence: float | None = None
    nearest_other: str | None = None


@dataclass(frozen=True)
class ExportRow:
    """What export needs per image: its label, origin cluster in the session's run, flags."""

    image_id: int
    relpath: str
    sha256: str
    label: str
    cluster: int | None
    confirmed: bool
    state: str


@dataclass(frozen=True)
class Applied:
    """The outcome of an operation. ``entry_id`` is its audit row (None if nothing changed)."""

    entry_id: int | None
    op: str
    summary: str
    n_images: int
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class HistoryEntry:
    """One audit row. ``status`` of a ``do`` row: done, undone, or dropped (no longer
    redoable); None for undo/redo rows and the session start."""

    id: int
    at: str
    actor: str
    op: str
    kind: str
    summary: str
    status: str | None
    target_id: int | None
    n_images: int
    n_labels: int


@dataclass(frozen=True)
class Neighbour:
    """An image similar to another one: ``similarity`` is the cosine of their feature vectors
    (1 = same direction). ``label`` / ``label_id`` are None for an image without a label."""

    image_id: int
    relpath: str
    sha256: str
    label: str | None
    similarity: float
    label_id: int | None = None


@dataclass(frozen=True)
class Suggestion:
    """A label given to a new image by its nearest labeled neighbours."""

    image_id: int
    relpath: str
    label: str
    confidence: float


# -- names ------------------------------------------------------------------------------------


def validate_name(name: object) -> str:
    """Return the stored form of a label name, or raise `InvalidLabelName` saying why.

    The rules are in the module docstring: NFC, trimmed, non-empty, at most `MAX_NAME_LENGTH`
    characters, no control characters. Path-like names (``a/b``, ``../x``) are accepted
    because a label is text; export turns names into safe folder names.

    Examples
    --------
    >>> validate_name("  T-shirts ")
    'T-shirts'
    >>> validate_name("鞋子 👟")
    '鞋子 👟'
    """
    if not isinstance(name, str):
        raise InvalidLabelName(f"a label name must be text, not {type(name).__name__}")
    text = unicodedata.normalize("NFC", name).strip()
    if not text:
        raise InvalidLabelName("a label name cannot be empty or only whitespace")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            what = unicodedata.name(ch, f"U+{ord(ch):04X}")
            raise InvalidLabelName(
                f"label name {text!r} contains a control character ({what}); "
                "a name is one line of text"
            )
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidLabelName(
            f"label name is {len(text)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    return text


def name_key(name: str) -> str:
    """The form names are compared in: NFKC + casefold (Unicode's caseless identifier match)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


# -- sessions ---------------------------------------------------------------------------------


def start_session(
    ws: Workspace, run_id: int | None = None, *, actor: str = "cli", replace: bool = False
) -> int:
    """Start labeling from a clustering run: each cluster becomes a label ``cluster_NN``.

    Parameters
    ----------
    ws : Workspace
    run_id : int, optional
        The clustering run (`imgcluster.clustering.cluster`); the newest run if omitted.
    actor : str, default="cli"
        Who starts it (recorded in the audit log).
    replace : bool, default=False
        Start over although a session is active. The old session is kept (inactive) with
        its history if anyone did anything in it; an untouched one (only its start) is
        deleted, as it holds no decision.

    Returns
    -------
    int
        The new session id.

    Raises
    ------
    UnknownCluster
        If there is no such run (or no run at all).
    ImgclusterError
        If a session is already active and ``replace`` is False, so a stray click never
        hides an annotator's work.
    """
    actor = _actor(actor)
    with ws.transaction() as conn:
        if run_id is None:
            row = conn.execute("SELECT * FROM clusterings ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise UnknownCluster(
                    "no clustering run yet; cluster the images first (`imgcluster cluster`)"
                )
        else:
            row = conn.execute("SELECT * FROM clusterings WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise UnknownCluster(f"no clustering run with id {run_id}")
        run = dict(row)
        active = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        if active is not None and not replace:
            raise ImgclusterError(
                f"labeling session {active['id']} (from run {active['run_id']}, "
                f"{_n_steps(conn, active['id'])} "
                "operations) is active; continue it, or start over with replace=True "
                "(`--replace`): the old session is kept, inactive"
            )
        if active is not None and not _n_steps(conn, active["id"]):
            # Nothing was decided in it (the app restarts untouched labels on every k change):
            # drop it instead of keeping a copy of every image's row per k tried.
            conn.execute("DELETE FROM label_sessions WHERE id = ?", (active["id"],))
        conn.execute("UPDATE label_sessions SET active = 0 WHERE active = 1")
        sid = int(
            conn.execute(
                "INSERT INTO label_sessions(run_id, backbone, created_by) VALUES (?, ?, ?)",
                (run["id"], run["backbone"], actor),
            ).lastrowid
            or 0
        )
        members = conn.execute(
            "SELECT a.image_id, a.cluster FROM assignments AS a JOIN images AS i "
            "ON i.id = a.image_id WHERE a.run_id = ? AND i.status = 'ok' ORDER BY a.image_id",
            (run["id"],),
        ).fetchall()
        clusters = sorted(set(range(int(run["k"]))) | {int(m[1]) for m in members})
        width = max(2, len(str(clusters[-1]))) if clusters else 2
        rec = _Recorder(conn, sid)
        label_of = {c: rec.create_label(f"cluster_{c:0{width}d}", c) for c in clusters}
        rec.set_images({}, {int(m[0]): (label_of[int(m[1])], 0, "normal", None) for m in members})
        _record(
            conn,
            sid,
            actor,
            "start",
            f"start labeling from clustering run {run['id']} "
            f"({len(clusters)} labels, {len(members)} images)",
            {"run_id": run["id"]},
            rec,
            status=None,
        )
    return sid


def _n_steps(conn: sqlite3.Connection, sid: int) -> int:
    """Operations recorded in a session besides its start (undo/redo included)."""
    return int(
        conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE session_id = ? AND op != 'start'", (sid,)
        ).fetchone()[0]
    )


def active_session(ws: Workspace) -> Session | None:
    """The active labeling session, or None if labeling has not started."""
    with ws.read() as conn:
        row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
    return None if row is None else _session_from_row(row)


# -- reads ------------------------------------------------------------------------------------


def list_labels(ws: Workspace) -> list[LabelSummary]:
    """Every label of the active session with its counts, in creation order.

    One grouped query over the ``(session_id, label_id)`` index: milliseconds at 100k images.
    """
    with ws.read() as conn:
        session = _session(conn)
    _ensure_geometry(ws, session)
    with ws.read() as conn:
        rows = conn.execute(
            """
            SELECT l.id, l.name,
                   COUNT(m.image_id), COALESCE(SUM(m.confirmed), 0),
                   COALESCE(SUM(m.state = 'excluded'), 0), COALESCE(SUM(m.state = 'unsure'), 0),
                   COALESCE(SUM(m.poor_fit AND NOT m.confirmed AND m.state = 'normal'), 0)
            FROM labels AS l
            LEFT JOIN (
                SELECT il.* FROM image_labels AS il JOIN images AS i ON i.id = il.image_id
                WHERE il.session_id = ? AND i.status = 'ok'
            ) AS m ON m.label_id = l.id
            WHERE l.session_id = ? AND l.deleted_at IS NULL
            GROUP BY l.id ORDER BY l.id
            """,
            (session["id"], session["id"]),
        ).fetchall()
    return [LabelSummary(*(r[0], r[1]), *(int(v) for v in tuple(r)[2:])) for r in rows]


def label_images(
    ws: Workspace,
    label: int | str,
    *,
    offset: int = 0,
    limit: int = 60,
    order: str = "typicality",
) -> list[LabeledImage]:
    """One page of a label's images.

    Parameters
    ----------
    ws : Workspace
    label : str or int
        Name, id or ``"#id"``.
    offset, limit : int, default=0, 60
        The page.
    order : {"typicality", "misfit", "relpath"}, default="typicality"
        Most typical first (ascending distance to the label's centroid), worst fit first
        (ascending silhouette), or by path. Images without features come last.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} should be one of {ORDERS}")
    with ws.read() as conn:
        session = _session(conn)
        label_id = _label(conn, session["id"], label)["id"]
    _ensure_geometry(ws, session)
    args = (session["id"], label_id)
    with ws.read() as conn:
        if order == "relpath":
            rows = conn.execute(_page_sql(None), (*args, limit, offset)).fetchall()
            return [_labeled_image(r) for r in rows]
        # Images with a measure first, walking the (session, label, measure) index in order so
        # a page costs its own size; images without features follow, by path.
        rows = conn.execute(_page_sql(order), (*args, limit, offset)).fetchall()
        if len(rows) < limit:
            measured = len(rows) + offset
            if not rows and offset:
                measured = conn.execute(_count_sql(order), args).fetchone()[0]
            rows += conn.execute(
                _page_sql(order, measured=False),
                (*args, limit - len(rows), max(0, offset - measured)),
            ).fetchall()
    return [_labeled_image(r) for r in rows]


_MEASURE = {"typicality": "il.distance", "misfit": "il.silhouette"}


def _page_sql(order: str | None, *, measured: bool = True) -> str:
    """SQL of one page of a label (parameters: session, label, limit, offset)."""
    where = f"{_IMAGE_SELECT} WHERE il.session_id = ? AND il.label_id = ? AND i.status = 'ok'"
    if order is None:
        return f"{where} ORDER BY i.relpath LIMIT ? OFFSET ?"
    column = _MEASURE[order]
    if not measured:
        return f"{where} AND {column} IS NULL ORDER BY i.relpath LIMIT ? OFFSET ?"
    return f"{where} AND {column} IS NOT NULL ORDER BY {column}, il.image_id LIMIT ? OFFSET ?"


def _count_sql(order: str) -> str:
    return (
        "SELECT COUNT(*) FROM image_labels AS il JOIN images AS i ON i.id = il.image_id "
        "WHERE il.session_id = ? AND il.label_id = ? AND i.status = 'ok' "
        f"AND {_MEASURE[order]} IS NOT NULL"
    )


def misplaced(ws: Workspace, label: int | str | None = None, limit: int = 60) -> list[LabeledImage]:
    """Images that look misplaced: unconfirmed ``normal`` misfits, worst first.

    ``nearest_other`` of each names the label it looks more like (a one-click move target).
    With ``label=None`` across all labels.
    """
    with ws.read() as conn:
        session = _session(conn)
        label_id = None if label is None else _label(conn, session["id"], label)["id"]
    _ensure_geometry(ws, session)
    where = "il.session_id = ? AND i.status = 'ok' AND il.poor_fit = 1 AND il.confirmed = 0 "
    where += "AND il.state = 'normal'"
    args: list[Any] = [session["id"]]
    if label_id is not None:
        where += " AND il.label_id = ?"
        args.append(label_id)
    with ws.read() as conn:
        rows = conn.execute(
            f"{_IMAGE_SELECT} WHERE {where} ORDER BY il.silhouette, il.image_id LIMIT ?",
            (*args, limit),
        ).fetchall()
    return [_labeled_image(r) for r in rows]


def nearest_neighbours(ws: Workspace, image: int | str, *, limit: int = 12) -> list[Neighbour]:
    """The images most similar to one image, most similar first, with their current labels.

    Similarity is the cosine of the session backbone's stored (L2-normalised) feature vectors,
    not of the clustering space: it answers "what does this photo look like" whatever k or
    preprocessing the labels came from. The image itself and its exact duplicates (same
    content hash, similarity 1) are left out: they say nothing new.

    Parameters
    ----------
    ws : Workspace
    image : int or str
        Image id, or path relative to the collection root.
    limit : int, default=12
        At most this many neighbours.

    Returns
    -------
    list of Neighbour
        Empty when the image has no features yet.

    Raises
    ------
    NoLabelSession
        Labeling has not started (the session names the backbone).
    UnknownImage
        No such usable image.

    Examples
    --------
    >>> [n.label for n in nearest_neighbours(ws, "fmnist_00012.png", limit=3)]  # doctest: +SKIP
    ['sandals', 'sandals', 'sneakers']
    """
    with ws.read() as conn:
        session = _session(conn)
        image_id = _resolve_images(conn, [image])[0]
    features = _session_features(ws, session)
    row = np.flatnonzero(features.image_ids == image_id)
    if not len(row) or limit <= 0:
        return []
    query = features.vectors[row[0]]
    similarity = features.vectors @ query
    own_sha = features.sha256s[row[0]]
    # The image and its duplicates are the best matches; take enough to drop them all.
    n_same = sum(1 for sha in features.sha256s if sha == own_sha)
    take = min(len(similarity), int(limit) + n_same)
    best = np.argpartition(-similarity, take - 1)[:take]
    best = best[np.lexsort((features.image_ids[best], -similarity[best]))]
    chosen = [int(r) for r in best if features.sha256s[r] != own_sha][: int(limit)]
    ids = [int(features.image_ids[r]) for r in chosen]
    with ws.read() as conn:
        labels = {
            int(r[0]): (int(r[1]), r[2])
            for r in _chunked_rows(
                conn,
                "SELECT il.image_id, l.id, l.name FROM image_labels AS il JOIN labels AS l "
                f"ON l.id = il.label_id WHERE il.session_id = {int(session['id'])} "
                "AND il.image_id IN ({})",
                ids,
            )
        }
    return [
        Neighbour(
            image_id=i,
            relpath=features.relpaths[r],
            sha256=features.sha256s[r],
            label=labels[i][1] if i in labels else None,
            similarity=float(similarity[r]),
            label_id=labels[i][0] if i in labels else None,
        )
        for i, r in zip(ids, chosen, strict=True)
    ]


def history(ws: Workspace, limit: int = 50, *, actor: str | None = None) -> list[HistoryEntry]:
    """Audit rows of the active session, newest first (optionally one actor's)."""
    with ws.read() as conn:
        session = _session(conn)
        sql = (
            "SELECT id, at, actor, op, kind, summary, status, target_id, "
            "json_array_length(changes, '$.images'), json_array_length(changes, '$.labels') "
            "FROM audit_log WHERE session_id = ?"
        )
        args: list[Any] = [session["id"]]
        if actor is not None:
            sql += " AND actor = ?"
            args.append(actor)
        rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
    return [HistoryEntry(*tuple(r)) for r in rows]


def current_labels(ws: Workspace) -> list[ExportRow]:
    """Every labeled usable image of the active session, by relative path (for export).

    ``cluster`` is the image's cluster in the session's clustering run (None for images
    added later). Excluded images are included with ``state="excluded"``; export skips them.
    """
    with ws.read() as conn:
        session = _session(conn)
        rows = conn.execute(
            """
            SELECT i.id, i.relpath, i.sha256, l.name, a.cluster, il.confirmed, il.state
            FROM image_labels AS il
            JOIN images AS i ON i.id = il.image_id
            JOIN labels AS l ON l.id = il.label_id
            LEFT JOIN assignments AS a ON a.run_id = ? AND a.image_id = il.image_id
            WHERE il.session_id = ? AND i.status = 'ok'
            ORDER BY i.relpath
            """,
            (session["run_id"], session["id"]),
        ).fetchall()
    return [ExportRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]


# -- operations -------------------------------------------------------------------------------


def rename(
    ws: Workspace,
    old: int | str,
    new: str,
    *,
    actor: str = "cli",
    expected: int | None = None,
) -> Applied:
    """Rename a label.

    Raises
    ------
    InvalidLabelName
        If ``new`` breaks the naming rules or another label already has that name (merge
        them instead).
    UnknownCluster
        If ``old`` names no label (e.g. someone renamed it meanwhile).
    """
    actor = _actor(actor)
    name = validate_name(new)
    with _operation(ws, expected) as (conn, sid):
        label = _label(conn, sid, old)
        other = _find_label(conn, sid, name)
        if other is not None and other["id"] != label["id"]:
            raise InvalidLabelName(
                f"a label named {other['name']!r} already exists; merge the two instead"
            )
        if name == label["name"]:
            return Applied(None, "rename", f"{name!r} already has that name", 0, (label["id"],))
        rec = _Recorder(conn, sid)
        rec.set_label(label["id"], (name, label["cluster"]))
        summary = f"rename {label['name']!r} to {name!r}"
        entry = _record(
            conn,
            sid,
            actor,
            "rename",
            summary,
            {"label": label["id"], "old": label["name"], "new": name},
            rec,
        )
    return Applied(entry, "rename", summary, 0, (label["id"],))


def merge(
    ws: Workspace,
    labels: Sequence[int | str],
    *,
    into: str | int | None = None,
    actor: str = "cli",
    expected: int | None = None,
) -> Applied:
    """Merge labels into one; the others are deleted, their images keep their flags.

    Parameters
    ----------
    labels : sequence of str or int
        Labels to merge.
    into : str or int, optional
        The result: an existing label (listed or not) receives the others; a new name renames
        the first listed label, which receives the others. Default: the first listed label.
    """
    actor = _actor(actor)
    with _operation(ws, expected) as (conn, sid):
        sources = _distinct([_label(conn, sid, ref) for ref in labels])
        if not sources:
            raise UnknownCluster("merge needs labels")
        target, new_name = sources[0], None
        if into is not None:
            found = _find_label(conn, sid, into)
            if found is not None:
                target = found
                if isinstance(into, str) and not into.strip().startswith("#"):
                    typed = validate_name(into)
                    new_name = typed if typed != found["name"] else None
            else:
                if not isinstance(into, str):
                    raise UnknownCluster(f"no label with id {into}")
                new_name = validate_name(into)
        others = [lab for lab in sources if lab["id"] != target["id"]]
        if not others:
            raise UnknownCluster(
                f"nothing to merge: give at least two different labels (got {target['name']!r})"
            )
        rec = _Recorder(conn, sid)
        other_ids = [lab["id"] for lab in others]
        before = _image_states(conn, sid, label_ids=other_ids)
        rec.set_images(before, {i: (target["id"], *b[1:]) for i, b in before.items()})
        for lab in others:
            rec.set_label(lab["id"], None)
        if new_name is not None:
            rec.set_label(target["id"], (new_name, target["cluster"]))
        final = new_name or target["name"]
        summary = (
            f"merge {', '.join(repr(lab['name']) for lab in sources)} into {final!r} "
            f"({len(before)} images)"
        )
        args = {"labels": other_ids, "into": target["id"], "name": final}
        entry = _record(conn, sid, actor, "merge", summary, args, rec)
    return Applied(entry, "merge", summary, len(before), (target["id"],))


def split(
    ws: Workspace,
    label: int | str,
    n: int,
    *,
    actor: str = "cli",
    seed: int = 0,
    expected: int | None = None,
) -> Applied:
    """Split a label into ``n`` by KMeans over its unconfirmed images.

    The largest group stays in the label; the others become new labels ``<name>_2`` ...
    ``<name>_n``. Confirmed and excluded images, and images without features, stay.

    Raises
    ------
    imgcluster.clustering.NotEnoughImages
        If fewer than ``n`` unconfirmed images with features are in the label.
    """
    from imgcluster.clustering import NotEnoughImages, fit_kmeans

    actor = _actor(actor)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n={n!r} should be an integer >= 2")
    for _attempt in range(_ATTEMPTS):
        with ws.read() as conn:
            session = _session(conn)
            sid = session["id"]
            lab = _label(conn, sid, label)
            snapshot = _image_states(conn, sid, label_ids=[lab["id"]])
        movable = [i for i, s in snapshot.items() if not s[1] and s[2] != "excluded"]
        ids, space = _space_rows(ws, session, movable)
        if len(ids) < n:
            raise NotEnoughImages(
                f"label {lab['name']!r} has {len(ids)} unconfirmed images with features; "
                f"cannot split it into {n}"
            )
        groups = fit_kmeans(space, int(n), seed=seed).labels
        with _operation(ws, expected) as (conn, sid2):
            if sid2 != sid or _image_states(conn, sid, label_ids=[lab["id"]]) != snapshot:
                continue
            lab = _label(conn, sid, lab["id"])
            rec = _Recorder(conn, sid)
            new_ids = [
                rec.create_label(_free_name(conn, sid, lab["name"], i), None)
                for i in range(2, int(n) + 1)
            ]
            after = {
                int(i): (new_ids[g - 1], *snapshot[int(i)][1:])
                for i, g in zip(ids.tolist(), groups.tolist(), strict=True)
                if g > 0
            }
            rec.set_images(snapshot, after)
            names = [lab["name"], *(_label(conn, sid, i)["name"] for i in new_ids)]
            summary = f"split {lab['name']!r} into {', '.join(map(repr, names))}"
            args = {"label": lab["id"], "n": int(n), "seed": seed, "new": new_ids}
            entry = _record(conn, sid, actor, "split", summary, args, rec)
            return Applied(entry, "split", summary, len(after), (lab["id"], *new_ids))
    raise StaleState(f"label {label!r} kept changing while it was being split; try again")


def move(
    ws: Workspace,
    images: Iterable[int | str],
    to_label: int | str,
    *,
    create: bool = True,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Move images to a label (created if it does not exist); they become confirmed.

    A move is a person's decision, so the images are marked confirmed; their state
    (excluded / unsure) is unchanged. Images added after the session started (no label yet)
    can be moved too.

    Parameters
    ----------
    images : iterable of int or str
        Image ids or paths relative to the collection root (absolute paths inside it work).
    to_label : str or int
        Target label; a new name creates it when ``create`` is True.
    expected : int or mapping, optional
        Session version of the caller's view, or ``{image: label it was shown in}`` (None =
        shown without a label). On any mismatch nothing moves and `StaleState` is raised.
    """
    actor = _actor(actor)
    with _operation(ws, _version(expected)) as (conn, sid):
        ids = _resolve_images(conn, images)
        if not ids:
            raise UnknownImage("no images given to move")
        if isinstance(expected, Mapping):
            _check_shown_labels(conn, sid, expected)
        rec = _Recorder(conn, sid)
        target = _find_label(conn, sid, to_label)
        created = target is None
        if target is None:
            if not create or not isinstance(to_label, str) or to_label.strip().startswith("#"):
                raise UnknownCluster(_no_label_message(conn, sid, to_label))
            target_id = rec.create_label(validate_name(to_label), None)
            target_name = validate_name(to_label)
        else:
            target_id, target_name = target["id"], target["name"]
        before = _image_states(conn, sid, image_ids=ids)
        after: dict[int, ImageState | None] = {}
        for i in ids:
            old = before.get(i)
            new: ImageState = (target_id, 1, old[2] if old else "normal", None)
            if old != new:
                after[i] = new
        rec.set_images(before, after)
        if not after and not created:
            return Applied(None, "move", f"already in {target_name!r}", 0, (target_id,))
        summary = f"move {_n_images(len(after))} to {target_name!r}" + (
            " (new label)" if created else ""
        )
        args = {"images": list(after), "to": target_id, "created": created}
        entry = _record(conn, sid, actor, "move", summary, args, rec)
    return Applied(entry, "move", summary, len(after), (target_id,))


def set_state(
    ws: Workspace,
    images: Iterable[int | str],
    state: str,
    *,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Mark images ``excluded`` (not exported), ``unsure`` (for review) or back to ``normal``.

    The label and confirmation are unchanged. ``expected`` works as in `move`.
    """
    if state not in STATES:
        raise ValueError(f"state={state!r} should be one of {STATES}")
    actor = _actor(actor)
    with _operation(ws, _version(expected)) as (conn, sid):
        ids = _resolve_images(conn, images)
        if isinstance(expected, Mapping):
            _check_shown_labels(conn, sid, expected)
        before = _image_states(conn, sid, image_ids=ids)
        unlabeled = [i for i in ids if i not in before]
        if unlabeled:
            raise UnknownImage(
                f"{_n_images(len(unlabeled))} ({_relpaths(conn, unlabeled)}) have no label in "
                "this session yet; move them to a label (or suggest labels) first"
            )
        after = {i: (b[0], b[1], state, b[3]) for i, b in before.items() if b[2] != state}
        if not after:
            return Applied(None, "set_state", f"already {state}", 0)
        rec = _Recorder(conn, sid)
        rec.set_images(before, after)
        summary = f"mark {_n_images(len(after))} {state}"
        entry = _record(
            conn, sid, actor, "set_state", summary, {"images": list(after), "state": state}, rec
        )
    return Applied(entry, "set_state", summary, len(after))


def confirm(
    ws: Workspace,
    label: int | str,
    *,
    actor: str = "cli",
    expected: int | Collection[int | str] | None = None,
) -> Applied:
    """Confirm a whole label: its ``normal`` images become confirmed (unsure ones stay open).

    ``expected`` may be the session version or the collection of images the label was shown
    with; if the label's members differ now, nothing is confirmed (`StaleState`).
    """
    actor = _actor(actor)
    with _operation(ws, _version(expected)) as (conn, sid):
        lab = _label(conn, sid, label)
        before = _image_states(conn, sid, label_ids=[lab["id"]])
        if expected is not None and not _is_int(expected):
            shown = set(_resolve_images(conn, expected))
            if shown != set(before):
                raise StaleState(
                    f"label {lab['name']!r} changed since it was shown ({len(before)} images "
                    f"now, {len(shown)} shown); look again before confirming"
                )
        after = {
            i: (b[0], 1, b[2], None) for i, b in before.items() if b[2] == "normal" and not b[1]
        }
        if not after:
            return Applied(None, "confirm", f"{lab['name']!r} has nothing to confirm", 0)
        rec = _Recorder(conn, sid)
        rec.set_images(before, after)
        summary = f"confirm {lab['name']!r} ({_n_images(len(after))})"
        entry = _record(conn, sid, actor, "confirm", summary, {"label": lab["id"]}, rec)
    return Applied(entry, "confirm", summary, len(after), (lab["id"],))


def delete_label(
    ws: Workspace, label: int | str, *, actor: str = "cli", expected: int | None = None
) -> Applied:
    """Delete an empty label (move or merge its images first)."""
    actor = _actor(actor)
    with _operation(ws, expected) as (conn, sid):
        lab = _label(conn, sid, label)
        count = conn.execute(
            "SELECT COUNT(*) FROM image_labels WHERE session_id = ? AND label_id = ?",
            (sid, lab["id"]),
        ).fetchone()[0]
        if count:
            raise ImgclusterError(
                f"label {lab['name']!r} still has {_n_images(count)}; move or merge them first"
            )
        rec = _Recorder(conn, sid)
        rec.set_label(lab["id"], None)
        summary = f"delete label {lab['name']!r}"
        entry = _record(conn, sid, actor, "delete", summary, {"label": lab["id"]}, rec)
    return Applied(entry, "delete", summary, 0, (lab["id"],))


def recluster_unconfirmed(
    ws: Workspace, n_new: int, *, seed: int = 0, actor: str = "cli"
) -> Applied:
    """Re-cluster the unconfirmed images around the existing labels plus ``n_new`` new ones.

    Every existing label with images is a fixed seed at its centroid (of its confirmed
    images if it has any, else of its ``normal`` images), so unconfirmed images that look like
    a labeled group join it; `imgcluster.clustering.kmeans_with_fixed_centroids` learns
    ``n_new`` more centroids, which become labels ``cluster_NN`` (numbers continue after the
    highest used). Confirmed and excluded images never change label, no label is removed,
    and the number of labels grows by exactly ``n_new``.
    """
    from imgcluster.clustering import kmeans_with_fixed_centroids

    actor = _actor(actor)
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral) or n_new < 0:
        raise ValueError(f"n_new={n_new!r} should be an integer >= 0")
    for _attempt in range(_ATTEMPTS):
        with ws.read() as conn:
            session = _session(conn)
            sid, version = session["id"], session["version"]
            states = _image_states(conn, sid)
            live = [r["id"] for r in _live_labels(conn, sid)]
        ids, space = _space_rows(ws, session, list(states))
        label_ids = np.array([states[i][0] for i in ids.tolist()], dtype=np.int64)
        confirmed = np.array([states[i][1] for i in ids.tolist()], dtype=bool)
        normal = np.array([states[i][2] == "normal" for i in ids.tolist()], dtype=bool)
        seeds, fixed = [], []
        for lab in live:
            mine = (label_ids == lab) & normal
            chosen = mine & confirmed if (mine & confirmed).any() else mine
            if chosen.any():
                seeds.append(lab)
                fixed.append(space[chosen].mean(axis=0))
        movable = ~confirmed & np.array(
            [states[i][2] != "excluded" for i in ids.tolist()], dtype=bool
        )
        if not movable.any():
            raise ImgclusterError("nothing to re-cluster: every image is confirmed or excluded")
        fixed_arr = np.array(fixed, np.float32).reshape(-1, space.shape[1])
        result = kmeans_with_fixed_centroids(space[movable], fixed_arr, int(n_new), seed=seed)
        with _operation(ws, None) as (conn, sid2):
            now = conn.execute(
                "SELECT version FROM label_sessions WHERE id = ?", (sid,)
            ).fetchone()[0]
            if sid2 != sid or now != version:
                continue
            rec = _Recorder(conn, sid)
            new_ids = _create_cluster_labels(conn, sid, rec, int(n_new))
            targets = [*seeds, *new_ids]
            after = {}
            for i, g in zip(ids[movable].tolist(), result.labels.tolist(), strict=True):
                old = states[i]
                new = (targets[g], 0, old[2], None)
                if new != old:
                    after[i] = new
            rec.set_images(states, after)
            summary = (
                f"re-cluster {int(movable.sum())} unconfirmed images: "
                f"{len(after)} changed label, {int(n_new)} new labels"
            )
            args = {"n_new": int(n_new), "seed": seed, "new": new_ids}
            entry = _record(conn, sid, actor, "recluster", summary, args, rec)
            return Applied(entry, "recluster", summary, len(after), tuple(new_ids))
    raise StaleState("labels kept changing while re-clustering; try again")


def suggest_for_new_images(ws: Workspace, *, k: int = 5, actor: str = "cli") -> list[Suggestion]:
    """Give images that have features but no label the label of their nearest neighbours.

    Neighbours are the ``k`` nearest confirmed ``normal`` images in the session's clustering
    space (all labeled ``normal`` images when nothing is confirmed yet); votes are weighted by
    inverse distance and ``confidence`` is the winning label's share. Suggested images are
    unconfirmed and keep their confidence until a person moves or confirms them.
    """
    actor = _actor(actor)
    for _attempt in range(_ATTEMPTS):
        with ws.read() as conn:
            session = _session(conn)
            sid, version = session["id"], session["version"]
            states = _image_states(conn, sid)
        ids, space = _space_rows(ws, session, None)
        id_list = ids.tolist()
        new_rows = np.array([i not in states for i in id_list], dtype=bool)
        if not new_rows.any():
            return []
        refs = np.array(
            [i in states and states[i][2] == "normal" and bool(states[i][1]) for i in id_list]
        )
        if not refs.any():
            refs = np.array([i in states and states[i][2] == "normal" for i in id_list])
        if not refs.any():
            raise ImgclusterError("no labeled images to suggest from; label some images first")
        ref_labels = np.array([states[i][0] for i in ids[refs].tolist()], dtype=np.int64)
        winners, confidences = _knn_vote(space[new_rows], space[refs], ref_labels, k)
        with _operation(ws, None) as (conn, sid2):
            now = conn.execute(
                "SELECT version FROM label_sessions WHERE id = ?", (sid,)
            ).fetchone()[0]
            if sid2 != sid or now != version:
                continue
            new_ids = ids[new_rows].tolist()
            after = {
                int(i): (int(w), 0, "normal", round(float(c), 4))
                for i, w, c in zip(new_ids, winners.tolist(), confidences.tolist(), strict=True)
            }
            rec = _Recorder(conn, sid)
            rec.set_images({}, after)
            summary = f"suggest labels for {_n_images(len(after))}"
            _record(conn, sid, actor, "suggest", summary, {"k": k}, rec)
            names = {r["id"]: r["name"] for r in _live_labels(conn, sid)}
            paths = dict(
                _chunked_rows(conn, "SELECT id, relpath FROM images WHERE id IN ({})", new_ids)
            )
            return [
                Suggestion(i, paths[i], names[after[i][0]], float(after[i][3] or 0.0))
                for i in new_ids
            ]
    raise StaleState("labels kept changing while suggesting; try again")


# -- undo / redo ------------------------------------------------------------------------------


def undo(ws: Workspace, *, actor: str = "cli") -> Applied:
    """Undo the actor's newest operation that is not undone yet.

    Raises
    ------
    NothingToUndo
        If the actor has no such operation in this session.
    StaleState
        If someone changed the same images or labels since; nothing is changed.
    """
    return _undo_redo(ws, _actor(actor), "undo")


def redo(ws: Workspace, *, actor: str = "cli") -> Applied:
    """Redo the actor's most recently undone operation (until they do something new)."""
    return _undo_redo(ws, _actor(actor), "redo")


def _undo_redo(ws: Workspace, actor: str, kind: str) -> Applied:
    with _operation(ws, None) as (conn, sid):
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
        labels = [(int(i), _label_state(b), _label_state(a)) for i, b, a in changes["labels"]]
        images = [(int(i), _image_state(b), _image_state(a)) for i, b, a in changes["images"]]
        if kind == "undo":  # write "before" over "after"
            labels = [(i, a, b) for i, b, a in labels]
            images = [(i, a, b) for i, b, a in images]
        _check_unchanged(conn, sid, row, kind, labels, images)
        rec = _Recorder(conn, sid)
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
        entry = _record(
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
    now_labels = _label_states(conn, [i for i, _, _ in labels])
    now_images = _image_states(conn, sid, image_ids=[i for i, _, _ in images])
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
        parts.append(f"{_n_images(len(bad_images))} ({_relpaths(conn, bad_images)})")
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
    used = _chunked_rows(
        conn,
        f"SELECT label_id, COUNT(*) FROM image_labels WHERE session_id = {int(sid)} "
        "AND label_id IN ({}) GROUP BY label_id",
        removed,
    )
    if used:
        names = dict(
            _chunked_rows(
                conn, "SELECT id, name FROM labels WHERE id IN ({})", [u[0] for u in used]
            )
        )
        detail = ", ".join(f"{names[u[0]]!r} ({_n_images(u[1])})" for u in used)
        raise StaleState(
            f"cannot {kind} “{row['summary']}”: it would remove label {detail}, which received "
            "other images since; move them out first. Nothing was changed"
        )


def _check_targets_live(
    conn: sqlite3.Connection, row: sqlite3.Row, kind: str, label_ids: set[int]
) -> None:
    """Refuse to put images back into a label that was deleted or merged away since."""
    gone = sorted(label_ids - set(_label_states(conn, sorted(label_ids))))
    if gone:
        names = [
            r[0] for r in _chunked_rows(conn, "SELECT name FROM labels WHERE id IN ({})", gone)
        ]
        raise StaleState(
            f"cannot {kind} “{row['summary']}”: it would put images back into "
            f"{', '.join(map(repr, names))}, deleted or merged away since; nothing was changed"
        )


# -- internals: sessions, lookups -------------------------------------------------------------


def _actor(actor: str | None) -> str:
    text = (actor or "").strip()
    return text or os.environ.get("USER") or "unknown"


def _session_from_row(row: sqlite3.Row) -> Session:
    return Session(
        id=int(row["id"]),
        run_id=int(row["run_id"]),
        backbone=row["backbone"],
        version=int(row["version"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
    )


def _session(conn: sqlite3.Connection) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
    if row is None:
        raise NoLabelSession(
            "labeling has not started in this workspace; start it from a clustering run "
            "(`imgcluster labels start`, or the app's Label page)"
        )
    return row


@contextlib.contextmanager
def _operation(ws: Workspace, expected: int | None) -> Iterator[tuple[sqlite3.Connection, int]]:
    """One write transaction on the active session, checking a version precondition."""
    with ws.transaction() as conn:
        session = _session(conn)
        if expected is not None and int(session["version"]) != int(expected):
            raise StaleState(
                f"the labels changed since this view was loaded (version {expected}, now "
                f"{session['version']}); reload and try again"
            )
        yield conn, int(session["id"])


def _live_labels(conn: sqlite3.Connection, sid: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM labels WHERE session_id = ? AND deleted_at IS NULL ORDER BY id", (sid,)
    ).fetchall()


def _find_label(conn: sqlite3.Connection, sid: int, ref: object) -> sqlite3.Row | None:
    """A live label by id, ``"#id"`` or name (case-insensitive), or None."""
    if _is_int(ref):
        return conn.execute(
            "SELECT * FROM labels WHERE id = ? AND session_id = ? AND deleted_at IS NULL",
            (int(ref), sid),
        ).fetchone()
    if not isinstance(ref, str):
        raise UnknownCluster(f"a label is named by text or id, not {type(ref).__name__}")
    text = unicodedata.normalize("NFC", ref).strip()
    if text.startswith("#") and text[1:].isdigit():
        return _find_label(conn, sid, int(text[1:]))
    return conn.execute(
        "SELECT * FROM labels WHERE session_id = ? AND name_key = ? AND deleted_at IS NULL",
        (sid, name_key(text)),
    ).fetchone()


def _label(conn: sqlite3.Connection, sid: int, ref: object) -> sqlite3.Row:
    row = _find_label(conn, sid, ref)
    if row is None:
        raise UnknownCluster(_no_label_message(conn, sid, ref))
    return row


def _no_label_message(conn: sqlite3.Connection, sid: int, ref: object) -> str:
    names = [r["name"] for r in _live_labels(conn, sid)]
    shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
    return f"no label {ref!r} in this session (renamed or merged since?); labels: {shown}"


def _distinct(rows: Iterable[sqlite3.Row]) -> list[sqlite3.Row]:
    seen: set[int] = set()
    out = []
    for row in rows:
        if row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    return out


def _free_name(conn: sqlite3.Connection, sid: int, base: str, i: int) -> str:
    """``<base>_<i>`` (then ``_<i>_2``...), within the length limit and not taken."""
    for extra in range(1000):
        suffix = f"_{i}" + (f"_{extra + 1}" if extra else "")
        name = base[: MAX_NAME_LENGTH - len(suffix)] + suffix
        if _find_label(conn, sid, name) is None:
            return name
    raise InvalidLabelName(f"no free name for part {i} of {base!r}")


def _create_cluster_labels(conn: sqlite3.Connection, sid: int, rec: _Recorder, n: int) -> list[int]:
    top = conn.execute(
        "SELECT COALESCE(MAX(cluster), -1) FROM labels WHERE session_id = ?", (sid,)
    ).fetchone()[0]
    ids = []
    c = int(top) + 1
    while len(ids) < n:
        name = f"cluster_{c:02d}"
        if _find_label(conn, sid, name) is None:
            ids.append(rec.create_label(name, c))
        c += 1
    return ids


def _resolve_images(conn: sqlite3.Connection, refs: Iterable[int | str]) -> list[int]:
    """Image ids (usable images only) for ids or collection-relative paths, in given order."""
    return list(dict.fromkeys(_resolve_image_map(conn, refs).values()))


def _resolve_image_map(conn: sqlite3.Connection, refs: Iterable[int | str]) -> dict[int | str, int]:
    """``{ref: image id}``; raises `UnknownImage` naming the references that match nothing."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    root_row = conn.execute("SELECT value FROM meta WHERE key = 'collection_root'").fetchone()
    root = Path(root_row[0]) if root_row else None
    numeric = [int(r) for r in refs if _is_int(r)]
    paths = {r: _normalise_relpath(str(r), root) for r in refs if not _is_int(r)}
    found_ids = {
        int(r[0])
        for r in _chunked_rows(
            conn, "SELECT id FROM images WHERE status = 'ok' AND id IN ({})", numeric
        )
    }
    found_paths = {
        r[1]: int(r[0])
        for r in _chunked_rows(
            conn,
            "SELECT id, relpath FROM images WHERE status = 'ok' AND relpath IN ({})",
            list(set(paths.values())),
        )
    }
    out: dict[int | str, int] = {}
    missing: list[str] = []
    for ref in refs:
        if _is_int(ref):
            if int(ref) in found_ids:
                out[ref] = int(ref)
            else:
                missing.append(f"#{int(ref)}")
        elif paths[ref] in found_paths:
            out[ref] = found_paths[paths[ref]]
        else:
            missing.append(str(ref))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UnknownImage(
            f"{_n_images(len(missing))} not in the workspace (paths are relative to the "
            f"collection root {root}): {shown}"
        )
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _version(expected: object) -> int | None:
    """The session-version part of an ``expected`` precondition (None for other kinds)."""
    return int(expected) if _is_int(expected) else None  # type: ignore[call-overload]


def _normalise_relpath(path: str, root: Path | None) -> str:
    if root is not None and os.path.isabs(path):
        with contextlib.suppress(ValueError):
            path = Path(path).resolve().relative_to(root.resolve()).as_posix()
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def _chunked_rows(conn: sqlite3.Connection, sql: str, values: Sequence[Any]) -> list[tuple]:
    out: list[tuple] = []
    values = list(values)
    for start in range(0, len(values), _SQL_CHUNK):
        chunk = values[start : start + _SQL_CHUNK]
        out.extend(tuple(r) for r in conn.execute(sql.format(",".join("?" * len(chunk))), chunk))
    return out


def _relpaths(conn: sqlite3.Connection, ids: Sequence[int], show: int = 3) -> str:
    rows = _chunked_rows(conn, "SELECT relpath FROM images WHERE id IN ({})", list(ids)[:show])
    return ", ".join(r[0] for r in rows) + (", ..." if len(ids) > show else "")


def _n_images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def _check_shown_labels(
    conn: sqlite3.Connection, sid: int, expected: Mapping[int | str, int | str | None]
) -> None:
    """Refuse if any image is no longer in the label the caller's view showed it in."""
    ids = _resolve_image_map(conn, list(expected))
    states = _image_states(conn, sid, image_ids=list(ids.values()))
    stale = []
    for ref, image_id in ids.items():
        shown, now = expected[ref], states.get(image_id)
        if shown is None or now is None:
            ok = shown is None and now is None
        else:
            label = _find_label(conn, sid, shown)
            ok = label is not None and label["id"] == now[0]
        if not ok:
            stale.append(image_id)
    if stale:
        raise StaleState(
            f"{_n_images(len(stale))} ({_relpaths(conn, stale)}) changed label since this view "
            "was loaded (someone else moved them); nothing was changed, reload and try again"
        )


# -- internals: state rows, recorder, audit ---------------------------------------------------


def _image_state(value: Sequence[Any] | None) -> ImageState | None:
    if value is None:
        return None
    return (int(value[0]), int(value[1]), str(value[2]), None if value[3] is None else value[3])


def _label_state(value: Sequence[Any] | None) -> LabelState | None:
    if value is None:
        return None
    return (str(value[0]), None if value[1] is None else int(value[1]))


def _image_states(
    conn: sqlite3.Connection,
    sid: int,
    *,
    image_ids: Sequence[int] | None = None,
    label_ids: Sequence[int] | None = None,
) -> dict[int, ImageState]:
    """Current image rows of the session (all, or of some images, or of some labels)."""
    cols = "image_id, label_id, confirmed, state, confidence"
    if image_ids is None and label_ids is None:
        rows = conn.execute(
            f"SELECT {cols} FROM image_labels WHERE session_id = ?", (sid,)
        ).fetchall()
    elif image_ids is not None:
        rows = _chunked_rows(
            conn,
            f"SELECT {cols} FROM image_labels WHERE session_id = {int(sid)} AND image_id IN ({{}})",
            list(image_ids),
        )
    else:
        rows = _chunked_rows(
            conn,
            f"SELECT {cols} FROM image_labels WHERE session_id = {int(sid)} AND label_id IN ({{}})",
            list(label_ids or []),
        )
    return {int(r[0]): (int(r[1]), int(r[2]), r[3], r[4]) for r in rows}


def _label_states(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, LabelState]:
    rows = _chunked_rows(
        conn,
        "SELECT id, name, cluster FROM labels WHERE deleted_at IS NULL AND id IN ({})",
        list(ids),
    )
    return {int(r[0]): (r[1], r[2]) for r in rows}


class _Recorder:
    """Applies row changes inside the open transaction and remembers before/after of each."""

    def __init__(self, conn: sqlite3.Connection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.labels: dict[int, list[LabelState | None]] = {}
        self.images: dict[int, list[ImageState | None]] = {}

    def create_label(self, name: str, cluster: int | None) -> int:
        cur = self.conn.execute(
            "INSERT INTO labels(session_id, name, name_key, cluster) VALUES (?, ?, ?, ?)",
            (self.sid, name, name_key(name), cluster),
        )
        label_id = int(cur.lastrowid or 0)
        self.labels[label_id] = [None, (name, cluster)]
        return label_id

    def set_label(self, label_id: int, after: LabelState | None) -> None:
        before = _label_states(self.conn, [label_id]).get(label_id)
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
                f"UPDATE labels SET deleted_at = {_NOW} WHERE id = ? AND deleted_at IS NULL",
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
        """Write ``after`` rows (None deletes); ``before`` must hold their current values."""
        upserts = [
            (self.sid, i, *a) for i, a in after.items() if a is not None and before.get(i) != a
        ]
        deletes = [(self.sid, i) for i, a in after.items() if a is None and i in before]
        self.conn.executemany(
            "INSERT INTO image_labels(session_id, image_id, label_id, confirmed, state, "
            "confidence) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(session_id, image_id) DO UPDATE "
            "SET label_id = excluded.label_id, confirmed = excluded.confirmed, "
            f"state = excluded.state, confidence = excluded.confidence, updated_at = {_NOW}",
            upserts,
        )
        self.conn.executemany(
            "DELETE FROM image_labels WHERE session_id = ? AND image_id = ?", deletes
        )
        for i, a in after.items():
            entry = self.images.setdefault(i, [before.get(i), None])
            entry[1] = a

    def payload(self) -> dict[str, list]:
        return {
            "labels": [[i, _json(b), _json(a)] for i, (b, a) in self.labels.items() if b != a],
            "images": [[i, _json(b), _json(a)] for i, (b, a) in self.images.items() if b != a],
        }


def _json(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def _record(
    conn: sqlite3.Connection,
    sid: int,
    actor: str,
    op: str,
    summary: str,
    args: dict[str, Any],
    rec: _Recorder,
    *,
    kind: str = "do",
    target: int | None = None,
    status: str | None = "done",
) -> int:
    """Append the audit row and bump the session version (geometry becomes stale)."""
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


# -- internals: feature space and geometry ----------------------------------------------------

_IMAGE_SELECT = """
    SELECT il.image_id, i.relpath, i.sha256, l.name, il.confirmed, il.state, il.distance,
           il.silhouette,
           (il.poor_fit AND NOT il.confirmed AND il.state = 'normal') AS misfit,
           il.label_id, il.confidence, alt.name AS nearest_other
    FROM image_labels AS il
    JOIN images AS i ON i.id = il.image_id
    JOIN labels AS l ON l.id = il.label_id
    LEFT JOIN labels AS alt ON alt.id = il.alt_label_id AND alt.deleted_at IS NULL
"""


def _labeled_image(r: sqlite3.Row) -> LabeledImage:
    return LabeledImage(
        image_id=int(r[0]),
        relpath=r[1],
        sha256=r[2],
        label=r[3],
        confirmed=bool(r[4]),
        state=r[5],
        distance=r[6],
        silhouette=r[7],
        misfit=bool(r[8]),
        label_id=int(r[9]),
        confidence=r[10],
        nearest_other=r[11],
    )


_features_lock = threading.Lock()
_features_cache: dict[tuple, Any] = {}


def _session_features(ws: Workspace, session: sqlite3.Row) -> FeatureMatrix:
    """The session backbone's stored vectors (`load_features`), memoised for one workspace.

    The key changes when vectors or images are added, so a stale matrix is never returned.
    """
    from imgcluster.features import load_features

    with ws.read() as conn:
        key = (
            str(ws.db_path),
            session["backbone"],
            *conn.execute(
                "SELECT COUNT(*), MAX(shard_id) FROM features WHERE backbone = ?",
                (session["backbone"],),
            ).fetchone(),
            *conn.execute("SELECT COUNT(*), MAX(updated_at) FROM images").fetchone(),
        )
    with _features_lock:
        features = _features_cache.get(key)
    if features is None:
        features = load_features(ws, session["backbone"])
        with _features_lock:
            _features_cache.clear()  # one workspace at a time is plenty; vectors are large
            _features_cache[key] = features
    return features


def _session_space(ws: Workspace, session: sqlite3.Row) -> tuple[np.ndarray, np.ndarray]:
    """Image ids and their points in the session run's clustering space (memoised)."""
    from imgcluster.clustering import DEFAULT_PREPROCESS, clustering_space

    with ws.read() as conn:
        run = conn.execute(
            "SELECT seed, params FROM clusterings WHERE id = ?", (session["run_id"],)
        ).fetchone()
    features = _session_features(ws, session)
    if not len(features):
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    params = json.loads(run["params"]) if run else {}
    preprocess = params.get("preprocess", DEFAULT_PREPROCESS)
    space = clustering_space(features, preprocess, seed=int(run["seed"]) if run else 0)
    return features.image_ids, space


def _space_rows(
    ws: Workspace, session: sqlite3.Row, image_ids: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The given images that have features (all with features if None), and their points."""
    ids, space = _session_space(ws, session)
    if image_ids is None:
        return ids, space
    wanted = np.asarray(image_ids, dtype=np.int64)
    rows = np.flatnonzero(np.isin(ids, wanted))
    return ids[rows], space[rows]


def _knn_vote(
    queries: np.ndarray, refs: np.ndarray, ref_labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-distance-weighted vote of the ``k`` nearest references for each query."""
    k = max(1, min(int(k), len(refs)))
    winners = np.empty(len(queries), np.int64)
    confidence = np.empty(len(queries), np.float64)
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    for start in range(0, len(queries), 2048):
        block = queries[start : start + 2048]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2 * block @ refs.T + ref_sq[None]
        nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
        for row, cols in enumerate(nearest):
            weights = 1.0 / (np.sqrt(np.maximum(d2[row, cols], 0.0)) + 1e-6)
            votes: dict[int, float] = {}
            for lab, w in zip(ref_labels[cols].tolist(), weights.tolist(), strict=True):
                votes[lab] = votes.get(lab, 0.0) + w
            best = max(votes, key=votes.__getitem__)
            winners[start + row] = best
            confidence[start + row] = votes[best] / sum(votes.values())
    return winners, confidence


def _ensure_geometry(ws: Workspace, session: sqlite3.Row) -> None:
    """Recompute distances / silhouettes / misfits if an operation made them stale."""
    with ws.read() as conn:
        row = conn.execute(
            "SELECT version, geometry_version FROM label_sessions WHERE id = ?", (session["id"],)
        ).fetchone()
    if row is None or row[0] == row[1]:
        return
    _refresh_geometry(ws, session, int(row[0]))


_NULL = -9.0  # stands for SQL NULL in the geometry array (distances, silhouettes are > -9)


def _refresh_geometry(ws: Workspace, session: sqlite3.Row, version: int) -> None:
    sid = session["id"]
    with ws.read() as conn:
        conn.row_factory = None  # plain tuples: 100k rows straight into one numpy array
        stored = conn.execute(
            f"SELECT image_id, label_id, state = 'normal', IFNULL(distance, {_NULL}), "
            f"IFNULL(margin, {_NULL}), IFNULL(silhouette, {_NULL}), poor_fit, "
            f"IFNULL(alt_label_id, {_NULL}) FROM image_labels WHERE session_id = ? "
            "ORDER BY image_id",
            (sid,),
        ).fetchall()
    if not stored:
        updates: list[tuple] = []
    else:
        raw = np.array(stored, dtype=np.float64)
        table = raw[:, :3].astype(np.int64)
        old = np.where(raw[:, 3:] == _NULL, np.nan, raw[:, 3:])
        ids, space = _space_rows(ws, session, table[:, 0])
        new = np.full((len(stored), 5), np.nan)
        new[:, 3] = 0
        if len(ids):
            rows = np.searchsorted(table[:, 0], ids)
            new[rows] = _geometry(space, table[rows, 1], table[rows, 2].astype(bool))
        updates = _changed_geometry(table[:, 0], old, new, sid)
    # Derived data: every reader computes the same values, so bumping the revision would only
    # invalidate caches for nothing.
    with ws.transaction(bump_revision=False) as conn:
        now = conn.execute("SELECT version FROM label_sessions WHERE id = ?", (sid,)).fetchone()
        if now is not None and now[0] == version:
            conn.executemany(
                "UPDATE image_labels SET distance = ?, margin = ?, silhouette = ?, "
                "poor_fit = ?, alt_label_id = ? WHERE session_id = ? AND image_id = ?",
                updates,
            )
            conn.execute(
                "UPDATE label_sessions SET geometry_version = ? WHERE id = ?", (version, sid)
            )


def _changed_geometry(
    image_ids: np.ndarray, old: np.ndarray, new: np.ndarray, sid: int
) -> list[tuple]:
    """UPDATE parameters for rows whose stored geometry differs from the new one."""
    same_nan = np.isnan(old) == np.isnan(new)
    close = np.isclose(np.nan_to_num(old), np.nan_to_num(new), rtol=0, atol=1e-5)
    changed = ~(same_nan & close).all(axis=1)
    out = []
    for row in np.flatnonzero(changed):
        d, m, s, poor, alt = new[row]
        out.append(
            (
                _opt(d),
                _opt(m),
                _opt(s),
                int(poor),
                None if np.isnan(alt) else int(alt),
                sid,
                int(image_ids[row]),
            )
        )
    return out


def _opt(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _geometry(space: np.ndarray, label_ids: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Per row: distance to own label centroid, margin, silhouette, misfit flag, nearest other
    label id (NaN where undefined).

    Centroids are means of each label's ``normal`` rows. The "other" side of the margin and
    the silhouette only counts labels with at least `MISFIT_MIN_LABEL_SIZE` normal images: a
    label of a few hand-picked images (say the two most typical of a group, moved out) sits
    right on its old group's centre, and comparing against it would flag the whole group.
    """
    from imgcluster.clustering import EXACT_SILHOUETTE_MAX_N, misfit_mask

    n = len(space)
    out = np.full((n, 5), np.nan)
    out[:, 3] = 0
    labels, inverse = np.unique(label_ids, return_inverse=True)
    counts = np.bincount(inverse[normal], minlength=len(labels))
    has = counts > 0
    if not has.any():
        return out
    # Sum each label's rows with one sparse product (np.add.at is ~10x slower at 100k rows).
    from scipy.sparse import csr_matrix

    rows_of = np.flatnonzero(normal)
    onehot = csr_matrix(
        (np.ones(len(rows_of), np.float32), (inverse[rows_of], rows_of)),
        shape=(len(labels), n),
    )
    sums = np.asarray(onehot @ space, dtype=np.float64)
    centroids = (sums[has] / counts[has, None]).astype(np.float32)
    col_of = np.full(len(labels), -1)
    col_of[has] = np.arange(int(has.sum()))
    dist = np.sqrt(_sq_dist(space, centroids))
    own_col = col_of[inverse]
    rows = np.arange(n)
    own = np.where(own_col >= 0, dist[rows, np.maximum(own_col, 0)], np.nan)
    out[:, 0] = own
    reference = counts >= MISFIT_MIN_LABEL_SIZE  # per label, see the docstring
    masked = dist.copy()
    masked[:, ~reference[has]] = np.inf
    masked[rows[own_col >= 0], own_col[own_col >= 0]] = np.inf
    other_col = masked.argmin(axis=1)
    other = masked[rows, other_col]
    defined = ~np.isnan(own) & np.isfinite(other)
    if not defined.any():
        return out
    margin = np.where(defined, other - own, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        silhouette = np.where(np.maximum(own, other) > 0, margin / np.maximum(own, other), 0.0)
    if int(normal.sum()) <= EXACT_SILHOUETTE_MAX_N:
        silhouette[normal] = _exact_silhouette(space[normal], inverse[normal], counts, reference)
    silhouette[~defined] = np.nan
    out[:, 1] = margin
    out[:, 2] = silhouette
    out[defined, 3] = misfit_mask(own[defined], margin[defined], silhouette[defined])
    out[defined, 4] = labels[np.flatnonzero(has)[other_col[defined]]]
    return out


def _exact_silhouette(
    x: np.ndarray, members: np.ndarray, counts: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Silhouette of each row of ``x`` (label index ``members``), the nearest other label
    chosen among ``reference`` labels only (NaN if there is none).

    With every label a reference this is `sklearn.metrics.silhouette_samples`: ``a`` is the
    mean distance to the other members of the own label (0 for a label of one, whose
    silhouette is 0), ``b`` the smallest mean distance to another label's members.
    """
    n, n_labels = len(x), len(counts)
    # Dense: at most EXACT_SILHOUETTE_MAX_N rows, and a BLAS product beats a sparse one here.
    onehot = np.zeros((n, n_labels))
    onehot[np.arange(n), members] = 1.0
    x64 = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    totals = np.empty((n, n_labels))
    for start in range(0, n, 1024):
        block = x64[start : start + 1024]
        d2 = sq[start : start + 1024, None] - 2.0 * (block @ x64.T) + sq[None]
        d = np.sqrt(np.maximum(d2, 0.0))
        d[np.arange(len(block)), np.arange(start, start + len(block))] = 0.0
        totals[start : start + 1024] = d @ onehot
    rows = np.arange(n)
    own_count = counts[members]
    a = totals[rows, members] / np.maximum(own_count - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = totals / counts[None, :]
    means[:, ~reference] = np.inf
    means[rows, members] = np.inf
    b = means.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(a, b), 0.0)
    s[own_count == 1] = 0.0
    s[~np.isfinite(b)] = np.nan
    return s


def _sq_dist(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    c_sq = np.einsum("ij,ij->i", c, c)
    out = np.empty((len(x), len(c)), np.float32)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2.0 * (block @ c.T) + c_sq[None]
        out[start : start + chunk] = np.maximum(d2, 0.0)
    return out
