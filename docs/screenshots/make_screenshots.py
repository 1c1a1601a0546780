"""Take the README's screenshots of the Clusters and Label pages from the real app.

Builds a workspace from the clothing photos (``../shared/datasets/clothing``, 600 real product
photos), computes features, clusters them, waits for the UMAP map, names most labels after the
kind of product most of their images show (as an annotator would; two keep their automatic
name, so the suggested names show), then runs ``streamlit run app.py`` and photographs the
pages in headless Chromium: ``clusters.png`` (the k control and the map, with a box selection),
``clusters_strips.png`` (the strips of typical photos) and ``label.png`` (the selection grid)::

    python docs/screenshots/make_screenshots.py [--k 10] [--out docs/screenshots] [--home DIR]

``--home`` keeps the built workspace in DIR and reuses it on the next run (only the photographs
are taken again). Takes about three minutes on two cores (extraction and UMAP dominate).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
CLOTHING = PROJECT.parent / "shared" / "datasets" / "clothing"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def build_workspace(home: Path, k: int) -> None:
    from imgcluster import labels as lb
    from imgcluster import spaces
    from imgcluster.clustering import cluster
    from imgcluster.features import extract
    from imgcluster.images import ingest
    from imgcluster.projection import compute_projection
    from imgcluster.workspace import Workspace

    ws = Workspace(home / "clothing", create=True)
    ingest(ws, CLOTHING)
    extract(ws)
    # The refined space first (what the app's background worker makes), so the clusters are
    # the ones the app settles on.
    spaces.compute_space(ws, "efficientnet-lite0", spaces.REFINED)
    run = cluster(ws, "efficientnet-lite0", k)
    lb.start_session(ws, run.id, actor="demo")
    compute_projection(ws, "efficientnet-lite0", "umap")
    with open(CLOTHING / "labels.csv", newline="", encoding="utf-8") as fh:
        truth = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    taken: Counter[str] = Counter()
    for summary in sorted(lb.list_labels(ws), key=lambda s: -s.count)[:-2]:
        members = lb.label_images(ws, summary.id, limit=10_000)
        kind = Counter(truth.get(m.relpath, "other") for m in members).most_common(1)[0][0]
        taken[kind] += 1
        name = kind if taken[kind] == 1 else f"{kind} {taken[kind]}"
        lb.rename(ws, summary.id, name, actor="demo")


def serve(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "IMGCLUSTER_WORKSPACES": str(home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(PROJECT / "app.py"),
            "--server.port",
            str(port),
            "--server.headless",
            "true",
        ],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2),
        ):
            return proc, url
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("streamlit did not start")


SELECT_LABEL = "t-shirt"
BOX_OF_TRACE = """(name) => {
    const gd = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
    const trace = gd._fullData.find((t) => t.name === name);
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    const xs = Array.from(trace.x, (v) => xa.l2p(v) + xa._offset);
    const ys = Array.from(trace.y, (v) => ya.l2p(v) + ya._offset);
    const r = gd.getBoundingClientRect();
    return {x0: r.left + Math.min(...xs), x1: r.left + Math.max(...xs),
            y0: r.top + Math.min(...ys), y1: r.top + Math.max(...ys)};
}"""


def settle(page) -> None:  # a playwright Page
    page.wait_for_timeout(500)
    page.wait_for_selector(
        '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=120_000
    )
    page.wait_for_timeout(800)


def photograph(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1100}, device_scale_factor=1)
        page.set_default_timeout(120_000)
        page.goto(f"{url}/clusters?ws=clothing")
        page.get_by_role("heading", name="Clusters", level=1).wait_for()
        settle(page)
        show_umap = page.get_by_role("button", name="The UMAP map is ready: show it")
        if show_umap.count():
            show_umap.click()
            settle(page)
        map_chart = page.locator(".js-plotly-plot").filter(has_text="map of").first
        map_chart.hover()
        map_chart.locator('.modebar-btn[data-title="Box Select"]').click()
        # A box around one label's points (their screen positions from Plotly's own axes).
        box = page.evaluate(BOX_OF_TRACE, SELECT_LABEL)
        page.mouse.move(box["x0"] - 12, box["y0"] - 12)
        page.mouse.down()
        page.mouse.move(box["x1"] + 12, box["y1"] + 12, steps=15)
        page.mouse.up()
        settle(page)
        page.mouse.move(5, 5)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(out / "clusters.png"))
        page.get_by_text("Clusters at a glance").scroll_into_view_if_needed()
        page.wait_for_timeout(800)
        page.get_by_text("Clusters at a glance").evaluate(
            "e => e.closest('[data-testid=\"stColumn\"]').scrollIntoView({block: 'start'})"
        )
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "clusters_strips.png"))

        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Label").click()
        settle(page)
        page.get_by_role("combobox", name="Label", exact=True).click()
        page.keyboard.type("shoes")
        page.keyboard.press("Enter")
        settle(page)
        cells = page.locator(".icg .cell[data-id]")
        cells.first.wait_for()
        for i in (1, 4, 5):  # a few photos selected in the grid, to show the selection
            cells.nth(i).click()
        page.mouse.move(5, 5)
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "label.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "screenshots")
    parser.add_argument("--home", type=Path, help="build the workspace here and reuse it")
    args = parser.parse_args()
    if not (CLOTHING / "labels.csv").exists():
        sys.exit(f"{CLOTHING} not found")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgcluster-shots-") as tmp:
        home = args.home or Path(tmp)
        if not (home / "clothing" / "built.ok").exists():
            build_workspace(home, args.k)
            (home / "clothing" / "built.ok").write_text("ok")
        proc, url = serve(home)
        try:
            photograph(url, args.out)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    print(f"wrote clusters.png, clusters_strips.png and label.png in {args.out}")


if __name__ == "__main__":
    main()
