"""Speed of clustering and projection on synthetic L2-normalised 1280-d vectors.

For N = 1k, 10k, 100k: a workspace with N images and one vector each (100 Gaussian blobs, so
KMeans has structure to find) is clustered through the public API, as the app does:

* ``first``: `cluster` with k=10 on a fresh process cache (load vectors + PCA + fit + store);
* ``k change``: `cluster` with k=20 right after (the clustering space is cached) - the number
  the app's k slider feels; target < 1 s at 10k, < 10 s at 100k on 2 cores;
* ``stored``: the same request again (returned from the workspace, no fit);
* the baseline: the same k change with ``preprocess="l2"`` (KMeans on the raw 1280-d vectors,
  the original recipe), and the ratio baseline / default.

Projection: PCA 2-D (`compute_projection(..., "pca")`), and UMAP 2-D through the real worker
(``python -m imgcluster.projection``) in a fresh process - JIT included - then a second UMAP
fit in one process after a warm-up fit (steady state). UMAP runs are capped by ``--umap-timeout``.

Usage::

    python bench/cluster.py [--sizes 1000 10000 100000] [--umap-timeout 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from imgcluster.clustering import DEFAULT_PREPROCESS, cluster, clustering_space
from imgcluster.features import load_features, save_vectors
from imgcluster.projection import compute_projection
from imgcluster.workspace import Workspace

BACKBONE = "synthetic"
DIM = 1280


def synthetic_vectors(n: int, *, blobs: int = 100, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``blobs`` random directions (cosine ~0.8 to their centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 10_000):
        m = min(10_000, n - start)
        which = rng.integers(blobs, size=m)
        noise = rng.normal(scale=0.75 / np.sqrt(DIM), size=(m, DIM)).astype(np.float32)
        out[start : start + m] = centres[which] + noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_workspace(root: Path, n: int) -> Workspace:
    """A workspace whose images table has n rows (no files: only vectors are benchmarked)."""
    ws = Workspace(root / f"ws{n}", create=True)
    sha = [f"{i:064x}" for i in range(n)]
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT INTO images(relpath, sha256, status) VALUES (?, ?, 'ok')",
            ((f"img{i:07d}.jpg", sha[i]) for i in range(n)),
        )
    vectors = synthetic_vectors(n)
    for start in range(0, n, 20_000):
        save_vectors(ws, BACKBONE, sha[start : start + 20_000], vectors[start : start + 20_000])
    return ws


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


UMAP_STEADY = textwrap.dedent(
    """
    import sys, time
    sys.modules.setdefault("tensorflow", None)
    from imgcluster.workspace import Workspace
    from imgcluster.features import load_features
    from imgcluster.projection import umap_embed
    x = load_features(Workspace(sys.argv[1]), sys.argv[2]).vectors
    t = time.perf_counter(); umap_embed(x, 2, seed=0); first = time.perf_counter() - t
    t = time.perf_counter(); umap_embed(x, 2, seed=0); second = time.perf_counter() - t
    print(f"{first:.3f} {second:.3f}")
    """
)


def bench_umap(ws: Workspace, timeout: float) -> tuple[str, str]:
    """(fresh-process worker time, steady time) as printable strings."""
    cmd = [sys.executable, "-m", "imgcluster.projection", str(ws.path), BACKBONE]
    start = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s (skipped)", "skipped"
    fresh = time.perf_counter() - start
    try:
        out = subprocess.run(
            [sys.executable, "-c", UMAP_STEADY, str(ws.path), BACKBONE],
            check=True,
            timeout=2 * timeout,
            capture_output=True,
            text=True,
        ).stdout.split()
    except subprocess.TimeoutExpired:
        return f"{fresh:.1f} s", f"> {2 * timeout:.0f} s (skipped)"
    return f"{fresh:.1f} s", f"{float(out[1]):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--umap-timeout", type=float, default=300.0)
    parser.add_argument("--no-umap", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            ws = make_workspace(Path(tmp), n)
            _, load_s = timed(lambda ws=ws: load_features(ws, BACKBONE))
            first, first_s = timed(lambda ws=ws: cluster(ws, BACKBONE, 10))
            second, change_s = timed(lambda ws=ws: cluster(ws, BACKBONE, 20))
            _, stored_s = timed(lambda ws=ws: cluster(ws, BACKBONE, 20))
            # Baseline: the same k change on the raw 1280-d vectors (space cached too).
            cluster(ws, BACKBONE, 10, preprocess="l2")
            _, base_s = timed(lambda ws=ws: cluster(ws, BACKBONE, 20, preprocess="l2"))
            _, space_s = timed(
                lambda ws=ws: clustering_space(
                    load_features(ws, BACKBONE), DEFAULT_PREPROCESS, seed=99
                )
            )
            _, pca_s = timed(lambda ws=ws: compute_projection(ws, BACKBONE, "pca"))
            umap_fresh, umap_steady = (
                ("-", "-") if args.no_umap else bench_umap(ws, args.umap_timeout)
            )
            row = {
                "N": n,
                "algorithm": second.algorithm,
                "load": load_s,
                "space": space_s,
                "first": first_s,
                "k change": change_s,
                "stored": stored_s,
                "baseline": base_s,
                "ratio": base_s / change_s,
                "pca2d": pca_s,
                "umap fresh": umap_fresh,
                "umap steady": umap_steady,
            }
            rows.append(row)
            print(row, flush=True)
            del first
    print()
    print(
        f"| N | algorithm | load vectors | {DEFAULT_PREPROCESS} space | first k=10 | "
        "k change 10->20 | stored run | baseline k change (l2) | speed-up | PCA 2-D | "
        "UMAP 2-D fresh process | UMAP 2-D steady |"
    )
    print("|" + "---|" * 12)
    for r in rows:
        print(
            f"| {r['N']:,} | {r['algorithm']} | {r['load']:.2f} s | {r['space']:.2f} s | "
            f"{r['first']:.2f} s | **{r['k change']:.2f} s** | {r['stored']:.2f} s | "
            f"{r['baseline']:.2f} s | {r['ratio']:.1f}x | {r['pca2d']:.2f} s | "
            f"{r['umap fresh']} | {r['umap steady']} |"
        )


if __name__ == "__main__":
    main()
