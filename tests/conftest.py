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
