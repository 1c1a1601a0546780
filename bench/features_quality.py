"""Feature-set quality on real photos: fusion and test-time flip (NMI), and suggested names.

On ``../shared/datasets/clothing`` (600 photos, 10 classes), through the real pipeline
(`imgcluster.ingest`, `imgcluster.features.extract`, `load_features`):

* NMI of ``KMeans(n_clusters=10, random_state=s)`` for 10 seeds, mean ± std, on the stored
  L2-normalised vectors (``l2``) and on their 64 principal components (``pca``, the default
  clustering space's recipe), for Lite0, Lite2, the fusion Lite0+Lite2, and each with flip.
* Suggested names at k=10 (seeds 0-9): how often the suggestion's top ImageNet class belongs to
  the cluster's majority true class, under the hand-made ImageNet -> clothing map `CLASS_MAP`
  (ImageNet has no "longsleeve"; every class a human would accept is listed).

Usage::

    python bench/features_quality.py [--dataset ../shared/datasets/clothing] [--seeds 10]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from imgcluster.features import CACHE_ENV, extract, load_features, suggest_names
from imgcluster.images import ingest
from imgcluster.workspace import Workspace

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = PROJECT.parent / "shared" / "datasets" / "clothing"
LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"
FUSED = f"{LITE0}+{LITE2}"

#: ImageNet classes a person would accept as a name for each clothing class.
CLASS_MAP: dict[str, set[str]] = {
    "shoes": {"running shoe", "sandal", "clog", "Loafer", "cowboy boot", "sock", "shoe shop"},
    "hat": {"cowboy hat", "sombrero", "bonnet", "mortarboard", "shower cap", "crash helmet"},
    "dress": {"gown", "overskirt", "hoopskirt", "abaya", "kimono", "maillot", "vestment"},
    "skirt": {"miniskirt", "overskirt", "hoopskirt", "sarong"},
    "pants": {"jean", "suit"},
    "shorts": {"swimming trunks", "miniskirt", "jean"},
    "t-shirt": {"jersey", "sweatshirt"},
    "shirt": {"jersey", "suit", "bow tie", "Windsor tie", "lab coat", "cardigan"},
    "longsleeve": {"sweatshirt", "jersey", "cardigan", "pajama"},
    "outwear": {"trench coat", "fur coat", "lab coat", "poncho", "cardigan", "bulletproof vest"},
}


def nmi(vectors: np.ndarray, truth: list[str], seeds: int, space: str) -> list[float]:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import normalized_mutual_info_score

    scores = []
    for seed in range(seeds):
        x = vectors
        if space == "pca":
            x = PCA(64, random_state=seed).fit_transform(vectors)
        labels = KMeans(n_clusters=10, random_state=seed, n_init=1).fit_predict(x)
        scores.append(normalized_mutual_info_score(truth, labels))
    return scores


def name_accuracy(ws: Workspace, backbone: str, truth: dict[str, str], seeds: int) -> str:
    """Share of clusters (k=10, over the seeds) whose suggestion's top class fits the
    cluster's majority true class; plus one seed's names for the record."""
    from sklearn.cluster import KMeans

    fm = load_features(ws, backbone)
    hits = total = 0
    example = ""
    for seed in range(seeds):
        labels = KMeans(n_clusters=10, random_state=seed, n_init=1).fit_predict(fm.vectors)
        groups = {c: fm.image_ids[labels == c].tolist() for c in range(10)}
        names = suggest_names(ws, backbone, groups)
        for c, name in names.items():
            majority = Counter(
                truth[fm.relpaths[i]] for i in np.flatnonzero(labels == c)
            ).most_common(1)[0][0]
            top = name.split(" / ")[0]
            hits += top in CLASS_MAP[majority]
            total += 1
            if seed == 0:
                example += f"  {majority:10s} -> {name}\n"
    return f"{hits}/{total} = {hits / total:.0%}\n(seed 0: majority class -> suggestion)\n{example}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-quality-"))
    os.environ.setdefault(CACHE_ENV, str(tmp / "cache"))
    with open(args.dataset / "labels.csv") as fh:
        truth = {row["path"]: row["label"] for row in csv.DictReader(fh)}

    results: dict[str, dict[str, list[float]]] = {}
    spaces: dict[bool, Workspace] = {}
    for flip in (False, True):
        ws = Workspace(tmp / f"ws-flip{int(flip)}", create=True)
        ingest(ws, args.dataset)
        started = time.perf_counter()
        report = extract(ws, FUSED, flip=flip, runtime="tflite")
        print(
            f"extract {FUSED} flip={flip}: {report.extracted} in {report.seconds:.1f} s "
            f"(+{time.perf_counter() - started - report.seconds:.1f} s load)"
        )
        spaces[flip] = ws
        for backbone in (LITE0, LITE2, FUSED):
            fm = load_features(ws, backbone)
            labels = [truth[r] for r in fm.relpaths]
            key = backbone + (" flip" if flip else "")
            results[key] = {s: nmi(fm.vectors, labels, args.seeds, s) for s in ("l2", "pca")}

    print(f"\nNMI, KMeans k=10, {args.seeds} seeds, mean ± std")
    print(f"{'feature set':40s} {'l2':>16s} {'pca-64':>16s}")
    for key, by_space in results.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for v in by_space.values()]
        print(f"{key:40s} {cells[0]:>16s} {cells[1]:>16s}")

    for backbone in (LITE0, FUSED):
        print(
            f"\nsuggested names, {backbone}, k=10, top class fits the majority class: "
            + name_accuracy(spaces[False], backbone, truth, args.seeds)
        )


if __name__ == "__main__":
    main()
