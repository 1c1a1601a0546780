"""Feature vectors: the on-disk store (and, below it, the batched extraction pipeline).

Vectors are L2-normalised float32, keyed by backbone name and image content hash, so exact
duplicates share one vector, re-running skips finished images and adding images extracts only
the new ones. They are stored in shards (one ``.npy`` per extraction batch) written to a
temporary file and renamed into place *before* the SQLite rows that point at them are
committed: a process killed at any moment loses at most the batch in flight, and an orphan
shard without rows is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgcluster.workspace import Workspace, atomic_write


@dataclass(frozen=True)
class FeatureMatrix:
    """Vectors of the workspace's usable images, rows aligned with ``image_ids``.

    Rows follow the images' relative-path order; images without a vector (not extracted yet)
    are absent, so always index through ``image_ids``.
    """

    backbone: str
    image_ids: np.ndarray  # int64, (n,)
    relpaths: list[str]
    sha256s: list[str]
    vectors: np.ndarray  # float32, (n, dim), L2-normalised

    def __len__(self) -> int:
        return len(self.image_ids)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows in float32 (a zero row stays zero instead of becoming NaN)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def save_vectors(
    workspace: Workspace, backbone: str, sha256s: Sequence[str], vectors: np.ndarray
) -> None:
    """Store one batch of vectors (L2-normalised here) for the given content hashes.

    Hashes that already have a vector for this backbone keep their first one.
    """
    if len(sha256s) != len(vectors):
        raise ValueError(f"{len(sha256s)} hashes for {len(vectors)} vectors")
    if not len(sha256s):
        return
    unit = l2_normalize(vectors)
    name = f"{uuid.uuid4().hex}.npy"
    path = workspace.features_dir(backbone) / name
    atomic_write(path, lambda fh: np.save(fh, unit))
    with workspace.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO feature_shards(backbone, file, n_rows, dim) VALUES (?, ?, ?, ?)",
            (backbone, f"features/{backbone}/{name}", len(unit), unit.shape[1]),
        )
        shard_id = cur.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO features(backbone, sha256, shard_id, row) VALUES (?, ?, ?, ?)",
            [(backbone, sha, shard_id, row) for row, sha in enumerate(sha256s)],
        )


def missing_hashes(workspace: Workspace, backbone: str) -> list[str]:
    """Distinct content hashes of usable images that have no vector for ``backbone`` yet."""
    with workspace.read() as conn:
        rows = conn.execute(
            """
            SELECT DISTINCT i.sha256 FROM images AS i
            WHERE i.status = 'ok' AND NOT EXISTS (
                SELECT 1 FROM features AS f WHERE f.backbone = ? AND f.sha256 = i.sha256)
            ORDER BY i.relpath
            """,
            (backbone,),
        ).fetchall()
    return [row[0] for row in rows]


def load_features(workspace: Workspace, backbone: str) -> FeatureMatrix:
    """All stored vectors of the workspace's usable images for ``backbone``."""
    with workspace.read() as conn:
        rows = conn.execute(
            """
            SELECT i.id, i.relpath, i.sha256, s.file, f.row
            FROM images AS i
            JOIN features AS f ON f.backbone = ? AND f.sha256 = i.sha256
            JOIN feature_shards AS s ON s.id = f.shard_id
            WHERE i.status = 'ok'
            ORDER BY i.relpath
            """,
            (backbone,),
        ).fetchall()
    if not rows:
        return FeatureMatrix(backbone, np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32))
    shards: dict[str, np.ndarray] = {}
    for file in {row[3] for row in rows}:
        shards[file] = np.load(workspace.path / file, mmap_mode="r")
    dim = next(iter(shards.values())).shape[1]
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for i, row in enumerate(rows):
        vectors[i] = shards[row[3]][row[4]]
    return FeatureMatrix(
        backbone=backbone,
        image_ids=np.array([row[0] for row in rows], dtype=np.int64),
        relpaths=[row[1] for row in rows],
        sha256s=[row[2] for row in rows],
        vectors=vectors,
    )


def feature_counts(workspace: Workspace) -> dict[str, int]:
    """Number of usable images with a vector, per backbone."""
    with workspace.read() as conn:
        return {
            row[0]: row[1]
            for row in conn.execute(
                """
                SELECT f.backbone, COUNT(*) FROM images AS i
                JOIN features AS f ON f.sha256 = i.sha256
                WHERE i.status = 'ok' GROUP BY f.backbone
                """
            )
        }
