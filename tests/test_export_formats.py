"""The export is a dataset the trainer reads (issue 14 §4): every file it writes is a format
``keras.utils.image_dataset_from_directory`` lists and ``tf.io.decode_image`` decodes, under
the extension of its content, whatever format the collection held under whatever name.

One file of every format Pillow can write and read on this machine (AVIF, BLP, BMP in 1/8/24/
32 bits, DDS, ICNS, ICO, IM, JPEG 2000, MSP, PCX, PPM, QOI, SGI, SPIDER, TGA, TIFF, WebP, XBM,
CMYK JPEG, 16-bit PNG, APNG, animated GIF...) named ``.jpg`` or ``.png`` is ingested, labeled
and exported through the library, and each exported file is decoded by TensorFlow.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from imgcluster.export import (
    FORMATS,
    KERAS_EXTENSIONS,
    ExportItem,
    export_items,
    export_workspace,
    read_manifest,
)
from imgcluster.export.formats import sniff

pytestmark = pytest.mark.filterwarnings("ignore:IM image format:DeprecationWarning")

W, H = 24, 16


def _picture(mode: str = "RGB") -> Image.Image:
    """A small picture with structure (so a wrong decode shows), in ``mode``."""
    x = np.linspace(0, 255, W, dtype=np.uint8)[None, :].repeat(H, 0)
    y = np.linspace(255, 0, H, dtype=np.uint8)[:, None].repeat(W, 1)
    rgb = Image.fromarray(np.stack([x, y, (x // 2 + y // 2)], axis=-1), "RGB")
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(x))
        return rgba
    return rgb.convert(mode)


def _encode(fmt: str, mode: str = "RGB", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    _picture(mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [_picture().rotate(angle) for angle in (0, 90, 180)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def corpus() -> dict[str, bytes]:
    """``case name -> file content`` for every format Pillow writes and reads here."""
    cases = {
        "jpeg": lambda: _encode("JPEG"),
        "jpeg-grey": lambda: _encode("JPEG", "L"),
        "jpeg-cmyk": lambda: _encode("JPEG", "CMYK"),
        "jpeg-progressive": lambda: _encode("JPEG", progressive=True),
        "png": lambda: _encode("PNG"),
        "png-rgba": lambda: _encode("PNG", "RGBA"),
        "png-16bit": lambda: _encode("PNG", "I;16"),
        "png-palette": lambda: _encode("PNG", "P"),
        "apng": lambda: _animated("PNG"),
        "gif": lambda: _encode("GIF"),
        "gif-animated": lambda: _animated("GIF"),
        "bmp-1bit": lambda: _encode("BMP", "1"),
        "bmp-8bit": lambda: _encode("BMP", "L"),
        "bmp-24bit": lambda: _encode("BMP"),
        "bmp-32bit": lambda: _encode("BMP", "RGBA"),
        "dib": lambda: _encode("DIB"),
        "webp": lambda: _encode("WEBP", quality=90),
        "webp-lossless": lambda: _encode("WEBP", lossless=True),
        "webp-animated": lambda: _animated("WEBP"),
        "tiff": lambda: _encode("TIFF"),
        "tiff-lzw": lambda: _encode("TIFF", compression="tiff_lzw"),
        "tiff-16bit": lambda: _encode("TIFF", "I;16"),
        "tiff-cmyk": lambda: _encode("TIFF", "CMYK"),
        "tiff-float": lambda: _encode("TIFF", "F"),
        "tiff-multipage": lambda: _animated("TIFF"),
        "jpeg2000": lambda: _encode("JPEG2000"),
        "avif": lambda: _encode("AVIF"),
        "dds": lambda: _encode("DDS"),
        "ico": lambda: _encode("ICO", sizes=[(16, 16)]),
        "icns": lambda: _encode("ICNS"),
        "pcx": lambda: _encode("PCX"),
        "ppm": lambda: _encode("PPM"),
        "pgm": lambda: _encode("PPM", "L"),
        "tga": lambda: _encode("TGA"),
        "tga-rgba": lambda: _encode("TGA", "RGBA"),
        "sgi": lambda: _encode("SGI"),
        "qoi": lambda: _encode("QOI"),
        "im": lambda: _encode("IM"),
        "msp": lambda: _encode("MSP", "1"),
        "xbm": lambda: _encode("XBM", "1"),
        "blp": lambda: _encode("BLP", "P"),
        "spider": lambda: _encode("SPIDER", "F"),
        "mpo": lambda: _encode("MPO"),
    }
    found = {}
    for name, make in cases.items():
        try:
            data = make()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception:
            continue
        found[name] = data
    return found


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _decodes(tf, path: Path) -> tuple[int, ...]:
    tensor = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False)
    return tuple(tensor.shape)


def _labeled(tmp_path: Path, files: dict[str, bytes]):
    """A workspace holding ``files`` (relpath -> bytes), ingested, clustered and labeled."""
    from imgcluster import labels
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    root = tmp_path / "photos"
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root, workers=1)
    images = ws.images()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(images), 8)).astype(np.float32)
    save_vectors(ws, "synthetic", [r.sha256 for r in images], vectors)
    labels.start_session(ws, cluster(ws, "synthetic", 2, random_state=0).id)
    return ws, root


def test_pillow_writes_and_reads_the_formats_the_issue_names() -> None:
    found = corpus()
    expected = {"tiff", "ico", "dds", "pcx", "ppm", "tga", "jpeg2000", "webp", "bmp-1bit"}
    if features.check("avif"):
        expected.add("avif")
    assert expected <= set(found), sorted(expected - set(found))


@pytest.mark.slow  # TensorFlow
def test_every_format_is_exported_as_one_tensorflow_decodes(tmp_path: Path, tf) -> None:
    files = {}
    for i, (name, data) in enumerate(sorted(corpus().items())):
        files[f"{name}/{name}.{'jpg' if i % 2 else 'png'}"] = data
    ws, root = _labeled(tmp_path, files)
    ingested = {r.relpath for r in ws.images()}
    assert len(ingested) >= 30, sorted(set(files) - ingested)

    result = export_workspace(ws, tmp_path / "out")
    rows = read_manifest(tmp_path / "out")
    assert result.left_out == {} and len(rows) == len(ingested)
    for row in rows:
        exported = tmp_path / "out" / row["path"]
        ext = exported.suffix.lower()
        assert ext in KERAS_EXTENSIONS, row
        content = sniff(exported.read_bytes()[:64])
        assert content is not None and ext in FORMATS[content].extensions, row
        assert row["format"] == content, row  # the manifest says what the file is
        assert _decodes(tf, exported)[2] == 3, row
        assert exported.stat().st_mode & 0o777 == 0o644
    # The default is lossless for what it converts: a TIFF's pixels survive exactly.
    tiff_row = next(r for r in rows if r["source"].startswith("tiff/"))
    exported = np.asarray(Image.open(tmp_path / "out" / tiff_row["path"]).convert("RGB"))
    source = np.asarray(Image.open(root / tiff_row["source"]).convert("RGB"))
    assert np.array_equal(exported, source)


@pytest.mark.slow  # TensorFlow
def test_keras_reads_every_file_of_the_export(tmp_path: Path, tf) -> None:
    keras = pytest.importorskip("keras")
    files = {f"{name}.jpg": data for name, data in sorted(corpus().items())}
    ws, _root = _labeled(tmp_path, files)
    result = export_workspace(ws, tmp_path / "out")
    ds = keras.utils.image_dataset_from_directory(
        tmp_path / "out", image_size=(8, 8), batch_size=None, shuffle=False, verbose=False
    )
    got = Counter(ds.class_names[int(label)] for _, label in ds)  # fails on an unknown format
    assert sum(got.values()) == result.n_files == len(ws.images())


@pytest.mark.slow  # TensorFlow
@pytest.mark.parametrize("policy", ["png", "jpeg", "keep"])
def test_format_option(tmp_path: Path, policy: str, tf) -> None:
    """``format="png"|"jpeg"`` writes every file in that format; ``"keep"`` writes the bytes
    as they are under their own name, and warns about what keras skips."""
    data = {"a.png": _encode("PNG"), "b.jpg": _encode("JPEG"), "c.tif": _encode("TIFF")}
    root = tmp_path / "src"
    root.mkdir()
    items = []
    for name, content in data.items():
        (root / name).write_bytes(content)
        import hashlib

        items.append(ExportItem(root / name, name, "x", hashlib.sha256(content).hexdigest()))
    result = export_items(items, tmp_path / "out", format=policy)
    names = sorted(p.name for p in (tmp_path / "out" / "x").iterdir())
    if policy == "keep":
        assert names == ["a.png", "b.jpg", "c.tif"]
        assert (tmp_path / "out/x/c.tif").read_bytes() == data["c.tif"]
        assert any("skips these formats: 1 .tif" in w for w in result.warnings)
        return
    ext = FORMATS[policy.upper()].extensions[0]
    assert names == sorted(f"{stem}{ext}" for stem in "abc")
    for name in names:
        assert sniff((tmp_path / "out/x" / name).read_bytes()[:64]) == policy.upper()
        assert _decodes(tf, tmp_path / "out/x" / name) == (H, W, 3)


def test_pure_export_reads_the_format_from_the_content(tmp_path: Path) -> None:
    """Without a recorded format, a TIFF named .jpg is planned from its bytes: PNG, not JPEG."""
    import hashlib

    content = _encode("TIFF")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/scan.jpg").write_bytes(content)
    item = ExportItem(
        tmp_path / "src/scan.jpg", "scan.jpg", "x", hashlib.sha256(content).hexdigest()
    )
    export_items([item], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out/x").iterdir()] == ["scan.png"]
    assert read_manifest(tmp_path / "out")[0]["format"] == "PNG"
