"""Shared fixtures: real folders of images, real workspaces on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = PROJECT / "sample_data"  # 120 CC0 photos, 10 classes x 12 (the app's sample)
# The former sample: 180 Fashion-MNIST PNGs, 6 classes x 30, for tests built on that shape.
FMNIST = PROJECT / "tests" / "fixtures" / "fmnist"
CLOTHING = PROJECT.parent / "shared" / "datasets" / "clothing"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private converted-model cache per test module, so tests never read or write the user's."""
    from imgcluster.settings import CACHE_ENV

    folder = tmp_path_factory.mktemp("imgcluster-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def clothing_dir() -> Path:
    """The 600 real CC0 product photos beside the project (read-only; never copied in)."""
    if not (CLOTHING / "labels.csv").exists():
        pytest.skip(f"{CLOTHING} not present (it lives in ../shared beside the project)")
    return CLOTHING


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def sample_photos() -> Path:
    """120 real CC0 product photos shipped in the repo (10 clothing classes x 12, JPEGs with the
    longest side 400 px, one flat folder): for tests that need real photos but not 600 of them,
    so they run on a fresh clone without ../shared. Read-only: copy before changing anything.
    Their classes: `sample_photo_classes()`."""
    return SAMPLE_DATA / "images"


def read_truth(folder: Path, *, strip: str = "") -> dict[str, str]:
    """The one truth helper: ``path -> label`` from ``folder/labels.csv`` (columns ``path``,
    ``label``), with ``strip`` removed from the front of each path. Only tests and benchmarks
    look at it."""
    import csv

    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        return {row["path"].removeprefix(strip): row["label"] for row in csv.DictReader(fh)}


def sample_photo_classes() -> dict[str, str]:
    """True class by file name of the `sample_photos` folder (only tests and benchmarks look)."""
    return read_truth(SAMPLE_DATA, strip="images/")


def synthetic_workspace(path: Path, vectors, *, backbone: str = "synthetic"):
    """A workspace built through the library: one real distinct 8x8 PNG per row of
    ``vectors``, ingested, with ``vectors`` stored as the ``backbone`` features of the images
    in relative-path order (for clustering and labeling tests that need no CNN)."""
    import numpy as np
    from PIL import Image

    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    vectors = np.asarray(vectors, dtype=np.float32)
    photos = path / "photos"
    photos.mkdir(parents=True)
    for i in range(len(vectors)):
        color = (i * 37 % 256, i * 91 % 256, i // 256 % 256)
        Image.new("RGB", (8, 8), color).save(photos / f"{i:05d}.png")
    ws = Workspace(path / "ws", create=True)
    report = ingest(ws, photos)
    assert report.ok == len(vectors) and report.duplicates == 0, report
    shas = [img.sha256 for img in ws.images()]
    save_vectors(ws, backbone, shas, vectors)
    return ws
