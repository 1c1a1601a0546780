"""AppTest fixtures: the app's own folder importable, workspaces in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

APP = PROJECT / "app.py"

# `imgcluster_app` is imported by the app as a top-level package from the project folder
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
