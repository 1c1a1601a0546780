"""Ingest: examine every file of a collection (read once, hash, decode, thumbnail) and store it.

One bad file is that file's problem: it is recorded with a reason and the batch goes on.
Source images are opened read-only and never written. The work is split so that the Ray
engine can run `examine_file` on a cluster and commit with the same functions
(`plan_ingest` -> `examine_file` -> `commit_examined` -> `finish_ingest`).

Decoding lives in `imgcluster.decode` and scanning in `imgcluster.scan`; their public names
are re-exported here, where the rest of the project has always imported them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISREG

from imgcluster._process import JobLock, acquire
from imgcluster.decode import (
    MAX_ASPECT_RATIO,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    THUMBNAIL_SIDE,
    DecodedImage,
    Progress,
    make_thumbnail,
    open_rgb,
    read_capped,
    square_thumbnail,
    to_rgb,
)
from imgcluster.decode import short_reason as _short
from imgcluster.errors import ImageRejected, InvalidPath, StorageFull, WorkspaceReadOnly
from imgcluster.paths import check_collection
from imgcluster.scan import (
    IMAGE_EXTENSIONS,
    NOT_SCANNED,
    ScannedFile,
    ScanResult,
    file_kind,
    scan,
    scan_collection,
)
from imgcluster.workspace import Workspace, atomic_write, sqlite_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "INGEST_LOCK",
    "MAX_ASPECT_RATIO",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "NOT_SCANNED",
    "THUMBNAIL_SIDE",
    "DecodedImage",
    "ExaminedFile",
    "ImageRejected",
    "IngestPlan",
    "IngestReport",
    "Progress",
    "RelocateReport",
    "ScanResult",
    "ScannedFile",
    "commit_examined",
    "ensure_thumbnail",
    "examine_file",
    "finish_ingest",
    "ingest",
    "make_thumbnail",
    "open_rgb",
    "plan_ingest",
    "read_capped",
    "relocate",
    "scan",
    "scan_collection",
    "square_thumbnail",
    "to_rgb",
    "write_thumbnail",
]


# -- examining one file -----------------------------------------------------------------------

#: Errors of the disk we write to: they stop the batch (one line), never count as a bad file.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS})


@dataclass(frozen=True)
class ExaminedFile:
    """The verdict on one file: its identity, and either its image facts or a skip reason.

    ``thumbnail`` holds the JPEG bytes still to be written (None once written, or for a bad
    file). Plain values only, so the Ray engine can ship it as a Parquet row.
    """

    relpath: str
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str | None = None
    thumbnail: bytes | None = None
    ctime_ns: int | None = None
    inode: int | None = None
    #: Same content as the stored row (decoding skipped); only the file's stat is refreshed.
    same: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


def examine_file(scanned: ScannedFile, *, known_sha256: str | None = None) -> ExaminedFile:
    """Read, hash, decode and thumbnail one file.

    Never raises for a bad file: every exception while reading or decoding it becomes its
    skip reason (``"decode error: <type>: <message>"`` for the unexpected ones). Only errors of
    the machine itself escape (out of memory for the process, KeyboardInterrupt).
    ``known_sha256``: the stored hash; when the content still has it, decoding is skipped.
    """
    try:
        return _examine(scanned, known_sha256)
    except ImageRejected as exc:
        return ExaminedFile(scanned.relpath, None, None, None, reason=exc.reason)
    except Exception as exc:
        reason = f"decode error: {type(exc).__name__}: {_short(exc)}"
        return ExaminedFile(scanned.relpath, None, None, None, reason=reason)


def _examine(scanned: ScannedFile, known_sha256: str | None) -> ExaminedFile:
    rel = scanned.relpath
    if scanned.problem:
        return ExaminedFile(rel, None, None, None, reason=scanned.problem)
    # Non-blocking: a file swapped for a FIFO since the scan must not hang the open. No-follow
    # when the scan saw a plain file: one swapped for a link since could point anywhere.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not scanned.link:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(scanned.path, flags)
    except OSError as exc:
        reason = f"unreadable: {(exc.strerror or _short(exc)).lower()}"
        return ExaminedFile(rel, None, None, None, reason=reason)
    try:
        stat = os.fstat(fd)
        ident = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        extra = {"ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
        if not S_ISREG(stat.st_mode):
            # A FIFO or device named like an image would block (or never end) when read.
            reason = f"not a regular file: {file_kind(stat.st_mode)} named like an image"
            return ExaminedFile(rel, None, **ident, reason=reason, **extra)
        if stat.st_size > MAX_FILE_BYTES:
            # Read whole into memory to hash and decode: cap it before reading, not after.
            reason = (
                f"file too large: {stat.st_size:,} bytes, more than the "
                f"{MAX_FILE_BYTES >> 20:,} MiB limit"
            )
            return ExaminedFile(rel, None, **ident, reason=reason, **extra)
        try:
            data = read_capped(fd)
        except OSError as exc:
            reason = f"unreadable: {(exc.strerror or _short(exc)).lower()}"
            return ExaminedFile(rel, None, **ident, reason=reason, **extra)
    finally:
        os.close(fd)
    sha = hashlib.sha256(data).hexdigest()
    if known_sha256 is not None and sha == known_sha256:
        return ExaminedFile(rel, sha, **ident, same=True, **extra)
    try:
        decoded = open_rgb(data, draft_size=(2 * THUMBNAIL_SIDE, 2 * THUMBNAIL_SIDE))
    except ImageRejected as exc:
        return ExaminedFile(rel, sha, **ident, reason=exc.reason, **extra)
    buf = io.BytesIO()
    make_thumbnail(decoded.image).save(buf, format="JPEG", quality=85)
    return ExaminedFile(
        rel,
        sha,
        **ident,
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        thumbnail=buf.getvalue(),
        **extra,
    )


def write_thumbnail(workspace: Workspace, examined: ExaminedFile) -> ExaminedFile:
    """Write ``examined``'s thumbnail (once per content) and return it without the bytes."""
    if examined.thumbnail is None or examined.sha256 is None:
        return examined
    path = workspace.thumbnail_path(examined.sha256)
    if not path.exists():
        data = examined.thumbnail
        atomic_write(path, lambda fh: fh.write(data))
    return replace(examined, thumbnail=None)


def ensure_thumbnail(workspace: Workspace, sha256: str) -> Path | None:
    """The thumbnail of a content hash, regenerated from its source if it was deleted.

    Returns None when no usable source with that content is left (changed, gone, unreadable)
    or the workspace cannot be written. Never raises for a bad file.
    """
    path = workspace.thumbnail_path(sha256)
    if path.is_file():
        return path
    with workspace.read() as conn:
        # `+status`: keep SQLite on the sha256 index (the status index matches nearly every
        # row, 0.15 s per call at 1M images; a grid asks for up to 48 at once).
        relpaths = [
            row[0]
            for row in conn.execute(
                "SELECT relpath FROM images WHERE sha256 = ? AND +status = 'ok' ORDER BY id",
                (sha256,),
            )
        ]
    for rel in relpaths:
        try:
            source = workspace.source_path(rel)
        except InvalidPath:
            continue
        examined = examine_file(ScannedFile(rel, source, link=source.is_symlink()))
        if examined.ok and examined.sha256 == sha256:
            try:
                write_thumbnail(workspace, examined)
            except OSError:
                return None
            return path
    return None


# -- ingest -----------------------------------------------------------------------------------


@dataclass
class IngestReport:
    """What an ingest did, for the CLI summary and the app.

    ``changed`` counts files whose content or verdict differs from the stored one; a file
    re-read with the same content (a ``touch``, a copy with new times) counts as unchanged.
    """

    found: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    missing: int = 0
    #: Directory entries not considered, by reason (other extensions, workspace folders, ...).
    ignored: Counter[str] = field(default_factory=Counter)
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)
    #: Leftover temporary files of a killed ingest removed at the start.
    cleaned: int = 0
    #: Files that came back (status missing -> ok); their labels are kept.
    returned: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_ignored(self) -> int:
        return sum(self.ignored.values())


@dataclass
class IngestPlan:
    """Between `plan_ingest` and `finish_ingest`: what is to be examined, and the ingest lock."""

    root: Path
    files: list[ScannedFile]
    todo: list[ScannedFile]
    known: dict[str, sqlite3.Row]
    report: IngestReport
    lock: JobLock | None = None


def ingest(
    workspace: Workspace,
    root: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> IngestReport:
    """Add the images under ``root`` to the workspace.

    Files already ingested with the same size, modification time, change time and inode are
    not read again; a file whose content changed is re-validated. A file with the same content
    as another is recorded as its exact duplicate. Files that vanished are marked ``missing``
    (their labels are kept and come back with them). One bad file never stops the batch.

    Parameters
    ----------
    workspace : Workspace
    root : path
        The image collection; must be the workspace's collection root if it has one.
    progress : callable(done, total), optional
    workers : int, optional
        Decoding threads (Pillow releases the GIL while decoding).

    Returns
    -------
    IngestReport

    Raises
    ------
    StorageFull
        The disk filled while writing thumbnails or rows (what was committed stays whole).
    WorkspaceReadOnly, Busy, InvalidPath
    """
    plan = plan_ingest(workspace, root)
    try:
        total = len(plan.todo)
        if progress:
            progress(0, total)
        batch: list[ExaminedFile] = []
        n_workers = workers or min(8, (os.cpu_count() or 2) + 2)

        def work(scanned: ScannedFile) -> ExaminedFile:
            row = plan.known.get(scanned.relpath)
            known = row["sha256"] if row is not None and row["status"] == "ok" else None
            if known is not None and not workspace.thumbnail_path(known).exists():
                known = None  # re-decode to regenerate the deleted thumbnail
            return write_thumbnail(workspace, examine_file(scanned, known_sha256=known))

        with _storage_errors(workspace), ThreadPoolExecutor(max_workers=n_workers) as pool:
            for done, examined in enumerate(pool.map(work, plan.todo), start=1):
                batch.append(examined)
                if len(batch) >= 64:
                    commit_examined(workspace, plan, batch)
                    batch = []
                if progress:
                    progress(done, total)
            commit_examined(workspace, plan, batch)
        return finish_ingest(workspace, plan)
    finally:
        if plan.lock is not None:
            plan.lock.release()


def plan_ingest(workspace: Workspace, root: str | os.PathLike[str]) -> IngestPlan:
    """Lock the workspace for ingest, clean a killed ingest's leftovers, scan, and list what
    must be examined (`examine_file`) because it is new or may have changed.

    Call `commit_examined` with the results and `finish_ingest` at the end (which releases the
    lock); `ingest` does all of it with threads, the Ray engine on a cluster.
    """
    root_path = workspace.set_collection_root(root)
    lock = acquire(workspace.path / INGEST_LOCK, wait=None, what="ingest")
    try:
        cleaned = _clean_leftovers(workspace)
        scanned = scan_collection(root_path, exclude=[workspace.path])
        with workspace.read() as conn:
            known = {
                row["relpath"]: row
                for row in conn.execute(
                    "SELECT relpath, sha256, size, mtime_ns, ctime_ns, inode, status, "
                    "skip_reason FROM images"
                )
            }
    except BaseException:
        lock.release()
        raise
    report = IngestReport(
        found=len(scanned.files),
        ignored=scanned.ignored,
        skipped_folders=scanned.skipped_folders,
        cleaned=cleaned,
    )
    todo: list[ScannedFile] = []
    for item in scanned.files:
        if _unchanged(known.get(item.relpath), item):
            report.unchanged += 1
        else:
            todo.append(item)
    return IngestPlan(root_path, scanned.files, todo, known, report, lock)


INGEST_LOCK = "ingest.lock"


def _unchanged(row: sqlite3.Row | None, scanned: ScannedFile) -> bool:
    """Whether a file can be trusted to be what the stored row says without reading it."""
    if row is None or row["status"] == "missing":
        return False
    if scanned.problem:
        return row["status"] == "skipped" and row["skip_reason"] == scanned.problem
    stat = _stat(scanned.path)
    if stat is None or (row["size"], row["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
        return False
    if row["ctime_ns"] is None:  # ingested before change times were stored
        return row["status"] == "ok"
    # A same-size replacement with its mtime set back still changes ctime (and often inode).
    return (row["ctime_ns"], row["inode"]) == (stat.st_ctime_ns, stat.st_ino)


def _clean_leftovers(workspace: Workspace) -> int:
    """Remove temporary thumbnails a killed ingest left (called holding the ingest lock)."""
    n = 0
    for tmp in (workspace.path / "thumbs").glob("*/.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n


@contextlib.contextmanager
def _storage_errors(workspace: Workspace) -> Iterator[None]:
    """Turn a full disk or a read-only workspace into one line (nothing half-written stays:
    thumbnails are written by rename, rows in transactions)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise StorageFull(
                f"the disk holding {workspace.path} is full ({exc.strerror}); free some space "
                "and run ingest again (what was stored so far is complete)"
            ) from None
        if exc.errno in _READ_ONLY_ERRNOS:
            raise WorkspaceReadOnly(
                f"workspace {workspace.path} is read-only; ingest needs to write to it"
            ) from None
        raise
    except sqlite3.DatabaseError as exc:
        raise sqlite_error(workspace.db_path, exc) from None


def commit_examined(
    workspace: Workspace, plan: IngestPlan, examined: Iterable[ExaminedFile]
) -> None:
    """Store a batch of verdicts in one transaction (thumbnail bytes still attached are
    written first, so a row never points at a missing thumbnail)."""
    rows, touched = [], []
    for e in examined:
        if e.thumbnail is not None:
            e = write_thumbnail(workspace, e)
        row = plan.known.get(e.relpath)
        if e.same and row is not None:
            plan.report.unchanged += 1
            touched.append((e.size, e.mtime_ns, e.ctime_ns, e.inode, e.relpath))
            continue
        _count(plan.report, row, e)
        rows.append(
            (
                e.relpath,
                e.sha256,
                e.size,
                e.mtime_ns,
                e.ctime_ns,
                e.inode,
                e.width,
                e.height,
                e.format,
                "ok" if e.ok else "skipped",
                e.reason,
            )
        )
    if not rows and not touched:
        return
    with _storage_errors(workspace), workspace.transaction() as conn:
        conn.executemany(
            "UPDATE images SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ? WHERE relpath = ?",
            touched,
        )
        conn.executemany(
            """
            INSERT INTO images(relpath, sha256, size, mtime_ns, ctime_ns, inode, width, height,
                               format, status, skip_reason)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(relpath) DO UPDATE SET
                sha256 = excluded.sha256, size = excluded.size, mtime_ns = excluded.mtime_ns,
                ctime_ns = excluded.ctime_ns, inode = excluded.inode,
                width = excluded.width, height = excluded.height, format = excluded.format,
                status = excluded.status, skip_reason = excluded.skip_reason,
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            """,
            rows,
        )


def _count(report: IngestReport, row: sqlite3.Row | None, e: ExaminedFile) -> None:
    if row is None:
        report.new += 1
        return
    status = "ok" if e.ok else "skipped"
    if row["status"] == "missing" and e.ok:
        report.returned += 1
    same_verdict = (row["sha256"], row["status"], row["skip_reason"]) == (
        e.sha256,
        status,
        e.reason,
    )
    if same_verdict:
        report.unchanged += 1
    else:
        report.changed += 1


def finish_ingest(workspace: Workspace, plan: IngestPlan) -> IngestReport:
    """Mark vanished files missing, record exact duplicates, count, and release the lock."""
    try:
        report = plan.report
        seen = {f.relpath for f in plan.files}
        gone = [
            rel for rel, row in plan.known.items() if rel not in seen and row["status"] != "missing"
        ]
        with _storage_errors(workspace), workspace.transaction() as conn:
            conn.executemany(
                "UPDATE images SET status = 'missing', skip_reason = 'missing: file no longer "
                "exists', updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE relpath = ?",
                [(rel,) for rel in gone],
            )
            _mark_duplicates(conn)
        report.missing = len(gone)
        counts = workspace.image_counts()
        report.ok = counts["ok"]
        report.duplicates = counts["duplicates"]
        report.missing = counts["missing"]
        report.skipped = Counter()
        with workspace.read() as conn:
            for (reason,) in conn.execute(
                "SELECT skip_reason FROM images WHERE status = 'skipped'"
            ):
                report.skipped[reason.split(":", 1)[0]] += 1
        return report
    finally:
        if plan.lock is not None:
            plan.lock.release()
            plan.lock = None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _mark_duplicates(conn: sqlite3.Connection) -> None:
    """Point every exact copy at the first-ingested image with the same content."""
    conn.execute(
        """
        UPDATE images SET duplicate_of = CASE WHEN status = 'ok' THEN (
            SELECT MIN(i2.id) FROM images AS i2
            WHERE i2.sha256 = images.sha256 AND i2.status = 'ok' AND i2.id < images.id
        ) END
        """
    )


# -- relocation -------------------------------------------------------------------------------


@dataclass
class RelocateReport:
    """What `relocate` verified: every usable image is looked up under the new root."""

    old_root: Path | None
    new_root: Path
    verified: int = 0
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)


def relocate(
    workspace: Workspace,
    new_root: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> RelocateReport:
    """Point the workspace at its collection's new folder, after checking it by content.

    Every usable image is read under ``new_root`` and hashed; the root changes only if at
    least one image matches and none differs (a missing one is marked missing by the next
    ingest, keeping its label). Labels, features and runs are keyed by image, so nothing else
    changes.

    Raises
    ------
    InvalidPath
        ``new_root`` is not a folder, holds none of the images, or holds different content
        under the same names (nothing is changed).
    """
    target = Path(new_root).expanduser().resolve()
    if not target.is_dir():
        raise InvalidPath(f"new image folder {target} does not exist or is not a folder")
    check_collection(target, workspace.path)
    report = RelocateReport(workspace.collection_root, target)
    images = [img for img in workspace.images("ok") if img.sha256]
    if progress:
        progress(0, len(images))
    for done, img in enumerate(images, start=1):
        path = target / img.relpath
        if not path.is_file():
            report.missing.append(img.relpath)
        else:
            examined = examine_file(
                ScannedFile(img.relpath, path, link=path.is_symlink()), known_sha256=img.sha256
            )
            if examined.same:
                report.verified += 1
            else:
                report.different.append(img.relpath)
        if progress:
            progress(done, len(images))
    if report.different:
        raise InvalidPath(
            f"{target} holds different content for {len(report.different)} image(s) "
            f"(e.g. {report.different[0]!r}); not relocated"
        )
    if report.verified == 0:
        raise InvalidPath(f"{target} holds none of the workspace's images; not relocated")
    workspace.set_meta("collection_root", str(target))
    return report
