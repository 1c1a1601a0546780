"""The real app on a 1M-image workspace, in a real Chromium (issue 15 §4): does it stay usable?

Starts `streamlit run app.py` (the UMAP worker off, as in `bench/app_speed.py`, whose server
start, idle wait, grid helpers and CPU accounting this reuses) on an EXISTING workspace (1M
image rows, synthetic 1280-d vectors, a stored run and an active label session: H1's
``bench/scale.py --scale 1000000 --keep /tmp/ws1m --build-only`` plus a label session; this
benchmark never builds one) and drives Debian's Chromium at 1440x1000 through:

1. the first open of the Clusters page on a fresh server (density image, label names at the
   centroids, a sample of points); when no 2-D map is stored yet it is computed inside this
   open (PCA fitted on a sample, applied to all: `imgcluster.spaces.pca_2d`), and its own
   cost is read back from the ``projections`` row the library stored (``seconds``);
2. warm opens of the Clusters page from the sidebar (`app_speed.open_clusters`);
3. box selections on the map: from mouse-up to the selection panel's count on screen; the
   count is checked against every point of the stored projection inside the drawn box
   (server side, all 1M coordinates: not only the drawn sample);
4. the Label page opened on one label (deep link), switching label, paging, a move of 3
   images (these WRITE to the workspace: run it on a copy); then the Clusters page opened
   again (its per-revision caches are cold after the moves);
5. optionally (``--with-k-change``) a k change, last: with edits in the labels the page asks
   first, the benchmark confirms "start over", and the time runs from that click to the page
   showing k labels (clustering + H1's `labels.start_session` at 1M, which cost minutes
   before H1's work of 2026-12-02; 19-36 s on the tree of 02:17-02:34 UTC).

For each step: median / worst wall time, CPU seconds of the server and of every Chromium
process (``/proc``), and the server's RSS and peak RSS (``VmRSS`` / ``VmHWM``) after it. The
load average is printed at start and end (the machine is shared). Copy the workspace first:

    cp -a /tmp/ws1m /tmp/h2ws1m
    .venv/bin/python bench/app_million.py --workspace /tmp/h2ws1m/ws --thumbnails  # once
    .venv/bin/python bench/app_million.py --workspace /tmp/h2ws1m/ws
    .venv/bin/python bench/app_million.py --workspace /tmp/h2ws1m/ws --repeats 3 --with-k-change
    .venv/bin/python bench/app_million.py --workspace /tmp/h2ws1m/ws --profile /tmp/server.spy
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_speed as sp

HEADER = re.compile(r"([\d,]+) images selected on the map")
#: Fractions of the plot area (x0, y0, x1, y1) of the boxes dragged on the map.
BOXES = ((0.30, 0.30, 0.55, 0.60), (0.45, 0.20, 0.75, 0.50), (0.10, 0.50, 0.40, 0.85))
MAP_JS = """() => {
  const gd = Array.from(document.querySelectorAll('.js-plotly-plot')).find(g => {
    const t = g.layout && g.layout.title;
    return String((t && t.text) || t || '').includes('map of'); });
  if (!gd) return null;
  const full = gd._fullData || [];
  const dots = full.filter(t => String(t.mode).includes('markers'));
  const names = full.filter(t => t.mode === 'text');
  return {title: gd.layout.title.text || gd.layout.title,
          dots: dots.reduce((s, t) => s + t._length, 0), traces: dots.length,
          names: names.reduce((s, t) => s + t._length, 0),
          images: (gd.layout.images || []).length,
          selections: (gd.layout.selections || []).map(s => [s.x0, s.x1, s.y0, s.y1])};
}"""


# -- the server's memory -----------------------------------------------------------------------


def server_memory(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of the server process in GB, from /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024**2
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


class Steps:
    """Wall and CPU seconds per step, and the server's memory after each."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.out: dict[str, list[float]] = {}

    def start(self) -> None:
        sp.CPU.start()
        self.t0 = time.perf_counter()

    def stop(self, key: str) -> float:
        wall = time.perf_counter() - self.t0
        self.out.setdefault(key, []).append(wall)
        sp.CPU.stop(self.out, key)
        rss, peak = server_memory(self.pid)
        self.out.setdefault(f"{key}_rss", []).append(rss)
        self.out.setdefault(f"{key}_peak", []).append(peak)
        print(
            f"  {key}: {wall:.2f} s (server CPU {self.out[f'{key}_server_cpu'][-1]:.2f} s, "
            f"browser CPU {self.out[f'{key}_browser_cpu'][-1]:.2f} s, server RSS {rss:.2f} GB, "
            f"peak {peak:.2f} GB; load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        return wall


# -- the steps -----------------------------------------------------------------------------------


def wait_map(page, timeout: float = 900_000) -> dict:
    """Until the Clusters page is idle with its map drawn; what the map holds."""
    page.get_by_role("heading", name="Clusters", level=1).wait_for(timeout=timeout)
    page.wait_for_selector(sp.IDLE, timeout=timeout)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=timeout)
    page.wait_for_function(f"({MAP_JS})() !== null", timeout=timeout)
    return page.evaluate(MAP_JS)


def first_open(page, url: str, name: str, steps: Steps) -> dict:
    steps.start()
    page.goto(f"{url}/clusters?ws={name}")
    info = wait_map(page)
    steps.stop("clusters_first")
    print(f"  the map: {info}", flush=True)
    assert info["images"] == 1, "no density image on the 1M map"
    assert 0 < info["dots"] <= 5_000, f"{info['dots']} dots drawn (expected a sample)"
    assert info["names"] > 0, "no label names at the centroids"
    return info


def box_select(page, steps: Steps, projection, box: tuple[float, ...]) -> tuple[int, int]:
    """Drag ``box`` (fractions of the plot area) on the map; (count shown, count inside)."""
    chart = page.get_by_test_id("stPlotlyChart").first
    chart.scroll_into_view_if_needed()
    chart.hover()
    chart.locator('.modebar-btn[data-title="Box Select"]').click()
    area = chart.locator(".nsewdrag").first.bounding_box()
    assert area is not None
    before = page.get_by_text(HEADER).all_inner_texts()
    x0, y0, x1, y1 = box
    page.mouse.move(area["x"] + area["width"] * x0, area["y"] + area["height"] * y0)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * x1, area["y"] + area["height"] * y1, steps=12)
    drawn = page.evaluate(MAP_JS)["selections"]  # the box in map coordinates, as drawn
    steps.start()
    page.mouse.up()
    sp.idle(page, timeout=900_000)
    header = page.get_by_text(HEADER).first
    header.wait_for(timeout=900_000)
    deadline = time.monotonic() + 900
    while header.inner_text() in before and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    sp.idle(page, timeout=900_000)
    steps.stop("box")
    shown = int(HEADER.search(header.inner_text()).group(1).replace(",", ""))
    sel = page.evaluate(MAP_JS)["selections"] or drawn
    assert sel, "the map holds no box selection"
    bx0, bx1, by0, by1 = sel[-1]
    from imgcluster.projection import select_box

    inside = len(select_box(projection, (bx0, bx1), (by0, by1)))
    xy = projection.coords
    lo_x, hi_x, lo_y, hi_y = min(bx0, bx1), max(bx0, bx1), min(by0, by1), max(by0, by1)
    by_hand = int(
        ((xy[:, 0] >= lo_x) & (xy[:, 0] <= hi_x) & (xy[:, 1] >= lo_y) & (xy[:, 1] <= hi_y)).sum()
    )
    print(f"  box {sel[-1]}: panel says {shown:,}, inside by coordinates {by_hand:,}", flush=True)
    assert inside == by_hand
    assert shown == by_hand, f"the panel counts {shown:,} images, {by_hand:,} are inside the box"
    return shown, by_hand


def clear_selection(page) -> None:
    """Double-click the plot area: Plotly drops the selection and the page reruns."""
    chart = page.get_by_test_id("stPlotlyChart").first
    area = chart.locator(".nsewdrag").first.bounding_box()
    page.mouse.dblclick(area["x"] + area["width"] * 0.97, area["y"] + area["height"] * 0.97)
    sp.idle(page, timeout=900_000)


def label_steps(page, url: str, name: str, steps: Steps, labels: list[str], repeats: int):
    """Open the Label page on one label, switch label, page, move 3 images."""
    steps.start()
    page.goto(f"{url}/label?ws={name}&label={labels[0]}")
    page.get_by_role("heading", name="Label", level=1).wait_for(timeout=900_000)
    page.wait_for_selector(sp.IDLE, timeout=900_000)
    sp.wait_grid(page)
    steps.stop("label_open")
    for r in range(repeats):
        target = labels[(r + 1) % len(labels)]
        before = sp.grid_ids(page)
        box = page.get_by_role("combobox", name="Label", exact=True)
        box.click()
        page.keyboard.type(target)
        steps.start()
        page.keyboard.press("Enter")
        sp.idle(page, timeout=900_000)
        sp.wait_grid(page, differs=before)
        steps.stop("switch")
        before = sp.grid_ids(page)
        steps.start()
        page.get_by_role("button", name="Page 2", exact=True).click()
        sp.idle(page, timeout=900_000)
        sp.wait_grid(page, differs=before)
        steps.stop("page")
        cells = page.locator(".icg .cell[data-id]")
        ids = {cells.nth(i).get_attribute("data-id") for i in range(3)}
        for i in range(3):
            cells.nth(i).click()
        page.locator('.icg select[aria-label="Move to label"]').select_option(index=1)
        steps.start()
        page.locator(".icg [data-act=move]").click()
        sp.idle(page, timeout=900_000)
        sp.wait_grid(page, exclude=ids)
        steps.stop("move")


def k_change(page, steps: Steps, k: int) -> None:
    """Ask for ``k`` on the Clusters page; with edits, confirm the start-over (timed from the
    click that starts the work to k labels on screen)."""
    box = page.locator(".st-key-view_k_input input")
    box.fill(str(k))
    steps.start()
    box.press("Enter")
    sp.idle(page, timeout=1_800_000)
    restart = page.get_by_role("button", name=f"Start over with k = {k}")
    if restart.count():
        restart.click()
        sp.idle(page)
        confirm = page.get_by_role("button", name=f"Discard them and start over with k = {k}")
        confirm.wait_for()
        steps.start()
        confirm.click()
        sp.idle(page, timeout=1_800_000)
    page.get_by_text(f"· {k} labels").first.wait_for(timeout=1_800_000)
    steps.stop("k_change")


def stored_map_seconds(path: Path) -> list[tuple[str, float]]:
    """(method, seconds) of the 2-D maps the library stored, read-only (what computing the map
    cost inside the first open)."""
    import sqlite3

    with sqlite3.connect(f"file:{path / 'imgcluster.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT method, seconds FROM projections").fetchall()
    return [(method, seconds) for method, seconds in rows if method in ("pca", "umap")]


# -- the run -------------------------------------------------------------------------------------


def run(
    workspace: Path, repeats: int, with_k_change: bool, page_factory, profile: Path | None
) -> dict:
    from imgcluster import labels as lb
    from imgcluster.projection import get_projection
    from imgcluster.workspace import Workspace

    ws = Workspace(workspace)
    maps_before = stored_map_seconds(workspace)
    print(f"  2-D maps stored before: {maps_before or 'none (the first open computes it)'}")
    home = Path(tempfile.mkdtemp(prefix="app-million-"))
    (home / "workspaces").symlink_to(workspace.parent)  # the app finds it as ?ws=<folder name>
    proc, url = sp.start_server(home)
    sp.CPU.server_pid = proc.pid
    spy = None
    if profile is not None:  # py-spy samples the server (collapsed stacks, for flame graphs)
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
             "--rate", "20", "--format", "raw", "--output", str(profile), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
    steps = Steps(proc.pid)
    page = page_factory()
    try:
        first_open(page, url, workspace.name, steps)
        maps = stored_map_seconds(workspace)
        if not maps_before:
            steps.out["map_compute"] = [s for _m, s in maps]
            print(f"  2-D map computed in the first open: {maps}", flush=True)
        t0 = time.perf_counter()
        projection = get_projection(ws, backbone_of(ws))
        print(f"  (bench side: projection read in {time.perf_counter() - t0:.1f} s)", flush=True)
        for box in BOXES[:repeats]:
            box_select(page, steps, projection, box)
            clear_selection(page)
        labels = [s.name for s in sorted(lb.list_labels(ws), key=lambda s: -s.count)]
        sp.open_clusters(page, steps.out, "clusters_warm", repeats)
        label_steps(page, url, workspace.name, steps, labels, repeats)
        # The Clusters page again, now that labels carry edits (its caches are per revision).
        steps.start()
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Clusters").click()
        wait_map(page)
        steps.stop("clusters_after_edit")
        if with_k_change:
            k_change(page, steps, len(labels) + 1)
    except Exception:
        shot = home / "failed.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"  failed; screenshot in {shot}, server log in {home / 'server.log'}")
        raise
    finally:
        steps.out["server_peak_rss"] = [server_memory(proc.pid)[1]]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        proc.terminate()
        proc.wait(timeout=60)
    return steps.out


def give_thumbnails(workspace: Path) -> None:
    """Give every image of the (copied) workspace a thumbnail: a symlink to one small JPEG.

    H1's synthetic 1M workspace has no photos and no thumbnails, where a real one has a
    thumbnail per image; without them every photo drawn costs a lookup for a source to make
    one from (0.15 s each at 1M, see bench/README.md), which is not what annotators see.
    """
    from PIL import Image

    from imgcluster.workspace import Workspace

    ws = Workspace(workspace)
    one = workspace / "thumbs" / "_bench_placeholder.jpg"
    one.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (150, 120, 90)).save(one, quality=80)
    made = 0
    for image in ws.images():
        path = ws.thumbnail_path(image.sha256) if image.sha256 else None
        if path is not None and not os.path.lexists(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(one)
            made += 1
    print(f"  {made:,} placeholder thumbnails made", flush=True)


def backbone_of(ws) -> str:
    from imgcluster import labels as lb

    session = lb.active_session(ws)
    return session.backbone


ROWS = (
    ("open Clusters, first (fresh server)", "clusters_first"),
    ("  of which: the 2-D map computed (PCA on a sample, applied to all)", "map_compute"),
    ("open Clusters, warm (from the sidebar)", "clusters_warm"),
    ("box selection, mouse-up to the panel's count", "box"),
    ("open Label on one label (deep link)", "label_open"),
    ("switch label", "switch"),
    ("next page (Page 2)", "page"),
    ("move 3 images", "move"),
    ("open Clusters after the moves (first open at a new revision)", "clusters_after_edit"),
    ("k change (start over, confirmed)", "k_change"),
)


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def report(out: dict[str, list[float]]) -> str:
    lines = [
        "| step | wall (s) | server CPU (s) | browser CPU (s) | server RSS after (GB) | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for title, key in ROWS:
        if not out.get(key):
            continue
        rss = f"{max(out[f'{key}_rss']):.2f}" if out.get(f"{key}_rss") else "-"
        lines.append(
            f"| {title} | {cell(out[key])} | {cell(out.get(f'{key}_server_cpu', []))} | "
            f"{cell(out.get(f'{key}_browser_cpu', []))} | {rss} | {len(out[key])} |"
        )
    lines.append(f"\nserver peak RSS (VmHWM): {out['server_peak_rss'][0]:.2f} GB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a COPY (label writes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-k-change", action="store_true", help="last (a re-cluster at 1M)")
    parser.add_argument("--profile", type=Path, help="py-spy the server into this file (raw)")
    parser.add_argument(
        "--thumbnails",
        action="store_true",
        help="first give every image without one a placeholder thumbnail (writes thumbs/)",
    )
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    if workspace == Path("/tmp/ws1m/ws"):  # H1's shared original: the label steps write
        parser.error("run on a copy: cp -a /tmp/ws1m /tmp/h2ws1m; --workspace /tmp/h2ws1m/ws")
    if args.thumbnails:
        give_thumbnails(workspace)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=sp.CHROMIUM, headless=True, args=["--no-sandbox", sp.BROWSER_TAG]
        )

        def page_factory():
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            page.set_default_timeout(300_000)
            return page

        out = run(
            workspace,
            min(args.repeats, len(BOXES)),
            args.with_k_change,
            page_factory,
            args.profile,
        )
        browser.close()
    print(f"load average at end: {os.getloadavg()}")
    print(report(out))


if __name__ == "__main__":
    main()
