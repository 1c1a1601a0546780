"""Zipping an export folder for a download, streamed file by file and written atomically."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import zipfile
from pathlib import Path

from imgcluster._process import JobLock, acquire, clean_unlocked, pid_alive
from imgcluster.errors import ExportError
from imgcluster.export.files import FILE_MODE, ExportWriteError
from imgcluster.export.staging import export_lock, storage_error

#: Already compressed formats are stored in the zip as they are (deflating them again costs time
#: and gains nothing).
_COMPRESSED = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})


def zip_export(out: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Zip an export folder to ``dest`` (default ``OUT.zip`` beside it), file by file.

    Each file is streamed from disk into the archive, so memory stays flat however big the
    export; JPEG/PNG are stored as they are (already compressed). The archive holds one top
    folder named like OUT, keeps empty class folders, and is written to a temporary file and
    renamed, so a half-written zip never has the final name; a full disk or a read-only
    folder leaves nothing behind and raises `ExportError` in one line. Symbolic links are
    zipped as the images they point at.

    Returns
    -------
    Path
        The zip file (open it with ``open(path, "rb")`` for a download button).

    Raises
    ------
    ExportError
        OUT is missing, the target is inside OUT or not a regular file, or it cannot be
        written (read-only, disk full).
    Busy
        An export to OUT is running.
    """
    root = Path(out).resolve()
    if not root.is_dir():
        raise ExportError(f"export folder {root} does not exist")
    target = _absolute(Path(dest)) if dest else root.parent / f"{root.name}.zip"
    if target.is_relative_to(root):
        raise ExportError(f"zip file {target} cannot be inside the folder it zips")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        # Replacing a device, a folder or a link's target is never what "write a zip" means.
        raise ExportError(f"zip target {target} exists and is not a regular file; choose another")
    # Hold OUT's export lock while reading it: an export replacing OUT meanwhile would
    # otherwise leave a zip of half the old and half the new export. Where the lock cannot
    # be created (OUT on a read-only disk) nobody can be replacing OUT either.
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ExportWriteError):
            stack.enter_context(export_lock(root))
        return _zip_locked(root, target)


def _zip_locked(root: Path, target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_zips(target)
        lock, tmp, fd = _new_temporary(target)
    except OSError as exc:
        raise storage_error(exc, target.parent, "write the zip") from None
    try:
        with lock:
            _write_zip(fd, root)
            os.chmod(tmp, FILE_MODE)  # a zip is for sharing
            os.replace(tmp, target)
    except OSError as exc:
        raise storage_error(exc, target.parent, "write the zip") from None
    finally:
        tmp.unlink(missing_ok=True)
        lock.path.unlink(missing_ok=True)
    return target


def _absolute(path: Path) -> Path:
    """Absolute, the parent resolved but not the file itself (a symlink there is refused)."""
    path = Path(os.path.abspath(path.expanduser()))
    return path.parent.resolve() / path.name


def _new_temporary(target: Path) -> tuple[JobLock, Path, int]:
    """A locked ``.ZIP.XXXX.tmp.lock`` and then its ``.ZIP.XXXX.tmp``: one lock per temporary
    zip, taken before the zip exists, so a cleaner never meets a temporary zip without its lock
    (the kernel releases the lock however the writer dies)."""
    lock_fd, lock_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp.lock"
    )
    os.close(lock_fd)
    lock = acquire(lock_name, what=f"zip {target}")
    tmp = Path(lock_name.removesuffix(".lock"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except BaseException:
        lock.release()
        Path(lock_name).unlink(missing_ok=True)
        raise
    return lock, tmp, fd


def _write_zip(fd: int, root: Path) -> None:
    with (
        os.fdopen(fd, "wb") as raw,
        zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf,
    ):
        _zip_tree(zf, root)


def _remove_abandoned_zips(target: Path) -> None:
    """Delete half-written zips of ``target`` whose writer has died (its lock is free).

    Temporary zips of earlier versions carry their writer's pid instead of a lock.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        lock = Path(f"{stale}.lock")
        if lock.exists():
            clean_unlocked(lock, stale)
            continue
        pid_text = stale.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        stale.unlink(missing_ok=True)


def _zip_tree(zf: zipfile.ZipFile, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        arc_dir = Path(root.name) / folder.relative_to(root)
        zf.write(folder, arc_dir.as_posix() + "/")
        for name in sorted(filenames):
            ext = Path(name).suffix.lower()
            method = zipfile.ZIP_STORED if ext in _COMPRESSED else zipfile.ZIP_DEFLATED
            zf.write(folder / name, (arc_dir / name).as_posix(), compress_type=method)
