"""Honest k advice: silhouette per k in the best stored space, stability across seeds, and
how much to trust the result (issue 13 §6; figures in bench/README.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from imgcluster import spaces
from imgcluster.errors import InvalidParameter, NotEnoughImages
from imgcluster.kmeans import KMeansResult, fit_kmeans
from imgcluster.spaces import DEFAULT_PREPROCESS, REFINED_PREPROCESS, preprocess_vectors
from imgcluster.workspace import Workspace

if TYPE_CHECKING:
    from imgcluster.images import Progress

__all__ = ["STABLE_ARI", "KSuggestion", "suggest_k"]


#: A k whose clusterings under different random states agree at least this much (mean
#: pairwise adjusted Rand index) counts as stable; unstable ks rank after every stable one.
STABLE_ARI = 0.8


@dataclass(frozen=True)
class KSuggestion:
    """Quality of each k in a range, and the advice drawn from it.

    ``silhouette`` is measured in ``space`` (the refined UMAP space when stored: there the
    silhouette tracks agreement with the true classes, Lowe et al., arXiv 2406.02465);
    ``stability`` is the mean adjusted Rand index between clusterings of the same k under
    `n_seeds` random states (1.0: the same partition every time). ``best`` lists the few best
    k, best first: stable ks (`STABLE_ARI`) by silhouette, then the unstable ones.
    ``confidence`` is ``"high"``, ``"medium"`` or ``"low"`` and ``advice`` says why in one
    sentence.
    """

    ks: list[int]
    silhouette: list[float]
    inertia: list[float]
    best: list[int]
    stability: list[float] = field(default_factory=list)
    space: str = DEFAULT_PREPROCESS
    confidence: str = "low"
    advice: str = ""


def _stability(space: np.ndarray, k: int, first: KMeansResult, seeds: list[int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    if not seeds:
        return math.nan
    others = [fit_kmeans(space, k, algorithm="kmeans", random_state=s).labels for s in seeds]
    runs = [first.labels, *others]
    scores = [
        adjusted_rand_score(runs[i], runs[j])
        for i in range(len(runs))
        for j in range(i + 1, len(runs))
    ]
    return float(np.mean(scores))


def _rank(ks: list[int], scores: list[float], stability: list[float]) -> list[int]:
    def key(i: int) -> tuple[int, float]:
        stable = not math.isfinite(stability[i]) or stability[i] >= STABLE_ARI
        return (0 if stable else 1, -scores[i])

    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    return [ks[i] for i in sorted(finite, key=key)]


def _margin(ks: list[int], scores: list[float], top: int) -> float:
    """Silhouette of ``top`` minus the best silhouette of the ks not next to it."""
    rivals = [s for k, s in zip(ks, scores, strict=True) if abs(k - top) > 1 and math.isfinite(s)]
    return scores[ks.index(top)] - max(rivals) if rivals else math.inf


def _confidence(
    ks: list[int], scores: list[float], stability: list[float], best: list[int], space: str
) -> tuple[str, str]:
    """How far the best k stands out, how stable it is, in which space it was measured.

    The smallest k tried nearly always has the highest silhouette (one coarse split: shoes vs
    garments on the clothing photos, bench/README.md), so a win there says little about the
    number of classes: the advice then names the best larger k and how little it stands out.
    """
    if not best:
        return "low", "no k could be scored"
    top = best[0]
    where = "the refined space" if space == REFINED_PREPROCESS else f"the {space} space"
    if top == ks[0] and len(best) > 1:
        finer = next((k for k in best if k > ks[0] + 1), best[1])
        margin = _margin(ks[1:], scores[1:], finer)
        return "low", (
            f"k={top} scores best in {where}, but the smallest k tried usually wins (one coarse "
            f"split); the best larger k is {finer} ({margin:+.3f} silhouette over the other ks "
            f"not next to it), which may still be a coarser grouping than your classes: choose "
            "k from the classes you expect, or over-cluster (2x) and merge labels; confidence low"
        )
    margin = _margin(ks, scores, top)
    stab = stability[ks.index(top)]
    stable = not math.isfinite(stab) or stab >= 0.9
    if margin >= 0.03 and stable:
        level = "high"
    elif margin >= 0.01 and (not math.isfinite(stab) or stab >= STABLE_ARI):
        level = "medium"
    else:
        level = "low"
    stab_text = f", the same partition across seeds (ARI {stab:.2f})" if math.isfinite(stab) else ""
    return level, (
        f"k={top} in {where}: silhouette {scores[ks.index(top)]:.3f}, {margin:+.3f} over the "
        f"ks not next to it{stab_text}; confidence {level}"
    )


def suggest_k(
    source: Workspace | np.ndarray,
    k_min: int = 2,
    k_max: int = 40,
    *,
    backbone: str | None = None,
    random_state: int = 0,
    preprocess: str | None = None,
    sample_size: int = 3_000,
    n_best: int = 3,
    n_seeds: int = 3,
    progress: Progress | None = None,
) -> KSuggestion:
    """Silhouette, inertia and stability of KMeans for each k in ``k_min..k_max``.

    Above ``sample_size`` images a seeded random sample is clustered and scored, so the curve
    costs seconds even for 100k images. Inertia is per image, so curves of different sizes
    compare.

    Parameters
    ----------
    source : Workspace or ndarray of shape (n, d)
        A workspace (then ``backbone`` is required) or the vectors themselves.
    k_min, k_max : int, default=2, 40
        Range of k, clipped to ``[2, n - 1]``.
    backbone : str, optional
    random_state : int, default=0
    preprocess : str, optional
        Space to score in. Default: for a workspace the best stored space (refined when the
        background worker stored it), for vectors ``"pca"``.
    sample_size : int, default=3000
    n_best : int, default=3
    n_seeds : int, default=3
        Random states per k for the stability score (1 turns it off).
    progress : callable, optional
        ``(done, total)`` over the k values.

    Returns
    -------
    KSuggestion
    """
    from sklearn.metrics import silhouette_score

    if isinstance(source, Workspace):
        if backbone is None:
            raise InvalidParameter("backbone is required when suggesting k for a workspace")
        preprocess = spaces.resolve_preprocess(source, backbone, preprocess)
        _ids, space = spaces.space_of(source, backbone, preprocess)
    else:
        preprocess = preprocess or DEFAULT_PREPROCESS
        space = np.asarray(source, dtype=np.float32)
    n = len(space)
    k_max = min(k_max, n - 1)
    if n < 3 or k_max < max(2, k_min):
        raise NotEnoughImages(f"{n} images are too few to compare k in {k_min}..{k_max}")
    k_min = max(2, k_min)
    if n > sample_size:
        rng = np.random.default_rng(random_state)
        space = space[np.sort(rng.choice(n, sample_size, replace=False))]
    if not isinstance(source, Workspace):
        space = preprocess_vectors(space, preprocess, random_state=random_state)
    ks = list(range(k_min, k_max + 1))
    seeds = [random_state + 1 + i for i in range(max(0, n_seeds - 1))]
    scores: list[float] = []
    inertias: list[float] = []
    stability: list[float] = []
    for i, k in enumerate(ks, start=1):
        result = fit_kmeans(space, k, algorithm="kmeans", random_state=random_state)
        if len(np.unique(result.labels)) > 1:
            with spaces.single_thread():
                scores.append(float(silhouette_score(space, result.labels)))
        else:
            scores.append(math.nan)
        inertias.append(result.inertia / len(space))
        stability.append(_stability(space, k, result, seeds))
        if progress:
            progress(i, len(ks))
    best = _rank(ks, scores, stability)[:n_best]
    confidence, advice = _confidence(ks, scores, stability, best, preprocess)
    return KSuggestion(
        ks=ks,
        silhouette=scores,
        inertia=inertias,
        best=best,
        stability=stability,
        space=preprocess,
        confidence=confidence,
        advice=advice,
    )
