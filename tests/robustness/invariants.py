"""What "no partial state" means for a workspace, checked on the real files.

Every robustness test ends by calling `problems(ws)` and asserting it is empty: the SQLite file
is intact, every image row is consistent with its status, and every stored vector points at a
shard file that exists, has the recorded shape and holds a unit vector at that row.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np

from imgcluster.labels._store import image_states
from imgcluster.labels.audit import started_images
from imgcluster.workspace import Workspace

#: A skip reason is "<kind>" or "<kind>: <detail>", the kind in plain lower-case words.
_REASON = re.compile(r"^[a-z][a-z0-9 ()_-]*(: .+)?$", re.DOTALL)


def problems(
    ws: Workspace, *, complete_features: str | None = None, thumbnails: bool = True
) -> list[str]:
    """Everything inconsistent in ``ws`` (empty list = consistent).

    Parameters
    ----------
    complete_features : str, optional
        A backbone whose vectors must exist for every usable image.
    thumbnails : bool, default=True
        Require a thumbnail file per usable image (synthetic workspaces have none).
    """
    found: list[str] = []
    with ws.read() as conn:
        found += _database(conn)
        found += _images(ws, conn, thumbnails)
        found += _features(ws, conn)
        if complete_features:
            found += _complete(conn, complete_features)
    return found


def _database(conn: sqlite3.Connection) -> list[str]:
    found = []
    check = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if check != ["ok"]:
        found.append(f"integrity_check: {check}")
    violations = conn.execute("PRAGMA foreign_key_check").fetchall()
    if violations:
        found.append(f"foreign_key_check: {[tuple(v) for v in violations][:5]}")
    return found


def _images(ws: Workspace, conn: sqlite3.Connection, thumbnails: bool) -> list[str]:
    found = []
    rows = conn.execute(
        "SELECT id, relpath, sha256, width, height, format, status, skip_reason, duplicate_of "
        "FROM images"
    ).fetchall()
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        where = f"image {row['relpath']!r} ({row['status']})"
        found += [f"{where}: {p}" for p in _row_problems(ws, row, thumbnails)]
        found += [f"{where}: {p}" for p in _duplicate_problems(row, by_id)]
    return found


def _row_problems(ws: Workspace, row: sqlite3.Row, thumbnails: bool) -> list[str]:
    """What is wrong with one image row for its status."""
    status, reason = row["status"], row["skip_reason"]
    if status == "skipped":
        ok = bool(reason) and bool(_REASON.match(reason))
        return [] if ok else [f"reason {reason!r} is not '<kind>: <detail>'"]
    if status == "missing":
        return [] if (reason or "").startswith("missing") else [f"reason {reason!r}"]
    if status != "ok":
        return ["unknown status"]
    found = []
    if not (row["sha256"] and row["format"] and row["width"] and row["height"]):
        found.append("ok without hash/format/size")
    elif row["width"] < 1 or row["height"] < 1:
        found.append(f"size {row['width']}x{row['height']}")
    elif thumbnails and not ws.thumbnail_path(row["sha256"]).is_file():
        found.append("no thumbnail")
    if reason is not None:
        found.append(f"ok with a skip reason {reason!r}")
    return found


def _duplicate_problems(row: sqlite3.Row, by_id: dict[int, sqlite3.Row]) -> list[str]:
    dup = row["duplicate_of"]
    if dup is None:
        return []
    original = by_id.get(dup)
    if row["status"] != "ok" or original is None or original["status"] != "ok":
        return [f"duplicate_of {dup} is not an ok image"]
    if original["sha256"] != row["sha256"] or dup >= row["id"]:
        return [f"duplicate_of {dup} has other content or a later id"]
    return []


def _features(ws: Workspace, conn: sqlite3.Connection) -> list[str]:
    found = []
    shards = conn.execute("SELECT id, backbone, file, n_rows, dim FROM feature_shards").fetchall()
    loaded: dict[int, np.ndarray] = {}
    for shard in shards:
        path = ws.path / shard["file"]
        where = f"shard {shard['file']}"
        if not path.is_file():
            found.append(f"{where}: file missing")
            continue
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            found.append(f"{where}: unreadable ({exc})")
            continue
        if array.shape != (shard["n_rows"], shard["dim"]) or array.dtype != np.float32:
            found.append(
                f"{where}: {array.shape} {array.dtype}, recorded "
                f"({shard['n_rows']}, {shard['dim']}) float32"
            )
            continue
        loaded[shard["id"]] = array
    for feat in conn.execute("SELECT backbone, sha256, shard_id, row FROM features"):
        array = loaded.get(feat["shard_id"])
        if array is None:
            found.append(f"vector {feat['sha256'][:12]}: shard {feat['shard_id']} unusable")
            continue
        if not 0 <= feat["row"] < len(array):
            found.append(f"vector {feat['sha256'][:12]}: row {feat['row']} of {len(array)}")
            continue
        norm = float(np.linalg.norm(array[feat["row"]]))
        # Unit length; an all-zero vector stays zero (`l2_normalize` never divides by zero).
        if not np.isfinite(norm) or (abs(norm - 1.0) > 1e-3 and norm != 0.0):
            found.append(f"vector {feat['sha256'][:12]}: norm {norm}")
    return found


def _complete(conn: sqlite3.Connection, backbone: str) -> list[str]:
    rows = conn.execute(
        """
        SELECT relpath FROM images AS i WHERE status = 'ok' AND NOT EXISTS (
            SELECT 1 FROM features AS f WHERE f.backbone = ? AND f.sha256 = i.sha256)
        """,
        (backbone,),
    ).fetchall()
    return [f"image {row[0]!r}: ok but no {backbone} vector" for row in rows]


def temp_files(ws: Workspace) -> list[Path]:
    """Leftovers of `atomic_write` interrupted by a kill (harmless, but counted)."""
    return sorted(ws.path.rglob(".*.tmp"))


def audit_mismatches(ws: Workspace) -> list[str]:
    """Where the active labeling session differs from a replay of its audit log.

    Every audit row stores the exact after-values of the label and image rows it changed, so
    applying them in id order must rebuild the current state. A half-applied operation (rows
    changed without their audit row, or the reverse) shows up here.
    """
    with ws.read() as conn:
        session = conn.execute("SELECT id FROM label_sessions WHERE active = 1").fetchone()
        if session is None:
            return []
        sid = session[0]
        labels: dict[int, tuple | None] = {}
        images: dict[int, tuple | None] = {}
        for (changes,) in conn.execute(
            "SELECT changes FROM audit_log WHERE session_id = ? ORDER BY id", (sid,)
        ):
            document = json.loads(changes)
            # A start names its image rows by reference to its run (`started_images`).
            images.update(started_images(conn, document))
            for label_id, _before, after in document["labels"]:
                labels[int(label_id)] = tuple(after) if after is not None else None
            for image_id, _before, after in document["images"]:
                images[int(image_id)] = tuple(after) if after is not None else None
        live = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT id, name, cluster FROM labels WHERE session_id = ? AND deleted_at IS NULL",
                (sid,),
            )
        }
        # The session's rows as the library reads them: ``image_labels`` merged over the
        # implicit start rows (only the images that differ from the start are stored).
        current = image_states(conn, sid)
    found = []
    replayed_labels = {i: v for i, v in labels.items() if v is not None}
    if replayed_labels != live:
        diff = set(replayed_labels.items()) ^ set(live.items())
        found.append(f"labels differ from the audit replay: {sorted(diff, key=str)[:5]}")
    replayed_images = {i: v for i, v in images.items() if v is not None}
    if replayed_images != current:
        ids = {
            i
            for i in replayed_images.keys() | current.keys()
            if replayed_images.get(i) != current.get(i)
        }
        sample = [(i, replayed_images.get(i), current.get(i)) for i in sorted(ids)[:5]]
        found.append(f"{len(ids)} image labels differ from the audit replay, e.g. {sample}")
    return found
