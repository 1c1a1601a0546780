"""Read-only queries of the active labeling session: labels and counts, pages of a label,
misfits, neighbours, progress, export rows. Nothing here writes (issue 11 §3): the derived
geometry is kept current by the operations that move images (`imgcluster.labels.geometry`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgcluster.errors import InvalidParameter, UnknownLabel
from imgcluster.labels import geometry
from imgcluster.labels._store import (
    STATES,
    Rows,
    chunked_rows,
    image_states,
    label,
    resolve_images,
    session_from_row,
    session_row,
    session_rows,
)
from imgcluster.labels._store import (
    label_by_name as _label_by_name,
)
from imgcluster.labels.results import (
    ExportRow,
    ImageState,
    LabeledImage,
    LabelSummary,
    Neighbour,
    Progress,
    Session,
)
from imgcluster.workspace import Workspace

__all__ = [
    "ORDERS",
    "active_session",
    "current_labels",
    "label_arrays",
    "label_by_id",
    "label_by_name",
    "label_images",
    "list_labels",
    "misplaced",
    "nearest_neighbours",
    "next_label_to_review",
    "page_sql",
    "progress",
]

#: Orders of `label_images`.
ORDERS = ("typicality", "misfit", "relpath")

#: One image row of a grid, without its geometry (`_with_geometry` adds it from this
#: process's state: `imgcluster.labels.geometry`).
IMAGE_SELECT = """
    SELECT il.image_id, i.relpath, i.sha256, l.name, il.confirmed, il.state, il.label_id,
           il.confidence, il.by_hand
    FROM image_labels AS il
    JOIN image_catalog AS i ON i.id = il.image_id
    JOIN labels AS l ON l.id = il.label_id
"""


def active_session(workspace: Workspace) -> Session | None:
    """The active labeling session (with its `Session.n_edits`), or None before labeling."""
    with workspace.read() as conn:
        row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        return None if row is None else session_from_row(conn, row)


# -- labels and counts ------------------------------------------------------------------------


@dataclass
class _Flags:
    """The label counts that SQL gives (everything but misfits), of usable images only, and
    what they were computed from: cached on (database, session, images version, usable
    images), carried over a write by this process (`carry_counts`)."""

    key: tuple
    per_label: dict[int, list[int]]  # count, confirmed, excluded, unsure, 0, by hand, reviewed
    gone: list[tuple]  # labeled unusable images: label, confirmed, state, by hand, image id
    unusable: frozenset[int]  # ids of unusable images (missing or skipped files)


def _row_flags(state: ImageState) -> tuple[int, ...]:
    """One image row's contribution to its label's `_Flags` counts."""
    _label, confirmed, kind, _confidence, by_hand = state
    reviewed = bool(confirmed or by_hand or kind != "normal")
    return (1, int(confirmed), int(kind == "excluded"), int(kind == "unsure"), 0, by_hand, reviewed)


def _flag_counts(workspace: Workspace, conn: Any, session: Any) -> _Flags:
    ok = conn.execute("SELECT COUNT(*) FROM image_catalog WHERE status = 'ok'").fetchone()[0]
    sid = int(session["id"])
    key = (str(workspace.db_path), sid, int(session["images_version"]), ok)
    cached = geometry._CACHE.get("counts", key)
    if cached is not None:
        return cached
    # Without a per-row join (a join per image costs ~7 us, 0.7 s at 100k): flags of every
    # row (implicit start rows included), then the rows of unusable images (few, from the
    # status index) taken out.
    rows = session_rows(conn, sid)
    per_label = _per_label(rows)
    unusable = frozenset(_unusable_ids(conn).tolist())
    pos, _found = rows.find(sorted(unusable))
    gone = [
        (lab, confirmed, STATES[state], by_hand, image)
        for image, lab, confirmed, state, by_hand in zip(
            rows.ids[pos].tolist(),
            rows.label[pos].tolist(),
            rows.confirmed[pos].astype(int).tolist(),
            rows.state[pos].tolist(),
            rows.by_hand[pos].astype(int).tolist(),
            strict=True,
        )
    ]
    for label_id, confirmed, kind, by_hand, _image in gone:
        c = per_label.get(int(label_id))
        if c is not None:
            flags = _row_flags((label_id, confirmed, kind, None, by_hand))
            per_label[int(label_id)] = [x - y for x, y in zip(c, flags, strict=True)]
    flags = _Flags(key, per_label, gone, unusable)
    _publish_flags(flags)
    return flags


def _per_label(rows: Rows) -> dict[int, list[int]]:
    """Per label: count, confirmed, excluded, unsure, 0, by hand, reviewed (one pass)."""
    labs, inverse = np.unique(rows.label, return_inverse=True)
    excluded = rows.state == STATES.index("excluded")
    unsure = rows.state == STATES.index("unsure")
    reviewed = rows.confirmed | rows.by_hand | (rows.state != 0)
    columns = [
        np.bincount(inverse, minlength=len(labs)),
        np.bincount(inverse, rows.confirmed, len(labs)),
        np.bincount(inverse, excluded, len(labs)),
        np.bincount(inverse, unsure, len(labs)),
        np.zeros(len(labs)),
        np.bincount(inverse, rows.by_hand, len(labs)),
        np.bincount(inverse, reviewed, len(labs)),
    ]
    table = np.stack(columns, axis=1).astype(np.int64) if len(labs) else np.zeros((0, 7))
    return {int(lab): [int(v) for v in row] for lab, row in zip(labs.tolist(), table, strict=True)}


def _publish_flags(flags: _Flags) -> None:
    geometry._CACHE.put("counts", flags.key, flags)
    geometry._CACHE.put("counts", ("latest", *flags.key[:2]), flags)


def carry_counts(
    workspace: Workspace,
    conn: Any,
    session: Any,
    before: Mapping[int, ImageState | None],
    after: Mapping[int, ImageState | None],
) -> _Flags | None:
    """The counts after a write of this process (image rows ``before`` -> ``after``, inside
    its transaction), from the counts cached before it: no GROUP BY over every row (0.3-1 s
    at 1M) for the label list that follows each move. None when nothing fits (the next list
    counts in SQL). Publish the result with `publish_counts` once committed."""
    sid = int(session["id"])
    old = geometry._CACHE.get("counts", ("latest", str(workspace.db_path), sid))
    if old is None or old.key[2] != int(session["images_version"]):
        return None
    if any(i in old.unusable for i in after):
        return None
    per_label = {lab: list(c) for lab, c in old.per_label.items()}
    for image_id, new in after.items():
        for sign, state in ((-1, before.get(image_id)), (1, new)):
            if state is not None:
                c = per_label.setdefault(int(state[0]), [0] * 7)
                for j, v in enumerate(_row_flags(state)):
                    c[j] += sign * v
    version = conn.execute(
        "SELECT images_version FROM label_sessions WHERE id = ?", (sid,)
    ).fetchone()[0]
    key = (old.key[0], sid, int(version), old.key[3])
    return _Flags(key, per_label, old.gone, old.unusable)


def publish_counts(flags: _Flags | None) -> None:
    """Make counts carried over a committed write the cached ones."""
    if flags is not None:
        _publish_flags(flags)


def _counts(workspace: Workspace, conn: Any, session: Any) -> dict[int, tuple[int, ...]]:
    """Per label: count, confirmed, excluded, unsure, misfits, by hand, reviewed. The SQL
    part is cached on (database, session, images version): a rename or a page view reuses
    it; misfits come from this process's geometry state."""
    flags = _flag_counts(workspace, conn, session)
    with geometry.reading(workspace, conn, session) as entry:
        misfits = dict(entry.misfit_counts())
        poor = entry.geometry_of([int(r[4]) for r in flags.gone])
    for label_id, confirmed, kind, _by_hand, image_id in flags.gone:
        flagged = poor.get(int(image_id), (None, None, False, None))[2]
        if flagged and not confirmed and kind == "normal" and int(label_id) in misfits:
            misfits[int(label_id)] -= 1
    out = {}
    for lab, c in flags.per_label.items():
        row = list(c)
        row[4] = misfits.get(lab, 0)
        out[lab] = tuple(row)
    return out


def list_labels(workspace: Workspace, *, include_empty: bool = False) -> list[LabelSummary]:
    """The labels of the active session with their counts, in creation order.

    Parameters
    ----------
    include_empty : bool, default=False
        Also list labels that hold no image (hidden by default: an empty label is no
        decision; `imgcluster.labels.delete_empty_labels` removes them).
    """
    with workspace.read() as conn:
        session = session_row(conn)
        counts = _counts(workspace, conn, session)
        labels = conn.execute(
            "SELECT id, name FROM labels WHERE session_id = ? AND deleted_at IS NULL ORDER BY id",
            (session["id"],),
        ).fetchall()
    out = []
    for lab_id, name in labels:
        c = counts.get(int(lab_id), (0,) * 7)
        if c[0] or include_empty:
            out.append(LabelSummary(int(lab_id), name, *c))
    return out


def label_by_id(workspace: Workspace, label_id: int) -> LabelSummary:
    """One label (with counts) by id. Raises `UnknownLabel`."""
    for summary in list_labels(workspace, include_empty=True):
        if summary.id == int(label_id):
            return summary
    raise UnknownLabel(f"no label with id {label_id} in this session (deleted or merged?)")


def label_by_name(workspace: Workspace, name: str) -> LabelSummary:
    """One label (with counts) by name, compared by the names' normal form (a name like
    ``#5`` is a name, never an id). Raises `UnknownLabel`."""
    with workspace.read() as conn:
        row = _label_by_name(conn, session_row(conn)["id"], name)
    if row is None:
        raise UnknownLabel(f"no label named {name!r} in this session (renamed or merged?)")
    return label_by_id(workspace, int(row["id"]))


def progress(workspace: Workspace) -> Progress:
    """Images reviewed (confirmed, moved by hand, excluded or marked unsure), confirmed and
    moved by hand, per label and in total (issue 12, "Getting to done")."""
    labels = tuple(list_labels(workspace))
    return Progress(
        images=sum(s.count for s in labels),
        reviewed=sum(s.reviewed for s in labels),
        confirmed=sum(s.confirmed for s in labels),
        by_hand=sum(s.by_hand for s in labels),
        excluded=sum(s.excluded for s in labels),
        unsure=sum(s.unsure for s in labels),
        labels=labels,
    )


def next_label_to_review(workspace: Workspace) -> LabelSummary | None:
    """The label with the most unreviewed images (ties: the older label), None when every
    image has been reviewed."""
    todo = [s for s in list_labels(workspace) if s.unreviewed > 0]
    return max(todo, key=lambda s: (s.unreviewed, -s.id)) if todo else None


# -- pages ------------------------------------------------------------------------------------


def label_images(
    workspace: Workspace,
    label_ref: int | str,
    *,
    offset: int = 0,
    limit: int = 60,
    order: str = "typicality",
    search: str | None = None,
) -> list[LabeledImage]:
    """One page of a label's images.

    Parameters
    ----------
    workspace : Workspace
    label_ref : str or int
        Label id (int) or name (str).
    offset, limit : int, default=0, 60
        The page.
    order : {"typicality", "misfit", "relpath"}, default="typicality"
        Most typical first (ascending distance to the label's centroid), worst fit first
        (ascending silhouette), or by path. Images without features come last.
    search : str, optional
        Only images whose path relative to the collection (file name or folder) contains this
        text, case-insensitively for ASCII.
    """
    if order not in ORDERS:
        raise InvalidParameter(f"order={order!r} should be one of {ORDERS}")
    offset, limit = max(0, int(offset)), max(0, int(limit))
    with workspace.read() as conn:
        session = session_row(conn)
        sid = int(session["id"])
        label_id = int(label(conn, sid, label_ref)["id"])
        extra, extra_args = _search_clause(search)
        members = session_rows(conn, sid).members(label_id)
        if order == "relpath":
            page = _by_relpath(conn, members, extra, extra_args)[offset : offset + limit]
            return _with_geometry(workspace, conn, session, _rows_by_id(conn, sid, page))
        with geometry.reading(workspace, conn, session) as entry:
            # Images with a measure first, in the state's order (an argsort of the label's
            # rows); SQL fetches only the page's rows, by primary key.
            measured = entry.ordered(label_id, order)
            in_state = entry.label_size(label_id)
        measured = measured[
            np.isin(
                measured,
                _usable_members(conn, members, extra, extra_args),
                invert=bool(not extra),
            )
        ]
        page = measured[offset : offset + limit].tolist()
        unmeasured = len(members) > in_state or in_state > len(measured) or bool(extra)
        if len(page) < limit and unmeasured:
            # Images without features (or an undefined measure) follow, by path.
            tail = np.asarray(_by_relpath(conn, members, extra, extra_args), np.int64)
            tail = tail[~np.isin(tail, measured)]
            start = max(0, offset - len(measured))
            page += tail[start : start + limit - len(page)].tolist()
        rows = _rows_by_id(conn, sid, page)
        return _with_geometry(workspace, conn, session, rows)


def _by_relpath(conn: Any, members: np.ndarray, extra: str, extra_args: tuple) -> list[int]:
    """The usable ones of ``members`` (matching the search clause ``extra``), by path: their
    paths by primary key, sorted here (a label of 50k images at 1M: ~0.1 s)."""
    found = chunked_rows(
        conn,
        "SELECT i.id, i.relpath FROM image_catalog AS i WHERE i.status = 'ok'"
        f"{extra} AND i.id IN ({{}})",
        members.tolist(),
        prefix=extra_args,
    )
    return [int(r[0]) for r in sorted(found, key=lambda r: (r[1], r[0]))]


def _usable_members(conn: Any, members: np.ndarray, extra: str, extra_args: tuple) -> np.ndarray:
    """With a search: the label's usable images that match it. Without: the label's images
    that are not usable (few; from the status index), to leave out."""
    if extra:
        return np.asarray(_by_relpath(conn, members, extra, extra_args), np.int64)
    unusable = _unusable_ids(conn)
    return unusable[np.isin(unusable, members)]


def _rows_by_id(conn: Any, sid: int, image_ids: list[int]) -> list[tuple]:
    """Grid rows of ``image_ids`` in that order (usable labeled images only): image id,
    relpath, sha256, label name, confirmed, state, label id, confidence, by hand."""
    if not image_ids:
        return []
    catalog = {
        int(r[0]): r
        for r in chunked_rows(
            conn,
            "SELECT id, relpath, sha256 FROM image_catalog WHERE status = 'ok' AND id IN ({})",
            image_ids,
        )
    }
    states = image_states(conn, sid, image_ids=list(catalog))
    names = dict(
        chunked_rows(
            conn,
            "SELECT id, name FROM labels WHERE id IN ({})",
            sorted({s[0] for s in states.values()}),
        )
    )
    out = []
    for i in image_ids:
        if i in catalog and i in states:
            lab, confirmed, kind, confidence, by_hand = states[i]
            _id, relpath, sha = catalog[i]
            out.append((i, relpath, sha, names.get(lab), confirmed, kind, lab, confidence, by_hand))
    return out


def _search_clause(search: str | None) -> tuple[str, tuple[str, ...]]:
    if not search or not search.strip():
        return "", ()
    escaped = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return " AND i.relpath LIKE ? ESCAPE '\\'", (f"%{escaped}%",)


def page_sql(order: str | None = None, *, extra: str = "") -> str:
    """SQL of one page of a label by path (parameters: session, label, [search], limit,
    offset). The other orders come from the geometry state (`label_images`).

    Public so tests can check its query plan.
    """
    if order is not None:
        raise InvalidParameter("only the relpath order is paged in SQL")
    where = f"{IMAGE_SELECT} WHERE il.session_id = ? AND il.label_id = ? AND i.status = 'ok'{extra}"
    return f"{where} ORDER BY i.relpath LIMIT ? OFFSET ?"


def _with_geometry(
    workspace: Workspace, conn: Any, session: Any, rows: list[Any]
) -> list[LabeledImage]:
    """Grid rows with their distance, silhouette, misfit flag and nearest other label."""
    if not rows:
        return []
    with geometry.reading(workspace, conn, session) as entry:
        geo = entry.geometry_of([int(r[0]) for r in rows])
    names = dict(
        conn.execute(
            "SELECT id, name FROM labels WHERE session_id = ? AND deleted_at IS NULL",
            (session["id"],),
        ).fetchall()
    )
    out = []
    for r in rows:
        distance, silhouette, poor, alt = geo.get(int(r[0]), (None, None, False, None))
        out.append(
            LabeledImage(
                image_id=int(r[0]),
                relpath=r[1],
                sha256=r[2],
                label=r[3],
                confirmed=bool(r[4]),
                state=r[5],
                distance=distance,
                silhouette=silhouette,
                misfit=bool(poor and not r[4] and r[5] == "normal"),
                label_id=int(r[6]),
                confidence=r[7],
                nearest_other=None if alt is None else names.get(alt),
                by_hand=bool(r[8]),
            )
        )
    return out


def misplaced(
    workspace: Workspace, label_ref: int | str | None = None, limit: int = 60
) -> list[LabeledImage]:
    """Images that look misplaced: unconfirmed ``normal`` misfits, worst first.

    ``nearest_other`` of each names the label it looks more like (a one-click move target).
    With ``label_ref=None`` across all labels.
    """
    with workspace.read() as conn:
        session = session_row(conn)
        sid = int(session["id"])
        label_id = None if label_ref is None else label(conn, sid, label_ref)["id"]
        with geometry.reading(workspace, conn, session) as entry:
            candidates = entry.misplaced(label_id).tolist()
        rows: list[Any] = []
        for start in range(0, len(candidates), max(int(limit), 1) * 2):
            if len(rows) >= limit:
                break
            chunk = _rows_by_id(conn, sid, candidates[start : start + max(int(limit), 1) * 2])
            rows += [r for r in chunk if not r[4] and r[5] == "normal"]
        return _with_geometry(workspace, conn, session, rows[: max(int(limit), 0)])


def nearest_neighbours(
    workspace: Workspace, image: int | str, *, limit: int = 12
) -> list[Neighbour]:
    """The images most similar to one image, most similar first, with their current labels.

    Similarity is the cosine of the session backbone's stored (L2-normalised) feature vectors,
    not of the clustering space: it answers "what does this photo look like" whatever k or
    preprocessing the labels came from. The image itself and its exact duplicates (same
    content hash, similarity 1) are left out: they say nothing new.

    Parameters
    ----------
    workspace : Workspace
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
    """
    with workspace.read() as conn:
        session = session_row(conn)
        image_id = resolve_images(conn, [image])[0]
    features = geometry.session_features(workspace, session["backbone"])
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
    with workspace.read() as conn:
        states = image_states(conn, int(session["id"]), image_ids=ids)
        names = dict(
            chunked_rows(
                conn,
                "SELECT id, name FROM labels WHERE id IN ({})",
                sorted({s[0] for s in states.values()}),
            )
        )
        labels = {i: (s[0], names[s[0]]) for i, s in states.items()}
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


def current_labels(
    workspace: Workspace, *, include_missing: bool = False, clusters: bool = True
) -> list[ExportRow]:
    """Every labeled usable image of the active session, by relative path (for export).

    ``cluster`` is the image's cluster in the session's clustering run (None for images
    added later). Excluded images are included with ``state="excluded"``; export skips them.
    With ``include_missing``, labeled images whose file ingest found gone are listed too,
    with ``status="missing"`` (export reports them with their label instead of dropping them).
    With ``clusters=False`` every ``cluster`` is None: the run's assignments are not read
    (a split preview needs only labels and hashes; at 1M images that read is a dict of 1M).
    """
    statuses = "('ok', 'missing')" if include_missing else "('ok')"
    with workspace.read() as conn:
        session = session_row(conn)
        assigned = _run_clusters(conn, session["run_id"]) if clusters else {}
        rows = _labeled_catalog(
            conn,
            int(session["id"]),
            "SELECT id, relpath, sha256, status FROM image_catalog AS i "
            f"WHERE i.status IN {statuses} ORDER BY i.relpath",
        )
    return [
        ExportRow(i, relpath, sha, name, assigned.get(i), bool(confirmed), state, status)
        for (i, relpath, sha, status), (name, confirmed, state) in rows
    ]


def _labeled_catalog(
    conn: Any, sid: int, sql: str, args: tuple = ()
) -> list[tuple[tuple, tuple[str, int, str]]]:
    """``(catalog row, (label name, confirmed, state))`` of the rows of ``sql`` (over
    ``image_catalog``, image id first, in its order) that the session labels."""
    catalog = conn.execute(sql, args).fetchall()
    rows = session_rows(conn, sid)
    ids = np.fromiter((r[0] for r in catalog), np.int64, len(catalog))
    pos, found = rows.find(ids)
    names = dict(conn.execute("SELECT id, name FROM labels WHERE session_id = ?", (sid,)))
    labels = [names.get(lab) for lab in rows.label[pos].tolist()]
    confirmed = rows.confirmed[pos].astype(int).tolist()
    states = [STATES[v] for v in rows.state[pos].tolist()]
    kept = [tuple(r) for r, hit in zip(catalog, found.tolist(), strict=True) if hit]
    return list(zip(kept, zip(labels, confirmed, states, strict=True), strict=True))


def _run_clusters(conn: Any, run_id: int) -> Mapping[int, int]:
    from imgcluster.clustering import run_assignments

    return run_assignments(conn, run_id)


#: SQL true for a relative path that would leave the collection (never produced by ingest):
#: absolute, holding a NUL, or with a ``..`` component. The same test as
#: `imgcluster.export.workspace_export`'s per-row one (a test holds them equal).
UNSAFE_RELPATH_SQL = (
    "(i.relpath LIKE '/%' OR instr(i.relpath, char(0)) > 0 "
    "OR ('/' || i.relpath || '/') LIKE '%/../%')"
)


@dataclass(frozen=True)
class LabelStateCount:
    """How many labeled images share one label, state, confirmed flag, image status and
    path safety (`label_state_counts`)."""

    label: str
    state: str
    confirmed: bool
    status: str
    unsafe: bool
    count: int


def label_state_counts(workspace: Workspace) -> list[LabelStateCount]:
    """Labeled images of the active session (usable and missing), counted by label, state,
    confirmed, image status and whether the path is unsafe (`UNSAFE_RELPATH_SQL`).

    What an export preview needs without a split: counts instead of one row per image (at
    1M images, the per-row `current_labels` is most of a 30 s preview). The counts come from
    the labels' covering index alone; the few images that are not usable or have an unsafe
    path (one pass over the images' paths, no join) are moved to their own groups. Raises
    `NoLabelSession` when labeling has not started.
    """
    with workspace.read() as conn:
        sid = int(session_row(conn)["id"])
        rows = session_rows(conn, sid)
        names = dict(conn.execute("SELECT id, name FROM labels WHERE session_id = ?", (sid,)))
        # One integer per (label, state, confirmed) group: label * 8 + state * 2 + confirmed.
        code = rows.label * 8 + rows.state.astype(np.int64) * 2 + rows.confirmed
        groups, n = np.unique(code, return_counts=True)
        totals = [
            (names[g // 8], STATES[(g % 8) // 2], g % 2, int(c))
            for g, c in zip(groups.tolist(), n.tolist(), strict=True)
        ]
        odd = [
            (name, state, confirmed, status, unsafe)
            for (_i, status, unsafe), (name, confirmed, state) in _labeled_catalog(
                conn,
                sid,
                f"SELECT i.id, i.status, {UNSAFE_RELPATH_SQL} FROM image_catalog AS i "
                f"WHERE i.status != 'ok' OR {UNSAFE_RELPATH_SQL}",
            )
        ]
    counts: Counter[tuple[str, str, bool, str, bool]] = Counter()
    for name, state, confirmed, n in totals:
        counts[(str(name), str(state), bool(confirmed), "ok", False)] += int(n)
    for name, state, confirmed, status, unsafe in odd:
        counts[(str(name), str(state), bool(confirmed), "ok", False)] -= 1
        if status in ("ok", "missing"):  # skipped images are no export's business
            counts[(str(name), str(state), bool(confirmed), str(status), bool(unsafe))] += 1
    return [LabelStateCount(*key, n) for key, n in sorted(counts.items()) if n > 0]


def labeled_hashes(
    workspace: Workspace, *, states: Sequence[str] = ("normal",), confirmed_only: bool = False
) -> list[tuple[str, str]]:
    """``(label, sha256)`` of the labeled usable images with a safe path whose state is one
    of ``states`` (confirmed ones only with ``confirmed_only``), in no particular order.

    What a split preview needs per image (the split keeps duplicates together by hash):
    two columns instead of an `ExportRow` with its cluster. Raises `NoLabelSession` when
    labeling has not started, `InvalidParameter` for an unknown state.
    """
    known = ("normal", "excluded", "unsure")  # `imgcluster.labels.STATES` (ops imports us)
    unknown = set(states) - set(known)
    if unknown:
        raise InvalidParameter(f"states {sorted(unknown)} should be among {known}")
    with workspace.read() as conn:
        sid = int(session_row(conn)["id"])
        rows = _labeled_catalog(
            conn,
            sid,
            "SELECT i.id, i.sha256 FROM image_catalog AS i "
            f"WHERE i.status = 'ok' AND NOT {UNSAFE_RELPATH_SQL}",
        )
    wanted = set(states)
    return [
        (str(name), str(sha))
        for (_i, sha), (name, is_confirmed, state) in rows
        if state in wanted and (is_confirmed or not confirmed_only)
    ]


def unusable_labels(workspace: Workspace) -> list[ExportRow]:
    """The labeled images export cannot write, by relative path: those whose file is missing
    and those whose path is unsafe (`UNSAFE_RELPATH_SQL`); few, listed with their label so
    a preview can name them. ``cluster`` is None."""
    with workspace.read() as conn:
        session = session_row(conn)
        rows = _labeled_catalog(
            conn,
            int(session["id"]),
            "SELECT i.id, i.relpath, i.sha256, i.status FROM image_catalog AS i "
            f"WHERE i.status = 'missing' OR (i.status = 'ok' AND {UNSAFE_RELPATH_SQL}) "
            "ORDER BY i.relpath",
        )
    return [
        ExportRow(i, relpath, sha, name, None, bool(confirmed), state, status)
        for (i, relpath, sha, status), (name, confirmed, state) in rows
    ]


def label_arrays(workspace: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids, label ids)`` of every labeled usable image of the active session, by
    image id: what the app's map, charts and suggested names group by, as two arrays (no
    Python object per image: 1M tuples cost seconds).

    Raises `NoLabelSession` when labeling has not started.
    """
    with workspace.read() as conn:
        session = session_row(conn)
        rows = session_rows(conn, int(session["id"]))
        unusable = _unusable_ids(conn)
        top = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM image_catalog").fetchone()[0])
    keep = (rows.ids <= top) & ~np.isin(rows.ids, unusable)
    return rows.ids[keep].astype(np.int64), rows.label[keep].astype(np.int64)


def _unusable_ids(conn: Any) -> np.ndarray:
    """Images that are not usable (skipped or missing): few, read from the status index."""
    return np.asarray(
        [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM image_catalog WHERE status IN ('skipped', 'missing')"
            )
        ],
        np.int64,
    )
