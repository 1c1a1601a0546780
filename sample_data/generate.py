"""Regenerate `sample_data/images/` from Debian's `dataset-fashion-mnist` package (Expat licence).

Run once by a maintainer (`apt-get install dataset-fashion-mnist`, then
`python sample_data/generate.py`); the app and tests use the committed PNGs, not this script.
Fashion-MNIST images are 28x28 white-on-black renderings of Zalando product photos; they are
inverted to dark-on-white and upscaled 4x so they read like catalogue shots in the app.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {1: "trouser", 5: "sandal", 7: "sneaker", 8: "bag", 9: "ankle_boot", 0: "t-shirt"}
PER_CLASS = 30
SCALE = 4


def _read(name: str, offset: int) -> np.ndarray:
    with gzip.open(SOURCE / name) as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def main() -> None:
    out = Path(__file__).parent
    images = _read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read("t10k-labels-idx1-ubyte.gz", 8)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for cls, name in CLASSES.items():
        for index in np.flatnonzero(labels == cls)[:PER_CLASS]:
            img = Image.fromarray(255 - images[index], mode="L")
            img = img.resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC)
            rel = f"images/fmnist_{int(index):05d}.png"
            img.save(out / rel, optimize=True)
            rows.append((rel, name))
    rows.sort()
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


if __name__ == "__main__":
    main()
