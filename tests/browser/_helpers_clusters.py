"""Helpers for the Clusters and Export browser tests: workspaces built through the library (the
120 sample photos with class-blob vectors instead of the CNN, so a test takes seconds), and the
waits a Streamlit page needs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tests.browser.conftest import settle
from tests.conftest import SAMPLE_DATA

__all__ = ["labeled_workspace", "open_page", "plotly_traces", "sample_truth", "settle"]

BACKBONE = "efficientnet-lite0"  # the app's default, so the pages pick these vectors up


def sample_truth() -> dict[str, str]:
    with open(SAMPLE_DATA / "labels.csv", newline="", encoding="utf-8") as fh:
        return {r["path"].removeprefix("images/"): r["label"] for r in csv.DictReader(fh)}


def labeled_workspace(
    workspaces: Path, name: str, *, k: int = 10, actor: str = "fixture", outlier: bool = False
):
    """The sample photos ingested (read in place), one blob per true class as vectors (the first
    image far away from everything with ``outlier``), a k-means run and a started label
    session. Returns the `Workspace`."""
    from imgcluster import labels as lb
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    ws = Workspace(workspaces / name, create=True)
    ingest(ws, SAMPLE_DATA / "images")
    truth = sample_truth()
    classes = sorted(set(truth.values()))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(classes), 48)) * 3.0
    images = ws.images()
    vectors = np.array(
        [centres[classes.index(truth[im.relpath])] + rng.normal(size=48) for im in images],
        dtype=np.float32,
    )
    if outlier:
        vectors[0] *= 60.0
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], vectors)
    lb.start_session(ws, cluster(ws, BACKBONE, k).id, actor=actor)
    return ws


def open_page(page, server: dict, path: str, ws_name: str) -> None:
    """Open a page of the app on a workspace by URL, as a bookmark would."""
    page.goto(f"{server['url']}/{path}?ws={ws_name}")
    page.get_by_role("heading", level=1).first.wait_for()
    settle(page)


def plotly_traces(page, title: str) -> list[dict]:
    """The data of the Plotly chart whose title contains ``title`` (read from the live DOM)."""
    return page.evaluate(
        """(title) => {
            for (const gd of document.querySelectorAll('.js-plotly-plot')) {
                const t = (gd.layout && gd.layout.title && gd.layout.title.text) || '';
                if (t.includes(title)) {
                    // _fullData: plotly.js has decoded the base64 arrays plotly.py sends.
                    return gd._fullData.map(d => ({name: d.name, x: Array.from(d.x || []),
                                                   y: Array.from(d.y || []), mode: d.mode,
                                                   text: d.text ? Array.from(d.text) : null,
                                                   symbol: d.marker ? d.marker.symbol : null,
                                                   color: d.marker ? d.marker.color : null}));
                }
            }
            return null;
        }""",
        title,
    )
