"""Robustness tests drive the app with AppTest; keep them from starting UMAP workers that would
outlive the test run (the projection has tests of its own)."""

from __future__ import annotations

import pytest

from imgcluster.settings import UMAP_ENV


@pytest.fixture(autouse=True)
def _no_umap_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UMAP_ENV, "0")
