"""AppTest fixtures: the app's own folder importable, workspaces in tmp_path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import route_apptest_like_a_running_server

PROJECT = Path(__file__).resolve().parents[2]
APP = PROJECT / "app.py"

# `pages._common` is imported by the app as a top-level package from the project folder
# (Streamlit puts the main script's folder on sys.path); tests import it the same way.
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))


@pytest.fixture()
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Workspaces home in tmp_path; allowed roots = the sample data and the clothing set."""
    home = tmp_path / "workspaces"
    monkeypatch.setenv("IMGCLUSTER_WORKSPACES", str(home))
    roots = [PROJECT / "sample_data", PROJECT.parent / "shared" / "datasets", tmp_path]
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", ":".join(str(r) for r in roots))
    monkeypatch.setenv("IMGCLUSTER_UMAP", "0")
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(scope="session", autouse=True)
def _apptest_routed_like_a_running_server() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        route_apptest_like_a_running_server(mp)
        yield
