"""Internal lookups shared by the labels modules: the session row, labels by id or by name,
image references, chunked ``IN (...)`` queries, and the session's image rows (implicit start
rows merged with ``image_labels``: `session_rows`). Private: callers outside
`imgcluster.labels` use the public readers in `imgcluster.labels.queries`."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from imgcluster.errors import NoLabelSession, UnknownImage, UnknownLabel
from imgcluster.labels.names import name_key, normal_form
from imgcluster.labels.results import ImageState, LabelState, Session
from imgcluster.metrics import find_sorted
from imgcluster.workspace import read_collection_root

SQL_CHUNK = 900  # stay under SQLite's bound-variable limit on old builds
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

#: How often a computation done outside the write lock (split, re-cluster, suggest) is redone
#: when another writer changed the session meanwhile, before giving up with `StaleState`.
ATTEMPTS = 3


def session_row(conn: sqlite3.Connection) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
    if row is None:
        raise NoLabelSession(
            "labeling has not started in this workspace; start it from a clustering run "
            "(`imgcluster labels start`, or the app's Label page)"
        )
    return row


def n_steps(conn: sqlite3.Connection, sid: int) -> int:
    """Operations recorded in a session besides its start (undo/redo included)."""
    return int(
        conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE session_id = ? AND op != 'start'", (sid,)
        ).fetchone()[0]
    )


def session_from_row(conn: sqlite3.Connection, row: sqlite3.Row) -> Session:
    return Session(
        id=int(row["id"]),
        run_id=int(row["run_id"]),
        backbone=row["backbone"],
        version=int(row["version"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        n_edits=n_steps(conn, int(row["id"])),
    )


def live_labels(conn: sqlite3.Connection, sid: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM labels WHERE session_id = ? AND deleted_at IS NULL ORDER BY id", (sid,)
    ).fetchall()


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def find_label(conn: sqlite3.Connection, sid: int, ref: object) -> sqlite3.Row | None:
    """A live label by id (an int) or by name (a str, compared by `name_key`), or None.

    A string is always a name, even ``"#5"``: ids are ints (the CLI turns ``#ID`` into one).
    """
    if is_int(ref):
        return label_by_id(conn, sid, int(ref))  # type: ignore[call-overload]
    if not isinstance(ref, str):
        raise UnknownLabel(f"a label is named by text or id, not {type(ref).__name__}")
    return label_by_name(conn, sid, ref)


def label_by_id(conn: sqlite3.Connection, sid: int, label_id: int) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT * FROM labels WHERE id = ? AND session_id = ? AND deleted_at IS NULL",
        (int(label_id), sid),
    ).fetchone()


def label_by_name(conn: sqlite3.Connection, sid: int, name: str) -> sqlite3.Row | None:
    if not normal_form(name):
        return None
    return conn.execute(
        "SELECT * FROM labels WHERE session_id = ? AND name_key = ? AND deleted_at IS NULL",
        (sid, name_key(name)),
    ).fetchone()


def label(conn: sqlite3.Connection, sid: int, ref: object) -> sqlite3.Row:
    row = find_label(conn, sid, ref)
    if row is None:
        raise UnknownLabel(no_label_message(conn, sid, ref))
    return row


def no_label_message(conn: sqlite3.Connection, sid: int, ref: object) -> str:
    names = [r["name"] for r in live_labels(conn, sid)]
    shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
    what = f"with id {ref}" if is_int(ref) else repr(ref)
    return f"no label {what} in this session (renamed or merged since?); labels: {shown}"


def distinct(rows: Iterable[sqlite3.Row]) -> list[sqlite3.Row]:
    seen: set[int] = set()
    out = []
    for row in rows:
        if row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    return out


def resolve_images(conn: sqlite3.Connection, refs: Iterable[int | str]) -> list[int]:
    """Image ids (usable images only) for ids or collection-relative paths, in given order."""
    return list(dict.fromkeys(resolve_image_map(conn, refs).values()))


def resolve_image_map(conn: sqlite3.Connection, refs: Iterable[int | str]) -> dict[int | str, int]:
    """``{ref: image id}``; raises `UnknownImage` naming the references that match nothing."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    root = read_collection_root(conn)
    numeric = [int(r) for r in refs if is_int(r)]
    paths = {r: normalise_relpath(str(r), root) for r in refs if not is_int(r)}
    found_ids = {
        int(r[0])
        for r in chunked_rows(
            conn, "SELECT id FROM image_catalog WHERE status = 'ok' AND id IN ({})", numeric
        )
    }
    found_paths = {
        r[1]: int(r[0])
        for r in chunked_rows(
            conn,
            "SELECT id, relpath FROM image_catalog WHERE status = 'ok' AND relpath IN ({})",
            list(set(paths.values())),
        )
    }
    out: dict[int | str, int] = {}
    missing: list[str] = []
    for ref in refs:
        if is_int(ref):
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
            f"{n_images(len(missing))} not in the workspace (paths are relative to the "
            f"collection root {root}): {shown}"
        )
    return out


def normalise_relpath(path: str, root: Path | None) -> str:
    if root is not None and os.path.isabs(path):
        with contextlib.suppress(ValueError):
            path = Path(path).resolve().relative_to(root.resolve()).as_posix()
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def chunked_rows(
    conn: sqlite3.Connection, sql: str, values: Sequence[Any], *, prefix: Sequence[Any] = ()
) -> list[tuple]:
    """Rows of ``sql`` with its ``IN ({})`` list filled with ``values``, a chunk at a time
    (``prefix``: parameters that come before the list)."""
    out: list[tuple] = []
    values = list(values)
    for start in range(0, len(values), SQL_CHUNK):
        chunk = values[start : start + SQL_CHUNK]
        sql_chunk = sql.format(",".join("?" * len(chunk)))
        out.extend(tuple(r) for r in conn.execute(sql_chunk, (*prefix, *chunk)))
    return out


def relpaths(conn: sqlite3.Connection, ids: Sequence[int], show: int = 3) -> str:
    rows = chunked_rows(
        conn, "SELECT relpath FROM image_catalog WHERE id IN ({})", list(ids)[:show]
    )
    return ", ".join(r[0] for r in rows) + (", ..." if len(ids) > show else "")


def n_images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


# -- state rows -------------------------------------------------------------------------------

_STATE_COLUMNS = "image_id, label_id, confirmed, state, confidence, by_hand"


def image_state(value: Sequence[Any] | None) -> ImageState | None:
    """An audit-log image value as a state tuple (4-value rows predate ``by_hand``)."""
    if value is None:
        return None
    by_hand = int(value[4]) if len(value) > 4 else 0
    return (int(value[0]), int(value[1]), str(value[2]), value[3], by_hand)


def label_state(value: Sequence[Any] | None) -> LabelState | None:
    if value is None:
        return None
    return (str(value[0]), None if value[1] is None else int(value[1]))


def image_states(
    conn: sqlite3.Connection,
    sid: int,
    *,
    image_ids: Sequence[int] | None = None,
    label_ids: Sequence[int] | None = None,
) -> dict[int, ImageState]:
    """Current image rows of the session (all, or of some images, or of some labels),
    implicit start rows included (`session_rows`)."""
    base = session_base(conn, sid)
    if base is not None:
        if image_ids is not None:
            wanted = list(image_ids)
            found = base.states(wanted)
            found.update(_table_states(conn, sid, "image_id", wanted))  # changed rows win
            return found
        rows = session_rows(conn, sid)
        if label_ids is None:
            return rows.states()
        mask = np.isin(rows.label, np.asarray(list(label_ids), np.int64))
        return rows.states(np.flatnonzero(mask))
    if image_ids is None and label_ids is None:
        rows = conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM image_labels WHERE session_id = ?", (sid,)
        ).fetchall()
    else:
        column, values = (
            ("image_id", image_ids) if image_ids is not None else ("label_id", label_ids)
        )
        return _table_states(conn, sid, column, list(values or []))
    return {int(r[0]): (int(r[1]), int(r[2]), r[3], r[4], int(r[5])) for r in rows}


def _table_states(
    conn: sqlite3.Connection, sid: int, column: str, values: Sequence[int]
) -> dict[int, ImageState]:
    """``image_labels`` rows of the session whose ``column`` is one of ``values``."""
    rows = chunked_rows(
        conn,
        f"SELECT {_STATE_COLUMNS} FROM image_labels WHERE session_id = {int(sid)} "
        f"AND {column} IN ({{}})",
        list(values),
    )
    return {int(r[0]): (int(r[1]), int(r[2]), r[3], r[4], int(r[5])) for r in rows}


def label_states(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, LabelState]:
    rows = chunked_rows(
        conn,
        "SELECT id, name, cluster FROM labels WHERE deleted_at IS NULL AND id IN ({})",
        list(ids),
    )
    return {int(r[0]): (r[1], r[2]) for r in rows}


# -- implicit start rows ----------------------------------------------------------------------
#
# A session started from a run (``label_sessions.base`` set) keeps its start rows implicit:
# every image of the run, less those left out at the start, is ``(its cluster's label, 0,
# "normal", None, 0)`` until an operation changes it, and ``image_labels`` holds exactly the
# images whose row differs from that (or that the run did not hold). Starting labeling then
# writes no row per image (1M upserts cost ~10 s). Sessions with ``base`` NULL (started
# before) keep every row in ``image_labels``; everything below reads both alike.

STATES = ("normal", "excluded", "unsure")


@dataclass(frozen=True)
class Base:
    """The implicit start rows of a session: image ids (sorted) and their labels."""

    ids: np.ndarray
    labels: np.ndarray

    def find(self, image_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``image_ids`` in the base, and which of them are in it."""
        return find_sorted(self.ids, np.asarray(image_ids, np.int64))

    def states(self, image_ids: Sequence[int]) -> dict[int, ImageState]:
        """The implicit rows of those of ``image_ids`` the base holds."""
        wanted = np.asarray(list(image_ids), np.int64)
        pos, found = self.find(wanted)
        return {
            int(i): (int(lab), 0, "normal", None, 0)
            for i, lab in zip(wanted[found].tolist(), self.labels[pos].tolist(), strict=True)
        }


_bases: OrderedDict[tuple, Base] = OrderedDict()
_bases_lock = threading.Lock()


def base_json(run_id: int, labels: Mapping[int, int], left_out: Sequence[int]) -> str:
    """The ``label_sessions.base`` of a session started from run ``run_id`` (``labels``:
    cluster -> label id; ``left_out``: the run's images it does not label)."""
    return json.dumps(
        {
            "run_id": int(run_id),
            "labels": [[int(c), int(lab)] for c, lab in sorted(labels.items())],
            "left_out": [int(i) for i in left_out],
        },
        separators=(",", ":"),
    )


def session_base(conn: sqlite3.Connection, sid: int) -> Base | None:
    """The session's implicit start rows, or None when every row is in ``image_labels``.

    Memoised on the database and the base's own text (a run's assignments never change)."""
    row = conn.execute("SELECT base FROM label_sessions WHERE id = ?", (int(sid),)).fetchone()
    if row is None or row[0] is None:
        return None
    db = conn.execute("PRAGMA database_list").fetchone()[2]
    key = (db, int(sid), row[0])
    with _bases_lock:
        found = _bases.get(key)
    if found is not None:
        return found
    from imgcluster.runs import run_cluster_arrays

    spec = json.loads(row[0])
    ids, clusters = run_cluster_arrays(conn, int(spec["run_id"]))
    keep = ~np.isin(ids, np.asarray(spec["left_out"], np.int64))
    ids, clusters = ids[keep], clusters[keep]
    pairs = np.asarray(spec["labels"], np.int64).reshape(-1, 2)
    order = np.argsort(pairs[:, 0])
    keys, values = pairs[order, 0], pairs[order, 1]
    labels = values[np.searchsorted(keys, clusters)] if len(ids) else clusters
    base = Base(ids, labels.astype(np.int64))
    with _bases_lock:
        _bases[key] = base
        while len(_bases) > 4:
            _bases.popitem(last=False)
    return base


@dataclass(frozen=True)
class Rows:
    """Every image row of a session as arrays sorted by image id (implicit rows merged with
    ``image_labels``): what the readers count, page and export from."""

    ids: np.ndarray
    label: np.ndarray
    confirmed: np.ndarray  # bool
    state: np.ndarray  # int8 index into STATES
    confidence: np.ndarray  # float64, NaN = None
    by_hand: np.ndarray  # bool

    def find(self, image_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``image_ids`` that have a row, and which of them do."""
        return find_sorted(self.ids, np.asarray(image_ids, np.int64))

    def members(self, label_id: int) -> np.ndarray:
        """Image ids of one label (sorted)."""
        return self.ids[self.label == int(label_id)]

    def states(self, positions: np.ndarray | None = None) -> dict[int, ImageState]:
        """``{image id: state tuple}`` of the rows at ``positions`` (all if None)."""
        index: Any = slice(None) if positions is None else positions
        conf = self.confidence[index]
        confidences = [None if c != c else c for c in conf.tolist()]
        return {
            i: (lab, c, STATES[s], cf, b)
            for i, lab, c, s, cf, b in zip(
                self.ids[index].tolist(),
                self.label[index].tolist(),
                self.confirmed[index].astype(int).tolist(),
                self.state[index].tolist(),
                confidences,
                self.by_hand[index].astype(int).tolist(),
                strict=True,
            )
        }


def _table_rows(rows: list[tuple]) -> Rows:
    """`Rows` from ``image_labels`` tuples (image, label, confirmed, state, confidence, by
    hand), sorted by image id."""
    n = len(rows)
    ids = np.fromiter((r[0] for r in rows), np.int64, n)
    order = np.argsort(ids, kind="stable")
    code = {s: i for i, s in enumerate(STATES)}
    return Rows(
        ids=ids[order],
        label=np.fromiter((r[1] for r in rows), np.int64, n)[order],
        confirmed=np.fromiter((r[2] for r in rows), np.int64, n)[order].astype(bool),
        state=np.fromiter((code[r[3]] for r in rows), np.int8, n)[order],
        confidence=np.fromiter((np.nan if r[4] is None else r[4] for r in rows), np.float64, n)[
            order
        ],
        by_hand=np.fromiter((r[5] for r in rows), np.int64, n)[order].astype(bool),
    )


def session_rows(conn: sqlite3.Connection, sid: int) -> Rows:
    """Every image row of session ``sid`` as ``conn`` sees it (`Rows`)."""
    table = _table_rows(
        conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM image_labels WHERE session_id = ?", (int(sid),)
        ).fetchall()
    )
    base = session_base(conn, sid)
    if base is None:
        return table
    n = len(base.ids)
    merged = Rows(
        ids=base.ids,
        label=base.labels.copy(),
        confirmed=np.zeros(n, bool),
        state=np.zeros(n, np.int8),
        confidence=np.full(n, np.nan),
        by_hand=np.zeros(n, bool),
    )
    pos, found = merged.find(table.ids)
    for name in ("label", "confirmed", "state", "confidence", "by_hand"):
        getattr(merged, name)[pos] = getattr(table, name)[found]
    if found.all():
        return merged
    extra = ~found  # images the run did not hold (labeled later)
    ids = np.concatenate([merged.ids, table.ids[extra]])
    order = np.argsort(ids, kind="stable")
    return Rows(
        ids[order],
        *(
            np.concatenate([getattr(merged, name), getattr(table, name)[extra]])[order]
            for name in ("label", "confirmed", "state", "confidence", "by_hand")
        ),
    )
