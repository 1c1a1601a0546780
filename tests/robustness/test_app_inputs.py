"""The hostile corpus through the app: every page renders it, and extraction started from the
Features page (real efficientnet-lite0) reports files that changed after ingest instead of
failing. Streamlit AppTest, no browser.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from imgcluster.features import feature_counts
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.robustness.corpus import make_corpus
from tests.robustness.helpers import PROJECT
from tests.robustness.invariants import problems

PAGES = [
    "pages/images.py",
    "pages/features.py",
    "pages/clusters.py",
    "pages/label.py",
    "pages/export.py",
]


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.slow
def test_pages_render_the_hostile_corpus_and_extraction_reports_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not all((PROJECT / page).exists() for page in PAGES):
        pytest.skip("the app's pages are not all there")
    root = tmp_path / "photos"
    make_corpus(root, permissions=False)
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    (root / "one_pixel.png").unlink()  # changed after ingest
    (root / "shot.webp").write_bytes(b"not a webp any more")
    monkeypatch.setenv("IMGCLUSTER_WORKSPACES", str(tmp_path))
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", str(tmp_path))

    at = AppTest.from_file(str(PROJECT / "app.py"), default_timeout=180)
    at.session_state["ws_path"] = str(ws.path)
    _ok(at.run())
    for page in PAGES:
        _ok(at.switch_page(page).run())

    _ok(at.switch_page("pages/features.py").run())
    _ok(at.button(key="features_extract").click().run())
    assert not at.error, [e.value for e in at.error]
    # one_pixel.png and its symlink alias, and shot.webp: reported, not fatal, and counted.
    counts = [re.findall(r"(?<![\w.])\d+(?![\w.])", w.value) for w in at.warning]
    assert ["3"] in counts, [w.value for w in at.warning]
    usable = len(ws.images())
    assert feature_counts(ws).get("efficientnet-lite0") == usable - 3
    assert problems(ws) == []
    for page in PAGES:
        _ok(at.switch_page(page).run())
