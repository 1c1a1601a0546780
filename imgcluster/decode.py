"""Decoding one image under a budget: upright 8-bit RGB, thumbnails, capped reads.

Every file is judged by actually decoding it, because extensions lie and headers can promise
20000x20000 pixels. Whatever a decoder raises on a hostile file becomes `ImageRejected` with
a reason a person can act on; the size, aspect and read budgets are checked before the
pixels are allocated. (Re-exported by `imgcluster.images`.)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcluster.errors import ImageRejected

#: Largest image accepted, in pixels (Pillow's own warning threshold). Decoding a bigger one
#: could take gigabytes of memory: a decompression bomb is refused from its header alone.
MAX_PIXELS = 89_478_485

#: Largest file read, in bytes. Ingest reads a whole file to hash and decode it; an uncompressed
#: 16-bit RGBA TIFF at MAX_PIXELS is about 700 MiB, so nothing usable is larger than this.
MAX_FILE_BYTES = 1 << 30

THUMBNAIL_SIDE = 256
#: Progress callbacks receive ``(done, total)``; the CLI draws a bar, the app a progress widget.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DecodedImage:
    """A validated image: RGB pixels plus what the database records about the file."""

    image: Image.Image
    width: int
    height: int
    format: str


# -- decoding ---------------------------------------------------------------------------------

#: Longest side over shortest side accepted. A 89000x1 strip passes the pixel limit but
#: resizing its short side to a network's 256 would make it 22,784,000x256 (17 GB); no product
#: photo is that thin, so it is refused at ingest with a reason instead.
MAX_ASPECT_RATIO = 50

#: Modes with more than 8 bits per channel, converted to 8 bits without float64 copies.
_HIGH_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
#: Modes Pillow's `Image.reduce` handles (integer box downscale, no full-size copy).
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "I", "F"})
#: Images above this many pixels decode at most `_BIG_AT_ONCE` at a time across threads: eight
#: ingest threads on eight 89-megapixel files would need ~3 GB at once, two need ~0.8 GB.
BIG_PIXELS = 24_000_000
_BIG_AT_ONCE = 2
_BIG_DECODES = threading.BoundedSemaphore(_BIG_AT_ONCE)
#: Rows converted at a time from a high-depth image (bounds the temporary float32 block).
_ROWS_PER_BLOCK = 512


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
        The output may be scaled down to no less than this size while decoding: JPEG by DCT
        scaling (Pillow ``draft``), other formats by an integer box ``reduce`` right after
        decoding, so a 9400x9500 16-bit PNG never becomes a full-size RGB copy.

    Returns
    -------
    DecodedImage
        RGB pixels after EXIF orientation; width/height/format of the original file.

    Raises
    ------
    ImageRejected
        Empty, not an image, too large, too thin, corrupt or truncated, and any other exception
        a decoder raises on a malformed file ("decode error: <type>: <message>"): a bad file
        is that file's problem, never the caller's batch's.
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
            _check_budget(width, height)
            if draft_size is not None and fmt == "JPEG":
                img.draft("RGB", draft_size)
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame stands for the file
            big = width * height > BIG_PIXELS
            with _BIG_DECODES if big else contextlib.nullcontext():
                img.load()
                rgb = to_rgb(_shrink(img, draft_size))
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
        raise ImageRejected("corrupt image", short_reason(exc)) from exc
    except MemoryError as exc:
        raise ImageRejected("decode error", "MemoryError: not enough memory to decode") from exc
    except Exception as exc:
        raise ImageRejected("decode error", f"{type(exc).__name__}: {short_reason(exc)}") from exc
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def _check_budget(width: int, height: int) -> None:
    """Refuse from the header alone what would cost too much memory to decode or resize."""
    if width * height > MAX_PIXELS:
        raise ImageRejected(
            "image too large",
            f"{width}x{height} = {width * height / 1e6:.0f} megapixels, more than the "
            f"{MAX_PIXELS / 1e6:.0f} megapixel limit (possible decompression bomb)",
        )
    if width < 1 or height < 1:
        raise ImageRejected("corrupt image", f"{width}x{height} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(
            "extreme aspect ratio",
            f"{width}x{height} is more than {MAX_ASPECT_RATIO}:1; crop the image to use it",
        )


def _shrink(img: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    """``img`` reduced by the largest integer factor that keeps it at least ``draft_size``."""
    if draft_size is None:
        return img
    factor = min(img.width // max(1, draft_size[0]), img.height // max(1, draft_size[1]))
    if factor < 2:
        return img
    if img.mode in _REDUCIBLE:
        return img.reduce(factor)
    if img.mode in _HIGH_DEPTH:
        return _high_depth_to_l(img, step=factor)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any Pillow mode.

    Transparent pixels are composited on white (product shots are usually on white, and black
    would pull cut-outs of every class together); 16-bit and float data are scaled, not clipped,
    so a 16-bit PNG does not come out white.
    """
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in _HIGH_DEPTH:
        return _high_depth_to_l(img).convert("RGB")
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


def _high_depth_to_l(img: Image.Image, *, step: int = 1) -> Image.Image:
    """8-bit greyscale of a 16-bit, 32-bit or float image, every ``step``-th pixel.

    Scaled (not clipped) to 0..255, one block of about `_ROWS_PER_BLOCK` source rows at a
    time, so the temporary data is a few MB whatever the image size (a 9400x9500 16-bit PNG
    once cost 2.5 GB in full-size float64 copies).
    """
    mode = img.mode
    low, high = img.getextrema()
    peak = float(max(abs(low), abs(high)))
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and peak <= 1.0:
        top = 1.0  # float images conventionally hold 0..1; scaled by 255 they come out black
    else:
        top = 65535.0 if peak > 255 else 255.0
    scale = np.float32(255.0 / top)
    width, height = img.size
    out = np.empty((-(-height // step), -(-width // step)), dtype=np.uint8)
    rows = step * max(1, _ROWS_PER_BLOCK // step)  # a whole number of steps per block
    for top_row in range(0, height, rows):
        part = img.crop((0, top_row, width, min(height, top_row + rows)))
        block = np.asarray(part)[::step, ::step].astype(np.float32) * scale
        np.clip(np.rint(block, out=block), 0, 255, out=block)
        first = top_row // step
        out[first : first + block.shape[0]] = block
    return Image.fromarray(out, mode="L")


def make_thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A copy whose longest side is at most ``side`` (never upscaled)."""
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumb


def square_thumbnail(source: str | os.PathLike[str] | Image.Image, side: int = 256) -> bytes:
    """A JPEG of ``source`` centred on a white ``side`` x ``side`` square.

    Grid cells line up whatever the photos' shapes. Small images are scaled up to fill the
    square (for display only; the stored thumbnail is never upscaled).
    """
    if isinstance(source, Image.Image):
        img = source.convert("RGB")
    else:
        with Image.open(source) as opened:
            img = opened.convert("RGB")
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def short_reason(exc: BaseException) -> str:
    """An exception's message for a skip reason (its type name if empty), at most 200 chars."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_capped(fd: int, limit: int = MAX_FILE_BYTES) -> bytes:
    """At most ``limit`` bytes of an open file; `ImageRejected` if it holds more.

    The size is checked before and during the read: a file that grows (or a 20 GB sparse file
    swapped in) is never read whole into memory.
    """
    too_large = ImageRejected(
        "file too large", f"more than the {limit >> 20:,} MiB limit for one image file"
    )
    size = os.fstat(fd).st_size
    if size > limit:
        raise too_large
    # Ask for what the file holds (+1 byte to see it grow), never for ``limit``: Python
    # allocates the whole request up front, so ``read(limit + 1)`` reserved 1 GiB of address
    # space per file, and a few threads at once ran out under an address-space cap.
    chunks, total, want = [], 0, size + 1
    with os.fdopen(fd, "rb", closefd=False) as fh:
        while total <= limit:
            chunk = fh.read(min(want, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = 1 << 20  # it grew since the stat: go on in 1 MiB steps, up to the cap
    if total > limit:
        raise too_large
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
