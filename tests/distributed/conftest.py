"""A real multi-node Ray cluster on this machine, and a collection to run on it.

`ray.cluster_utils.Cluster` is what Ray's own test suite uses: a head node (the driver's
side, no CPUs, so every actor lands on a worker node, as on a real cluster) and two worker
nodes of one logical CPU each. Started once per session (~10 s); tests that remove a node
add one back.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLOTHING, SAMPLE_DATA

#: Photos per class copied from the clothing set (10 classes): a few hundred in all.
PER_CLASS = 20
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred real photos, plus the bad files a real catalogue has.

    Copied, so tests may change or delete files after ingest. Bad files: not an image, a
    truncated JPEG, an empty file and an exact duplicate (one vector for two files).
    """
    root = tmp_path_factory.mktemp("ray-collection")
    if (CLOTHING / "labels.csv").exists():
        for folder in sorted(p for p in CLOTHING.iterdir() if p.is_dir()):
            (root / folder.name).mkdir()
            for photo in sorted(folder.glob("*.jpg"))[:PER_CLASS]:
                shutil.copy2(photo, root / folder.name / photo.name)
    else:  # a fresh clone without ../shared: the 120 sample photos
        shutil.copytree(SAMPLE_DATA / "images", root / "sample")
    photos = sorted(root.rglob("*.jpg"))
    assert len(photos) >= 100
    (root / "bad").mkdir()
    (root / "bad" / "not-an-image.jpg").write_bytes(b"this is a text file named like a photo\n")
    data = photos[0].read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "bad" / "empty.png").write_bytes(b"")
    shutil.copy2(photos[1], root / "bad" / "copy-of-another.jpg")
    return root


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """Head + two worker nodes, with this process connected as the driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024 * 1024},
    )
    for _ in range(2):
        cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
