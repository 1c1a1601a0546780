"""Atomic export: build beside OUT, rename into place, recover from a kill.

An export is built in a temporary folder beside OUT (``.OUT.export-XXXX``, same filesystem)
and renamed into place only once complete: a crash or an error midway leaves the previous
export untouched. One export at a time per OUT: the build holds an exclusive lock on
``.OUT.export.lock`` (`imgcluster._process`, released by the kernel however the process dies),
so a second export to the same OUT is refused at once, and whoever next takes the lock knows
that every build folder it finds was abandoned by a killed export and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgcluster._process import JobLock, acquire, is_locked
from imgcluster.errors import Busy, ExportError, WorkspaceReadOnly
from imgcluster.export.files import ExportWriteError
from imgcluster.export.plan import LABELS_NAME

#: Written at the top of every export folder: ingest never scans a folder holding it.
try:
    from imgcluster.paths import EXPORT_MARKER
except ImportError:  # pragma: no cover - paths.py is new; keep the export importable
    EXPORT_MARKER = ".imgcluster-export"

_LOCK_SUFFIX = ".lock"


def lock_path(out: Path) -> Path:
    """The lock every export to ``out`` holds while it runs (deleted when it ends)."""
    return out.parent / f".{out.name}.export.lock"


def storage_error(exc: OSError, folder: Path, what: str = "write the export") -> ExportError:
    """One line for a filesystem refusal: which folder, why, what to do."""
    why = (exc.strerror or str(exc)).lower()
    hint = {
        errno.ENOSPC: "free some space or choose another disk",
        errno.EDQUOT: "free some space or choose another disk",
        errno.EROFS: "choose a writable folder",
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.ENOENT: "choose an existing, writable parent folder",
        errno.EFBIG: "the file is larger than this filesystem or process allows",
    }.get(exc.errno or 0, "choose another folder")
    return ExportWriteError(f"cannot {what} in {folder}: {why}; {hint}")


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold the OUT lock: refuse with `Busy` if another export to ``out`` is running.

    The lock file is deleted when the export ends, so nothing is left beside OUT. That is safe
    because a lock taken on a file that was deleted meanwhile (opened just before its holder
    deleted it) is detected by its inode and taken again on the current file.
    """
    path = lock_path(out)
    for _attempt in range(10):
        lock = _acquire(out, path)
        if _same_file(lock, path):
            break
        lock.release()
    else:  # pragma: no cover - ten exports finishing in a row under our feet
        raise Busy(f"another export to {out} is running; wait for it to finish")
    with lock:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _acquire(out: Path, path: Path) -> JobLock:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return acquire(path, wait=0, what=f"export to {out}")
    except Busy:
        raise Busy(
            f"another export to {out} is running; wait for it to finish or choose another folder"
        ) from None
    except WorkspaceReadOnly as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise storage_error(cause, out.parent) from None
        raise ExportWriteError(f"cannot write the export in {out.parent}: {exc}") from None
    except OSError as exc:
        raise storage_error(exc, out.parent) from None


def _same_file(lock: JobLock, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (not a deleted one)."""
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def build_folder(out: Path) -> Iterator[tuple[Path, Path]]:
    """A new build folder beside ``out`` (call under `export_lock`), removed on any error.

    Yields the build folder and the name the previous export is moved to during the swap.
    """
    try:
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as exc:
        raise storage_error(exc, out.parent) from None
    try:
        yield stage, Path(f"{stage}.old")
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # still there only if the export failed


def swap_into_place(stage: Path, out: Path, aside: Path, *, overwrite: bool) -> None:
    """Rename the finished export to ``out``.

    Without ``overwrite`` the rename itself refuses an ``out`` that is not empty (the kernel
    decides, so an export that appeared since the checks is never replaced). With it, an old
    export is renamed aside first and deleted last, so until the new one is in place the old
    one is complete; a crash between the two renames is undone by `recover_abandoned`.
    """
    if not overwrite or not out.exists():
        try:
            os.rename(stage, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ExportError(
                    f"export folder {out} appeared while this export was written; "
                    "pass overwrite=True (--overwrite) to replace it"
                ) from None
            raise storage_error(exc, out.parent) from None
        return
    os.rename(out, aside)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_abandoned(out: Path) -> None:
    """Clean up after exports to ``out`` that were killed (call under `export_lock`).

    Deletes their half-built folders and puts back a previous export a crash left renamed
    aside. A build holding a per-build lock of its own (``.OUT.export-XXXX.lock``, the scheme
    of earlier versions) that is still locked is left alone.
    """
    pattern = f".{glob.escape(out.name)}.export-*"
    for entry in sorted(out.parent.glob(pattern)):
        base = str(entry)
        for suffix in (_LOCK_SUFFIX, ".old"):
            base = base.removesuffix(suffix)
        if is_locked(base + _LOCK_SUFFIX):
            continue
        aside = entry.name.endswith(".old") and entry.is_dir() and not entry.is_symlink()
        if aside and not out.exists() and not out.is_symlink():
            os.rename(entry, out)  # a crash between the two renames of a swap: put it back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an imgcluster export (its marker, or its ``labels.json``)."""
    if (folder / EXPORT_MARKER).is_file():
        return True
    try:
        document = json.loads((folder / LABELS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and str(document.get("format", "")).startswith(
        "imgcluster-export/"
    )


def check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse a target that is a file, a symlink, or a folder that is not ours to replace."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"export target {out} exists and is not a folder; remove it first")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"export folder {out} already exists and is not empty; "
                "pass overwrite=True (--overwrite) to replace it"
            )
        if not is_export(out):
            raise ExportError(
                f"export folder {out} is not empty and is not an imgcluster export "
                f"(no {LABELS_NAME}); refusing to replace it -- choose another folder"
            )
