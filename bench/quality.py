"""Clustering quality against true labels on ../shared/datasets/clothing (600 photos, 10 classes).

For each offline backbone x preprocessing in {raw, l2, pca, pca-whiten, umap}: KMeans with k=10,
NMI / ARI / purity against ``labels.csv``, mean ± std over ``--seeds`` seeds (the seed drives
k-means++, PCA and UMAP). Vectors come from `FeatureExtractor.transform`, the same decoding and
resizing `imgcluster.features.extract` uses; ``raw`` is KMeans on the unnormalised vectors.

Baseline: the original recipe (features of the default backbone with NEAREST resizing, KMeans on
the raw vectors). Default: the real pipeline end to end - ingest, `extract`, `cluster` with
every default - in a temporary workspace. The closing lines give the NMI difference, with a 95%
bootstrap interval over images, and how well the misfit flag and typicality order work.

With ``--spaces WS`` it instead reuses the vectors stored in workspace WS (ingest and extract
the clothing photos into it once; add ``efficientnet-lite2`` for the fusion rows) and measures
the refined clustering space: UMAP ``n_neighbors``, ``n_epochs`` and dims against quality and
time (each seed drives UMAP and KMeans), the fused Lite0+Lite2 vectors, and Ward linkage.

Usage::

    python bench/quality.py [--seeds 10] [--k 10] [--no-umap]
    python bench/quality.py --spaces /tmp/ws-clothing [--seeds 10] [--k 10]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from imgcluster import clustering
from imgcluster.backbones import DEFAULT_BACKBONE, list_backbones
from imgcluster.features import extract, load_extractor
from imgcluster.images import ingest
from imgcluster.workspace import Workspace

CLOTHING = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clothing"
VARIANTS = ("raw", "l2", "pca", "pca-whiten", "umap")


def purity(truth: np.ndarray, labels: np.ndarray) -> float:
    """Share of images in their cluster's majority class."""
    total = 0
    for c in np.unique(labels):
        _, counts = np.unique(truth[labels == c], return_counts=True)
        total += counts.max()
    return total / len(truth)


def scores(truth: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    return (
        normalized_mutual_info_score(truth, labels),
        adjusted_rand_score(truth, labels),
        purity(truth, labels),
    )


def load_truth() -> tuple[list[Path], np.ndarray, list[str]]:
    with open(CLOTHING / "labels.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["path"])
    return (
        [CLOTHING / r["path"] for r in rows],
        np.array([r["label"] for r in rows]),
        [r["path"] for r in rows],
    )


def raw_vectors(
    paths: list[Path], backbone: str, *, nearest: bool = False, squash: bool = False
) -> np.ndarray:
    extractor = load_extractor(backbone, nearest_resize=nearest)
    if squash:  # the default filter, but the whole image squashed to the square (no crop)
        extractor.backbone_ = dataclasses.replace(extractor.backbone_, crop_fraction=None)
    return np.concatenate(
        [extractor.transform(paths[i : i + 32]) for i in range(0, len(paths), 32)]
    )


def variant_labels(raw: np.ndarray, variant: str, k: int, seed: int) -> np.ndarray:
    if variant == "raw":
        space = raw
    else:
        space = clustering.preprocess_vectors(raw, variant, random_state=seed)
    return clustering.fit_kmeans(space, k, random_state=seed).labels


def summarise(runs: list[tuple[float, float, float]]) -> list[str]:
    arr = np.array(runs)
    return [f"{m:.3f} ± {s:.3f}" for m, s in zip(arr.mean(0), arr.std(0), strict=True)]


def bootstrap_delta(
    truth: np.ndarray, a: np.ndarray, b: np.ndarray, *, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of NMI(a) - NMI(b) over images resampled with replacement."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        rows = rng.integers(len(truth), size=len(truth))
        deltas.append(
            normalized_mutual_info_score(truth[rows], a[rows])
            - normalized_mutual_info_score(truth[rows], b[rows])
        )
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-umap", action="store_true")
    parser.add_argument("--spaces", type=Path, help="Sweep refined-space settings on WS's vectors.")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        help="With --spaces: only the rows whose name contains this text (repeatable).",
    )
    parser.add_argument(
        "--k-advice", type=Path, nargs="+", help="suggest_k on these workspaces (truth in labels)"
    )
    args = parser.parse_args()
    if args.spaces is not None:
        sweep_spaces(args.spaces, args.seeds, args.k, args.row)
        return
    if args.k_advice:
        for path in args.k_advice:
            k_advice(Workspace(path))
        return
    if not (CLOTHING / "labels.csv").exists():
        sys.exit(f"{CLOTHING} not found")
    paths, truth, relpaths = load_truth()
    seeds = range(args.seeds)
    variants = [v for v in VARIANTS if not (args.no_umap and v == "umap")]
    print(
        f"clothing: {len(paths)} images, {len(set(truth))} classes, k={args.k}, "
        f"{args.seeds} seeds; default preprocess={clustering.DEFAULT_PREPROCESS}"
    )

    table: list[list[str]] = []
    backbones = [b.name for b in list_backbones() if b.offline]
    for name in backbones:
        start = time.perf_counter()
        raw = raw_vectors(paths, name)
        print(f"{name}: features in {time.perf_counter() - start:.1f} s", flush=True)
        for variant in variants:
            start = time.perf_counter()
            runs = [scores(truth, variant_labels(raw, variant, args.k, s)) for s in seeds]
            per_seed = (time.perf_counter() - start) / len(seeds)
            table.append([name, variant, *summarise(runs), f"{per_seed:.2f} s"])
            print("  ", table[-1], flush=True)

    # Baseline: the original recipe with the default backbone.
    base_raw = raw_vectors(paths, DEFAULT_BACKBONE, nearest=True)
    base_labels = {s: variant_labels(base_raw, "raw", args.k, s) for s in seeds}
    base_runs = [scores(truth, base_labels[s]) for s in seeds]
    table.append(
        [f"**baseline**: {DEFAULT_BACKBONE}, NEAREST resize", "raw", *summarise(base_runs), ""]
    )
    # Which part of the recipe matters: NEAREST features with the default preprocessing.
    nearest_runs = [
        scores(truth, variant_labels(base_raw, clustering.DEFAULT_PREPROCESS, args.k, s))
        for s in seeds
    ]
    table.append(
        [
            f"{DEFAULT_BACKBONE}, NEAREST resize",
            clustering.DEFAULT_PREPROCESS,
            *summarise(nearest_runs),
            "",
        ]
    )

    # Which part of the default matters: the same filter without the centre crop.
    squash_raw = raw_vectors(paths, DEFAULT_BACKBONE, squash=True)
    squash_runs = [
        scores(truth, variant_labels(squash_raw, clustering.DEFAULT_PREPROCESS, args.k, s))
        for s in seeds
    ]
    table.append(
        [
            f"{DEFAULT_BACKBONE}, bicubic squash (no centre crop)",
            clustering.DEFAULT_PREPROCESS,
            *summarise(squash_runs),
            "",
        ]
    )

    # The default pipeline, end to end through the workspace.
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws", create=True)
        ingest(ws, CLOTHING)
        extract(ws, DEFAULT_BACKBONE)
        by_relpath = dict(zip(relpaths, truth, strict=True))
        default_runs = []
        default_labels: dict[int, np.ndarray] = {}
        start = time.perf_counter()
        for s in seeds:
            run = clustering.cluster(ws, DEFAULT_BACKBONE, args.k, random_state=s)
            with ws.read() as conn:
                rel = dict(conn.execute("SELECT id, relpath FROM images").fetchall())
            run_truth = np.array([by_relpath[rel[int(i)]] for i in run.image_ids])
            default_labels[s] = run.labels
            default_runs.append(scores(run_truth, run.labels))
            if s == 0:
                misfit_line = misfit_report(run, run_truth)
        per_seed = (time.perf_counter() - start) / len(seeds)
        suggestion = clustering.suggest_k(ws, 2, 20, backbone=DEFAULT_BACKBONE)
    table.append(
        [
            f"**default**: {DEFAULT_BACKBONE}, `cluster()`",
            clustering.DEFAULT_PREPROCESS,
            *summarise(default_runs),
            f"{per_seed:.2f} s",
        ]
    )

    print()
    print("| backbone | preprocessing | NMI | ARI | purity | time per fit |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    d_nmi = np.mean([r[0] for r in default_runs]) - np.mean([r[0] for r in base_runs])
    low, high = bootstrap_delta(truth, default_labels[0], base_labels[0])
    print()
    print(
        f"default - baseline NMI: {d_nmi:+.3f} (mean over {args.seeds} seeds); "
        f"seed 0 difference, 95% bootstrap interval over images: [{low:+.3f}, {high:+.3f}]"
    )
    print(misfit_line)
    print(
        f"suggest_k(2..20) best: {suggestion.best}; silhouette at best "
        f"{max(s for s in suggestion.silhouette):.3f}"
    )


#: (label, dims, n_neighbors, n_epochs, min_dist) of the refined-space sweep; None = umap's default.
SPACE_GRID = [
    ("issue recipe: 10-d, 30 nn, min_dist 0", 10, 30, None, 0.0),
    ("15 nn", 10, 15, None, 0.0),
    ("50 nn", 10, 50, None, 0.0),
    ("5-d", 5, 30, None, 0.0),
    ("20-d", 20, 30, None, 0.0),
    ("200 epochs", 10, 30, 200, 0.0),
    ("min_dist 0.1", 10, 30, None, 0.1),
]


def _workspace_truth(ws: Workspace, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    from imgcluster.features import load_features

    features = load_features(ws, backbone)
    by_relpath = dict(zip(load_truth()[2], load_truth()[1], strict=True))
    return features.vectors, np.array([by_relpath[r] for r in features.relpaths])


def _umap(x: np.ndarray, dims: int, nn: int, epochs: int | None, md: float, seed: int):
    from imgcluster.spaces import umap_embed

    return umap_embed(x, dims, random_state=seed, n_neighbors=nn, min_dist=md, n_epochs=epochs)


def sweep_spaces(path: Path, n_seeds: int, k: int, only: Sequence[str] = ()) -> None:
    """NMI/ARI/purity (mean ± std over seeds) and seconds per fit of each clustering space
    (``only``: the rows whose name contains one of these texts)."""
    from sklearn.cluster import AgglomerativeClustering

    from imgcluster.features import l2_normalize

    ws = Workspace(path)
    lite0, truth = _workspace_truth(ws, DEFAULT_BACKBONE)
    seeds = range(n_seeds)
    rows: list[list[str]] = []

    def measure(name: str, make_labels: Callable[[int], np.ndarray]) -> None:
        if only and not any(text in name for text in only):
            return
        start = time.perf_counter()
        runs = [scores(truth, make_labels(s)) for s in seeds]
        per = (time.perf_counter() - start) / n_seeds
        rows.append([name, *summarise(runs), f"{per:.2f} s"])
        print("  ", rows[-1], flush=True)

    def kmeans(space: np.ndarray, s: int) -> np.ndarray:
        return clustering.fit_kmeans(space, k, random_state=s).labels

    measure("plain recipe: L2 vectors + KMeans", lambda s: kmeans(l2_normalize(lite0), s))
    measure(
        "PCA-64 + KMeans (instant default)",
        lambda s: kmeans(clustering.preprocess_vectors(lite0, "pca", random_state=s), s),
    )
    for name, dims, nn, epochs, md in SPACE_GRID:
        measure(f"UMAP {name}", lambda s, a=(dims, nn, epochs, md): kmeans(_umap(lite0, *a, s), s))
    measure(
        "UMAP recipe + Ward",
        lambda s: AgglomerativeClustering(k, linkage="ward").fit_predict(
            _umap(lite0, 10, 30, None, 0.0, s)
        ),
    )
    fused_name = f"{DEFAULT_BACKBONE}+efficientnet-lite2"
    try:
        lite2, truth2 = _workspace_truth(ws, "efficientnet-lite2")
    except Exception as exc:
        print(f"no efficientnet-lite2 vectors in {path}: {exc}")
    else:
        assert (truth2 == truth).all()
        fused = l2_normalize(np.concatenate([l2_normalize(lite0), l2_normalize(lite2)], axis=1))
        measure("fusion Lite0+Lite2, L2 + KMeans", lambda s: kmeans(fused, s))
        measure(
            "fusion Lite0+Lite2, UMAP recipe + KMeans",
            lambda s: kmeans(_umap(fused, 10, 30, None, 0.0, s), s),
        )
        # the library's refined space (spaces.REFINED_*: 200 epochs) on each candidate default
        refined = (10, 30, 200, 0.0)
        measure(
            "lite0, refined space (200 epochs) + KMeans",
            lambda s: kmeans(_umap(lite0, *refined, s), s),
        )
        measure(
            "lite2, refined space (200 epochs) + KMeans",
            lambda s: kmeans(_umap(lite2, *refined, s), s),
        )
        measure(
            "fusion Lite0+Lite2, refined space (200 epochs) + KMeans",
            lambda s: kmeans(_umap(fused, *refined, s), s),
        )
        print(f"(fusion as {fused_name}: each normalised, then the concatenation)")
    print()
    print(
        f"| space ({len(truth)} clothing photos, k={k}, {n_seeds} seeds) | NMI | ARI | purity "
        "| time per fit |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def k_advice(ws: Workspace, k_min: int = 2, k_max: int = 20) -> None:
    """Where `suggest_k`'s best ks fall against the true class count, in the PCA space and in
    the refined space (made now if the workspace does not hold it yet)."""
    from imgcluster import spaces

    spaces.compute_space(ws, DEFAULT_BACKBONE, spaces.REFINED)
    root = ws.collection_root
    classes = set()
    if root is not None:
        for labels_csv in (root / "labels.csv", root.parent / "labels.csv"):
            if labels_csv.exists():
                with open(labels_csv, newline="") as fh:
                    classes = {row["label"] for row in csv.DictReader(fh)}
                break
    print(f"{ws.path}: {len(classes) or '?'} true classes, k in {k_min}..{k_max}")
    for preprocess in ("pca", "umap"):
        start = time.perf_counter()
        result = clustering.suggest_k(
            ws, k_min, k_max, backbone=DEFAULT_BACKBONE, preprocess=preprocess
        )
        seconds = time.perf_counter() - start
        ranked = sorted(
            range(len(result.ks)), key=lambda i: -result.silhouette[i]
        )  # silhouette alone, for the rank of the true k
        true_rank = next(
            (r + 1 for r, i in enumerate(ranked) if result.ks[i] == len(classes)), None
        )
        i_true = result.ks.index(len(classes)) if len(classes) in result.ks else None
        true_text = (
            f"true k={len(classes)}: silhouette rank {true_rank}, stability "
            f"{result.stability[i_true]:.2f}"
            if i_true is not None
            else ""
        )
        print(
            f"  {preprocess:5s} best {result.best} ({result.confidence}); {true_text}; "
            f"{seconds:.1f} s\n        {result.advice}"
        )


def misfit_report(run: clustering.ClusterRun, truth: np.ndarray) -> str:
    """How often flagged / least typical images are not of their cluster's majority class."""
    majority = {}
    for c in range(run.k):
        classes, counts = np.unique(truth[run.labels == c], return_counts=True)
        majority[c] = classes[counts.argmax()]
    wrong = np.array([truth[i] != majority[c] for i, c in enumerate(run.labels)])
    flagged = run.misfits
    typical = _per_cluster(run, lambda rows: rows[:5])
    atypical = _per_cluster(run, lambda rows: rows[-5:])
    return (
        f"seed 0: {wrong.mean():.1%} of images are outside their cluster's majority class; "
        f"misfit flag marks {flagged.mean():.1%} of images, of which {wrong[flagged].mean():.1%} "
        f"are outside it (precision), catching {flagged[wrong].mean():.1%} of them (recall). "
        f"5 most typical per cluster: {wrong[typical].mean():.1%} outside; "
        f"5 least typical: {wrong[atypical].mean():.1%} outside."
    )


def _per_cluster(
    run: clustering.ClusterRun, pick: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    return np.concatenate([pick(clustering.typicality_order(run, c)) for c in range(run.k)]).astype(
        np.int64
    )


if __name__ == "__main__":
    main()
