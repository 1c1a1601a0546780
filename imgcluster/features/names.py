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
from imgcluster.workspace import Workspace

__all__ = ["NAME_SEPARATOR", "class_scores", "suggest_names"]

#: Joins the class names of one suggestion.
NAME_SEPARATOR = " / "


def suggest_names(
    workspace: Workspace,
    backbone: str,
    groups: Mapping[int, Sequence[int]],
    *,
    max_classes: int = 3,
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
    scores = class_scores(workspace, backbone, groups)
    names = imagenet_classes()
    out: dict[int, str] = {}
    for label_id, mean in scores.items():
        out[label_id] = NAME_SEPARATOR.join(_pick(mean, names, max_classes))
    return out


def class_scores(
    workspace: Workspace, backbone: str, groups: Mapping[int, Sequence[int]]
) -> dict[int, np.ndarray]:
    """Mean ImageNet class probabilities ``(1000,)`` per group (top classes of each image;
    the rest of its probability mass is not kept and counts as 0)."""
    wanted = sorted({int(i) for ids in groups.values() for i in ids})
    for member in split_feature_set(backbone, validate=False):
        image_ids, top = load_top_classes(workspace, member, wanted)
        if len(image_ids):
            break
    else:
        return {}
    k = top.shape[1] // 2
    dense = np.zeros((len(image_ids), len(imagenet_classes())), dtype=np.float32)
    rows = np.repeat(np.arange(len(image_ids)), k)
    dense[rows, top[:, :k].astype(np.int64).ravel()] = top[:, k:].ravel()
    position = {int(image_id): row for row, image_id in enumerate(image_ids)}
    scores: dict[int, np.ndarray] = {}
    for label_id, ids in groups.items():
        members = [position[int(i)] for i in ids if int(i) in position]
        if members:
            scores[label_id] = dense[members].mean(axis=0)
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
