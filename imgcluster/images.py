"""Image files: scan a folder, validate by decoding, normalise to RGB, thumbnails, ingest.

Every file is judged by actually decoding it, because extensions lie and headers can promise
20000x20000 pixels. A file that fails is recorded with a reason a person can act on and the
scan goes on. Source images are opened read-only and never written.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcluster.errors import InvalidPath
from imgcluster.workspace import Workspace, atomic_write

#: Extensions scanned (lower case). Other files are counted as ignored, not reported.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Largest image accepted, in pixels (Pillow's own warning threshold). Decoding a bigger one
#: could take gigabytes of memory: a decompression bomb is refused from its header alone.
MAX_PIXELS = 89_478_485

#: Largest file read, in bytes. Ingest reads a whole file to hash and decode it; an uncompressed
#: 16-bit RGBA TIFF at MAX_PIXELS is about 700 MiB, so nothing usable is larger than this.
MAX_FILE_BYTES = 1 << 30

THUMBNAIL_SIDE = 256

#: Progress callbacks receive ``(done, total)``; the CLI draws a bar, the app a progress widget.
Progress = Callable[[int, int], None]


class ImageRejected(Exception):
    """A file that cannot be used; ``reason`` is ``"<kind>: <detail>"`` for people."""

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.reason = f"{kind}: {detail}" if detail else kind
        super().__init__(self.reason)


@dataclass(frozen=True)
class DecodedImage:
    """A validated image: RGB pixels plus what the database records about the file."""

    image: Image.Image
    width: int
    height: int
    format: str


# -- decoding ---------------------------------------------------------------------------------


def open_rgb(
    source: str | os.PathLike[str] | bytes,
    *,
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode an image file fully and return it as upright 8-bit RGB.

    Parameters
    ----------
    source : path or bytes
        The file, or its content already read (ingest reads once to hash and decode).
    draft_size : (width, height), optional
        Let JPEG decoding scale down by DCT while decoding (Pillow ``draft``) to at least this
        size: several times faster for feature extraction of large photos.

    Returns
    -------
    DecodedImage
        RGB pixels after EXIF orientation; width/height/format of the original file.

    Raises
    ------
    ImageRejected
        Empty, not an image, too large, corrupt or truncated.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageRejected("empty file", "0 bytes")
        fp: io.BytesIO | str | os.PathLike[str] = io.BytesIO(source)
    else:
        fp = source
    try:
        with Image.open(fp) as img:
            width, height = img.size
            fmt = img.format or "unknown"
            if width * height > MAX_PIXELS:
                raise ImageRejected(
                    "image too large",
                    f"{width}x{height} = {width * height / 1e6:.0f} megapixels, more than the "
                    f"{MAX_PIXELS / 1e6:.0f} megapixel limit (possible decompression bomb)",
                )
            if draft_size is not None and fmt == "JPEG":
                img.draft("RGB", draft_size)
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame stands for the file
            img.load()
            rgb = to_rgb(img)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("not an image", "no known image format found in the file") from exc
    except Image.DecompressionBombError as exc:
        # Pillow refuses more than twice its limit while still parsing the header.
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(match.group(1)) / 1e6:.0f} megapixels" if match else "too many pixels"
        raise ImageRejected(
            "image too large",
            f"{pixels}, more than the {MAX_PIXELS / 1e6:.0f} megapixel limit "
            "(possible decompression bomb)",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("corrupt image", _short(exc)) from exc
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any Pillow mode.

    Transparent pixels are composited on white (product shots are usually on white, and black
    would pull cut-outs of every class together); 16-bit and float data are scaled, not clipped,
    so a 16-bit PNG does not come out white.
    """
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0  # float images conventionally hold 0..1; scaled by 255 they come out black
        arr8 = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def make_thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A copy whose longest side is at most ``side`` (never upscaled)."""
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumb


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- scanning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannedFile:
    """A candidate file found under the collection root."""

    relpath: str
    path: Path
    problem: str | None = None  # a reason to skip found while scanning (permissions, symlink)
    link: bool = False  # a symlink (checked to point inside the collection) when scanned


def scan(root: str | os.PathLike[str]) -> Iterator[ScannedFile]:
    """Yield image-like files under ``root`` recursively, sorted by relative path.

    Folder symlinks are not followed (no loops, no escaping the collection); file symlinks are
    followed only when they point inside ``root``. Unreadable folders are reported, not fatal.
    """
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise InvalidPath(f"image folder {root_path} does not exist or is not a folder")
    found: list[ScannedFile] = []
    undecodable: dict[str, ScannedFile] = {}

    def on_error(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root_path
        rel = _relpath(where, root_path)
        detail = (err.strerror or _short(err)).lower()
        found.append(ScannedFile(rel + "/", where, f"unreadable folder: {detail}"))

    for dirpath, dirnames, filenames in os.walk(root_path, onerror=on_error):
        dirnames.sort()
        folder = Path(dirpath)
        for name in filenames:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = folder / name
            rel = _relpath(path, root_path)
            if rel != path.relative_to(root_path).as_posix():
                # Not valid UTF-8: the stored name cannot lead back to this file (and may equal
                # another file's real name), so it must never be opened by name later.
                undecodable.setdefault(rel, ScannedFile(rel, path, _UNDECODABLE))
                continue
            problem = None
            try:
                is_link = path.is_symlink()
            except OSError as exc:  # e.g. a folder that can be listed but not searched
                reason = f"unreadable: {(exc.strerror or _short(exc)).lower()}"
                found.append(ScannedFile(rel, path, reason))
                continue
            if is_link:
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on ELOOP
                    found.append(ScannedFile(rel, path, "symlink loop: the link never ends"))
                    continue
                if not target.is_relative_to(root_path):
                    problem = "symlink outside collection: points to a file outside the folder"
                elif not target.is_file():
                    problem = "broken symlink: the link points to nothing"
            found.append(ScannedFile(rel, path, problem, link=is_link))
    taken = {f.relpath for f in found}
    found.extend(f for rel, f in undecodable.items() if rel not in taken)
    found.sort(key=lambda f: f.relpath)
    yield from found


_UNDECODABLE = "undecodable name: the file name is not valid UTF-8; rename the file to use it"


def _relpath(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    # Names that are not valid UTF-8 arrive as surrogate escapes, which SQLite cannot store.
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- ingest -----------------------------------------------------------------------------------


@dataclass
class IngestReport:
    """What an ingest did, for the CLI summary and the app."""

    found: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    missing: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class _Outcome:
    relpath: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    decoded: DecodedImage | None
    reason: str | None


def ingest(
    workspace: Workspace,
    root: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> IngestReport:
    """Add the images under ``root`` to the workspace.

    Files already ingested with the same size and modification time are not read again; a
    file whose content changed is re-validated. A file with the same content as another is
    recorded as its exact duplicate. Files that vanished are marked ``missing``.

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
    """
    root_path = workspace.set_collection_root(root)
    files = list(scan(root_path))
    report = IngestReport(found=len(files))
    with workspace.read() as conn:
        known = {
            row["relpath"]: row
            for row in conn.execute("SELECT relpath, sha256, size, mtime_ns, status FROM images")
        }
    todo: list[ScannedFile] = []
    for scanned in files:
        row = known.get(scanned.relpath)
        stat = _stat(scanned.path)
        if (
            row is not None
            and stat is not None
            and row["status"] != "missing"
            and (row["size"], row["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        ):
            report.unchanged += 1
        else:
            todo.append(scanned)

    total = len(todo)
    if progress:
        progress(0, total)
    batch: list[_Outcome] = []
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) + 2)) as pool:
        for done, outcome in enumerate(pool.map(lambda f: _examine(f, workspace), todo), start=1):
            batch.append(outcome)
            if len(batch) >= 64:
                _store(workspace, batch, known, report)
                batch = []
            if progress:
                progress(done, total)
    _store(workspace, batch, known, report)

    seen = {f.relpath for f in files}
    gone = [rel for rel, row in known.items() if rel not in seen and row["status"] != "missing"]
    with workspace.transaction() as conn:
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
    with workspace.read() as conn:
        for (reason,) in conn.execute("SELECT skip_reason FROM images WHERE status = 'skipped'"):
            report.skipped[reason.split(":", 1)[0]] += 1
    return report


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _examine(scanned: ScannedFile, workspace: Workspace) -> _Outcome:
    """Read, hash, decode and thumbnail one file; never raises for a bad file."""
    if scanned.problem:
        return _Outcome(scanned.relpath, None, None, None, None, scanned.problem)
    # Non-blocking: a file swapped for a FIFO since the scan must not hang the open. No-follow
    # when the scan saw a plain file: one swapped for a link since could point anywhere.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not scanned.link:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(scanned.path, flags)
    except OSError as exc:
        detail = (exc.strerror or _short(exc)).lower()
        return _Outcome(scanned.relpath, None, None, None, None, f"unreadable: {detail}")
    try:
        read = _read_regular(scanned, fd)
    finally:
        os.close(fd)
    if isinstance(read, _Outcome):
        return read
    stat, data = read
    sha = hashlib.sha256(data).hexdigest()
    try:
        decoded = open_rgb(data)
    except ImageRejected as exc:
        return _Outcome(scanned.relpath, stat.st_size, stat.st_mtime_ns, sha, None, exc.reason)
    thumb_path = workspace.thumbnail_path(sha)
    if not thumb_path.exists():
        thumb = make_thumbnail(decoded.image)
        atomic_write(thumb_path, lambda fh: thumb.save(fh, format="JPEG", quality=85))
    return _Outcome(scanned.relpath, stat.st_size, stat.st_mtime_ns, sha, decoded, None)


def _read_regular(scanned: ScannedFile, fd: int) -> tuple[os.stat_result, bytes] | _Outcome:
    """The stat and bytes of an open file, or the outcome that says why it is not read."""
    try:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode):
            # A FIFO or device named like an image would block (or never end) when read.
            reason = "not a regular file: a pipe, device, socket or folder named like an image"
            return _Outcome(scanned.relpath, None, None, None, None, reason)
        if stat.st_size > MAX_FILE_BYTES:
            # Read whole into memory to hash and decode: cap it before reading, not after.
            reason = (
                f"file too large: {stat.st_size:,} bytes, more than the "
                f"{MAX_FILE_BYTES >> 20:,} MiB limit"
            )
            return _Outcome(scanned.relpath, None, None, None, None, reason)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return stat, fh.read()
    except OSError as exc:
        detail = (exc.strerror or _short(exc)).lower()
        return _Outcome(scanned.relpath, None, None, None, None, f"unreadable: {detail}")


def _store(
    workspace: Workspace, outcomes: Iterable[_Outcome], known: dict, report: IngestReport
) -> None:
    rows = []
    for o in outcomes:
        if o.relpath in known:
            report.changed += 1
        else:
            report.new += 1
        d = o.decoded
        rows.append(
            (
                o.relpath,
                o.sha256,
                o.size,
                o.mtime_ns,
                d.width if d else None,
                d.height if d else None,
                d.format if d else None,
                "ok" if d else "skipped",
                o.reason,
            )
        )
    if not rows:
        return
    with workspace.transaction() as conn:
        conn.executemany(
            """
            INSERT INTO images(relpath, sha256, size, mtime_ns, width, height, format,
                               status, skip_reason)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(relpath) DO UPDATE SET
                sha256 = excluded.sha256, size = excluded.size, mtime_ns = excluded.mtime_ns,
                width = excluded.width, height = excluded.height, format = excluded.format,
                status = excluded.status, skip_reason = excluded.skip_reason,
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            """,
            rows,
        )


def _mark_duplicates(conn) -> None:
    """Point every exact copy at the first-ingested image with the same content."""
    conn.execute(
        """
        UPDATE images SET duplicate_of = CASE WHEN status = 'ok' THEN (
            SELECT MIN(i2.id) FROM images AS i2
            WHERE i2.sha256 = images.sha256 AND i2.status = 'ok' AND i2.id < images.id
        ) END
        """
    )
