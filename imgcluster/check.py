"""`imgcluster check`: is this workspace whole, and what to do if not.

Kept apart from `imgcluster.workspace` (which opens workspaces and refuses damaged ones) so the
checks can grow without crowding the store. Only `check(..., repair=True)` writes, and only
what loses nothing.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from imgcluster.errors import WorkspaceCorrupt
from imgcluster.images import ensure_thumbnail
from imgcluster.migrations import MIGRATIONS, SCHEMA_VERSION, split_sql
from imgcluster.workspace import (
    DB_NAME,
    Workspace,
    check_database_file,
    read_collection_root,
    short_reason,
)


@dataclass
class CheckReport:
    """What `check` found in a workspace: problems (each with what to do), and facts."""

    path: Path
    problems: list[str]
    facts: list[str]
    repaired: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def expected_schema() -> dict[str, set[str]]:
    """Table (or published view) -> column names of a workspace at `SCHEMA_VERSION`."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for _name, sql in MIGRATIONS:
            for statement in split_sql(sql):
                conn.execute(statement)
        return _schema(conn)
    finally:
        conn.close()


def _schema(conn: sqlite3.Connection) -> dict[str, set[str]]:
    tables = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master "
            "WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {t: {row[1] for row in conn.execute(f"PRAGMA table_info({t!r})")} for t in tables}


def check(path: str | os.PathLike[str], *, repair: bool = False) -> CheckReport:
    """Check a workspace without changing it (unless ``repair``), saying what to do.

    Runs SQLite's ``integrity_check`` and ``foreign_key_check``, compares the tables with this
    version's schema, and checks the workspace's own rules: usable images have a hash, size and
    thumbnail; the collection folder exists. ``repair=True`` only does what loses nothing:
    restores a lost schema version when every table matches (a ``.dump`` restore) and
    regenerates deleted thumbnails (`imgcluster.images.ensure_thumbnail`).
    """
    folder = Path(path).expanduser().resolve()
    db = folder / DB_NAME
    report = CheckReport(folder, [], [], [])
    if not db.is_file():
        report.problems.append(f"{db} does not exist: {folder} is not a workspace")
        return report
    try:
        check_database_file(db)
    except WorkspaceCorrupt as exc:
        report.problems.append(str(exc))
        return report
    try:
        conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True, isolation_level=None)
        try:
            _check_database(conn, report)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        report.problems.append(
            f"{db} cannot be read ({short_reason(exc)}): restore it from a backup (sqlite3's "
            "`.recover` may save part of it into a new file)"
        )
        return report
    if repair:
        _repair(folder, report)
    return report


def _check_database(conn: sqlite3.Connection, report: CheckReport) -> None:
    db = report.path / DB_NAME
    lines = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
    if lines != ["ok"]:
        report.problems.append(
            f"{db} is damaged ({'; '.join(lines[:3])}): restore it from a backup"
        )
        return
    report.facts.append("integrity_check: ok")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    have, want = _schema(conn), expected_schema()
    if version != SCHEMA_VERSION:
        if have == want:
            report.problems.append(
                f"schema version is {version} but every table matches version {SCHEMA_VERSION} "
                "(a `.dump` restore or a lowered user_version): run `imgcluster check "
                "--repair` to record the right version"
            )
        elif version < SCHEMA_VERSION and version > 0 and "images" in have:
            report.facts.append(f"schema version {version}: opening it upgrades it")
        else:
            report.problems.append(
                f"schema version {version} does not match its tables: restore from a backup"
            )
        return
    missing = sorted(set(want) - set(have))
    if missing:
        report.problems.append(f"tables missing: {', '.join(missing)}: restore from a backup")
        return
    violations = conn.execute("PRAGMA foreign_key_check").fetchall()
    if violations:
        report.problems.append(
            f"{len(violations)} rows point at rows that do not exist: restore from a backup"
        )
    _check_images(conn, report)


def _check_images(conn: sqlite3.Connection, report: CheckReport) -> None:
    conn.row_factory = sqlite3.Row
    rows = conn.execute(
        "SELECT relpath, sha256, width, height, format FROM image_catalog WHERE status = 'ok'"
    ).fetchall()
    bad = [r["relpath"] for r in rows if not (r["sha256"] and r["width"] and r["format"])]
    if bad:
        report.problems.append(
            f"{len(bad)} usable images lack a hash or size (e.g. {bad[0]!r}): run ingest again"
        )
    thumbs = report.path / "thumbs"
    no_thumb = sum(
        1
        for r in rows
        if r["sha256"] and not (thumbs / r["sha256"][:2] / f"{r['sha256']}.jpg").exists()
    )
    if no_thumb:
        report.problems.append(
            f"{no_thumb} thumbnails are missing: run `imgcluster check --repair` (or they are "
            "regenerated when shown)"
        )
    root = read_collection_root(conn)
    if root and not root.is_dir():
        report.problems.append(
            f"the image folder {root} is gone: if it moved, run `imgcluster relocate "
            "--workspace WS NEW_FOLDER`"
        )
    report.facts.append(f"{len(rows)} usable images")


def _repair(folder: Path, report: CheckReport) -> None:
    db = folder / DB_NAME
    if any("--repair` to record the right version" in p for p in report.problems):
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            conn.close()
        report.repaired.append(f"schema version set to {SCHEMA_VERSION}")
    if any("thumbnails are missing" in p for p in report.problems):
        ws = Workspace(folder)
        made = sum(
            1
            for img in ws.images("ok")
            if img.sha256
            and not ws.thumbnail_path(img.sha256).exists()
            and ensure_thumbnail(ws, img.sha256)
        )
        report.repaired.append(f"{made} thumbnails regenerated")
    if report.repaired:
        again = check(folder)
        report.problems, report.facts = again.problems, again.facts
