"""Speed of clustering and projection on synthetic L2-normalised 1280-d vectors.

For N = 1k, 10k, 100k: a workspace with N images and one vector each (100 Gaussian blobs, so
KMeans has structure to find) is clustered through the public API, as the app does:

* ``first``: `cluster` with k=10 on a fresh process cache (load vectors + PCA + fit + store);
* ``k change``: `cluster` with k=20 right after (the clustering space is cached) - the number
  the app's k slider feels; target < 1 s at 10k, < 10 s at 100k on 2 cores;
* ``stored``: the same request again (returned from the workspace, no fit);
* the baseline: the same k change with ``preprocess="l2"`` (KMeans on the raw 1280-d vectors,
  the original recipe), and the ratio baseline / default.

Projection: PCA 2-D (`compute_projection(..., "pca")`). Then the real background worker
(`imgcluster.space_worker.start_background`, a fresh process: numba's on-disk cache as it is) makes
the refined clustering space and the 2-D map; after it, ``cluster`` defaults to the refined
space: first k=10, a k change to 20 in this process, and a k change in a fresh process (the
space read back from the workspace, never recomputed). The worker is capped by
``--umap-timeout``.

With ``--sample-fit N`` it compares, on N synthetic vectors (100 blobs), the refined space
fitted on all points against fitted on a seeded sample with the rest placed by umap's
``transform``: seconds, and NMI of KMeans (k=100) in that space against the blobs.

With ``--numba WS`` it instead times umap's first call in fresh processes on WS's stored
``efficientnet-lite0`` vectors (the refined space's settings), with an empty numba cache
folder (a new machine) and then with the cache that first process left (every later process).

With ``--first-fit N`` it times the refined space's UMAP fit of N synthetic vectors in fresh
processes (the first fills numba's cache, the later ones are what every process after it
pays): wall and CPU (user+sys) seconds of the fit, and of its kNN graph alone;
``--graph pynndescent`` is the round-1 baseline (umap's own kNN search). With ``--k-change N``:
k = 20, 30, 40 after k = 10 in a stored 10-d refined space of N points (100 blobs).

Usage::

    python bench/cluster.py [--sizes 1000 10000 100000] [--umap-timeout 300]
    python bench/cluster.py --numba /tmp/ws-clothing
    python bench/cluster.py --sample-fit 100000 [--fit-samples 20000 50000]
    python bench/cluster.py --first-fit 10000 [--runs 3] [--graph pynndescent]
    python bench/cluster.py --k-change 100000
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

from imgcluster.clustering import DEFAULT_PREPROCESS, cluster, preprocess_vectors
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


KCHANGE_FRESH = textwrap.dedent(
    """
    import sys, time
    from imgcluster.workspace import Workspace
    from imgcluster.clustering import cluster
    ws = Workspace(sys.argv[1])
    t = time.perf_counter(); cluster(ws, sys.argv[2], int(sys.argv[3]))
    print(f"{time.perf_counter() - t:.3f}")
    """
)


def bench_refined(ws: Workspace, timeout: float) -> dict[str, object]:
    """The background worker (refined space, then the 2-D map) in a fresh process, then
    k changes in the refined space: in this process and in a fresh one (space read back)."""
    from imgcluster import space_worker, spaces

    start = time.perf_counter()
    job = space_worker.start_background(ws, BACKBONE)
    if job is None or not job.wait(timeout) or job.returncode != 0:
        return {"worker": f"> {timeout:.0f} s or failed (skipped)"}
    worker = time.perf_counter() - start
    seconds = {m: s for m, s in _space_seconds(ws)}
    _, first = timed(lambda: cluster(ws, BACKBONE, 10))  # default: now the refined space
    run, change = timed(lambda: cluster(ws, BACKBONE, 20))
    fresh = subprocess.run(
        [sys.executable, "-c", KCHANGE_FRESH, str(ws.path), BACKBONE, "30"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    return {
        "worker": f"{worker:.1f} s",
        "refined fit": f"{seconds.get(spaces.REFINED, float('nan')):.1f} s",
        "map fit": f"{seconds.get(spaces.MAP_UMAP, float('nan')):.1f} s",
        "refined first": first,
        "refined k change": change,
        "refined k change fresh": float(fresh),
        "refined preprocess": run.preprocess,
    }


def _space_seconds(ws: Workspace) -> list[tuple[str, float]]:
    with ws.read() as conn:
        return [tuple(r) for r in conn.execute("SELECT method, seconds FROM projections")]


FIRST_CALL = textwrap.dedent(
    """
    import sys, time
    start = time.perf_counter()
    from imgcluster import spaces
    from imgcluster.features import load_features
    from imgcluster.workspace import Workspace
    x = load_features(Workspace(sys.argv[1]), "efficientnet-lite0").vectors
    t = time.perf_counter()
    spaces.umap_embed(x, 10, n_neighbors=30, min_dist=0.0)
    first = time.perf_counter() - t
    t = time.perf_counter()
    spaces.umap_embed(x, 10, n_neighbors=30, min_dist=0.0, random_state=1)
    print(f"{first:.2f} {time.perf_counter() - t:.2f} {time.perf_counter() - start:.2f}")
    """
)


def bench_numba(path: Path) -> None:
    """First UMAP call in a fresh process: empty numba cache, then the cache it left."""
    import os

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "IMGCLUSTER_CACHE": cache}
        env.pop("NUMBA_CACHE_DIR", None)
        print("| numba cache | first UMAP call | second call (same process) | process total |")
        print("|---|---|---|---|")
        for name in ("empty (new machine)", "warm (every later process)", "warm, again"):
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c", FIRST_CALL, str(path)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            print(f"| {name} | {out[0]} s | {out[1]} s | {out[2]} s |", flush=True)


FIRST_FIT = textwrap.dedent(
    """
    import resource, sys, time
    sys.path.insert(0, sys.argv[2])
    from cluster import synthetic_vectors
    from imgcluster import spaces
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    x = synthetic_vectors(int(sys.argv[1]))
    if sys.argv[3] == "pynndescent":  # round 1: umap's own (uncacheable) pynndescent graph
        spaces.EXACT_KNN_MIN_N = 10**12
    c, t = cpu(), time.perf_counter()
    spaces.umap_embed(x, spaces.REFINED_COMPONENTS, n_neighbors=spaces.REFINED_N_NEIGHBORS,
                      min_dist=spaces.REFINED_MIN_DIST, n_epochs=spaces.REFINED_N_EPOCHS)
    wall, used = time.perf_counter() - t, cpu() - c
    x50 = spaces.pca_reduce(spaces.l2_normalize(x), spaces.UMAP_PCA_DIMS)
    c, t = cpu(), time.perf_counter()
    spaces.exact_knn(x50, spaces.REFINED_N_NEIGHBORS, "euclidean")
    print(f"{wall:.1f} {used:.1f} {time.perf_counter() - t:.1f} {cpu() - c:.1f}")
    """
)


def bench_first_fit(n: int, runs: int, graph: str) -> None:
    """The refined space's fit in fresh processes: wall and CPU, the kNN graph apart."""
    import os

    print(f"| fresh process ({n:,} points) | fit wall | fit CPU | kNN graph wall | kNN CPU |")
    print("|---|---|---|---|---|")
    here = str(Path(__file__).resolve().parent)
    for run in range(runs):
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", FIRST_FIT, str(n), here, graph],
            env=os.environ.copy(),
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        print(f"| {run + 1} | {out[0]} s | {out[1]} s | {out[2]} s | {out[3]} s |", flush=True)


def bench_k_change(n: int) -> None:
    """k changes in a stored 10-d refined space of ``n`` points (100 blobs), as the slider does."""
    import resource

    from imgcluster import spaces

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp), n)
        ids = load_features(ws, BACKBONE).image_ids
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(100, spaces.REFINED_COMPONENTS)) * 5
        coords = centres[rng.integers(100, size=n)] + rng.normal(size=(n, len(centres[0])))
        space = spaces.StoredSpace(coords.astype(np.float32), ids, spaces.REFINED, {})
        spaces._store(ws, BACKBONE, spaces.REFINED, spaces.feature_set(ws, BACKBONE), space, 0)
        run = cluster(ws, BACKBONE, 10)
        print("| N | space | algorithm | k | wall | CPU |\n|---|---|---|---|---|---|")
        for k in (20, 30, 40):
            c, (run, wall) = cpu(), timed(lambda k=k: cluster(ws, BACKBONE, k))
            print(
                f"| {n:,} | {run.preprocess} | {run.algorithm} | {k} | {wall:.2f} s | "
                f"{cpu() - c:.2f} s |",
                flush=True,
            )


def bench_sample_fit(n: int, samples: list[int]) -> None:
    """Full UMAP fit against fit-on-a-sample + transform, at ``n`` points."""
    from sklearn.metrics import normalized_mutual_info_score

    from imgcluster import spaces
    from imgcluster.clustering import fit_kmeans

    rng = np.random.default_rng(0)
    blobs = 100
    centres = rng.normal(size=(blobs, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(blobs, size=n)
    x = centres[truth] + rng.normal(scale=1.2 / np.sqrt(DIM), size=(n, DIM)).astype(np.float32)
    print(f"| fit on ({n:,} points) | seconds | NMI of KMeans k={blobs} |")
    print("|---|---|---|")
    for sample in [*samples, None]:
        space, seconds = timed(
            lambda sample=sample: spaces.umap_embed(
                x,
                spaces.REFINED_COMPONENTS,
                n_neighbors=spaces.REFINED_N_NEIGHBORS,
                min_dist=spaces.REFINED_MIN_DIST,
                fit_sample=sample,
            )
        )
        labels = fit_kmeans(space, blobs, random_state=0).labels
        name = "all points" if sample is None else f"sample of {sample:,} + transform"
        score = normalized_mutual_info_score(truth, labels)
        print(f"| {name} | {seconds:.1f} s | {score:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--umap-timeout", type=float, default=300.0)
    parser.add_argument("--no-umap", action="store_true")
    parser.add_argument("--numba", type=Path, help="Time umap's first call on WS's vectors.")
    parser.add_argument("--sample-fit", type=int, default=0, help="Sample fit vs full at N.")
    parser.add_argument("--fit-samples", type=int, nargs="+", default=[20_000, 50_000])
    parser.add_argument("--first-fit", type=int, default=0, help="Refined fit at N, fresh.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--graph", choices=["exact", "pynndescent"], default="exact")
    parser.add_argument("--k-change", type=int, default=0, help="Refined k changes at N.")
    args = parser.parse_args()
    if args.first_fit:
        bench_first_fit(args.first_fit, args.runs, args.graph)
        return
    if args.k_change:
        bench_k_change(args.k_change)
        return
    if args.sample_fit:
        bench_sample_fit(args.sample_fit, args.fit_samples)
        return
    if args.numba is not None:
        bench_numba(args.numba)
        return
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
                lambda ws=ws: preprocess_vectors(
                    load_features(ws, BACKBONE).vectors, DEFAULT_PREPROCESS, random_state=99
                )
            )
            _, pca_s = timed(lambda ws=ws: compute_projection(ws, BACKBONE, "pca"))
            refined = {} if args.no_umap else bench_refined(ws, args.umap_timeout)
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
                **refined,
            }
            rows.append(row)
            print(row, flush=True)
            del first
    print()
    print(
        f"| N | algorithm | load vectors | {DEFAULT_PREPROCESS} space | first k=10 | "
        "k change 10->20 | stored run | baseline k change (l2) | speed-up | PCA 2-D |"
    )
    print("|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['N']:,} | {r['algorithm']} | {r['load']:.2f} s | {r['space']:.2f} s | "
            f"{r['first']:.2f} s | **{r['k change']:.2f} s** | {r['stored']:.2f} s | "
            f"{r['baseline']:.2f} s | {r['ratio']:.1f}x | {r['pca2d']:.2f} s |"
        )
    print()
    print(
        "| N | worker process (refined + map) | refined fit | map fit | first k=10 refined | "
        "k change 10->20 refined | k change, fresh process |"
    )
    print("|" + "---|" * 7)
    for r in rows:
        if "refined first" not in r:
            print(f"| {r['N']:,} | {r.get('worker', '-')} | | | | | |")
            continue
        print(
            f"| {r['N']:,} | {r['worker']} | {r['refined fit']} | {r['map fit']} | "
            f"{r['refined first']:.2f} s | **{r['refined k change']:.2f} s** | "
            f"{r['refined k change fresh']:.2f} s |"
        )


if __name__ == "__main__":
    main()
