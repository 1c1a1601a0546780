"""Regenerate `sample_data/` from the CC0 clothing photos in `../shared/datasets/clothing`.

Run by a maintainer from the project root (`.venv/bin/python sample_data/generate.py`); the app
and tests use the committed JPEGs, not this script. It is deterministic: the first
`PER_CLASS` files by name of each class, each turned upright by its EXIF orientation, resized so
its longest side is `LONGEST_SIDE` px and saved as a baseline JPEG with no EXIF, ICC or comment
block (nothing about the camera or the original file travels with the sample).

File names are the first 8 hex digits of the source's UUID name, in one flat folder, so neither
the folder nor the name gives the class away: the app must find the groups itself.
`labels.csv` holds the true class (and the source path) of each image, for tests and benchmarks.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "datasets" / "clothing"
PER_CLASS = 12
LONGEST_SIDE = 400
QUALITY = 85


def _source_rows() -> dict[str, list[str]]:
    """Source paths by class, in file-name order (the reproducible choice of `PER_CLASS`)."""
    by_class: dict[str, list[str]] = {}
    with open(SOURCE / "labels.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_class.setdefault(row["label"], []).append(row["path"])
    return {label: sorted(paths)[:PER_CLASS] for label, paths in sorted(by_class.items())}


def _write_photo(src: Path, dst: Path) -> None:
    with Image.open(src) as opened:
        img = ImageOps.exif_transpose(opened).convert("RGB")
    scale = LONGEST_SIDE / max(img.size)
    if scale < 1:
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, Image.Resampling.LANCZOS)
    # A fresh image carries no info dict: no EXIF, no ICC profile, no comment.
    clean = Image.new("RGB", img.size)
    clean.paste(img)
    clean.save(dst, "JPEG", quality=QUALITY, optimize=True)


def main() -> None:
    if not (SOURCE / "labels.csv").is_file():
        raise SystemExit(f"{SOURCE} not found: it lives in ../shared beside the project")
    images = HERE / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir()
    rows = []
    for label, paths in _source_rows().items():
        for path in paths:
            rel = f"images/{Path(path).stem[:8]}.jpg"
            _write_photo(SOURCE / path, HERE / rel)
            rows.append((rel, label, path))
    rows.sort()
    assert len({r[0] for r in rows}) == len(rows), "two sources share an 8-digit prefix"
    with open(HERE / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "source"])
        writer.writerows(rows)
    shutil.copyfile(SOURCE / "LICENSE", HERE / "LICENSE")


if __name__ == "__main__":
    main()
