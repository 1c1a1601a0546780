"""Real EfficientNet-Lite0 features of ../shared/datasets/clothing, extracted once per session.

Shared by tests/test_clustering.py and tests/test_projection.py: the first caller ingests and
extracts into the session's base temp folder (about 10-30 s on 2 cores), later callers reopen
that workspace. Tests may add runs and projections to it, never change images or vectors.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgcluster.features import extract, load_features
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import read_truth

BACKBONE = "efficientnet-lite0"


def clothing_workspace(tmp_path_factory: pytest.TempPathFactory, clothing_dir: Path) -> Workspace:
    """The shared workspace with every clothing photo ingested and its lite0 vector stored."""
    root = tmp_path_factory.getbasetemp() / f"clothing-{BACKBONE}"
    done = root / "extracted.ok"
    if done.exists():
        return Workspace(root)
    ws = Workspace(root, create=True)
    ingest(ws, clothing_dir)
    report = extract(ws, BACKBONE)
    assert not report.failed, report.failed[:3]
    assert len(load_features(ws, BACKBONE)) == 600
    done.write_text("ok")
    return ws


def clothing_truth(clothing_dir: Path) -> dict[str, str]:
    """True class by relative path (only tests and benchmarks look at it)."""
    return read_truth(clothing_dir)
