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

from imgcluster._process import job_lock
from imgcluster.errors import (
    Busy,
    ImgclusterError,
    InvalidPath,
    StorageFull,
    WorkspaceCorrupt,
    WorkspaceNotFound,
    WorkspaceReadOnly,
    WorkspaceVersionError,
)
from imgcluster.migrations import MIGRATIONS, SCHEMA_VERSION
from imgcluster.migrations import _apply_migrations as _apply_migrations
from imgcluster.migrations import _split_sql as _split_sql
from imgcluster.paths import DB_NAME, check_collection, plain_name

__all__ = ["DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "ImageRecord", "Workspace", "atomic_write"]


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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        read_only: bool | None = None,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.db_path = self.path / DB_NAME
        if self.path.exists() and not self.path.is_dir():
            raise InvalidPath(f"workspace path {self.path} exists and is not a folder")
        if not self.db_path.exists() and not create:
            raise WorkspaceNotFound(
                f"{self.path} is not an imgcluster workspace (no {DB_NAME}); "
                "create one with `imgcluster ingest IMAGE_DIR --workspace WS`"
            )
        if read_only is None:
            read_only = self.db_path.exists() and not _writable(self.path, self.db_path)
        #: Opened for browsing and export only (a read-only mount or folder): writes raise
        #: `WorkspaceReadOnly` saying edits are disabled.
        self.read_only = read_only
        if read_only:
            self._open_read_only()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with _creation_lock(self.path):
            if self.db_path.exists():
                _check_file(self.db_path)  # an existing database is never re-created
            else:
                _refuse_orphaned_files(self.path, self.db_path)
            for sub in ("features", "thumbs", "runs"):
                (self.path / sub).mkdir(exist_ok=True)
            self._migrate()

    def _open_read_only(self) -> None:
        _check_file(self.db_path)
        try:
            with self.read() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                conn.execute("SELECT COUNT(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise sqlite_error(self.db_path, exc) from None
        if version != SCHEMA_VERSION:
            raise WorkspaceVersionError(
                f"read-only workspace {self.path} has schema version {version}, this imgcluster "
                f"needs {SCHEMA_VERSION}; open it once where it can be written to upgrade it"
            )

    # -- connections -------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """Open a new connection (one per operation and thread; never cache it)."""
        if self.read_only:
            return self._connect_read_only()
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        # mode=ro reads a WAL database when its -shm can be made or already exists; on a
        # read-only mount neither holds, and immutable=1 (nothing can change it) is the way.
        uri = self.db_path.as_uri()
        conn = None
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(uri + query, uri=True, timeout=60, isolation_level=None)
            try:
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                break
            except sqlite3.OperationalError:
                conn.close()
                conn = None
        if conn is None:
            raise WorkspaceCorrupt(f"workspace database {self.db_path} cannot be read")
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    def require_writable(self) -> None:
        """Raise `WorkspaceReadOnly` when this workspace was opened read-only."""
        if self.read_only:
            raise WorkspaceReadOnly(
                f"workspace {self.path} is read-only (a read-only folder or mount): "
                "edits are disabled; browsing and export still work"
            )

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
        self.require_writable()
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
                # A failed COMMIT (disk full) may have rolled back already: keep its error.
                with contextlib.suppress(sqlite3.Error):
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
                if version < SCHEMA_VERSION:
                    _apply_migrations(conn, version, self.db_path)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise sqlite_error(self.db_path, exc) from None
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
        check_collection(resolved, self.path)
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
        if not self.read_only:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def uploads_dir(self) -> Path:
        """Where files uploaded through the app are saved; a workspace made from uploads has
        this folder as its collection root (it may take more uploads). Not created here."""
        return self.path / "uploads"

    @property
    def exports_dir(self) -> Path:
        """Where the app writes exports (one plain-named sub-folder each). Not created here."""
        return self.path / "exports"

    def export_dir(self, name: str) -> Path:
        """The export folder called ``name`` under `exports_dir`; ``name`` must be a plain
        folder name (letters, digits, ``._-``), never a path from the browser."""
        return self.exports_dir / plain_name(name, what="export name")

    @property
    def takes_uploads(self) -> bool:
        """Whether this workspace's collection is its own uploads folder."""
        return self.collection_root == self.uploads_dir

    def source_files(
        self, conn: sqlite3.Connection | None = None
    ) -> dict[str, tuple[str | None, str | None]]:
        """``relpath -> (absolute source path, stored format)`` of every image row, one query.

        The bulk form of `source_path` for readers of many images (the export preview at 100k
        images): the collection root is read once, on ``conn`` when the caller has one open,
        and each relpath is checked lexically (not absolute, no ``..``), never resolved, so no
        file is touched. Whoever opens a file checks what it finds (export verifies its hash).
        A relpath that would leave the collection maps to path None.
        """
        if conn is None:
            with self.read() as own:
                return self.source_files(own)
        row = conn.execute("SELECT value FROM meta WHERE key = 'collection_root'").fetchone()
        root = row[0].rstrip("/") if row else None
        files: dict[str, tuple[str | None, str | None]] = {}
        for relpath, fmt in conn.execute("SELECT relpath, format FROM images"):
            unsafe = (
                root is None
                or relpath.startswith("/")
                or "\0" in relpath
                or (".." in relpath and ".." in relpath.split("/"))
            )
            files[relpath] = (None if unsafe else f"{root}/{relpath}", fmt)
        return files


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


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _corrupt(db_path: Path, exc: BaseException) -> WorkspaceCorrupt:
    return WorkspaceCorrupt(
        f"workspace database {db_path} is damaged ({_reason(exc)}); it was not changed. "
        f"Run `imgcluster check --workspace {db_path.parent}` and restore it from a backup"
    )


def sqlite_error(db_path: Path, exc: sqlite3.DatabaseError) -> ImgclusterError:
    """The library error for an SQLite failure on ``db_path``: a full disk, a read-only file,
    or a damaged database (a raw `sqlite3` exception is never shown to people)."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError):
        if "full" in text or "i/o" in text:
            return StorageFull(
                f"cannot write {db_path} ({exc}: the disk is probably full); free some space "
                "and run the command again (every committed step is intact)"
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return WorkspaceReadOnly(
                f"cannot write {db_path} ({exc}): the workspace is read-only, edits are disabled"
            )
        if "locked" in text or "busy" in text:
            return Busy(f"{db_path} is busy ({exc}); another process holds it, try again")
    return _corrupt(db_path, exc)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _check_file(db_path: Path) -> None:
    """Refuse, from its header alone, a database file that is not a whole SQLite database.

    Opening an empty or foreign file with sqlite3 would silently make it a new empty database
    (the labels lost for good); a truncated one fails later with a raw "malformed" error.
    """
    try:
        size = db_path.stat().st_size
        with open(db_path, "rb") as fh:
            header = fh.read(100)
    except OSError as exc:
        raise WorkspaceCorrupt(
            f"workspace database {db_path} cannot be read ({(exc.strerror or '').lower()}); "
            "check its permissions"
        ) from None
    if size == 0:
        raise WorkspaceCorrupt(
            f"workspace database {db_path} is empty (0 bytes): it was truncated, and is not "
            "re-created over your labels; restore it from a backup, or move it away to start over"
        )
    if not header.startswith(_SQLITE_MAGIC) or len(header) < 100:
        raise WorkspaceCorrupt(
            f"workspace database {db_path} is not an SQLite database; restore it from a backup"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # the in-header size is current
    wal = db_path.with_name(db_path.name + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0  # a checkpoint may be half done
    if valid and pages and not pending and size < pages * page_size:
        raise WorkspaceCorrupt(
            f"workspace database {db_path} is truncated ({size:,} of {pages * page_size:,} "
            "bytes); restore it from a backup"
        )


def _refuse_orphaned_files(folder: Path, db_path: Path) -> None:
    """A folder with a workspace's thumbnails or vectors but no database lost its database:
    creating a new one there would pass for the old project with none of its labels."""
    for sub in ("thumbs", "features", "runs"):
        try:
            used = any((folder / sub).iterdir())
        except OSError:
            continue
        if used:
            raise WorkspaceCorrupt(
                f"{folder} holds a workspace's {sub}/ but its database {db_path.name} is gone; "
                "restore it from a backup, or use a new workspace folder"
            )


def _writable(folder: Path, db_path: Path) -> bool:
    """Whether this process may write the database and its folder (WAL needs both)."""
    try:
        fd = os.open(db_path, os.O_RDWR)
        os.close(fd)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _creation_lock(folder: Path) -> Iterator[None]:
    """Serialise creating and migrating a workspace between processes."""
    with job_lock(folder / ".create.lock", wait=120, what="opening the workspace"):
        yield


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


def read_collection_root(conn: sqlite3.Connection) -> Path | None:
    """`Workspace.collection_root` through the caller's open connection (e.g. inside its
    transaction), for modules that must not read the ``meta`` table with their own SQL."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'collection_root'").fetchone()
    return Path(row[0]) if row and row[0] else None


def delete_meta(conn: sqlite3.Connection, key: str) -> None:
    """Forget a ``meta`` key inside the caller's transaction (e.g. a feature set's cached
    fingerprint, dropped together with its vectors), for modules that must not write the
    ``meta`` table with their own SQL."""
    conn.execute("DELETE FROM meta WHERE key = ?", (key,))


# Public names for `imgcluster.check`.
check_database_file = _check_file
short_reason = _reason
split_sql = _split_sql


def images_version(workspace: Workspace) -> tuple[int, int, str]:
    """A fingerprint of the image list: (rows, largest id, latest change stamp).

    Ingest stamps ``updated_at`` on every image it adds or changes (content, status), so this
    changes with the images and not with label writes, which bump `Workspace.revision`: the
    app caches its id -> (relpath, sha256) table on it instead of re-reading every image
    after each move.
    """
    with workspace.read() as conn:
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(MAX(updated_at), '') FROM images"
        ).fetchone()
    return int(row[0]), int(row[1]), str(row[2])
