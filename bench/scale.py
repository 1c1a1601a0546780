"""A 100,000-image workspace stays usable: labeling operations time and peak memory.

The workspace is built through the library's own storage: image rows inserted in the images
table (no files: labeling never opens them), and synthetic L2-normalised 1280-d vectors (Gaussian
blobs, so clusters mean something) stored with `save_vectors` in shards of 10,000 as extraction
would. Then, in this one process, as the app would call them:

* ``cluster k=K``: the first clustering (load vectors, PCA, fit, silhouettes, store);
* ``start labeling``: every cluster becomes a label, and every image's typicality/misfit
  geometry is computed once (its own table, `imgcluster.labels.geometry`);
* ``label list`` (first, then warm), and the label list right after a **rename** (touches no
  geometry: issue 11's target < 0.05 s at 100k) and after a **move of 20 images** (refreshes
  two labels' centroids incrementally inside the move: target < 0.2 s for the list);
* ``page a label``: the first page (60, most typical first), a page deep in the biggest label,
  the worst-fit page, and the "misplaced" list across labels;
* ``move 1,000 images`` to another label (its geometry refreshed inside the move), and the
  ``label list`` right after;
* ``undo`` of that move;
* ``progress`` and the next label to review; ``gather`` strays into a label (issue 13 §7);
* ``re-cluster (change k)``: `cluster` with k=K2 (the app's k slider), re-clustering the
  unconfirmed images around the labels (`recluster_unconfirmed`), and restarting labeling
  from the new run.

Baseline: `load_features` of all N vectors, warm (the floor for anything that reads every vector);
each operation's time is also shown as a ratio to it. Peak RSS (``ru_maxrss``) must stay under
4 GB.

Usage::

    python bench/scale.py [--n 100000 | --scale 100000] [--k 20] [--k2 25] [--dim 1280] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgcluster import labels
from imgcluster.clustering import cluster
from imgcluster.features import load_features, save_vectors
from imgcluster.workspace import Workspace

BACKBONE = "synthetic"
DIM = 1280
SHARD = 10_000
RSS_LIMIT_GB = 4.0
RSS_LIMIT_GB_1M = 8.0
#: "Finishes in under a few seconds on 2 cores" (issue 8), per interactive operation.
TARGET_SECONDS = 3.0


def rss_limit_gb(n: int) -> float:
    """4 GB up to 100k images; 8 GB at 1M (issue 15 §3: 1M x 1280 float32 alone is 5 GB)."""
    return RSS_LIMIT_GB if n <= 100_000 else RSS_LIMIT_GB_1M


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_vectors(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """Unit vectors around random ``centres`` (cosine ~0.8 to their centre)."""
    which = rng.integers(len(centres), size=n)
    noise = rng.normal(scale=0.75 / np.sqrt(DIM), size=(n, DIM)).astype(np.float32)
    out = centres[which] + noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def image_rows_workspace(path: Path, n: int) -> tuple[Workspace, list[str]]:
    """A workspace in ``path / "ws"`` with ``n`` image rows and no files; their sha256s.

    Labeling, clustering and export planning never open an image, so rows are enough (also
    used by ``bench/export_plan.py``).
    """
    ws = Workspace(path / "ws", create=True)
    (path / "photos").mkdir(exist_ok=True)
    ws.set_collection_root(path / "photos")
    shas = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(n)]
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT INTO images(relpath, sha256, size, mtime_ns, width, height, format, status) "
            "VALUES (?, ?, 20000, 1, 640, 480, 'JPEG', 'ok')",
            ((f"batch{i // 1000:03d}/photo_{i:06d}.jpg", sha) for i, sha in enumerate(shas)),
        )
    return ws, shas


def build_workspace(path: Path, n: int, *, blobs: int = 40, seed: int = 0) -> Workspace:
    """``n`` image rows and their vectors, stored through the library's own API."""
    ws, shas = image_rows_workspace(path, n)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, SHARD):
        chunk = shas[start : start + SHARD]
        save_vectors(ws, BACKBONE, chunk, synthetic_vectors(rng, centres, len(chunk)))
    return ws


def _interactive(name: str) -> bool:
    """Operations an annotator waits for (not the setup or the baseline)."""
    return not name.startswith(("setup", "baseline"))


class Table:
    """Rows of (operation, seconds, ratio to the baseline, peak RSS so far)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.baseline: float | None = None

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
        self.rows.append((name, seconds, peak_rss_gb()))
        print(f"  {name:44s} {seconds:8.3f} s", file=sys.stderr, flush=True)
        return value

    def print(self, n: int) -> None:
        base = self.baseline or float("nan")
        print(f"\n{n:,} images, {DIM}-d vectors; baseline = load all vectors ({base:.3f} s)\n")
        print("| operation | seconds | x baseline | peak RSS (GB) |")
        print("|---|---:|---:|---:|")
        for name, seconds, rss in self.rows:
            flag = " (slow)" if seconds > TARGET_SECONDS and _interactive(name) else ""
            print(f"| {name}{flag} | {seconds:.3f} | {seconds / base:.2f} | {rss:.2f} |")
        print(f"\npeak RSS {peak_rss_gb():.2f} GB (limit {rss_limit_gb(n):.0f} GB)")


def open_or_build(folder: Path, n: int, table: Table) -> Workspace:
    """The workspace in ``folder / "ws"``: reused when it holds ``n`` images with vectors
    (``--keep`` of an earlier run, e.g. the 1M build), built otherwise."""
    if (folder / "ws" / "imgcluster.sqlite").exists():
        ws = Workspace(folder / "ws")
        with ws.read() as conn:
            have = conn.execute("SELECT COUNT(*) FROM image_catalog").fetchone()[0]
        if have == n:
            print(f"  reusing the workspace in {folder / 'ws'}", file=sys.stderr, flush=True)
            return ws
        raise SystemExit(f"{folder / 'ws'} holds {have:,} images, not {n:,}: pick another --keep")
    return table.time(f"setup: {n:,} image rows + vectors", lambda: build_workspace(folder, n))


#: Stages ``--skip`` can leave out (another engineer's part, or slow at 1M).
SKIPPABLE = ("gather", "recluster")


def run(n: int, k: int, k2: int, folder: Path, skip: frozenset[str] = frozenset()) -> Table:
    table = Table()
    ws = open_or_build(folder, n, table)

    def baseline() -> None:
        load_features(ws, BACKBONE)

    table.time("setup: load all vectors (cold)", baseline)
    table.time("baseline: load all vectors", baseline)
    table.baseline = table.rows[-1][1]
    first_run = table.time(f"cluster k={k} (first)", lambda: cluster(ws, BACKBONE, k))
    # replace=True: a reused workspace (--keep) holds the session of an earlier run
    table.time(
        "start labeling",
        lambda: labels.start_session(ws, first_run.id, actor="bench", replace=True),
    )
    table.time("label list (first)", lambda: labels.list_labels(ws))
    summary = table.time("label list", lambda: labels.list_labels(ws))
    biggest = max(summary, key=lambda s: s.count)
    table.time("page a label: first 60", lambda: labels.label_images(ws, biggest.id))
    deep = max(0, biggest.count - 60)
    table.time("page a label: last 60", lambda: labels.label_images(ws, biggest.id, offset=deep))
    table.time(
        "page a label: worst fit 60", lambda: labels.label_images(ws, biggest.id, order="misfit")
    )
    table.time("misplaced across labels (60)", lambda: labels.misplaced(ws))
    table.time("rename a label", lambda: labels.rename(ws, biggest.id, "renamed", actor="bench"))
    table.time("label list after a rename", lambda: labels.list_labels(ws))
    twenty = [im.image_id for im in labels.label_images(ws, biggest.id, limit=20)]
    other = next(s.id for s in summary if s.id != biggest.id)
    table.time("move 20 images", lambda: labels.move(ws, twenty, other, actor="bench"))
    table.time("label list after a move (20)", lambda: labels.list_labels(ws))
    table.time("page a label after the move", lambda: labels.label_images(ws, biggest.id))
    table.time("progress + next label to review", lambda: labels.next_label_to_review(ws))
    if "gather" not in skip:
        table.time("gather strays into a label (60)", lambda: labels.gather(ws, other))

    rng = random.Random(0)
    with ws.read() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM images")]
    chosen = rng.sample(ids, 1000)
    target = summary[1].id if summary[0].id == biggest.id else summary[0].id
    table.time("move 1,000 images", lambda: labels.move(ws, chosen, target, actor="bench"))
    table.time("label list after the move", lambda: labels.list_labels(ws))
    table.time("undo the move", lambda: labels.undo(ws, actor="bench"))
    table.time("label list after undo", lambda: labels.list_labels(ws))

    if "recluster" in skip:
        return table
    second = table.time(f"re-cluster: cluster k={k2}", lambda: cluster(ws, BACKBONE, k2))
    table.time(
        "re-cluster unconfirmed (+3 labels)",
        lambda: labels.recluster_unconfirmed(ws, 3, actor="bench"),
    )
    table.time("label list after re-cluster", lambda: labels.list_labels(ws))
    table.time(
        f"restart labeling from k={k2}",
        lambda: labels.start_session(ws, second.id, actor="bench", replace=True),
    )
    table.time("label list (new session)", lambda: labels.list_labels(ws))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", "--scale", type=int, default=100_000, help="number of images")
    parser.add_argument("--dim", type=int, default=DIM, help="vector width (1280 = Lite0)")
    parser.add_argument("--k", type=int, default=20, help="first clustering's k")
    parser.add_argument("--k2", type=int, default=25, help="k of the re-clustering")
    parser.add_argument(
        "--keep", type=Path, help="build the workspace here and keep it (reused when it exists)"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="build the --keep workspace and stop"
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated stages to leave out: {', '.join(SKIPPABLE)}",
    )
    args = parser.parse_args(argv)
    skip = frozenset(s for s in args.skip.split(",") if s)
    if skip - set(SKIPPABLE):
        parser.error(f"--skip takes {', '.join(SKIPPABLE)}")
    globals()["DIM"] = args.dim  # the vector width every helper reads
    folder = args.keep or Path(tempfile.mkdtemp(prefix="imgcluster-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        if args.keep is None:
            parser.error("--build-only needs --keep DIR")
        table = Table()
        open_or_build(folder, args.n, table)
        print(f"workspace: {folder / 'ws'} (peak RSS {peak_rss_gb():.2f} GB)")
        return 0
    try:
        table = run(args.n, args.k, args.k2, folder, skip)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    table.print(args.n)
    slow = [name for name, s, _ in table.rows if s > TARGET_SECONDS and _interactive(name)]
    if slow:
        print(f"slower than {TARGET_SECONDS:.0f} s: {', '.join(slow)}")
    return 1 if peak_rss_gb() >= rss_limit_gb(args.n) else 0


if __name__ == "__main__":
    sys.exit(main())
