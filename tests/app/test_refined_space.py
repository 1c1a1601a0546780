"""AppTest: the refined clustering space takes over on its own only while nobody labeled.

Issue 13 §1: when the refined space becomes ready and labeling has not started (no edit in
the session), the clusters move to it at the same k; once an annotator edited anything the
labels never change by themselves (the browser test of the offer covers that side). The
workspace is the 120 sample photos with class-blob vectors (no CNN needed), on real SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from imgcluster import labels as lb
from imgcluster import spaces
from imgcluster.clustering import load_run
from tests.app.conftest import APP
from tests.browser._helpers_clusters import BACKBONE, labeled_workspace

pytestmark = pytest.mark.slow


def _clusters_page(name: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=240)
    at.query_params["ws"] = name
    at.run()
    at.switch_page("pages/clusters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _session_space(ws) -> tuple[str, int]:
    session = lb.active_session(ws)
    run = load_run(ws, session.run_id)
    return run.preprocess, run.k


def test_untouched_clusters_move_to_the_refined_space_and_edited_ones_stay(app_env: Path):
    untouched = labeled_workspace(app_env, "untouched", k=6)
    edited = labeled_workspace(app_env, "edited", k=6)
    lb.rename(edited, "cluster_00", "tops", actor="ana")
    assert _session_space(untouched) == (spaces.DEFAULT_PREPROCESS, 6)
    before = {r.image_id: r.label for r in lb.current_labels(edited)}

    # Before the space is ready nothing moves.
    _clusters_page("untouched")
    assert _session_space(untouched) == (spaces.DEFAULT_PREPROCESS, 6)

    for ws in (untouched, edited):
        spaces.compute_space(ws, BACKBONE, spaces.REFINED)
    at = _clusters_page("untouched")
    assert _session_space(untouched) == (spaces.REFINED_PREPROCESS, 6)
    assert len(lb.list_labels(untouched)) == 6
    assert any("refined space" in t.value for t in at.toast)
    # A second visit changes nothing more (one move, not one per rerun).
    n_ops = len(lb.history(untouched))
    _clusters_page("untouched").run()
    assert len(lb.history(untouched)) == n_ops

    _clusters_page("edited")
    assert _session_space(edited) == (spaces.DEFAULT_PREPROCESS, 6)
    assert {r.image_id: r.label for r in lb.current_labels(edited)} == before
