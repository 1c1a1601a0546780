"""Simulated annotator: how many actions turn the default clustering into 100% correct labels.

On ``../shared/datasets/clothing`` (600 photos, 10 classes, truth in ``labels.csv``) the real
pipeline runs once (ingest, EfficientNet-Lite0 features, the default clustering at k=10) and is
cached in a workspace under ``/tmp`` for reruns. A fresh labeling session is started and an
oracle that knows the true class of every photo labels the collection with the library's own
operations (`imgcluster.labels`), the way a person would in the app:

1. **rename** each label to the majority class of its images; a class that is the majority of
   several labels gets one **merge** of them (a multi-select merge is one action);
2. **move** misplaced images: in each label, the images of one other class are selected
   together and moved in one action (a lasso or multi-select), to an existing or new label.

Printed: the actions of each kind, images labeled per action (600 / actions; labeling photos
one at a time is 1 per action), accuracy after the renames alone, the images that had to
be picked by hand, and how well the app's "looks misplaced" view (`labels.misplaced`) points
at the wrong images after the renames. The run ends by checking that `current_labels` is 100%
correct.

With ``--variants`` it runs the same oracle for each pipeline variant (plain recipe: L2 vectors
+ KMeans; PCA default; refined UMAP space; the Lite0+Lite2 fusion in the refined space when
the workspace holds Lite2 vectors), at the true k and at 2x the true k (over-cluster, then
merge), without and with the gather tool (`labels.gather`: after the renames, for each label
the oracle reviews its gathered grid, most likely first, and accepts the prefix that saves the
most actions: one action for the grid plus one per wrong entry in it, against the step-2
moves of every (label, class) group the accepted entries empty; passes repeat while a grid
pays, at most 3), over ``--seeds`` KMeans seeds; it prints
mean and spread of the actions and images per action. In the app the gathered grid is a
selection grid with nothing preselected: "Select page" (or a click and a shift-click for a
prefix), one click per wrong photo to untick it, then "Move"; the oracle counts that as one
action plus one per unticked photo, as it counts a lasso move as one action.
A third gather mode, ``true-label probe``, is a bound on what any gather model can do with
these features: the same oracle and accounting, but the grid ranked by a logistic regression
trained on the *true* classes (out of fold, so no image scores itself). ``--only`` restricts
the variants by name (e.g. ``--only refined,fusion``).

With ``--scattered 0.05,0.1`` the session starts instead from the *true* labels with that share
of the images each moved to a random other label (single misfits scattered over all labels,
what the held-out sets' refined clusterings left), and the same oracle runs with and without
gather: what the gather tool is for, measured where lassos cannot group the misfits.

With ``--scale N`` it also times the app's queries and a move on a synthetic workspace of N
images (default 100k) and 50 labels, against the clustering module's own page query
(`imgcluster.clustering.cluster_members`) measured in the same run.

Usage::

    python bench/annotate.py [--workspace /tmp/imgcluster-bench-annotate] [--scale 100000]
    python bench/annotate.py --workspace WS --variants [--seeds 10] [--only refined,fusion]
    python bench/annotate.py --workspace WS --scattered 0.05,0.1,0.2 [--seeds 10]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from imgcluster import labels as L
from imgcluster.clustering import cluster, cluster_members, store_partition
from imgcluster.features import extract, feature_counts, save_vectors
from imgcluster.images import ingest
from imgcluster.workspace import Workspace

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clothing"
BACKBONE = "efficientnet-lite0"
K = 10


def prepare(path: Path) -> tuple[Workspace, int]:
    """The cached workspace with features and the default k=10 run (computed on first use)."""
    ws = Workspace(path, create=True)
    if ws.image_counts()["ok"] == 0:
        ingest(ws, DATASET)
    if feature_counts(ws).get(BACKBONE, 0) < ws.image_counts()["ok"]:
        extract(ws, BACKBONE)
    run = cluster(ws, BACKBONE, K)  # default algorithm, seed and preprocessing
    return ws, run.id


def truth() -> dict[str, str]:
    with open(DATASET / "labels.csv", newline="") as fh:
        return {row["path"]: row["label"] for row in csv.DictReader(fh)}


class Gathered(Protocol):
    """What the oracle reads of a gathered image (`imgcluster.labels.Stray` has it)."""

    image_id: int
    relpath: str
    label_id: int


#: A gather model: (workspace, gathering label) -> its grid, most likely first.
Gatherer = Callable[[Workspace, L.LabelSummary], Sequence[Gathered]]


def library_gather(ws: Workspace, summary: L.LabelSummary) -> Sequence[Gathered]:
    """The app's gather (`imgcluster.labels.gather`), one page of 60."""
    return L.gather(ws, summary.id, limit=PAGE)


PAGE = 60


def simulate(
    ws: Workspace,
    run_id: int,
    *,
    use_gather: bool = False,
    gatherer: Gatherer = library_gather,
) -> dict[str, object]:
    """The oracle's session; returns the counts printed and written to bench/README.md."""
    classes = truth()
    L.start_session(ws, run_id, actor="oracle", replace=True)
    actions: Counter[str] = Counter()

    # 1. rename each label to its majority class; merge labels sharing a majority class
    label_id = {summary.name: summary.id for summary in L.list_labels(ws)}
    members: dict[int, list[str]] = defaultdict(list)
    for row in L.current_labels(ws):
        members[label_id[row.label]].append(row.relpath)
    majority = {
        lab: Counter(classes[p] for p in paths).most_common(1)[0][0]
        for lab, paths in members.items()
    }
    purity = {
        lab: Counter(classes[p] for p in paths).most_common(1)[0][1] / len(paths)
        for lab, paths in members.items()
    }
    by_class: dict[str, list[int]] = defaultdict(list)
    for lab in sorted(members, key=lambda lab: -len(members[lab])):
        by_class[majority[lab]].append(lab)
    for cls, labs in by_class.items():
        L.rename(ws, labs[0], cls, actor="oracle")
        actions["rename"] += 1
        if len(labs) > 1:
            L.merge(ws, labs, actor="oracle")
            actions["merge"] += 1
    after_renames = _accuracy(ws, classes)
    # how well the app's "looks misplaced" view points at the images that are really wrong
    flagged = {image.relpath for image in L.misplaced(ws, None, limit=100_000)}
    mislabeled = {r.relpath for r in L.current_labels(ws) if classes[r.relpath] != r.label}

    # 1b. gather the strays: accept the gathered grids while they save actions
    # the bound: a perfect gather (exactly a class's strays, one action per class; a class
    # without a label of its own needs one move to create it first)
    groups = _wrong_groups(ws, classes)
    per_class = Counter(cls for _label, cls in groups)
    names_now = {s.name for s in L.list_labels(ws)}
    ideal = sum(actions.values()) + sum(
        1 + (n > 1 and cls not in names_now) for cls, n in per_class.items()
    )
    shown: Counter[str] = Counter()
    if use_gather:
        for _pass in range(3):
            gathered = _gather_pass(ws, classes, shown if not _pass else Counter(), gatherer)
            actions.update(gathered)
            if not gathered["gather"]:
                break

    # 2. in each label, select the images of each wrong class together and move them
    picked = _group_moves(ws, classes, actions)
    final = _accuracy(ws, classes)
    if final != 1.0:
        raise AssertionError(f"the oracle ended at {final:.1%} correct, not 100%")
    n_images = len(L.current_labels(ws))
    total = sum(actions.values())
    return {
        "images": n_images,
        "actions": dict(actions),
        "total": total,
        "per_action": n_images / total,
        "after_renames": after_renames,
        "picked": picked,
        "flagged": len(flagged),
        "flag_precision": len(flagged & mislabeled) / max(1, len(flagged)),
        "flag_recall": len(flagged & mislabeled) / max(1, len(mislabeled)),
        "purity": sorted(purity.values()),
        # first pass: share of the gathered first pages (60) that are of the label's class
        "gather_precision": shown["right"] / max(1, shown["shown"]),
        "gather_shown": shown["shown"],
        "ideal_gather": ideal,
        "classes_without_cluster": sorted(set(classes.values()) - set(majority.values())),
    }


def _wrong_groups(ws: Workspace, classes: dict[str, str]) -> dict[tuple[int, str], list[int]]:
    """``{(label id, true class): image ids}`` of every image not in its class's label."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for summary in L.list_labels(ws):
        for image in L.label_images(ws, summary.id, limit=100_000):
            if classes[image.relpath] != summary.name:
                groups[(summary.id, classes[image.relpath])].append(image.image_id)
    return groups


def _group_moves(ws: Workspace, classes: dict[str, str], actions: Counter[str]) -> int:
    """Step 2: one move per (label, wrong class) group; returns the images moved."""
    picked = 0
    for (_label, cls), ids in sorted(_wrong_groups(ws, classes).items()):
        L.move(ws, ids, cls, actor="oracle")
        actions["move"] += 1
        picked += len(ids)
    return picked


def _gather_pass(
    ws: Workspace, classes: dict[str, str], shown: Counter[str], gatherer: Gatherer
) -> Counter[str]:
    """For each label, review its gathered grid (most likely first) and accept the prefix
    that saves the most actions: one action for the grid plus one per wrong entry in it
    (deselected, as fixing it by a move would cost), against the step-2 moves it makes
    unnecessary (every (source label, class) group the accepted entries empty). A person
    scrolls the grid and stops where it turns wrong the same way.
    """
    done: Counter[str] = Counter()
    names = set(classes.values())
    for summary in L.list_labels(ws):
        if summary.name not in names:
            continue
        strays = gatherer(ws, summary)
        shown["shown"] += len(strays)
        shown["right"] += sum(classes[s.relpath] == summary.name for s in strays)
        if not strays:
            continue
        groups = _wrong_groups(ws, classes)
        best, best_m = 0, 0
        taken: Counter[int] = Counter()
        wrong = 0
        for m, stray in enumerate(strays, start=1):
            if classes[stray.relpath] == summary.name:
                taken[stray.label_id] += 1
            else:
                wrong += 1
            drained = sum(n == len(groups.get((src, summary.name), ())) for src, n in taken.items())
            if drained - 1 - wrong > best:
                best, best_m = drained - 1 - wrong, m
        if not best_m:
            continue
        prefix = strays[:best_m]
        right = [s.image_id for s in prefix if classes[s.relpath] == summary.name]
        L.accept_gathered(ws, summary.id, right, actor="oracle")
        done["gather"] += 1
        done["fix"] += best_m - len(right)
    return done


class TruthProbe:
    """The bound: gather ranked by a probe of the *true* classes (no gather model does better
    with these features than a supervised one, so if this grid does not pay, none will).

    A multinomial logistic regression on the L2-normalised vectors of the session's feature
    set, trained on labels.csv with 5-fold out-of-fold predictions (an image is never scored
    by a model that saw it). For the gathering label (named after class ``c``) it offers what
    `labels.gather` may offer (other labels' normal images, unconfirmed, not moved by hand)
    whose probability of ``c`` is at least that of the class its label is named after,
    most likely first, one page.
    """

    def __init__(self, classes: dict[str, str]) -> None:
        self.classes = classes
        self._fitted: dict[str, tuple[dict[str, int], list[str], np.ndarray]] = {}

    def _probabilities(
        self, ws: Workspace, backbone: str
    ) -> tuple[dict[str, int], list[str], np.ndarray]:
        if backbone not in self._fitted:
            from sklearn.linear_model import LogisticRegression
            from sklearn.model_selection import StratifiedKFold

            from imgcluster.features import l2_normalize, load_features

            features = load_features(ws, backbone)
            x = l2_normalize(features.vectors)
            y = np.array([self.classes[p] for p in features.relpaths])
            names = sorted(set(y.tolist()))
            proba = np.zeros((len(y), len(names)))
            for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
                model = LogisticRegression(C=1.0, max_iter=1000).fit(x[train], y[train])
                cols = np.searchsorted(names, model.classes_)
                proba[np.ix_(test, cols)] = model.predict_proba(x[test])
            row = {path: i for i, path in enumerate(features.relpaths)}
            self._fitted[backbone] = (row, names, proba)
        return self._fitted[backbone]

    def __call__(self, ws: Workspace, summary: L.LabelSummary) -> list[L.LabeledImage]:
        session = L.active_session(ws)
        assert session is not None
        row, names, proba = self._probabilities(ws, session.backbone)
        col = {name: i for i, name in enumerate(names)}
        if summary.name not in col:
            return []
        target = col[summary.name]
        offered: list[tuple[float, L.LabeledImage]] = []
        for other in L.list_labels(ws):
            if other.id == summary.id:
                continue
            own = col.get(other.name)
            for image in L.label_images(ws, other.id, limit=100_000):
                if image.confirmed or image.by_hand or image.state != "normal":
                    continue
                p = proba[row[image.relpath]]
                if p[target] >= (p[own] if own is not None else 0.0):
                    offered.append((float(p[target]), image))
        offered.sort(key=lambda item: -item[0])
        return [image for _p, image in offered[:PAGE]]


def _gather_modes() -> list[tuple[str, Gatherer | None]]:
    """The gather modes every table compares: none, the app's, and the true-label bound."""
    return [
        ("no", None),
        ("kNN vote (labels.gather)", library_gather),
        ("true-label probe (bound)", TruthProbe(truth())),
    ]


#: A table's header cells after its own leading columns.
_CELLS_HEAD = "actions to 100% ({n} seeds) | images per action | gather first-page precision | "
_CELLS_HEAD += "with a perfect gather |"


def _oracle_cells(ws: Workspace, run_ids: Iterable[int], gatherer: Gatherer | None) -> str:
    """The oracle on each run (with ``gatherer``, or none), as a table's cells:
    actions and images per action (mean ± std), and with gather its first-page precision and
    the perfect-gather bound."""
    results = [
        simulate(ws, run_id, use_gather=gatherer is not None, gatherer=gatherer or library_gather)
        for run_id in run_ids
    ]

    def spread(key: str) -> str:
        values = [r[key] for r in results]
        return f"{np.mean(values):.1f} ± {np.std(values):.1f}"

    used = gatherer is not None
    precision = np.mean([r["gather_precision"] for r in results])
    ideal = np.mean([r["ideal_gather"] for r in results])
    return (
        f"{spread('total')} | {spread('per_action')} | "
        f"{f'{precision:.2f}' if used else ''} | {f'{ideal:.1f}' if used else ''} |"
    )


def variants(ws: Workspace, n_seeds: int, only: Sequence[str] = ()) -> None:
    """The oracle's actions per pipeline variant, k and gather tool (mean ± std over seeds)."""
    n_classes = len(set(truth().values()))
    fused = f"{BACKBONE}+efficientnet-lite2"
    grid = [("refined space (Lite0)", BACKBONE, "umap")]
    if feature_counts(ws).get("efficientnet-lite2", 0):
        grid.append(("fusion Lite0+Lite2, refined", fused, "umap"))
    grid += [
        ("PCA default (Lite0)", BACKBONE, "pca"),
        ("plain recipe (L2 + KMeans)", BACKBONE, "l2"),
    ]
    if only:
        grid = [g for g in grid if any(word.lower() in g[0].lower() for word in only)]
    modes = _gather_modes()
    rows = []
    for name, backbone, preprocess in grid:
        for k in (n_classes, 2 * n_classes):
            for mode, gatherer in modes:
                start = time.perf_counter()
                runs = (
                    cluster(ws, backbone, k, random_state=seed, preprocess=preprocess).id
                    for seed in range(n_seeds)
                )
                rows.append(f"| {name} | {k} | {mode} | {_oracle_cells(ws, runs, gatherer)}")
                print(f"{rows[-1]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(f"| variant | k | gather | {_CELLS_HEAD.format(n=n_seeds)}")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def scattered(ws: Workspace, fractions: Sequence[float], n_seeds: int) -> None:
    """The oracle on labels that are right but for single misfits scattered over all labels.

    The held-out sets' finding (issue 13 §7): after a good clustering the remaining work is
    single misfits, one move each, where a lasso per (label, class) group saves nothing. This
    starts the session from the *true* partition with a share ``fraction`` of the images each
    put in a random other class's label (`store_partition`), then runs the same oracle with and
    without the gather tool. Seeds drive which images stray and where.
    """
    classes = truth()
    names = sorted(set(classes.values()))
    index = {name: i for i, name in enumerate(names)}
    image_ids = {image.relpath: image.id for image in ws.images()}
    paths = sorted(image_ids)

    def scattered_run(fraction: float, seed: int) -> int:
        rng = np.random.default_rng(seed)
        assignment = {image_ids[p]: index[classes[p]] for p in paths}
        for row in rng.choice(len(paths), size=round(fraction * len(paths)), replace=False):
            own = assignment[image_ids[paths[row]]]
            other = int(rng.integers(len(names) - 1))
            assignment[image_ids[paths[row]]] = other + (other >= own)
        return store_partition(ws, BACKBONE, assignment, preprocess="pca")

    print(f"| misfits scattered | gather | {_CELLS_HEAD.format(n=n_seeds)}")
    print("|---|---|---|---|---|---|")
    for fraction in fractions:
        for mode, gatherer in _gather_modes():
            runs = (scattered_run(fraction, seed) for seed in range(n_seeds))
            print(f"| {fraction:.0%} | {mode} | {_oracle_cells(ws, runs, gatherer)}", flush=True)


def _accuracy(ws: Workspace, classes: dict[str, str]) -> float:
    rows = L.current_labels(ws)
    return sum(classes[r.relpath] == r.label for r in rows) / len(rows)


def scale(n: int, n_labels: int = 50) -> list[tuple[str, float]]:
    """Seconds of the app's label queries and one move at ``n`` images (synthetic vectors)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws", create=True)
        sha = [f"{i:064x}" for i in range(n)]
        with ws.transaction() as conn:
            conn.executemany(
                "INSERT INTO images(relpath, sha256, status) VALUES (?, ?, 'ok')",
                ((f"img{i:07d}.jpg", sha[i]) for i in range(n)),
            )
        centres = rng.normal(size=(n_labels, 256)).astype(np.float32)
        which = rng.integers(n_labels, size=n)
        vectors = centres[which] + rng.normal(scale=0.8, size=(n, 256)).astype(np.float32)
        save_vectors(ws, "synthetic", sha, vectors)
        run = cluster(ws, "synthetic", n_labels)
        timings: list[tuple[str, float]] = []

        def timed(name: str, fn) -> object:  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            value = fn()
            timings.append((name, time.perf_counter() - start))
            return value

        timed(
            "baseline: cluster_members page (60)", lambda: cluster_members(ws, run.id, 3, limit=60)
        )
        timed("start_session", lambda: L.start_session(ws, run.id, actor="bench"))
        timed("first list_labels (computes geometry)", lambda: L.list_labels(ws))
        timed("list_labels", lambda: L.list_labels(ws))
        timed("label_images page (60, typicality)", lambda: L.label_images(ws, 3, limit=60))
        timed(
            "label_images page 10 (offset 540)", lambda: L.label_images(ws, 3, offset=540, limit=60)
        )
        timed("misplaced (60)", lambda: L.misplaced(ws, 3, 60))
        ids = [im.image_id for im in L.label_images(ws, 3, limit=20)]
        timed("move 20 images", lambda: L.move(ws, ids, "moved", actor="bench"))
        timed("list_labels after the move (geometry)", lambda: L.list_labels(ws))
        timed("undo", lambda: L.undo(ws, actor="bench"))
        timed("merge 2 labels", lambda: L.merge(ws, [5, 6], actor="bench"))
        timed("current_labels (export rows)", lambda: L.current_labels(ws))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/imgcluster-bench-annotate"))
    parser.add_argument("--scale", type=int, default=0, help="Also time queries at N images.")
    parser.add_argument("--variants", action="store_true", help="Oracle per pipeline variant.")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--scattered",
        default="",
        help="Comma-separated shares (e.g. 0.05,0.1,0.2): the oracle on the true labels with "
        "that share of images scattered as single misfits.",
    )
    parser.add_argument(
        "--only", default="", help="Comma-separated words: only the variants whose name has one."
    )
    args = parser.parse_args()
    if not (DATASET / "labels.csv").exists():
        raise SystemExit(f"{DATASET} not found (it lives in ../shared beside the project)")
    ws, run_id = prepare(args.workspace)
    if args.scattered:
        scattered(ws, [float(f) for f in args.scattered.split(",")], args.seeds)
        return
    if args.variants:
        variants(ws, args.seeds, [w for w in args.only.split(",") if w])
        return
    result = simulate(ws, run_id)
    acts = result["actions"]
    print(f"dataset            {DATASET} ({result['images']} images, 10 classes)")
    print(f"clustering         run {run_id}: {BACKBONE}, k={K}, default settings")
    print(f"cluster purity     {', '.join(f'{p:.0%}' for p in result['purity'])}")
    print(f"classes w/o a cluster of their own: {result['classes_without_cluster'] or 'none'}")
    print(f"after renames      {result['after_renames']:.1%} correct")
    print(
        f"actions to 100%    {result['total']} (rename {acts.get('rename', 0)}, "
        f"merge {acts.get('merge', 0)}, move {acts.get('move', 0)}, "
        f"gather {acts.get('gather', 0)}, fix {acts.get('fix', 0)})"
    )
    print(f"images picked      {result['picked']} moved in those {acts.get('move', 0)} moves")
    print(
        f"misplaced() view   after the renames flags {result['flagged']} images: "
        f"{result['flag_precision']:.0%} of them really are misplaced, "
        f"{result['flag_recall']:.0%} of the misplaced are flagged"
    )
    print(
        f"images per action  {result['per_action']:.1f} "
        f"(baseline, one photo at a time: 1.0; ratio {result['per_action']:.1f}x)"
    )
    if args.scale:
        timings = scale(args.scale)
        base = timings[0][1]
        print(f"\nqueries at {args.scale} images, 50 labels (seconds; ratio to the baseline)")
        for name, seconds in timings:
            print(f"  {name:42s} {seconds:8.3f}  {seconds / base:8.1f}x")


if __name__ == "__main__":
    main()
