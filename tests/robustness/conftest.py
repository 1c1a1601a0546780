"""Robustness tests drive the app with AppTest; keep them from starting UMAP workers that would
outlive the test run (the projection has tests of its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import route_apptest_like_a_running_server


@pytest.fixture(autouse=True)
def _no_umap_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCLUSTER_UMAP", "0")


@pytest.fixture(scope="session", autouse=True)
def _apptest_routed_like_a_running_server() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        route_apptest_like_a_running_server(mp)
        yield
