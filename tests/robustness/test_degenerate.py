"""Degenerate collections reach clustering and labeling: as many clusters as images, identical
images, all-zero vectors. Each ends in a stored run or an `ImgclusterError` a person can act
on, never in a library exception from deep inside scikit-learn.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imgcluster.errors import ImgclusterError
from imgcluster.features import save_vectors
from imgcluster.workspace import Workspace
from tests.robustness.invariants import problems

BACKBONE = "synthetic"


def _workspace(tmp_path: Path, vectors: np.ndarray) -> Workspace:
    """Image rows (no files: clustering and labeling never open them) with these vectors."""
    ws = Workspace(tmp_path / "ws", create=True)
    (tmp_path / "photos").mkdir()
    ws.set_collection_root(tmp_path / "photos")
    shas = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(len(vectors))]
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT INTO images(relpath, sha256, size, mtime_ns, width, height, format, status) "
            "VALUES (?, ?, 1, 1, 8, 8, 'PNG', 'ok')",
            [(f"{i:03d}.png", sha) for i, sha in enumerate(shas)],
        )
    save_vectors(ws, BACKBONE, shas, np.asarray(vectors, dtype=np.float32))
    return ws


@pytest.mark.parametrize(
    ("case", "vectors", "k"),
    [
        ("as many clusters as images", np.eye(4, 16), 4),
        ("one image fewer than clusters allow", np.eye(5, 16), 4),
        ("identical images", np.ones((6, 16)), 2),
        ("all-zero vectors", np.zeros((6, 16)), 3),
        ("two points, two clusters", np.eye(2, 16), 2),
    ],
)
def test_degenerate_clustering_gives_a_run_or_a_clear_error(
    tmp_path: Path, case: str, vectors: np.ndarray, k: int
) -> None:
    from imgcluster.clustering import cluster
    from imgcluster.labels import list_labels, start_session

    ws = _workspace(tmp_path, vectors)
    try:
        run = cluster(ws, BACKBONE, k)
    except ImgclusterError:
        return  # refused with a message for people: fine
    assert int(np.sum(run.sizes)) == len(vectors), case
    start_session(ws, run.id)
    assert sum(label.count for label in list_labels(ws)) == len(vectors)
    assert problems(ws, thumbnails=False) == []
