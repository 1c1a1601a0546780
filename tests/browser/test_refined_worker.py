"""The refined clustering space made by the real background worker of a real `streamlit run`
(issue 13 §1), in Chromium: the page polls while it is being made and, when it is ready, the
untouched clusters move to it at the same k without a click; an edited workspace only gets the
offer, its labels unchanged.
"""

from __future__ import annotations

import pytest

from imgcluster import labels as lb
from imgcluster import spaces
from imgcluster.clustering import load_run
from tests.browser._helpers_clusters import BACKBONE, labeled_workspace, open_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

APP_UMAP = True  # this module's server runs the background UMAP worker (see conftest)

WORKER_TIMEOUT_MS = 600_000  # a cold numba cache on a loaded 2-core CI machine


def _space_of(ws) -> tuple[str, int]:
    run = load_run(ws, lb.active_session(ws).run_id)
    return run.preprocess, run.k


def test_untouched_clusters_move_to_the_refined_space_when_the_worker_is_done(
    browser_page, app_server
):
    page = browser_page
    ws = labeled_workspace(app_server["workspaces"], "worker", k=6)
    edited = labeled_workspace(app_server["workspaces"], "worker_edited", k=6)
    lb.rename(edited, "cluster_00", "tops", actor="ana")
    before = {r.image_id: r.label for r in lb.current_labels(edited)}
    assert _space_of(ws) == (spaces.DEFAULT_PREPROCESS, 6)

    open_page(page, app_server, "clusters", "worker")
    # Nobody clicks: the note polls, the worker finishes, the page reruns by itself.
    page.get_by_text("Clustering space: refined").wait_for(timeout=WORKER_TIMEOUT_MS)
    page.get_by_text("Clusters moved to the refined space").wait_for(timeout=30_000)
    assert _space_of(ws) == (spaces.REFINED_PREPROCESS, 6)
    assert len(lb.list_labels(ws)) == 6

    # The edited workspace (same photos, its own space) keeps its labels: only the offer.
    spaces.compute_space(edited, BACKBONE, spaces.REFINED)
    open_page(page, app_server, "clusters", "worker_edited")
    page.get_by_role(
        "button", name="Re-cluster in the refined space, keeping your decisions"
    ).wait_for()
    assert _space_of(edited) == (spaces.DEFAULT_PREPROCESS, 6)
    assert {r.image_id: r.label for r in lb.current_labels(edited)} == before
