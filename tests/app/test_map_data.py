"""The Clusters map's per-point data, computed in numpy for a million points: each point's
label (images without one stay grey) and each label's name at its members' median point."""

from __future__ import annotations

import numpy as np

from imgcluster.projection import Projection
from imgcluster_app import clusters_view as cv
from imgcluster_app.views import LabelTable


def test_point_labels_and_centroids_match_a_plain_python_reading() -> None:
    rng = np.random.default_rng(0)
    n = 5_000
    image_ids = rng.permutation(n).astype(np.int64) + 10
    coords = rng.normal(size=(n, 2)).astype(np.float32)
    proj = Projection(coords, "pca", True, image_ids)
    labeled = rng.permutation(image_ids)[: n - 300]  # 300 images added after labeling started
    label_ids = rng.integers(0, 7, len(labeled)).astype(np.int64)
    table = LabelTable([], labeled, label_ids, [""] * len(labeled), 1)

    labels = cv.point_labels(proj, table)
    label_of = dict(zip(labeled.tolist(), label_ids.tolist(), strict=True))
    assert labels.tolist() == [label_of.get(i, -1) for i in image_ids.tolist()]
    assert (labels == -1).sum() == 300

    names = {i: f"label {i}" for i in range(7)}
    got = cv.centroids(proj, labels, names)
    want = [
        (*np.median(coords[labels == i], axis=0).tolist(), f"label {i}")
        for i in sorted(set(label_ids.tolist()))
    ]
    assert [g[2] for g in got] == [w[2] for w in want]
    np.testing.assert_allclose([g[:2] for g in got], [w[:2] for w in want], rtol=1e-6)
    assert cv.centroids(proj, np.full(n, -1), names) == []
