"""The on-disk labeling project: one folder, one SQLite database, feature arrays, thumbnails.

A workspace is the single source of truth. Every change is one method call in one SQLite
transaction, so a browser refresh, a server restart or a killed process never loses a decision.
Connections are opened per operation (a `sqlite3.Connection` is tied to its thread), in WAL mode
so readers never block the writer, with a busy timeout so two processes can share one workspace.

Layout::

    WS/
      imgcluster.sqlite      images, features index, clusterings, labels, audit log
      features/<backbone>/   float32 .npy shards of L2-normalised vectors
      thumbs/ab/<sha256>.jpg one thumbnail per distinct image content
      runs/                  centroids and projections (.npy)
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imgcluster.errors import InvalidPath, WorkspaceNotFound, WorkspaceVersionError

DB_NAME = "imgcluster.sqlite"

#: Schema steps, applied in order, each once. The schema version is the number applied (stored in
#: ``PRAGMA user_version``). Append new steps; never edit a released one, so old workspaces migrate.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "images",
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        INSERT INTO meta(key, value) VALUES ('revision', '0');
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            relpath TEXT NOT NULL UNIQUE,
            sha256 TEXT,
            size INTEGER,
            mtime_ns INTEGER,
            width INTEGER,
            height INTEGER,
            format TEXT,
            status TEXT NOT NULL CHECK (status IN ('ok', 'skipped', 'missing')),
            skip_reason TEXT,
            duplicate_of INTEGER REFERENCES images(id) ON DELETE SET NULL,
            added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE INDEX images_sha256 ON images(sha256);
        CREATE INDEX images_status ON images(status);
        """,
    ),
    (
        "features",
        """
        CREATE TABLE feature_shards (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            file TEXT NOT NULL UNIQUE,
            n_rows INTEGER NOT NULL,
            dim INTEGER NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE features (
            backbone TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            shard_id INTEGER NOT NULL REFERENCES feature_shards(id) ON DELETE CASCADE,
            row INTEGER NOT NULL,
            PRIMARY KEY (backbone, sha256)
        ) WITHOUT ROWID;
        CREATE INDEX features_shard ON features(shard_id);
        """,
    ),
    (
        "clusterings",
        """
        CREATE TABLE clusterings (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            k INTEGER NOT NULL,
            algorithm TEXT NOT NULL,
            seed INTEGER NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            centroids_file TEXT,
            n_images INTEGER NOT NULL,
            seconds REAL NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE assignments (
            run_id INTEGER NOT NULL REFERENCES clusterings(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            cluster INTEGER NOT NULL,
            distance REAL NOT NULL,
            silhouette REAL,
            margin REAL,
            PRIMARY KEY (run_id, image_id)
        ) WITHOUT ROWID;
        CREATE INDEX assignments_cluster ON assignments(run_id, cluster, distance);
        CREATE TABLE projections (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            method TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            file TEXT NOT NULL,
            seconds REAL NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            UNIQUE (backbone, method, fingerprint)
        );
        """,
    ),
    (
        "labels",
        # Owned by imgcluster/labels.py. Labels are soft-deleted (deleted_at) so undo and redo
        # bring back the same id, and ids are never reused (AUTOINCREMENT), so a view holding
        # an id never meets another label under it; the audit log stores row-level
        # before/after for every change.
        """
        CREATE TABLE label_sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES clusterings(id),
            backbone TEXT NOT NULL,
            active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
            version INTEGER NOT NULL DEFAULT 0,
            geometry_version INTEGER NOT NULL DEFAULT -1,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE UNIQUE INDEX label_sessions_one_active ON label_sessions(active) WHERE active = 1;
        CREATE TABLE labels (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            name_key TEXT NOT NULL,
            cluster INTEGER,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            deleted_at TEXT
        );
        CREATE INDEX labels_session ON labels(session_id);
        CREATE UNIQUE INDEX labels_live_name ON labels(session_id, name_key)
            WHERE deleted_at IS NULL;
        CREATE TABLE image_labels (
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            label_id INTEGER NOT NULL REFERENCES labels(id),
            confirmed INTEGER NOT NULL DEFAULT 0 CHECK (confirmed IN (0, 1)),
            state TEXT NOT NULL DEFAULT 'normal'
                CHECK (state IN ('normal', 'excluded', 'unsure')),
            confidence REAL,
            distance REAL,
            margin REAL,
            silhouette REAL,
            poor_fit INTEGER NOT NULL DEFAULT 0,
            alt_label_id INTEGER,
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            PRIMARY KEY (session_id, image_id)
        ) WITHOUT ROWID;
        CREATE INDEX image_labels_label ON image_labels(session_id, label_id, distance);
        CREATE INDEX image_labels_fit ON image_labels(session_id, label_id, silhouette);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            actor TEXT NOT NULL,
            at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            op TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('do', 'undo', 'redo')),
            target_id INTEGER REFERENCES audit_log(id),
            status TEXT CHECK (status IN ('done', 'undone', 'dropped')),
            undo_seq INTEGER,
            summary TEXT NOT NULL,
            args TEXT NOT NULL DEFAULT '{}',
            changes TEXT NOT NULL
        );
        CREATE INDEX audit_log_stack ON audit_log(session_id, actor, status, id);
        """,
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class ImageRecord:
    """One row of the images table, as the rest of the library sees it."""

    id: int
    relpath: str
    sha256: str | None
    width: int | None
    height: int | None
    format: str | None
    status: str
    skip_reason: str | None
    duplicate_of: int | None


_IMAGE_COLUMNS = "id, relpath, sha256, width, height, format, status, skip_reason, duplicate_of"


class Workspace:
    """A labeling project on disk.

    Parameters
    ----------
    path : str or Path
        The workspace folder.
    create : bool, default=False
        Create the folder and database if missing. Without it, a folder that holds no
        database raises `WorkspaceNotFound`, so a typo never silently starts an empty project.

    Examples
    --------
    >>> ws = Workspace("/tmp/ws", create=True)          # doctest: +SKIP
    >>> ws.set_collection_root("sample_data")           # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.db_path = self.path / DB_NAME
        if not self.db_path.exists():
            if not create:
                raise WorkspaceNotFound(
                    f"{self.path} is not an imgcluster workspace (no {DB_NAME}); "
                    "create one with `imgcluster ingest IMAGE_DIR --workspace WS`"
                )
            if self.path.exists() and not self.path.is_dir():
                raise InvalidPath(f"workspace path {self.path} exists and is not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
        for sub in ("features", "thumbs", "runs"):
            (self.path / sub).mkdir(exist_ok=True)
        self._migrate()

    # -- connections -------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """Open a new connection (one per operation and thread; never cache it)."""
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads; closed on exit."""
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self, *, bump_revision: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic write: ``BEGIN IMMEDIATE`` takes the write lock up front, so two processes
        serialise instead of failing halfway with "database is locked"; the revision counter is
        bumped so cached readers keyed on it see the change. ``bump_revision=False`` is for
        derived data every reader would compute alike (invalidating caches would be waste)."""
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                if bump_revision:
                    conn.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            _enable_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise WorkspaceVersionError(
                        f"workspace {self.path} has schema version {version}, newer than this "
                        f"imgcluster's {SCHEMA_VERSION}; upgrade imgcluster to open it"
                    )
                for _name, sql in MIGRATIONS[version:]:
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    @property
    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- metadata ----------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @property
    def revision(self) -> int:
        """Bumped by every write; cache keys use ``(path, revision)``."""
        return int(self.get_meta("revision", "0") or 0)

    @property
    def collection_root(self) -> Path | None:
        """The folder of source images this project labels (only ever read)."""
        root = self.get_meta("collection_root")
        return Path(root) if root else None

    def set_collection_root(self, root: str | os.PathLike[str]) -> Path:
        """Record the image folder; a workspace labels exactly one collection."""
        resolved = Path(root).expanduser().resolve()
        if not resolved.is_dir():
            raise InvalidPath(f"image folder {resolved} does not exist or is not a folder")
        current = self.collection_root
        if current is not None and current != resolved:
            raise InvalidPath(
                f"workspace {self.path} already labels {current}; "
                f"use a new workspace for {resolved}"
            )
        if current is None:
            self.set_meta("collection_root", str(resolved))
        return resolved

    def source_path(self, relpath: str) -> Path:
        """Absolute path of an image, refusing any relative path that leaves the collection."""
        root = self.collection_root
        if root is None:
            raise InvalidPath("workspace has no image collection yet; ingest a folder first")
        try:
            candidate = (root / relpath).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
            raise InvalidPath(f"{relpath!r} cannot be resolved: {exc}") from exc
        if not candidate.is_relative_to(root):
            raise InvalidPath(f"{relpath!r} is outside the image collection {root}")
        return root / relpath

    # -- images ------------------------------------------------------------------------------

    def images(self, status: str | None = "ok") -> list[ImageRecord]:
        """Images sorted by relative path (the order feature rows follow)."""
        sql = f"SELECT {_IMAGE_COLUMNS} FROM images"
        args: tuple[str, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        with self.read() as conn:
            rows = conn.execute(sql + " ORDER BY relpath", args).fetchall()
        return [ImageRecord(**dict(row)) for row in rows]

    def image_by_relpath(self, relpath: str) -> ImageRecord | None:
        with self.read() as conn:
            row = conn.execute(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE relpath = ?", (relpath,)
            ).fetchone()
        return ImageRecord(**dict(row)) if row else None

    def image_counts(self) -> dict[str, int]:
        """Counts by status, plus ``duplicates`` (exact copies of another image)."""
        with self.read() as conn:
            counts = {
                row[0]: row[1]
                for row in conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status")
            }
            counts["duplicates"] = conn.execute(
                "SELECT COUNT(*) FROM images WHERE duplicate_of IS NOT NULL AND status = 'ok'"
            ).fetchone()[0]
        for key in ("ok", "skipped", "missing"):
            counts.setdefault(key, 0)
        return counts

    def skipped(self) -> list[tuple[str, str]]:
        """``(relpath, reason)`` for every file that could not be used."""
        with self.read() as conn:
            return [
                (row[0], row[1])
                for row in conn.execute(
                    "SELECT relpath, skip_reason FROM images WHERE status = 'skipped' "
                    "ORDER BY relpath"
                )
            ]

    # -- files -------------------------------------------------------------------------------

    def thumbnail_path(self, sha256: str) -> Path:
        """Where the thumbnail of a content hash lives (shared by exact duplicates)."""
        return self.path / "thumbs" / sha256[:2] / f"{sha256}.jpg"

    def features_dir(self, backbone: str) -> Path:
        folder = self.path / "features" / backbone
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through a temporary sibling and an atomic rename.

    A crash at any point leaves either the old file or the new one, never half of one.
    ``write`` receives the open temporary file (binary) to fill, e.g. ``np.save`` or
    ``Image.save(fh, format="JPEG")``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _enable_wal(conn: sqlite3.Connection, *, timeout: float = 60.0) -> None:
    """Switch the database to WAL, waiting out a second opener.

    Changing the journal mode needs an exclusive lock and SQLite reports "database is locked"
    at once instead of calling the busy handler, so two processes creating the same workspace
    at the same moment must retry here (seen in CI: two ingests started together).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (none of ours contain a literal ';')."""
    return [part.strip() for part in script.split(";") if part.strip()]
