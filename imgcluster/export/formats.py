"""Which image formats an export writes, and re-encoding the others.

A trainer reading the export with ``keras.utils.image_dataset_from_directory`` lists only
``.bmp .gif .jpeg .jpg .png`` files and decodes them with ``tf.io.decode_image``, which knows
JPEG, PNG, GIF, BMP and WebP by their content. A file with another format, or whose extension
says another format than its content (a TIFF named ``.jpg``), fails mid-training with "Unknown
image file format" or is silently skipped. So by default (``format="auto"``) the export copies
JPEG, PNG, GIF and BMP files as they are, under the extension of their content, and re-encodes
everything else as PNG (lossless: the pixels Pillow decoded at ingest, alpha kept). WebP is
re-encoded too: TensorFlow decodes it but keras' directory loader skips ``.webp`` files.

``format="png"`` or ``"jpeg"`` writes every file in that format; ``"keep"`` copies every file
as it is under its own name (the export warns about formats keras skips).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

#: The ``format`` choices of `export_items` / ``imgcluster export --format``.
FORMAT_CHOICES = ("auto", "png", "jpeg", "keep")


@dataclass(frozen=True)
class FormatSpec:
    """A format the export writes: its extensions (the first is used for new names)."""

    name: str
    extensions: tuple[str, ...]


#: Formats keras' directory loader lists and TensorFlow decodes, by Pillow name.
FORMATS = {
    "JPEG": FormatSpec("JPEG", (".jpg", ".jpeg")),
    "PNG": FormatSpec("PNG", (".png",)),
    "GIF": FormatSpec("GIF", (".gif",)),
    "BMP": FormatSpec("BMP", (".bmp",)),
}
#: Stored (Pillow) format names that are one of `FORMATS` in content.
_ALIASES = {"MPO": "JPEG", "JPG": "JPEG"}
_BY_EXTENSION = {ext: spec.name for spec in FORMATS.values() for ext in spec.extensions}
#: Extensions keras' ``image_dataset_from_directory`` lists (it ignores every other file).
KERAS_EXTENSIONS = frozenset(_BY_EXTENSION)
#: JPEG quality when re-encoding for ``format="jpeg"``.
JPEG_QUALITY = 95


def content_format(stored: str | None, relpath: str) -> str | None:
    """The format of an image: the one recorded at ingest, else guessed from its extension."""
    if stored:
        name = stored.upper()
        return _ALIASES.get(name, name)
    ext = "." + relpath.rsplit(".", 1)[-1].lower() if "." in relpath else ""
    return _BY_EXTENSION.get(ext)


def output_format(stored: str | None, relpath: str, policy: str = "auto") -> str | None:
    """The format an image is exported in (None: its bytes as they are, under its name)."""
    if policy == "keep":
        return None
    if policy in ("png", "jpeg"):
        return policy.upper()
    fmt = content_format(stored, relpath)
    return fmt if fmt in FORMATS else "PNG"


def sniff(head: bytes) -> str | None:
    """The trainer format these first bytes are in, or None (another format, or a variant
    TensorFlow cannot decode, such as a 1-bit or RLE-compressed BMP)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM") and len(head) >= 34:
        bpp = int.from_bytes(head[28:30], "little")
        compression = int.from_bytes(head[30:34], "little")
        header = int.from_bytes(head[14:18], "little")
        if header >= 40 and bpp in (8, 24, 32) and compression == 0:
            return "BMP"
    return None


def reencode(data: bytes, target: str, out: BinaryIO) -> None:
    """Decode ``data`` with Pillow and write it to ``out`` in ``target`` format.

    PNG keeps every pixel (and alpha, palette, 16-bit grey); JPEG flattens alpha onto white;
    BMP is written as 8-bit grey, 24-bit RGB or 32-bit RGBA (what TensorFlow decodes). Only
    the first frame of an animation is kept. The caller checked the content's hash, so this
    is the image decoded at ingest (whose pixel limit applies here too).

    Raises
    ------
    OSError, ValueError, ...
        Whatever Pillow raises on content it cannot decode or write; the caller reports it.
    """
    from PIL import Image, ImageOps

    from imgcluster.images import MAX_PIXELS

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width}x{height} is over the {MAX_PIXELS:,} pixel limit")
        img.seek(0)
        _save(_upright(img, ImageOps), target, out)


def _upright(img, image_ops):
    """The image as the annotator saw it (EXIF orientation applied): the exported file has no
    EXIF and trainers ignore orientation anyway. Malformed EXIF leaves the pixels as stored."""
    try:
        return image_ops.exif_transpose(img)
    except Exception:
        return img


def _save(img, target: str, out: BinaryIO) -> None:
    from PIL import Image

    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if target == "JPEG":
        rgb = img.convert("RGBA") if has_alpha else img.convert("RGB")
        if has_alpha:
            flat = Image.new("RGB", rgb.size, (255, 255, 255))
            flat.paste(rgb, mask=rgb.getchannel("A"))
            rgb = flat
        rgb.save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif target == "BMP":
        mode = "L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGBA" if has_alpha else "RGB"
        img.convert(mode).save(out, "BMP")
    elif target == "GIF":
        img.save(out, "GIF")
    else:
        _png_ready(img, has_alpha).save(out, "PNG", compress_level=6)


def _png_ready(img, has_alpha: bool):
    """``img`` in a mode PNG stores without loss (16-bit grey stays 16-bit)."""
    if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        return img
    if img.mode in ("I", "F", "I;16B", "I;16L", "I;16N"):
        return img.convert("I;16") if _fits_16_bit(img) else img.convert("L")
    return img.convert("RGBA" if has_alpha else "RGB")


def _fits_16_bit(img) -> bool:
    low, high = img.getextrema()
    return low >= 0 and high <= 65535
