"""Read-only queries of the active labeling session: labels and counts, pages of a label,
misfits, neighbours, progress, export rows. Nothing here writes (issue 11 §3): the derived
geometry is kept current by the operations that move images (`imgcluster.labels.geometry`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgcluster.errors import InvalidParameter, UnknownLabel
from imgcluster.labels import geometry
from imgcluster.labels._store import (
    chunked_rows,
    label,
    resolve_images,
    session_from_row,
    session_row,
)
from imgcluster.labels._store import (
    label_by_name as _label_by_name,
)
from imgcluster.labels.results import (
    ExportRow,
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

_MEASURE = {"typicality": "g.distance", "misfit": "g.silhouette"}

IMAGE_SELECT = """
    SELECT il.image_id, i.relpath, i.sha256, l.name, il.confirmed, il.state, g.distance,
           g.silhouette,
           (COALESCE(g.poor_fit, 0) AND NOT il.confirmed AND il.state = 'normal') AS misfit,
           il.label_id, il.confidence, alt.name AS nearest_other, il.by_hand
    FROM image_labels AS il
    JOIN image_catalog AS i ON i.id = il.image_id
    JOIN labels AS l ON l.id = il.label_id
    LEFT JOIN label_geometry AS g
        ON g.session_id = il.session_id AND g.image_id = il.image_id AND g.label_id = il.label_id
    LEFT JOIN labels AS alt ON alt.id = g.alt_label_id AND alt.deleted_at IS NULL
"""


def active_session(workspace: Workspace) -> Session | None:
    """The active labeling session (with its `Session.n_edits`), or None before labeling."""
    with workspace.read() as conn:
        row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        return None if row is None else session_from_row(conn, row)


# -- labels and counts ------------------------------------------------------------------------


def _counts(workspace: Workspace, conn: Any, session: Any) -> dict[int, tuple[int, ...]]:
    """Per label: count, confirmed, excluded, unsure, misfits, by hand, reviewed. Cached on
    (database, session, images version): a rename or a page view reuses it."""
    ok = conn.execute("SELECT COUNT(*) FROM image_catalog WHERE status = 'ok'").fetchone()[0]
    key = (str(workspace.db_path), int(session["id"]), int(session["images_version"]), ok)
    cached = geometry._CACHE.get("counts", key)
    if cached is not None:
        return cached
    sid = int(session["id"])
    # Three queries without a per-row join (a join per image costs ~7 us, 0.7 s at 100k):
    # flags of every row, misfits among the few poor fits, and rows of unusable images.
    counts: dict[int, list[int]] = {}
    for r in conn.execute(
        """
        SELECT label_id, COUNT(*), SUM(confirmed), SUM(state = 'excluded'),
               SUM(state = 'unsure'), 0, SUM(by_hand),
               SUM(confirmed OR by_hand OR state != 'normal')
        FROM image_labels WHERE session_id = ? GROUP BY label_id
        """,
        (sid,),
    ):
        counts[int(r[0])] = [int(v or 0) for v in tuple(r)[1:]]
    for lab, n in conn.execute(
        """
        SELECT g.label_id, COUNT(*) FROM label_geometry AS g
        JOIN image_labels AS il ON il.session_id = g.session_id AND il.image_id = g.image_id
        WHERE g.session_id = ? AND g.poor_fit = 1 AND il.label_id = g.label_id
          AND il.confirmed = 0 AND il.state = 'normal'
        GROUP BY g.label_id
        """,
        (sid,),
    ):
        if int(lab) in counts:
            counts[int(lab)][4] = int(n)
    # Images labeled but no longer usable (missing or skipped files) do not count.
    for r in conn.execute(
        """
        SELECT il.label_id, il.confirmed, il.state, il.by_hand,
               COALESCE(g.poor_fit, 0)
        FROM image_catalog AS i
        CROSS JOIN image_labels AS il ON il.session_id = ? AND il.image_id = i.id
        LEFT JOIN label_geometry AS g
            ON g.session_id = il.session_id AND g.image_id = il.image_id
           AND g.label_id = il.label_id
        WHERE i.status IN ('skipped', 'missing')
        """,
        (sid,),
    ):
        c = counts.get(int(r[0]))
        if c is None:
            continue
        confirmed, state, by_hand, poor = int(r[1]), r[2], int(r[3]), int(r[4])
        c[0] -= 1
        c[1] -= confirmed
        c[2] -= state == "excluded"
        c[3] -= state == "unsure"
        c[4] -= bool(poor and not confirmed and state == "normal")
        c[5] -= by_hand
        c[6] -= bool(confirmed or by_hand or state != "normal")
    counts = {lab: tuple(c) for lab, c in counts.items()}  # type: ignore[misc]
    geometry._CACHE.put("counts", key, counts)
    return counts


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
    with workspace.read() as conn:
        session = session_row(conn)
        label_id = label(conn, session["id"], label_ref)["id"]
        extra, extra_args = _search_clause(search)
        args = (session["id"], label_id, *extra_args)
        if order == "relpath":
            rows = conn.execute(page_sql(None, extra=extra), (*args, limit, offset)).fetchall()
            return [_labeled_image(r) for r in rows]
        # Images with a measure first, walking the (session, label, measure) index in order so
        # a page costs its own size; images without features follow, by path.
        rows = conn.execute(page_sql(order, extra=extra), (*args, limit, offset)).fetchall()
        if len(rows) < limit:
            measured = len(rows) + offset
            if not rows and offset:
                measured = conn.execute(_count_sql(order, extra), args).fetchone()[0]
            rows += conn.execute(
                page_sql(order, measured=False, extra=extra),
                (*args, limit - len(rows), max(0, offset - measured)),
            ).fetchall()
    return [_labeled_image(r) for r in rows]


def _search_clause(search: str | None) -> tuple[str, tuple[str, ...]]:
    if not search or not search.strip():
        return "", ()
    escaped = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return " AND i.relpath LIKE ? ESCAPE '\\'", (f"%{escaped}%",)


def page_sql(order: str | None, *, measured: bool = True, extra: str = "") -> str:
    """SQL of one page of a label (parameters: session, label, [search], limit, offset).

    Public so tests can check its query plan walks an index (no sort of the whole label).
    """
    where = f"{IMAGE_SELECT} WHERE il.session_id = ? AND il.label_id = ? AND i.status = 'ok'{extra}"
    if order is None:
        return f"{where} ORDER BY i.relpath LIMIT ? OFFSET ?"
    column = _MEASURE[order]
    if not measured:
        return f"{where} AND {column} IS NULL ORDER BY i.relpath LIMIT ? OFFSET ?"
    # Walk label_geometry's (session, label, measure) index, then join the label row.
    return (
        f"SELECT g.image_id, i.relpath, i.sha256, l.name, il.confirmed, il.state, g.distance, "
        f"g.silhouette, (g.poor_fit AND NOT il.confirmed AND il.state = 'normal') AS misfit, "
        f"il.label_id, il.confidence, alt.name AS nearest_other, il.by_hand "
        f"FROM label_geometry AS g "
        f"JOIN image_labels AS il ON il.session_id = g.session_id AND il.image_id = g.image_id "
        f"AND il.label_id = g.label_id "
        f"JOIN image_catalog AS i ON i.id = g.image_id "
        f"JOIN labels AS l ON l.id = g.label_id "
        f"LEFT JOIN labels AS alt ON alt.id = g.alt_label_id AND alt.deleted_at IS NULL "
        f"WHERE g.session_id = ? AND g.label_id = ? AND i.status = 'ok'{extra} "
        f"AND {column} IS NOT NULL ORDER BY {column}, g.image_id LIMIT ? OFFSET ?"
    )


def _count_sql(order: str, extra: str = "") -> str:
    return (
        "SELECT COUNT(*) FROM label_geometry AS g "
        "JOIN image_labels AS il ON il.session_id = g.session_id AND il.image_id = g.image_id "
        "AND il.label_id = g.label_id JOIN image_catalog AS i ON i.id = g.image_id "
        f"WHERE g.session_id = ? AND g.label_id = ? AND i.status = 'ok'{extra} "
        f"AND {_MEASURE[order]} IS NOT NULL"
    )


def _labeled_image(r: Any) -> LabeledImage:
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
        by_hand=bool(r[12]),
    )


def misplaced(
    workspace: Workspace, label_ref: int | str | None = None, limit: int = 60
) -> list[LabeledImage]:
    """Images that look misplaced: unconfirmed ``normal`` misfits, worst first.

    ``nearest_other`` of each names the label it looks more like (a one-click move target).
    With ``label_ref=None`` across all labels.
    """
    with workspace.read() as conn:
        session = session_row(conn)
        label_id = None if label_ref is None else label(conn, session["id"], label_ref)["id"]
        where = "il.session_id = ? AND i.status = 'ok' AND g.poor_fit = 1 AND il.confirmed = 0 "
        where += "AND il.state = 'normal'"
        args: list[Any] = [session["id"]]
        if label_id is not None:
            where += " AND il.label_id = ?"
            args.append(label_id)
        rows = conn.execute(
            f"{IMAGE_SELECT} WHERE {where} ORDER BY g.silhouette, il.image_id LIMIT ?",
            (*args, limit),
        ).fetchall()
    return [_labeled_image(r) for r in rows]


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
        labels = {
            int(r[0]): (int(r[1]), r[2])
            for r in chunked_rows(
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


def current_labels(workspace: Workspace, *, include_missing: bool = False) -> list[ExportRow]:
    """Every labeled usable image of the active session, by relative path (for export).

    ``cluster`` is the image's cluster in the session's clustering run (None for images
    added later). Excluded images are included with ``state="excluded"``; export skips them.
    With ``include_missing``, labeled images whose file ingest found gone are listed too,
    with ``status="missing"`` (export reports them with their label instead of dropping them).
    """
    from imgcluster.clustering import run_assignments

    statuses = "('ok', 'missing')" if include_missing else "('ok')"
    with workspace.read() as conn:
        session = session_row(conn)
        clusters = run_assignments(conn, session["run_id"])
        rows = conn.execute(
            f"""
            SELECT i.id, i.relpath, i.sha256, l.name, il.confirmed, il.state, i.status
            FROM image_labels AS il
            JOIN image_catalog AS i ON i.id = il.image_id
            JOIN labels AS l ON l.id = il.label_id
            WHERE il.session_id = ? AND i.status IN {statuses}
            ORDER BY i.relpath
            """,
            (session["id"],),
        ).fetchall()
    return [
        ExportRow(r[0], r[1], r[2], r[3], clusters.get(int(r[0])), bool(r[4]), r[5], r[6])
        for r in rows
    ]
