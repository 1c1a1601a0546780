"""Suggested label names from the backbone's own ImageNet classifier.

The EfficientNet-Lite weights ship their 1000-class head; extraction keeps each content's top
classes beside its vector (`imgcluster.features.store.load_top_classes`). A group of images
(a cluster, a label) is named after the classes with the highest mean probability over its
members: "sandal / clog". ImageNet has no "t-shirt vs longsleeve" distinction, so a suggestion
is a starting point for the annotator, never applied without a click.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from imgcluster.backbones import imagenet_classes, split_feature_set
from imgcluster.features.store import load_top_classes
from imgcluster.metrics import find_sorted
from imgcluster.workspace import Workspace

__all__ = ["NAME_SEPARATOR", "class_scores", "feature_top_classes", "suggest_names"]

#: Joins the class names of one suggestion.
NAME_SEPARATOR = " / "


def suggest_names(
    workspace: Workspace,
    backbone: str,
    groups: Mapping[int, Sequence[int]],
    *,
    max_classes: int = 3,
    top: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[int, str]:
    """A suggested name per group of images, from their mean ImageNet class probabilities.

    Parameters
    ----------
    workspace : Workspace
    backbone : str
        The feature set the groups were clustered on; for a fusion, the first member whose
        class probabilities are stored is used.
    groups : mapping of label id -> image ids
    max_classes : int, default=3
        The two most probable classes are always named (when distinct); a third only when its
        mean probability is at least half the second's.
    top : (image ids, top classes), optional
        `feature_top_classes` of the feature set, when the caller keeps it (the app does: the
        groups change with every k, the stored classes only with the features).

    Returns
    -------
    dict of label id -> str
        E.g. ``{3: "sandal / clog"}``. Groups none of whose images has stored probabilities
        (extracted before they were kept, or a backbone without a classifier) are left out.

    Examples
    --------
    >>> suggest_names(ws, "efficientnet-lite0", {1: [4, 8, 15]})  # doctest: +SKIP
    {1: 'running shoe / sandal'}
    """
    scores = class_scores(workspace, backbone, groups, top=top)
    names = imagenet_classes()
    out: dict[int, str] = {}
    for label_id, mean in scores.items():
        out[label_id] = NAME_SEPARATOR.join(_pick(mean, names, max_classes))
    return out


def feature_top_classes(workspace: Workspace, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    """Every usable image's stored top classes for a feature set (for a fusion, the first
    member that has them), as `imgcluster.features.store.load_top_classes` returns them."""
    for member in split_feature_set(backbone, validate=False):
        image_ids, top = load_top_classes(workspace, member)
        if len(image_ids):
            return image_ids, top
    return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)


def class_scores(
    workspace: Workspace,
    backbone: str,
    groups: Mapping[int, Sequence[int]],
    *,
    top: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Mean ImageNet class probabilities ``(1000,)`` per group (top classes of each image;
    the rest of its probability mass is not kept and counts as 0).

    Summed per group with `np.bincount` over the stored top classes: never an
    (images x 1000) matrix, which at 1M images would be 4 GB.
    """
    image_ids, classes = top if top is not None else feature_top_classes(workspace, backbone)
    if not len(image_ids):
        return {}
    k = classes.shape[1] // 2
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    n_classes = len(imagenet_classes())
    scores: dict[int, np.ndarray] = {}
    for label_id, ids in groups.items():
        wanted = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        rows = order[find_sorted(sorted_ids, wanted)[0]]
        if not len(rows):
            continue
        total = np.bincount(
            classes[rows, :k].astype(np.int64).ravel(),
            weights=classes[rows, k:].astype(np.float64).ravel(),
            minlength=n_classes,
        )
        scores[label_id] = (total / len(rows)).astype(np.float32)
    return scores


def _pick(mean: np.ndarray, names: Sequence[str], max_classes: int) -> list[str]:
    picked: list[str] = []
    values: list[float] = []
    for index in np.argsort(-mean, kind="stable"):
        name, value = names[int(index)], float(mean[index])
        if value <= 0 or len(picked) >= max_classes:
            break
        if name in picked:  # "crane" and "maillot" name two classes each
            continue
        if len(picked) == 2 and value < 0.5 * values[1]:
            break
        picked.append(name)
        values.append(value)
    return picked
