"""Shared fixtures: real folders of images, real workspaces on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = PROJECT / "sample_data"
CLOTHING = PROJECT.parent / "shared" / "datasets" / "clothing"


@pytest.fixture(scope="session")
def clothing_dir() -> Path:
    """The 600 real CC0 product photos beside the project (read-only; never copied in)."""
    if not (CLOTHING / "labels.csv").exists():
        pytest.skip(f"{CLOTHING} not present (it lives in ../shared beside the project)")
    return CLOTHING


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DATA


def route_apptest_like_a_running_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let AppTest runs use `st.navigation` routing, as a running server does after its first run.

    AppTest resets Streamlit's "legacy pages/ folder" flag before every run, so with a
    ``pages/`` folder beside ``app.py`` each run would start in the legacy file-based mode that
    a real server only sees on its very first request (and leaves at once: see
    ``pages/_common.require_router``, tested in a real browser by
    ``tests/browser/test_deep_link.py``). Widget interactions in that nested mode are lost, so
    tests clear the flag again right after AppTest resets it.
    """
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self: PagesManager, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)
