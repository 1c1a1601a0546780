"""A generated corpus of hostile image-collection entries, each with its expected outcome.

Everything is written at test time into a temporary folder (nothing binary is committed). Each
`Case` says what the workspace must record for one entry: a usable image with a known size and
colour, a skipped file with a reason of a known kind, or nothing at all (a folder, a link that
is not followed). The corpus is ingested once by `imgcluster ingest` in a subprocess, with root's
file-permission override dropped so that permission cases behave as for a normal user.
"""

from __future__ import annotations

import io
import os
import struct
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from imgcluster.images import MAX_FILE_BYTES

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Case:
    """One hostile entry and what ingest must make of it.

    status is ``"ok"`` (usable; `size` is the upright thumbnail size, `color` its mean colour),
    ``"skipped"`` (recorded with a reason starting with `reason`) or ``"absent"`` (no row).
    """

    kind: str
    relpath: str
    status: str
    reason: str = ""
    size: tuple[int, int] | None = None
    color: RGB | None = None
    fmt: str | None = None


# -- encoders ---------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def solid(color: RGB, size: tuple[int, int] = (48, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels and carries none."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG start-of-frame claiming ``width x height`` (3 components), then end of image."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def png_text_bomb(megabytes: int = 4) -> bytes:
    """A small PNG carrying a compressed text chunk that inflates to ``megabytes`` MB."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (megabytes << 20), zip=True)
    return encode(solid((1, 2, 3)), "PNG", pnginfo=info)


def exif(orientation: int | None = None, description_bytes: int = 0) -> bytes:
    data = Image.Exif()
    if orientation is not None:
        data[0x0112] = orientation
    if description_bytes:
        data[0x010E] = "E" * description_bytes  # ImageDescription: a huge APP1 segment
    return data.tobytes()


# -- the corpus -------------------------------------------------------------------------------

RED: RGB = (220, 20, 20)
GREEN: RGB = (20, 180, 40)
BLUE: RGB = (30, 40, 200)
WHITE: RGB = (255, 255, 255)


def make_corpus(root: Path, *, permissions: bool = True) -> list[Case]:
    """Write the hostile collection under ``root`` (created) and return the expectations.

    Parameters
    ----------
    permissions : bool, default=True
        Include entries whose outcome depends on file permissions being enforced (the caller
        must ingest without CAP_DAC_OVERRIDE when running as root).
    """
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def put(relpath: str | bytes, data: bytes) -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(relpath))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def ok(
        kind: str, relpath: str, data: bytes, size: tuple[int, int], color: RGB | None, fmt: str
    ) -> None:
        put(relpath, data)
        cases.append(Case(kind, relpath, "ok", size=size, color=color, fmt=fmt))

    def bad(
        kind: str,
        relpath: str,
        reason: str,
        make: Callable[[Path], object] | None = None,
        data: bytes = b"",
    ) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if make is None:
            path.write_bytes(data)
        else:
            make(path)
        cases.append(Case(kind, relpath, "skipped", reason=reason))

    # The foundation issue's bad inputs.
    noise = Image.effect_noise((256, 256), 60).convert("RGB")
    bad("truncated JPEG", "truncated.jpg", "corrupt image", data=encode(noise, "JPEG")[:1500])
    bad("zero-byte file", "empty.png", "empty file", data=b"")
    bad("text named .jpg", "notes.jpg", "not an image", data=b"shopping list: socks\n" * 20)
    ok(
        "CMYK JPEG",
        "cmyk.jpg",
        encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),
        (40, 30),
        (255, 0, 0),
        "JPEG",
    )
    sixteen = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    ok("16-bit PNG", "sixteen.png", encode(sixteen, "PNG"), (30, 20), (156, 156, 156), "PNG")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    ok(
        "palette PNG with transparency",
        "palette.png",
        encode(palette, "PNG", transparency=0),
        (16, 16),
        WHITE,
        "PNG",
    )
    ok(
        "EXIF-rotated JPEG",
        "rotated.jpg",
        encode(solid(GREEN, (60, 20)), "JPEG", quality=95, exif=exif(6)),
        (20, 60),
        GREEN,
        "JPEG",
    )
    frames = [solid(c, (10, 10)) for c in (RED, BLUE, GREEN)]
    ok(
        "animated GIF",
        "animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        (10, 10),
        RED,
        "GIF",
    )
    bad(
        "20000x20000 header-only PNG",
        "bomb.png",
        "image too large",
        data=png_header_only(20000, 20000),
    )
    ok(
        "Chinese file and folder names",
        "连衣裙/红色 连衣裙.jpg",
        encode(solid(RED), "JPEG", quality=95),
        (48, 32),
        RED,
        "JPEG",
    )

    # Geometry extremes.
    ok("1-pixel image", "one_pixel.png", encode(solid(BLUE, (1, 1)), "PNG"), (1, 1), BLUE, "PNG")
    ok(
        "500x10 image (the widest aspect ratio accepted)",
        "wide.png",
        encode(solid(GREEN, (500, 10)), "PNG"),
        (256, 5),
        GREEN,
        "PNG",
    )
    bad(
        "30000x10 image (would cost gigabytes once resized for a network)",
        "strip.png",
        "extreme aspect ratio",
        data=encode(solid(GREEN, (30000, 10)), "PNG"),
    )
    bad(
        "JPEG header claiming 65535x65535",
        "flood.jpg",
        "image too large",
        data=jpeg_header_only(65535, 65535),
    )
    bad("PNG text chunk bomb", "textbomb.png", "corrupt image", data=png_text_bomb())
    bad("truncated PNG", "truncated.png", "corrupt image", data=encode(noise, "PNG")[:700])

    # Other formats and modes.
    ok("WebP", "shot.webp", encode(solid(BLUE), "WEBP", quality=95), (48, 32), BLUE, "WEBP")
    ok("BMP", "shot.bmp", encode(solid(GREEN), "BMP"), (48, 32), GREEN, "BMP")
    pages = [solid(c, (20, 10)) for c in (BLUE, RED)]
    ok(
        "multi-page TIFF",
        "pages.tif",
        encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        (20, 10),
        BLUE,
        "TIFF",
    )
    ok(
        "huge EXIF (60 KB)",
        "huge_exif.jpg",
        encode(solid(RED, (40, 30)), "JPEG", quality=95, exif=exif(6, 60_000)),
        (30, 40),
        RED,
        "JPEG",
    )
    ok(
        "EXIF orientation out of range",
        "orient9.jpg",
        encode(solid(BLUE, (40, 30)), "JPEG", quality=95, exif=exif(9)),
        (40, 30),
        BLUE,
        "JPEG",
    )
    ok(
        "progressive JPEG",
        "progressive.jpg",
        encode(solid(GREEN), "JPEG", quality=95, progressive=True),
        (48, 32),
        GREEN,
        "JPEG",
    )
    ok(
        "grayscale JPEG",
        "gray.jpg",
        encode(Image.new("L", (30, 30), 128), "JPEG", quality=95),
        (30, 30),
        (128, 128, 128),
        "JPEG",
    )
    float_tiff = Image.fromarray(np.full((12, 12), 0.5, dtype=np.float32))
    ok(
        "32-bit float TIFF (0..1)",
        "float.tif",
        encode(float_tiff, "TIFF"),
        (12, 12),
        (128, 128, 128),
        "TIFF",
    )
    ok(
        "transparent RGBA PNG",
        "clear.png",
        encode(Image.new("RGBA", (10, 10), (255, 0, 0, 0)), "PNG"),
        (10, 10),
        WHITE,
        "PNG",
    )
    ok(
        "1-bit PNG",
        "bilevel.png",
        encode(Image.new("1", (10, 10), 1), "PNG"),
        (10, 10),
        WHITE,
        "PNG",
    )
    ok("PNG content named .jpg", "really_png.jpg", encode(solid(RED), "PNG"), (48, 32), RED, "PNG")
    ok(
        "upper-case extension",
        "SHOUT.JPG",
        encode(solid(BLUE), "JPEG", quality=95),
        (48, 32),
        BLUE,
        "JPEG",
    )

    # Hostile names.
    ok(
        "names with newlines and quotes",
        "new\nline \"double\" 'single' `tick`.png",
        encode(solid(GREEN, (8, 8)), "PNG"),
        (8, 8),
        GREEN,
        "PNG",
    )
    ok(
        "HTML in a name",
        "<img src=x onerror=alert(1)>.png",
        encode(solid(RED, (9, 9)), "PNG"),
        (9, 9),
        RED,
        "PNG",
    )
    ok(
        "Markdown link in a name",
        "[click](javascript:alert(1)).png",
        encode(solid(BLUE, (9, 9)), "PNG"),
        (9, 9),
        BLUE,
        "PNG",
    )
    ok("255-byte name", "n" * 251 + ".png", encode(solid(BLUE, (7, 7)), "PNG"), (7, 7), BLUE, "PNG")
    nfc = unicodedata.normalize("NFC", "é.png")
    nfd = unicodedata.normalize("NFD", "é.png")
    ok("NFC name", nfc, encode(solid(RED, (5, 5)), "PNG"), (5, 5), RED, "PNG")
    ok("NFD twin of the NFC name", nfd, encode(solid(BLUE, (5, 5)), "PNG"), (5, 5), BLUE, "PNG")
    put(b"caf\xe9.png", encode(solid(RED, (6, 6)), "PNG"))
    cases.append(Case("non-UTF-8 file name", "caf\\xe9.png", "skipped", reason="undecodable name"))
    # A real file whose name is the escaped spelling of an undecodable one: it must keep its row.
    put(b"col\xe9.png", encode(solid(RED, (6, 6)), "PNG"))
    ok(
        "name equal to another's escaped non-UTF-8 name",
        "col\\xe9.png",
        encode(solid(GREEN, (4, 4)), "PNG"),
        (4, 4),
        GREEN,
        "PNG",
    )

    # Links, folders and special files.
    (root / "loop_a.jpg").symlink_to("loop_b.jpg")
    (root / "loop_b.jpg").symlink_to("loop_a.jpg")
    (root / "self.jpg").symlink_to("self.jpg")
    for name in ("loop_a.jpg", "loop_b.jpg", "self.jpg"):
        cases.append(Case("symlink loop (file)", name, "skipped", reason="symlink loop"))
    ok(
        "folder holding a folder-symlink loop",
        "sub/inner.png",
        encode(solid(RED, (3, 3)), "PNG"),
        (3, 3),
        RED,
        "PNG",
    )
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)
    cases.append(Case("symlink loop (folder) not followed", "sub/loop/sub/inner.png", "absent"))
    ok(
        "directory named like an image",
        "x.jpg/inside.png",
        encode(solid(GREEN, (3, 3)), "PNG"),
        (3, 3),
        GREEN,
        "PNG",
    )
    cases.append(Case("the image-named directory itself", "x.jpg", "absent"))
    (root / "alias.png").symlink_to("one_pixel.png")
    cases.append(
        Case("symlink to an image inside", "alias.png", "ok", size=(1, 1), color=BLUE, fmt="PNG")
    )
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    cases.append(
        Case(
            "symlink pointing outside", "escape.png", "skipped", reason="symlink outside collection"
        )
    )
    (root / "outside_dir").symlink_to(outside, target_is_directory=True)
    cases.append(Case("folder symlink pointing outside", "outside_dir/secret.png", "absent"))
    (root / "dangling.jpg").symlink_to(root / "nothing-here.jpg")
    cases.append(Case("broken symlink", "dangling.jpg", "skipped", reason="broken symlink"))
    bad("FIFO named .jpg", "pipe.jpg", "not a regular file", make=lambda p: os.mkfifo(p))
    bad(
        "sparse file over the size cap",
        "huge.tif",
        "file too large",
        make=lambda p: _sparse(p, MAX_FILE_BYTES + 1),
    )

    if permissions:
        locked = put("locked.png", encode(solid(RED, (8, 8)), "PNG"))
        locked.chmod(0)
        cases.append(
            Case("unreadable file", "locked.png", "skipped", reason="unreadable: permission denied")
        )
        put("locked_dir/hidden.png", encode(solid(RED, (8, 8)), "PNG"))
        (root / "locked_dir").chmod(0)
        cases.append(
            Case(
                "folder without read permission",
                "locked_dir/",
                "skipped",
                reason="unreadable folder",
            )
        )
        cases.append(
            Case("image in a folder without read permission", "locked_dir/hidden.png", "absent")
        )
        put("listable_dir/in.png", encode(solid(RED, (8, 8)), "PNG"))
        (root / "listable_dir").chmod(0o644)  # names can be listed, files not opened
        cases.append(
            Case(
                "image in a folder without search permission",
                "listable_dir/in.png",
                "skipped",
                reason="unreadable: permission denied",
            )
        )
    return cases


def _sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no disk space (nothing should ever read it)."""
    with open(path, "wb") as fh:
        fh.truncate(size)


def restore_permissions(root: Path) -> None:
    """Make everything under ``root`` deletable again (pytest cleans tmp_path later)."""
    for name in ("locked.png", "locked_dir", "listable_dir"):
        path = root / name
        if path.exists() or path.is_symlink():
            path.chmod(0o755)
