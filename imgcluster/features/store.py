"""The on-disk vector store: shards of L2-normalised float32 rows keyed by content hash.

Vectors are keyed by backbone name and image content hash, so exact duplicates share one
vector, re-running skips finished images and adding images extracts only the new ones. They are
stored in shards (one ``.npy`` per extraction batch) written to a temporary file and renamed into
place *before* the SQLite rows that point at them are committed: a process killed at any moment
loses at most the batch in flight, and an orphan shard without rows is harmless.

This module owns the ``features`` and ``feature_shards`` tables (and the ``features.*`` meta
keys). A *feature set* is one backbone (``efficientnet-lite0``) or the fusion of several
(``efficientnet-lite0+efficientnet-lite2``): a fusion is never stored, it is composed from its
members' stored vectors when loaded (each normalised, concatenated, normalised again).

A shard may have a companion ``<shard>.top5.npy`` with the same rows: each content's ImageNet
top classes (indices, then probabilities), from the backbone's own classifier head, for
suggested label names. It is written before the rows are committed, like the shard.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcluster.backbones import split_feature_set
from imgcluster.errors import FeaturesDamaged, FeaturesMismatch, InvalidParameter
from imgcluster.workspace import Workspace, atomic_write, delete_meta

__all__ = [
    "FeatureMatrix",
    "FeatureRows",
    "ShardCheck",
    "check_fingerprint",
    "delete_features",
    "feature_count",
    "feature_counts",
    "feature_rows",
    "feature_set_id",
    "features_version",
    "l2_normalize",
    "load_features",
    "load_top_classes",
    "missing_hashes",
    "save_vectors",
    "stored_fingerprint",
    "verify_shards",
]

#: Suffix of a shard's companion file of ImageNet top classes.
TOP_CLASSES_SUFFIX = ".top5.npy"


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
    """Unit-length rows in float32 (a zero row stays zero instead of becoming NaN).

    A new array, written block by block: no float64 or second full-size temporary, which at
    1M x 1280 would be another 5-10 GB.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)
    out = np.empty(vectors.shape, np.float32)
    step = max(1, 2**22 // max(1, vectors.shape[1]))  # ~16 MB of rows per block
    for start in range(0, len(vectors), step):
        block = vectors[start : start + step]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
        np.divide(block, np.maximum(norms, 1e-12), out=out[start : start + step])
    return out


# -- writing ----------------------------------------------------------------------------------


def save_vectors(
    workspace: Workspace,
    backbone: str,
    sha256s: Sequence[str],
    vectors: np.ndarray,
    *,
    top_classes: np.ndarray | None = None,
) -> None:
    """Store one batch of vectors (L2-normalised here) for the given content hashes.

    Hashes that already have a vector for this backbone keep their first one. ``top_classes``
    (same rows) is kept beside the shard for `load_top_classes`.
    """
    if len(sha256s) != len(vectors):
        raise InvalidParameter(f"{len(sha256s)} hashes for {len(vectors)} vectors")
    if not len(sha256s):
        return
    rows = l2_normalize(vectors)
    name = f"{uuid.uuid4().hex}.npy"
    path = workspace.features_dir(backbone) / name
    if top_classes is not None:
        top = np.asarray(top_classes, dtype=np.float32)
        if len(top) != len(rows):
            raise InvalidParameter(f"{len(top)} rows of top classes for {len(rows)} vectors")
        atomic_write(_top_path(path), lambda fh: np.save(fh, top))
    atomic_write(path, lambda fh: np.save(fh, rows))
    with workspace.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO feature_shards(backbone, file, n_rows, dim) VALUES (?, ?, ?, ?)",
            (backbone, f"features/{backbone}/{name}", len(rows), rows.shape[1]),
        )
        shard_id = cur.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO features(backbone, sha256, shard_id, row) VALUES (?, ?, ?, ?)",
            [(backbone, sha, shard_id, row) for row, sha in enumerate(sha256s)],
        )


def _top_path(shard: Path) -> Path:
    return shard.with_name(shard.stem + TOP_CLASSES_SUFFIX)


def delete_features(workspace: Workspace, backbone: str) -> int:
    """Forget every stored vector of ``backbone`` (e.g. to re-extract with other weights).

    Rows go first, in one transaction; shard files are removed afterwards, so a crash in
    between leaves only orphan files, which nothing reads.

    Returns
    -------
    int
        Number of vectors deleted.
    """
    with workspace.transaction() as conn:
        files = [row[0] for row in conn.execute(_SHARD_FILES, (backbone,))]
        n = conn.execute("DELETE FROM features WHERE backbone = ?", (backbone,)).rowcount
        conn.execute("DELETE FROM feature_shards WHERE backbone = ?", (backbone,))
        delete_meta(conn, _fingerprint_key(backbone))
    for file in files:
        (workspace.path / file).unlink(missing_ok=True)
        _top_path(workspace.path / file).unlink(missing_ok=True)
    return n


# -- fingerprints -----------------------------------------------------------------------------


def _fingerprint_key(backbone: str) -> str:
    return f"features.{backbone}.fingerprint"


def stored_fingerprint(workspace: Workspace, backbone: str) -> str | None:
    """The weights/resizing identity the stored vectors of ``backbone`` were computed with."""
    return workspace.get_meta(_fingerprint_key(backbone))


def check_fingerprint(workspace: Workspace, backbone: str, fingerprint: str) -> None:
    """Refuse to add vectors from other weights (or resizing) to a backbone's stored ones;
    record the fingerprint on first use.

    Raises
    ------
    FeaturesMismatch
        The stored vectors were computed under another fingerprint.
    """
    stored = stored_fingerprint(workspace, backbone)
    if stored is None:
        workspace.set_meta(_fingerprint_key(backbone), fingerprint)
    elif stored != fingerprint:
        raise FeaturesMismatch(
            f"the {backbone} vectors in {workspace.path} were computed with other weights, "
            f"resizing or flip ({stored}) than now ({fingerprint}); extract into a new "
            f"workspace, or start this backbone over with imgcluster.features.delete_features"
        )


# -- reading ----------------------------------------------------------------------------------


def missing_hashes(workspace: Workspace, backbone: str) -> list[str]:
    """Distinct content hashes of usable images that have no vector for ``backbone`` yet
    (for a fusion: that lack a vector of at least one member)."""
    members = split_feature_set(backbone, validate=False)
    marks = ", ".join("?" * len(members))
    with workspace.read() as conn:
        rows = conn.execute(
            f"""
            SELECT DISTINCT i.sha256 FROM image_catalog AS i
            WHERE i.status = 'ok' AND (
                SELECT COUNT(*) FROM features AS f
                WHERE f.backbone IN ({marks}) AND f.sha256 = i.sha256) < ?
            ORDER BY i.relpath
            """,
            (*members, len(members)),
        ).fetchall()
    return [row[0] for row in rows]


def load_features(workspace: Workspace, backbone: str) -> FeatureMatrix:
    """All stored vectors of the workspace's usable images for a feature set.

    For a fusion (``"a+b"``), each member's vectors are L2-normalised, concatenated and the
    concatenation L2-normalised; rows are the images that have every member's vector.

    Raises
    ------
    FeaturesDamaged
        A shard file is missing, truncated or of the wrong shape (one line naming it and the
        fix: run ``imgcluster extract``, which verifies shards and recomputes them).
    """
    members = split_feature_set(backbone, validate=False)
    if len(members) == 1:
        return _load_one(workspace, backbone)
    parts = [_load_one(workspace, member) for member in members]
    common = set(parts[0].sha256s).intersection(*(p.sha256s for p in parts[1:]))
    keep = [np.array([sha in common for sha in p.sha256s], dtype=bool) for p in parts]
    first = parts[0]
    if not common:
        return FeatureMatrix(backbone, np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32))
    # Every member's rows follow the same relpath order, so the kept rows line up.
    fused = l2_normalize(
        np.concatenate([l2_normalize(p.vectors[k]) for p, k in zip(parts, keep, strict=True)], 1)
    )
    mask = keep[0]
    return FeatureMatrix(
        backbone=backbone,
        image_ids=first.image_ids[mask],
        relpaths=[r for r, m in zip(first.relpaths, mask, strict=True) if m],
        sha256s=[s for s, m in zip(first.sha256s, mask, strict=True) if m],
        vectors=fused,
    )


#: Every usable image's stored row under one backbone (``?``), by relpath; aliases i, f, s.
_STORED_ROWS = """
    FROM image_catalog AS i
    JOIN features AS f ON f.backbone = ? AND f.sha256 = i.sha256
    JOIN feature_shards AS s ON s.id = f.shard_id
    WHERE i.status = 'ok'
    ORDER BY i.relpath
"""


def _stored_rows(workspace: Workspace, backbone: str, columns: str) -> list[sqlite3.Row]:
    """``columns`` (a constant SQL list over i, f, s) of each usable image's stored row, where
    both the vectors and the class probabilities are read from (one query, one order)."""
    with workspace.read() as conn:
        return conn.execute(f"SELECT {columns} {_STORED_ROWS}", (backbone,)).fetchall()


def _load_one(workspace: Workspace, backbone: str) -> FeatureMatrix:
    rows = _stored_rows(
        workspace, backbone, "i.id, i.relpath, i.sha256, s.file, f.row, s.n_rows, s.dim"
    )
    if not rows:
        return FeatureMatrix(backbone, np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32))
    # One fancy-indexing copy per shard instead of one Python-level copy per row.
    positions = np.array([row[4] for row in rows], dtype=np.int64)
    by_file: dict[str, list[int]] = {}
    shape: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(rows):
        by_file.setdefault(row[3], []).append(i)
        shape[row[3]] = (row[5], row[6])
    dim = rows[0][6]
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for file, indices in by_file.items():
        shard = _open_shard(workspace, file, shape[file], dim)
        idx = np.asarray(indices, dtype=np.int64)
        vectors[idx] = shard[positions[idx]]
    return FeatureMatrix(
        backbone=backbone,
        image_ids=np.array([row[0] for row in rows], dtype=np.int64),
        relpaths=[row[1] for row in rows],
        sha256s=[row[2] for row in rows],
        vectors=vectors,
    )


def _open_shard(workspace: Workspace, file: str, expected: tuple[int, int], dim: int) -> np.ndarray:
    """The shard memory-mapped, or one clear error naming it."""
    problem = _shard_problem(workspace, file, expected)
    if problem is None and expected[1] != dim:
        problem = f"has {expected[1]}-d rows where the others have {dim}"
    if problem is not None:
        raise FeaturesDamaged(
            f"feature shard {workspace.path / file} {problem}; run `imgcluster extract "
            f"--workspace {workspace.path}` to recompute the vectors it held"
        )
    return np.load(workspace.path / file, mmap_mode="r")


@dataclass(frozen=True)
class FeatureRows:
    """Where every usable image's vector is stored, without holding the vectors.

    What a space of a big set is computed from (`imgcluster.spaces`): a seeded sample is read
    with `take`, then every row once, shard-sized block after block (`blocks`), each block's
    shards memory-mapped only while it is read, so 1M x 1280 float32 (5 GB) is never held
    (`load_features` holds it). Rows follow `load_features`' order. A fusion has no stored
    rows: its composed matrix is held (``matrix``) and served the same way.
    """

    backbone: str
    image_ids: np.ndarray  # int64 (n,)
    dim: int
    shard_of: np.ndarray = field(repr=False)  # int64 (n,): index into ``files``
    row_of: np.ndarray = field(repr=False)  # int64 (n,): row inside that shard
    files: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = ()
    workspace: Workspace | None = field(default=None, repr=False)
    matrix: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of ``rows`` (indices into this order), as a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.matrix is not None:
            return np.asarray(self.matrix[rows], dtype=np.float32)
        out = np.empty((len(rows), self.dim), np.float32)
        shard = self.shard_of[rows]
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            data = self._open(int(s))
            out[where] = data[self.row_of[rows[where]]]
            del data
        return out

    def blocks(self, size: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, vectors)`` of consecutive blocks of at most ``size`` rows."""
        for start in range(0, len(self), size):
            stop = min(len(self), start + size)
            if self.matrix is not None:
                yield start, np.asarray(self.matrix[start:stop], dtype=np.float32)
            else:
                yield start, self.take(np.arange(start, stop))

    def _open(self, s: int) -> np.ndarray:
        assert self.workspace is not None
        return _open_shard(self.workspace, self.files[s], self.shapes[s], self.dim)


def feature_rows(workspace: Workspace, backbone: str) -> FeatureRows:
    """Where the vectors `load_features` would return are, in its row order; reads no vector.

    One query for the ids, shard numbers and rows (no relative paths or hashes: at 1M rows
    those Python strings alone cost seconds and hundreds of MB). For a fusion, the fused
    matrix is composed (`load_features`) and held.

    Raises
    ------
    FeaturesDamaged
        As `load_features`, when a block reads a broken shard.
    """
    if len(split_feature_set(backbone, validate=False)) > 1:
        fm = load_features(workspace, backbone)
        dim = fm.vectors.shape[1] if fm.vectors.ndim == 2 else 0
        empty = np.zeros(0, np.int64)
        return FeatureRows(backbone, fm.image_ids, dim, empty, empty, matrix=fm.vectors)
    with workspace.read() as conn:
        cur = conn.execute(f"SELECT i.id, f.shard_id, f.row {_STORED_ROWS}", (backbone,))
        cur.row_factory = None
        table = np.array(cur.fetchall(), dtype=np.int64).reshape(-1, 3)
        shards = conn.execute(
            "SELECT id, file, n_rows, dim FROM feature_shards WHERE backbone = ?", (backbone,)
        ).fetchall()
    ids = [int(r[0]) for r in shards]
    files = tuple(str(r[1]) for r in shards)
    shapes = tuple((int(r[2]), int(r[3])) for r in shards)
    if not len(table):
        empty = np.zeros(0, np.int64)
        return FeatureRows(backbone, empty, 0, empty, empty, workspace=workspace)
    lookup = np.full(max(ids) + 1, -1, np.int64)
    lookup[ids] = np.arange(len(ids))
    shard_of = lookup[table[:, 1]]
    used = np.unique(shard_of)
    dim = shapes[int(used[0])][1]
    return FeatureRows(
        backbone,
        table[:, 0].copy(),
        dim,
        shard_of,
        table[:, 2].copy(),
        files,
        shapes,
        workspace,
    )


def feature_counts(workspace: Workspace) -> dict[str, int]:
    """Number of usable images with a vector, per stored backbone (derived stores left out)."""
    with workspace.read() as conn:
        return {
            row[0]: row[1]
            for row in conn.execute(
                """
                SELECT f.backbone, COUNT(*) FROM image_catalog AS i
                JOIN features AS f ON f.sha256 = i.sha256
                WHERE i.status = 'ok' GROUP BY f.backbone
                """
            )
        }


def shards_version(workspace: Workspace) -> tuple[object, ...]:
    """A cheap stamp of every backbone's stored vectors (shard count, newest id, total rows):
    with `imgcluster.workspace.images_version` it says when `feature_counts` can change,
    which label writes never do."""
    with workspace.read() as conn:
        return tuple(
            conn.execute("SELECT COUNT(*), MAX(id), TOTAL(n_rows) FROM feature_shards").fetchone()
        )


def feature_set_id(conn: sqlite3.Connection, backbone: str) -> str:
    """Identity of the feature set `load_features` would return, from one query, no vectors.

    Which usable images have a ``backbone`` vector (their count and id sum), which stored vector
    each one gets (a checksum of image id, shard and row: an image whose content changed to
    another stored content changes it), and the newest shard (a re-extraction after
    `delete_features` reuses shard ids, so its file name goes in too). Equal ids
    mean equal rows in equal order, so derived spaces and runs stored under it stay valid; it
    costs one indexed join instead of loading every vector (issue 11 §2). For a fusion, the
    members' identities together.
    """
    parts = [backbone]
    for member in split_feature_set(backbone, validate=False):
        row = conn.execute(
            """
            SELECT COUNT(*), TOTAL(i.id),
                   SUM((i.id * 1000003 + f.shard_id * 65537 + f.row) % 1000000007),
                   MAX(f.shard_id),
                   (SELECT file FROM feature_shards WHERE backbone = ? ORDER BY id DESC LIMIT 1)
            FROM image_catalog AS i JOIN features AS f ON f.backbone = ? AND f.sha256 = i.sha256
            WHERE i.status = 'ok'
            """,
            (member, member),
        ).fetchone()
        parts.extend(str(value) for value in (member, *tuple(row)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def features_version(conn: sqlite3.Connection, backbone: str) -> tuple[object, ...]:
    """A cheap stamp of a feature set's stored vectors: per member, its shards' count, newest
    id, total rows and newest file (the ``feature_shards`` table is one row per batch).

    Every change of the ``features`` rows goes with a shard written or deleted in the same
    transaction (`save_vectors`, `verify_shards`, `delete_features`), so equal stamps mean
    equal vector rows; with `imgcluster.workspace.images_version` it says when
    `feature_set_id` (a join over every image, ~14 s at 1M under load) must be recomputed.
    """
    parts: list[object] = []
    for member in split_feature_set(backbone, validate=False):
        row = conn.execute(
            "SELECT COUNT(*), MAX(id), TOTAL(n_rows), "
            "(SELECT file FROM feature_shards WHERE backbone = ? ORDER BY id DESC LIMIT 1) "
            "FROM feature_shards WHERE backbone = ?",
            (member, member),
        ).fetchone()
        parts.extend((member, *tuple(row)))
    return tuple(parts)


# -- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardCheck:
    """What `verify_shards` found and forgot: damaged shards and the vectors they held."""

    checked: int
    damaged: list[tuple[str, str]]  # (file, problem)
    vectors_dropped: int


def verify_shards(workspace: Workspace, backbone: str, *, repair: bool = True) -> ShardCheck:
    """Check every shard of a stored backbone (missing, truncated, wrong shape or dtype, rows not
    of unit length) and, with ``repair``, forget the damaged ones so the next extraction
    recomputes exactly the vectors they held.

    Reads every shard once (~0.5 s per 100k vectors of 1280-d): `extract` runs it before working
    out what to compute, so "nothing to do" is never claimed over a broken store.
    """
    with workspace.read() as conn:
        shards = conn.execute(
            "SELECT id, file, n_rows, dim FROM feature_shards WHERE backbone = ?", (backbone,)
        ).fetchall()
    damaged: list[tuple[int, str, str]] = []
    for shard_id, file, n_rows, dim in shards:
        problem = _shard_problem(workspace, file, (n_rows, dim), check_norms=True)
        if problem is not None:
            damaged.append((shard_id, file, problem))
    dropped = 0
    if damaged and repair:
        with workspace.transaction() as conn:
            for shard_id, _file, _problem in damaged:
                dropped += conn.execute(
                    "DELETE FROM features WHERE shard_id = ?", (shard_id,)
                ).rowcount
                conn.execute("DELETE FROM feature_shards WHERE id = ?", (shard_id,))
    return ShardCheck(len(shards), [(f, p) for _i, f, p in damaged], dropped)


def _shard_problem(
    workspace: Workspace, file: str, expected: tuple[int, int], *, check_norms: bool = False
) -> str | None:
    """Why a shard cannot be used, or None."""
    path = workspace.path / file
    try:
        shard = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return "is missing"
    except (ValueError, OSError, EOFError) as exc:
        return f"is unreadable or truncated ({type(exc).__name__})"
    if shard.dtype != np.float32 or shard.ndim != 2:
        return f"holds {shard.dtype} of {shard.ndim} dimensions, not float32 rows"
    if shard.shape != expected:
        return f"has shape {shard.shape}, the store recorded {expected}"
    if check_norms:
        norms = np.linalg.norm(np.asarray(shard), axis=1)
        if not np.all((np.abs(norms - 1) < 1e-3) | (norms == 0)):
            return "holds rows that are not unit vectors (corrupted content)"
    return None


#: A feature set member's shard files (one row per batch of vectors).
_SHARD_FILES = "SELECT file FROM feature_shards WHERE backbone = ?"


def load_top_classes(
    workspace: Workspace, backbone: str, image_ids: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet top classes of usable images, where extraction stored them.

    Returns
    -------
    image_ids : ndarray, int64, (n,)
    top : ndarray, float32, (n, 2k)
        Per image: k class indices, then their probabilities. Images whose shard has no
        companion file (extracted before class probabilities were kept, or by a backbone without
        a classifier) are absent.
    """
    empty = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    with workspace.read() as conn:
        files = [r[0] for r in conn.execute(_SHARD_FILES, (backbone,))]
    if not any(_top_path(workspace.path / file).is_file() for file in files):
        return empty  # none stored: no join over every image (seconds at 1M) to learn that
    rows = _stored_rows(workspace, backbone, "i.id, s.file, f.row")
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    ids: list[int] = []
    tops: list[np.ndarray] = []
    cache: dict[str, np.ndarray | None] = {}
    for image_id, file, row in rows:
        if wanted is not None and image_id not in wanted:
            continue
        if file not in cache:
            cache[file] = _read_top(_top_path(workspace.path / file))
        top = cache[file]
        if top is not None and 0 <= row < len(top):
            ids.append(image_id)
            tops.append(top[row])
    if not tops:
        return empty
    return np.array(ids, dtype=np.int64), np.stack(tops).astype(np.float32)


def _read_top(path: Path) -> np.ndarray | None:
    try:
        top = np.load(path)
    except (OSError, ValueError, EOFError):  # none stored, or damaged: no suggestion from it
        return None
    return top if top.ndim == 2 else None


def feature_count(conn: sqlite3.Connection, backbone: str) -> int:
    """How many usable images have a ``backbone`` vector (for a fusion: the fewest of its
    members'), from one indexed query without loading vectors; the background UMAP worker
    checks it on every poll."""
    counts = [
        conn.execute(
            "SELECT COUNT(*) FROM image_catalog AS i JOIN features AS f "
            "ON f.backbone = ? AND f.sha256 = i.sha256 WHERE i.status = 'ok'",
            (member,),
        ).fetchone()[0]
        for member in split_feature_set(backbone, validate=False)
    ]
    return int(min(counts)) if counts else 0
