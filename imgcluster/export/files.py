"""Writing one exported file, verified: the content must still be what was ingested.

Each source is opened read-only and without blocking (a FIFO or a device put where an image
was never hangs the export), must be a regular file no larger than the ingest limit, and is
hashed while it is read -- one read per file. A file whose sha256 differs from the ingested one
is refused (left out, with the reason): what is exported is only what was labeled. Exported
files are new regular files with mode 0644 owned by whoever exports, whatever the source's
mode, owner or setuid/setgid/sticky bits; only the modification time is carried over.

Hard links and symbolic links cannot have their own mode or content: those modes expose the
source as it is (its mode bits included), after the same content check.

A problem with a source (missing, changed, unreadable, undecodable) is that file's: it is
left out and the export goes on. A problem with the destination (disk full, read-only) is the
export's: the `OSError` aborts it, and the caller removes the half-built export and reports
`ExportWriteError` in one line about OUT.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgcluster.errors import ExportError
from imgcluster.export.formats import reencode, sniff
from imgcluster.export.plan import PlannedFile

#: Mode of every exported file (regular, rw-r--r--), whatever the source's.
FILE_MODE = 0o644
_CHUNK = 1 << 20
_LINK_FALLBACK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)

#: Left-out reasons for sources (see `FileOutcome.reason`).
MISSING = "missing"
CHANGED = "changed since ingest"


class ExportWriteError(ExportError):
    """The export folder cannot be written (disk full, read-only, I/O error)."""


class _Refused(Exception):
    """This source is left out, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one planned file: written, or left out with ``reason``."""

    written: bool
    reason: str | None = None
    copied_instead_of_linked: bool = False
    reencoded: bool = False


def max_source_bytes() -> int:
    """The largest source read (the ingest limit: nothing larger was ever ingested)."""
    from imgcluster.images import MAX_FILE_BYTES

    return MAX_FILE_BYTES


def export_file(planned: PlannedFile, dst: Path, mode: str) -> FileOutcome:
    """Write ``planned`` to ``dst`` (which must not exist) in ``mode``, verified.

    Returns
    -------
    FileOutcome
        ``written=False`` with a reason when the source is left out.

    Raises
    ------
    OSError
        ``dst`` cannot be written (the caller turns it into one line about OUT).
    """
    try:
        with _open_source(Path(planned.item.source)) as (fd, st):
            return _export_open(planned, fd, st, dst, mode)
    except _Refused as refused:
        with contextlib.suppress(OSError):
            dst.unlink(missing_ok=True)
        return FileOutcome(written=False, reason=refused.reason)


def _export_open(
    planned: PlannedFile, fd: int, st: os.stat_result, dst: Path, mode: str
) -> FileOutcome:
    head = _read(fd, _CHUNK)
    target = planned.format
    verbatim = target is None or sniff(head) == target
    if not verbatim:
        data = _read_all(fd, head, planned.item.sha256)
        _reencode(data, target, dst, planned.item.relpath)
        _keep_mtime(dst, st)
        return FileOutcome(written=True, reencoded=True)
    if mode == "copy":
        _copy(fd, head, dst, planned.item.sha256)
        _keep_mtime(dst, st)
        return FileOutcome(written=True)
    _hash_rest(fd, head, planned.item.sha256)
    source = Path(planned.item.source)
    if mode == "symlink":
        os.symlink(os.path.abspath(source), dst)
        return FileOutcome(written=True)
    try:
        _link_verified(fd, source, dst)
        return FileOutcome(written=True)
    except OSError as exc:
        if exc.errno not in _LINK_FALLBACK_ERRNOS:
            raise
    os.lseek(fd, 0, os.SEEK_SET)
    _copy(fd, _read(fd, _CHUNK), dst, planned.item.sha256)
    _keep_mtime(dst, st)
    return FileOutcome(written=True, copied_instead_of_linked=True)


def peek_format(source: Path) -> str | None:
    """The format of ``source`` from its first bytes: a trainer format's name, ``"OTHER"`` for
    any other content, None when it cannot be read (the copy then reports why)."""
    try:
        with _open_source(source) as (fd, _st):
            head = _read(fd, 64)
    except _Refused:
        return None
    return sniff(head) or "OTHER"


def _link_verified(fd: int, source: Path, dst: Path) -> None:
    """Hard-link ``source`` and check the link is the very file that was just hashed (same
    inode as the open descriptor): a swap of the path between the check and the link is
    refused as changed content instead of exported."""
    os.link(source, dst, follow_symlinks=True)
    hashed, linked = os.fstat(fd), os.lstat(dst)
    if (hashed.st_dev, hashed.st_ino) != (linked.st_dev, linked.st_ino):
        dst.unlink()
        raise _Refused(CHANGED)


@contextlib.contextmanager
def _open_source(source: Path) -> Iterator[tuple[int, os.stat_result]]:
    """The source opened read-only, refused unless it is a regular file within the size limit.

    ``O_NONBLOCK`` makes opening a FIFO return at once (it is then refused as not a regular
    file) instead of waiting for a writer forever.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)
    except FileNotFoundError:
        raise _Refused(MISSING) from None
    except OSError as exc:
        raise _Refused(f"unreadable: {_why(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_source_bytes():
            raise _Refused(f"too large ({st.st_size:,} bytes)")
        yield fd, st
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _read(fd: int, n: int) -> bytes:
    try:
        return os.read(fd, n)
    except OSError as exc:
        raise _Refused(f"unreadable: {_why(exc)}") from None


def _chunks(fd: int, head: bytes) -> Iterator[bytes]:
    """``head`` then the rest of the file, refusing more bytes than the ingest limit."""
    limit, total = max_source_bytes(), len(head)
    chunk = head
    while chunk:
        yield chunk
        chunk = _read(fd, _CHUNK)
        total += len(chunk)
        if total > limit:
            raise _Refused(f"too large (over {limit:,} bytes)")


def _check(digest: hashlib._Hash, expected: str) -> None:
    if digest.hexdigest() != expected:
        raise _Refused(CHANGED)


def _hash_rest(fd: int, head: bytes, expected: str) -> None:
    digest = hashlib.sha256()
    for chunk in _chunks(fd, head):
        digest.update(chunk)
    _check(digest, expected)


def _read_all(fd: int, head: bytes, expected: str) -> bytes:
    digest, buffer = hashlib.sha256(), io.BytesIO()
    for chunk in _chunks(fd, head):
        digest.update(chunk)
        buffer.write(chunk)
    _check(digest, expected)
    return buffer.getvalue()


def _create(dst: Path) -> int:
    """A new file with mode 0644 (``fchmod``: the umask must not make it private or wider)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(dst, flags, 0o600)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy(fd: int, head: bytes, dst: Path, expected: str) -> None:
    """Stream the source into ``dst`` while hashing it; refuse (and delete ``dst``) when the
    hash is not the ingested one."""
    digest = hashlib.sha256()
    out = _create(dst)
    try:
        for chunk in _chunks(fd, head):
            digest.update(chunk)
            _write_all(out, chunk)
    finally:
        os.close(out)
    _check(digest, expected)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _reencode(data: bytes, target: str, dst: Path, relpath: str) -> None:
    buffer = io.BytesIO()
    try:
        reencode(data, target, buffer)
    except Exception as exc:
        raise _Refused(f"cannot convert to {target}: {type(exc).__name__}: {exc}") from None
    out = _create(dst)
    try:
        _write_all(out, buffer.getvalue())
    finally:
        os.close(out)


def _keep_mtime(dst: Path, st: os.stat_result) -> None:
    """Carry the modification time over (provenance); nothing else of the source's metadata."""
    os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
