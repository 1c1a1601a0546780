"""Scanning a collection: the candidate files, and a count of what was not considered and why.

Folder symlinks are not followed; file symlinks only when they point inside the collection;
imgcluster's own folders (workspaces, exports) are skipped whole. (Re-exported by
`imgcluster.images`.)
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK

from imgcluster.decode import short_reason
from imgcluster.errors import InvalidPath
from imgcluster.paths import imgcluster_folder_kind

#: Extensions scanned (lower case). Other files are counted as not considered, with the reason.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


#: Extensions of files Pillow could read that ingest does not scan, with what to do. They are
#: counted in `IngestReport.ignored` (never silently dropped).
NOT_SCANNED = {
    ".jfif": "a JPEG extension that training loaders do not read; rename the file to .jpg",
    ".jpe": "a JPEG extension that training loaders do not read; rename the file to .jpg",
    ".jif": "a JPEG extension that training loaders do not read; rename the file to .jpg",
    ".avif": "AVIF is not supported; convert the file to JPEG or PNG",
    ".heic": "HEIC is not supported; convert the file to JPEG or PNG",
    ".heif": "HEIF is not supported; convert the file to JPEG or PNG",
    ".jp2": "JPEG 2000 is not supported; convert the file to JPEG or PNG",
    ".ico": "icons are not supported; convert the file to PNG",
    ".ppm": "PPM is not supported; convert the file to PNG",
    ".tga": "TGA is not supported; convert the file to PNG",
    ".svg": "vector images are not supported; export the file as PNG",
}


@dataclass(frozen=True)
class ScannedFile:
    """A candidate file found under the collection root."""

    relpath: str
    path: Path
    problem: str | None = None  # a reason to skip found while scanning (permissions, symlink)
    link: bool = False  # a symlink (checked to point inside the collection) when scanned


@dataclass
class ScanResult:
    """What a scan found: candidate files (sorted), and what it did not consider and why."""

    files: list[ScannedFile] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    #: Folders skipped as a whole: ``(relative path, why)`` (workspaces, exports).
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)


def scan(root: str | os.PathLike[str]) -> Iterator[ScannedFile]:
    """Yield image-like files under ``root`` recursively, sorted by relative path.

    See `scan_collection` (this keeps only the files).
    """
    yield from scan_collection(root).files


def scan_collection(root: str | os.PathLike[str], *, exclude: Iterable[Path] = ()) -> ScanResult:
    """Every image-like file under ``root``, and a count of what was not considered and why.

    Folder symlinks are not followed (no loops, no escaping the collection); file symlinks are
    followed only when they point inside ``root``. Unreadable folders are reported, not fatal.
    Folders that are an imgcluster workspace or export (or listed in ``exclude``) are skipped
    whole: their thumbnails and copies would come back as new photos on every scan.

    Raises
    ------
    InvalidPath
        ``root`` is not a folder, or is itself a workspace or an export.
    """
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise InvalidPath(f"image folder {root_path} does not exist or is not a folder")
    kind = imgcluster_folder_kind(root_path)
    if kind is not None:
        raise InvalidPath(
            f"image folder {root_path} is an imgcluster {kind}, not a folder of photos; "
            "choose the folder that holds your photos"
        )
    result = ScanResult()
    excluded = {Path(p).resolve() for p in exclude}
    undecodable: dict[str, ScannedFile] = {}

    def on_error(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root_path
        detail = (err.strerror or short_reason(err)).lower()
        rel = _relpath(where, root_path)
        result.files.append(ScannedFile(rel + "/", where, f"unreadable folder: {detail}"))

    for dirpath, dirnames, filenames in os.walk(root_path, onerror=on_error):
        folder = Path(dirpath)
        _prune(folder, dirnames, root_path, excluded, result)
        for name in filenames:
            entry = _scan_entry(folder, name, root_path, result)
            if entry is None:
                continue
            if entry.problem == _UNDECODABLE:
                undecodable.setdefault(entry.relpath, entry)
            else:
                result.files.append(entry)
    taken = {f.relpath for f in result.files}
    result.files.extend(f for rel, f in undecodable.items() if rel not in taken)
    result.files.sort(key=lambda f: f.relpath)
    return result


def _prune(
    folder: Path, dirnames: list[str], root: Path, excluded: set[Path], result: ScanResult
) -> None:
    """Sort ``dirnames`` in place and drop imgcluster's own folders from the walk."""
    dirnames.sort()
    keep = []
    for name in dirnames:
        sub = folder / name
        kind = "workspace" if sub in excluded else imgcluster_folder_kind(sub)
        if kind is None:
            keep.append(name)
            continue
        rel = _relpath(sub, root) + "/"
        result.skipped_folders.append((rel, f"an imgcluster {kind}, not photos"))
        result.ignored[f"imgcluster {kind} folder skipped"] += 1
    dirnames[:] = keep


def _scan_entry(folder: Path, name: str, root: Path, result: ScanResult) -> ScannedFile | None:
    """The candidate for one directory entry, or None (counted in ``result.ignored``)."""
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        result.ignored[_ignored_reason(name, suffix)] += 1
        return None
    path = folder / name
    rel = _relpath(path, root)
    if rel != path.relative_to(root).as_posix():
        # Not valid UTF-8: the stored name cannot lead back to this file (and may equal
        # another file's real name), so it must never be opened by name later.
        return ScannedFile(rel, path, _UNDECODABLE)
    try:
        is_link = path.is_symlink()
    except OSError as exc:  # e.g. a folder that can be listed but not searched
        return ScannedFile(rel, path, f"unreadable: {(exc.strerror or short_reason(exc)).lower()}")
    problem = _link_problem(path, root) if is_link else None
    return ScannedFile(rel, path, problem, link=is_link)


def _ignored_reason(name: str, suffix: str) -> str:
    stripped = name.rstrip(" .")
    if stripped != name and Path(stripped).suffix.lower() in IMAGE_EXTENSIONS:
        return "name ends with a space or dot: rename the file to use it"
    if suffix in NOT_SCANNED:
        return f"{suffix} file: {NOT_SCANNED[suffix]}"
    if name.startswith("."):
        return "hidden file"
    return "not an image extension"


def _link_problem(path: Path, root: Path) -> str | None:
    """Why a file symlink cannot be used, or None (it points to a regular file inside)."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on ELOOP
        return "symlink loop: the link never ends"
    if not target.is_relative_to(root):
        return "symlink outside collection: points to a file outside the folder"
    try:
        mode = target.stat().st_mode
    except OSError:
        return "broken symlink: the link points to nothing"
    if not S_ISREG(mode):
        return f"symlink to {file_kind(mode)}: only links to regular image files are read"
    return None


def file_kind(mode: int) -> str:
    """``"a pipe (FIFO)"``, ``"a device"``, ... for people."""
    if S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if S_ISSOCK(mode):
        return "a socket"
    if S_ISCHR(mode) or S_ISBLK(mode):
        return "a device"
    if S_ISDIR(mode):
        return "a folder"
    return "a special file"


_UNDECODABLE = "undecodable name: the file name is not valid UTF-8; rename the file to use it"


def _relpath(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    # Names that are not valid UTF-8 arrive as surrogate escapes, which SQLite cannot store.
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
