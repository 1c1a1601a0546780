"""Uploaded images and zips, written safely into a folder (the app uses a workspace's own
``uploads/``).

An upload comes from a browser, so every name and size in it is hostile until checked: a zip
entry may be called ``../../home/me/.bashrc`` or ``/etc/cron.d/x``, be a symlink, claim 1 KB and
inflate to 10 GB, or not be an image at all. Each entry is judged on its own and either written
under the target folder or reported with a reason; nothing is ever written outside the target.
Whether a saved file really is an image is decided later by `imgcluster.images.ingest`, which
decodes every file.

Reasons are shown to the person who uploaded, so they name entries of the upload only, never a
path on the server ("duplicate name", not ``[Errno 17] File exists: '/srv/...'``).

The app's "New from uploads" and "Add" buttons call `save_uploads`; like the rest of the
library this module has no Streamlit import.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from imgcluster.errors import UploadRejected
from imgcluster.images import IMAGE_EXTENSIONS

#: Largest single image accepted from an upload (a 50 MB product photo is already unusual).
MAX_FILE_BYTES = 50 * 1024 * 1024
#: Largest total written by one upload, whatever the archive claims.
MAX_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
#: Most entries read from one zip (a central directory of millions of entries is an attack).
MAX_ENTRIES = 50_000
#: Largest uncompressed/compressed ratio of one entry. JPEG/PNG/WebP barely compress (ratios
#: near 1); zip bombs reach 1000 and more.
MAX_RATIO = 50
_CHUNK = 1024 * 1024
_MAX_NAME_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class UploadReport:
    """What one upload wrote (relative paths under the target) and what it refused, and why."""

    saved: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_written: int = 0


def safe_relpath(name: str) -> PurePosixPath:
    """A relative path for an upload entry name, or `UploadRejected` saying what is wrong.

    Refuses absolute paths (``/x``, ``\\x``, ``C:x``) and any ``..`` component rather than
    silently flattening them: an archive that tries to climb out is hostile, not sloppy.
    Control characters (newlines in names) become ``_``; empty and ``.`` components are dropped.
    """
    if "\x00" in name:
        raise UploadRejected("name contains a NUL byte")
    normalized = unicodedata.normalize("NFC", name.replace("\\", "/"))
    if normalized.startswith("/") or _DRIVE.match(normalized):
        raise UploadRejected("absolute path")
    parts: list[str] = []
    for part in normalized.split("/"):
        if part == "..":
            raise UploadRejected("path climbs out of the upload ('..')")
        part = _CONTROL.sub("_", part).strip()
        if part in ("", "."):
            continue
        if len(part.encode("utf-8")) > _MAX_NAME_BYTES:
            raise UploadRejected("name too long")
        parts.append(part)
    if not parts:
        raise UploadRejected("empty name")
    return PurePosixPath(*parts)


def _check_image_name(rel: PurePosixPath) -> None:
    if rel.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UploadRejected(f"not an image file (allowed: {', '.join(sorted(IMAGE_EXTENSIONS))})")


def _unique_destination(target: Path, rel: PurePosixPath) -> Path:
    """``target/rel``, checked to stay inside ``target``, renamed ``name-1.ext`` if taken.

    A folder of ``rel`` that is already a file (``a.png`` then ``a.png/b.png``) is refused as
    a duplicate name: the file is not renamed aside, it was there first.
    """
    dest = target.joinpath(*rel.parts)
    parent = dest.parent.resolve()
    if not parent.is_relative_to(target.resolve()):
        raise UploadRejected("path leaves the upload folder")
    folder = target
    for part in rel.parts[:-1]:
        folder = folder / part
        if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
            shown = folder.relative_to(target).as_posix()
            raise UploadRejected(f"duplicate name: {shown} is a file, not a folder")
    n = 1
    while os.path.lexists(dest):
        dest = dest.with_name(f"{rel.stem}-{n}{rel.suffix}")
        n += 1
    return dest


#: What reading a damaged zip entry raises (zlib.error: a broken deflate stream).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError)


def _os_reason(exc: OSError) -> str:
    """A reason for a failed write without the server path that ``str(exc)`` contains."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return "duplicate name"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the server"
    if exc.errno == errno.ENAMETOOLONG:
        return "name too long"
    return f"could not be saved ({exc.strerror or type(exc).__name__})"


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


def _write_stream(source: BinaryIO, dest: Path, limit: int, *, what: str = "file") -> int:
    """Copy at most ``limit`` bytes into ``dest`` atomically; `UploadRejected` beyond it.

    Sizes are counted while reading, never taken from headers, which an attacker writes.
    A read failure is a corrupt ``what``; a write failure gets a path-free reason.
    """
    target = dest.parent
    tmp_name: str | None = None
    written = 0
    try:
        target.mkdir(parents=True, exist_ok=True)
        # The parent may have been created just now; re-check it after mkdir (no symlinked
        # dirs: everything under the upload folder is created by this module).
        if target.is_symlink():
            raise UploadRejected("path leaves the upload folder")
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=".upload.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = source.read(min(_CHUNK, limit - written + 1))
                except _READ_ERRORS as exc:
                    raise UploadRejected(f"corrupt {what} ({_read_reason(exc)})") from exc
                if not chunk:
                    break
                written += len(chunk)
                if written > limit:
                    raise UploadRejected(
                        f"larger than the {limit // (1024 * 1024)} MB limit for one file"
                    )
                out.write(chunk)
        os.replace(tmp_name, dest)
    except OSError as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        raise UploadRejected(_os_reason(exc)) from exc
    except BaseException:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        raise
    return written


def save_image(
    name: str,
    source: BinaryIO,
    target: Path,
    report: UploadReport,
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> None:
    """Save one uploaded image file under ``target`` (its base name only), recording the outcome."""
    try:
        rel = PurePosixPath(safe_relpath(name).name)
        _check_image_name(rel)
        dest = _unique_destination(target, rel)
        report.bytes_written += _write_stream(source, dest, max_file_bytes)
        report.saved.append(dest.relative_to(target).as_posix())
    except UploadRejected as exc:
        report.rejected.append((name, str(exc)))


def extract_zip(
    archive: str | os.PathLike[str] | BinaryIO,
    target: Path,
    *,
    prefix: str = "",
    report: UploadReport | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_entries: int = MAX_ENTRIES,
    max_ratio: float = MAX_RATIO,
) -> UploadReport:
    """Extract the image files of a zip under ``target``, refusing every unsafe entry.

    Parameters
    ----------
    archive : path or binary file
        The uploaded zip.
    target : Path
        The folder to write into (created if needed); nothing is written anywhere else.
    prefix : str, default=""
        Sub-folder of ``target`` for this archive (e.g. the zip's own name), so two uploads
        with the same inner names do not collide.
    report : UploadReport, optional
        Accumulate into an existing report (several files in one upload).
    max_file_bytes, max_total_bytes, max_entries, max_ratio
        Limits against oversized files and zip bombs; see the module constants.

    Returns
    -------
    UploadReport
        Saved relative paths (under ``target``) and rejected entries with reasons.

    Raises
    ------
    UploadRejected
        The archive as a whole is unreadable, has too many entries or exceeds the total size.
    """
    report = report if report is not None else UploadReport()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    base = safe_relpath(prefix) if prefix else PurePosixPath()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadRejected(f"not a readable zip file ({_read_reason(exc)})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise UploadRejected(f"zip has {len(infos)} entries, more than the {max_entries} limit")
        for info in infos:
            if info.is_dir():
                continue
            try:
                _extract_entry(
                    zf, info, target, base, report, max_file_bytes, max_ratio, max_total_bytes
                )
            except UploadRejected as exc:
                report.rejected.append((info.filename, str(exc)))
    return report


def _extract_entry(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    target: Path,
    base: PurePosixPath,
    report: UploadReport,
    max_file_bytes: int,
    max_ratio: float,
    max_total_bytes: int,
) -> None:
    rel = safe_relpath(info.filename)
    if rel.parts[0] == "__MACOSX" or rel.name == ".DS_Store":
        raise UploadRejected("macOS metadata, not an image")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UploadRejected("symbolic link")
    if info.flag_bits & 0x1:
        raise UploadRejected("encrypted entry")
    _check_image_name(rel)
    if info.file_size > max_file_bytes:
        raise UploadRejected(f"larger than the {max_file_bytes // (1024 * 1024)} MB limit")
    if info.file_size > max(info.compress_size, 1) * max_ratio:
        raise UploadRejected(
            f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
            "looks like a zip bomb"
        )
    budget = max_total_bytes - report.bytes_written
    if budget <= 0:
        raise UploadRejected("upload exceeds the total size limit")
    dest = _unique_destination(target, base / rel)
    try:
        source = zf.open(info)
    except _READ_ERRORS as exc:  # e.g. the local header names another file
        raise UploadRejected(f"corrupt zip entry ({_read_reason(exc)})") from exc
    with source:
        limit = min(max_file_bytes, budget)
        report.bytes_written += _write_stream(source, dest, limit, what="zip entry")
    report.saved.append(dest.relative_to(target).as_posix())


def save_uploads(
    files: Iterable[tuple[str, BinaryIO]],
    target: Path,
    **limits: int,
) -> UploadReport:
    """Save browser uploads: zips are extracted (each into a folder named after it), images
    are saved as they are, anything else is refused with a reason."""
    report = UploadReport()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name, fh in files:
        if name.lower().endswith(".zip"):
            try:
                stem = safe_relpath(name).stem
                extract_zip(fh, target, prefix=stem, report=report, **limits)
            except UploadRejected as exc:
                report.rejected.append((name, str(exc)))
        else:
            file_limit = limits.get("max_file_bytes", MAX_FILE_BYTES)
            save_image(name, fh, target, report, max_file_bytes=file_limit)
    return report
