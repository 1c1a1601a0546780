"""Degenerate collections reach clustering and labeling: as many clusters as images, identical
images, all-zero vectors. Each case states its outcome: a stored run whose labels hold every
image, or (``refusal``) the `ImgclusterError` a person can act on, never a library exception
from deep inside scikit-learn and never an error the case did not expect.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from imgcluster.errors import ImgclusterError
from tests.conftest import synthetic_workspace
from tests.robustness.invariants import problems

BACKBONE = "synthetic"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PCA of identical rows divides by 0
@pytest.mark.parametrize(
    ("case", "vectors", "k", "refusal"),
    [
        ("as many clusters as images", np.eye(4, 16), 4, None),
        ("one image fewer than clusters allow", np.eye(5, 16), 4, None),
        ("identical images", np.ones((6, 16)), 2, None),
        ("all-zero vectors", np.zeros((6, 16)), 3, None),
        ("two points, two clusters", np.eye(2, 16), 2, None),
        ("more clusters than images", np.eye(3, 16), 4, r"\b3\b.*\b4\b|\b4\b.*\b3\b"),
    ],
)
def test_degenerate_clustering_gives_a_run_or_a_clear_error(
    tmp_path: Path, case: str, vectors: np.ndarray, k: int, refusal: str | None
) -> None:
    from imgcluster.clustering import cluster
    from imgcluster.labels import list_labels, start_session

    ws = synthetic_workspace(tmp_path, vectors, backbone=BACKBONE)
    if refusal is not None:
        with pytest.raises(ImgclusterError) as err:
            cluster(ws, BACKBONE, k)
        assert re.search(refusal, str(err.value)), (case, str(err.value))
        assert "\n" not in str(err.value)
        return
    run = cluster(ws, BACKBONE, k)  # any exception here fails the case
    assert run.k == k and len(run.sizes) == k, case
    assert int(np.sum(run.sizes)) == len(vectors), case
    start_session(ws, run.id)
    assert sum(label.count for label in list_labels(ws)) == len(vectors)
    assert problems(ws) == []
