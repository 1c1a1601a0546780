"""How fast the app answers an annotator, measured in a real Chromium on a real `streamlit run`.

For each size (default 1,000 and 10,000 images) a workspace is built through the library:
synthetic JPEGs (small coloured photos-to-be, one hue family per class) ingested for real, with
synthetic class-blob vectors stored as EfficientNet-Lite0 features (1280-d, so clustering and
the map cost what they cost with real vectors), clustered at k = 20, labeling started. Then, in
Chromium (1440x1000), the median and worst of:

- click-to-selected in the Label page's grid: from the pointer going down on a photo to the
  photo drawn as selected (in-page clock); and whether any script rerun happened (there must
  be none: the selection lives in the browser);
- move 3 images: from the click on "Move" to the grid showing the label without them;
- switch label: from picking another label in the chooser to its grid on screen;
- open the Clusters page from the sidebar (the first, cold open separately);
- k change on the Clusters page: from Enter in the k box to the page showing k labels.

Above the Clusters page's density threshold (`imgcluster_app.clusters_view.DENSITY_MIN`) the
warm open and the k change are measured twice in the same run: with the map as it is drawn by
default (a density image plus a sample of dots), then with "Draw every point" switched on (the
every-point map: every point in WebGL), so the two are compared under the same machine load.

The UMAP worker is off (``IMGCLUSTER_UMAP=0``) so it does not compete for the CPU during the
measurements; the map is the PCA map.

The machine may be shared: besides wall time, each k change and Clusters open also records the
CPU seconds the server process and the browser (all its processes) spent on it (``/proc``),
which another job's load barely changes, and the load average is printed at start and end.

    .venv/bin/python bench/app_speed.py                 # 1k and 10k, 5 repeats each
    .venv/bin/python bench/app_speed.py --sizes 1000 --repeats 3
    .venv/bin/python bench/app_speed.py --sizes 10000 --only clusters   # the Clusters page only
    .venv/bin/python bench/app_speed.py --map-points 1000000   # the map's server side, no browser
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

BACKBONE = "efficientnet-lite0"
N_CLASSES = 20
K = 20
CHROMIUM = "/usr/bin/chromium"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
#: A switch Chromium ignores, passed so its processes can be found in ``/proc``.
BROWSER_TAG = f"--imgcluster-bench={os.getpid()}"
_TICK = os.sysconf("SC_CLK_TCK")


# -- CPU time of the server and of the browser -------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _tree_cpu(roots: set[int]) -> float:
    """CPU seconds of ``roots`` and every live descendant."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    total, seen, todo = 0.0, set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(child for child, (ppid, _) in stats.items() if ppid == pid)
    return total


def browser_pids() -> set[int]:
    """The Chromium processes started with `BROWSER_TAG` (their children are counted too)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if BROWSER_TAG.encode() in Path(entry, "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


class Cpu:
    """CPU seconds of the server and the browser between `start` and `stop`."""

    server_pid = 0

    def start(self) -> None:
        self.pids = browser_pids()
        self.t0 = (_tree_cpu({self.server_pid}), _tree_cpu(self.pids))

    def stop(self, out: dict[str, list[float]], key: str) -> None:
        server, browser = _tree_cpu({self.server_pid}), _tree_cpu(self.pids)
        out.setdefault(f"{key}_server_cpu", []).append(server - self.t0[0])
        out.setdefault(f"{key}_browser_cpu", []).append(browser - self.t0[1])


CPU = Cpu()


# -- the workspace ----------------------------------------------------------------------------


def make_images(folder: Path, n: int) -> list[int]:
    """``n`` small JPEGs, one hue family per class, with noise so no two are the same file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = rng.integers(0, N_CLASSES, n)
    folder.mkdir(parents=True, exist_ok=True)
    for i, cls in enumerate(classes):
        base = np.array(
            [(cls * 37) % 256, (cls * 91 + 40) % 256, (cls * 53 + 80) % 256], dtype=np.int16
        )
        pixels = np.clip(base + rng.integers(-40, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=80)
    return classes.tolist()


def build_workspace(home: Path, n: int) -> str:
    from imgcluster import labels as lb
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    name = f"speed{n}"
    t0 = time.perf_counter()
    classes = make_images(home / f"photos{n}", n)
    ws = Workspace(home / "workspaces" / name, create=True)
    ingest(ws, home / f"photos{n}")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(N_CLASSES, 1280)).astype(np.float32)
    images = ws.images()
    by_name = {f"img{i:05d}.jpg": c for i, c in enumerate(classes)}
    vectors = np.stack(
        [
            centres[by_name[im.relpath]] + rng.normal(size=1280).astype(np.float32) * 0.8
            for im in images
        ]
    )
    save_vectors(ws, BACKBONE, [im.sha256 for im in images], vectors)
    lb.start_session(ws, cluster(ws, BACKBONE, K).id, actor="bench")
    print(f"  built {name}: {len(images):,} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return name


# -- the server -------------------------------------------------------------------------------


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "IMGCLUSTER_WORKSPACES": str(home / "workspaces"),
        "IMGCLUSTER_UMAP": "0",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PROJECT / "app.py"),
         "--server.port", str(port), "--server.headless", "true"],
        cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("streamlit did not start")


# -- measuring in the browser -----------------------------------------------------------------


def idle(page, timeout: float = 300_000) -> None:
    """Wait for the rerun an action started, then for it to end."""
    # (playwright's TimeoutError: the rerun was over within 400 ms, or did not happen)
    with contextlib.suppress(Exception):
        page.wait_for_selector(
            '[data-testid="stApp"][data-test-script-state="running"]', timeout=400
        )
    page.wait_for_selector(IDLE, timeout=timeout)


def grid_ids(page) -> list[str]:
    cells = page.locator(".icg .cell[data-id]")
    return cells.evaluate_all("cs => cs.map(c => c.dataset.id)")


def wait_grid(page, exclude: set[str] | None = None, differs: list[str] | None = None) -> None:
    """Until the grid is on screen (without ``exclude``d ids; other than ``differs``)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            ids = grid_ids(page)
        except Exception:  # the component is being re-mounted
            ids = []
        if ids and not (exclude and exclude & set(ids)) and ids != differs:
            return
        page.wait_for_timeout(20)
    raise TimeoutError("grid did not update")


def click_to_selected(page, index: int) -> tuple[float, bool]:
    """ms from pointerdown on a cell to the cell drawn selected; and whether a rerun ran."""
    cell = page.locator(".icg .cell[data-id]").nth(index)
    cell.evaluate(
        """cell => {
            window.__sel = null; window.__reran = false;
            const app = document.querySelector('[data-testid="stApp"]');
            const watch = new MutationObserver(() => {
                if (app.dataset.testScriptState === 'running') window.__reran = true; });
            watch.observe(app, {attributes: true});
            window.__watch = watch;
            const was = cell.classList.contains('selected');
            cell.addEventListener('pointerdown', () => {
                const t0 = performance.now();
                const seen = new MutationObserver(() => {
                    if (cell.classList.contains('selected') !== was) {
                        seen.disconnect();
                        requestAnimationFrame(() => { window.__sel = performance.now() - t0; });
                    }
                });
                seen.observe(cell, {attributes: true, attributeFilter: ['class']});
            }, {once: true, capture: true});
        }"""
    )
    cell.click()
    page.wait_for_function("window.__sel !== null", timeout=10_000)
    page.wait_for_timeout(300)  # a rerun, if one were triggered, would have started by now
    ms, reran = page.evaluate("[window.__sel, window.__reran, window.__watch.disconnect()]")[:2]
    return float(ms), bool(reran)


def goto_label(page, url: str, name: str) -> None:
    page.goto(f"{url}/label?ws={name}")
    page.get_by_role("heading", name="Label", level=1).wait_for(timeout=300_000)
    page.wait_for_selector(IDLE, timeout=300_000)
    wait_grid(page)


def k_change(page, out: dict[str, list[float]], key: str, ks: range) -> None:
    """From Enter in the k box to the page showing k labels, for each k of ``ks``."""
    box = page.locator(".st-key-view_k_input input")
    out.setdefault(key, [])
    for k in ks:
        box.fill(str(k))
        CPU.start()
        t0 = time.perf_counter()
        box.press("Enter")
        idle(page)
        page.get_by_text(f"· {k} labels").first.wait_for(timeout=300_000)
        out[key].append(time.perf_counter() - t0)
        CPU.stop(out, key)
        print(f"  k -> {k} ({key}): {out[key][-1]:.2f} s", flush=True)
        if page.get_by_role("button", name=f"Start over with k = {k}").count():
            raise RuntimeError("k change asked for confirmation: measure on unedited labels")


def every_point(page, on: bool) -> None:
    """Switch the Clusters page's "Draw every point" toggle (the map drawn point by point)."""
    toggle = page.locator(".st-key-clusters_every_point input")
    if toggle.is_checked() != on:
        page.locator(".st-key-clusters_every_point label").click()
        idle(page)


def open_clusters(page, out: dict[str, list[float]], key: str, repeats: int) -> None:
    """Open the Clusters page from the sidebar (coming from the Label page), ``repeats`` times."""
    out.setdefault(key, [])
    for _ in range(repeats):
        CPU.start()
        t0 = time.perf_counter()
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Clusters").click()
        page.get_by_role("heading", name="Clusters", level=1).wait_for()
        idle(page)
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for()
        out[key].append(time.perf_counter() - t0)
        CPU.stop(out, key)
        print(f"  open Clusters ({key}): {out[key][-1]:.2f} s", flush=True)
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Label").click()
        page.get_by_role("heading", name="Label", level=1).wait_for()
        idle(page)


def measure(page, url: str, name: str, repeats: int, only: str = "all") -> dict[str, list[float]]:
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    ws = Workspace(Path(os.environ["BENCH_HOME"]) / "workspaces" / name)
    out: dict[str, list[float]] = {k: [] for k in ("click", "move", "switch", "clusters", "k")}
    reruns = 0
    # Clusters page: the first (cold) open, from a fresh tab.
    t0 = time.perf_counter()
    page.goto(f"{url}/clusters?ws={name}")
    page.get_by_role("heading", name="Clusters", level=1).wait_for(timeout=300_000)
    page.wait_for_selector(IDLE, timeout=300_000)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=300_000)
    cold = time.perf_counter() - t0
    print(f"  Clusters page, first open: {cold:.2f} s", flush=True)

    # k changes first, while nobody has edited the labels (then a k change re-clusters at once);
    # above the density threshold, again with every point drawn (the every-point map), same run
    dense = page.locator(".st-key-clusters_every_point").count() > 0
    k_change(page, out, "k", range(K + 1, K + 1 + repeats))
    if dense:
        every_point(page, True)
        k_change(page, out, "k_points", range(K + 1 + repeats, K + 1 + 2 * repeats))
        every_point(page, False)
    goto_label(page, url, name)
    for r in range(repeats if only == "all" else 0):
        # click-to-selected (then clear, so each round starts from nothing selected)
        for i in range(3):
            ms, reran = click_to_selected(page, r * 3 + i)
            out["click"].append(ms)
            reruns += reran
        page.keyboard.press("Escape")
        # move 3 images to the next label
        cells = page.locator(".icg .cell[data-id]")
        ids = {cells.nth(i).get_attribute("data-id") for i in range(3)}
        for i in range(3):
            cells.nth(i).click()
        options = page.locator('.icg select[aria-label="Move to label"] option')
        page.locator('.icg select[aria-label="Move to label"]').select_option(
            index=(r + 1) % max(1, options.count() - 1)
        )
        t0 = time.perf_counter()
        page.locator(".icg [data-act=move]").click()
        idle(page)
        wait_grid(page, exclude=ids)
        out["move"].append(time.perf_counter() - t0)
        print(f"  move 3: {out['move'][-1]:.2f} s", flush=True)
        # switch label
        # (a label with room for the next round's clicks: k changes can leave tiny ones)
        every = lb.list_labels(ws)
        labels = [s.name for s in every if s.count >= 3 * repeats + 3] or [s.name for s in every]
        target = labels[(r * 7 + 3) % len(labels)]
        before = grid_ids(page)
        box = page.get_by_role("combobox", name="Label", exact=True)
        box.click()
        page.keyboard.type(target)
        t0 = time.perf_counter()
        page.keyboard.press("Enter")
        idle(page)
        wait_grid(page, differs=before)
        out["switch"].append(time.perf_counter() - t0)
        print(f"  switch: {out['switch'][-1]:.2f} s", flush=True)
    # The Clusters page from the sidebar (warm caches); then with every point drawn.
    open_clusters(page, out, "clusters", repeats)
    if dense:
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Clusters").click()
        idle(page)
        every_point(page, True)
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Label").click()
        idle(page)
        open_clusters(page, out, "clusters_points", repeats)
    out["clusters_cold"] = [cold]
    out["reruns_on_click"] = [float(reruns)]
    return out


def run_size(
    home: Path, n: int, repeats: int, page_factory, only: str = "all"
) -> dict[str, list[float]]:
    name = build_workspace(home, n)
    proc, url = start_server(home)
    CPU.server_pid = proc.pid
    try:
        page = page_factory()
        try:
            return measure(page, url, name, repeats, only)
        except Exception:
            shot = home.parent / f"app_speed_failed_{n}.png"
            page.screenshot(path=str(shot))
            print(f"  failed; screenshot in {shot}, server log in {home / 'server.log'}")
            raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(results: dict[int, dict[str, list[float]]]) -> str:
    rows = [
        ("click-to-selected (ms)", "click", "< 50 ms"),
        ("move 3 images (s)", "move", "< 1 s at 1k, < 1.5 s at 10k"),
        ("switch label (s)", "switch", "< 1 s at 10k"),
        ("open Clusters, warm (s)", "clusters", "< 1.5 s at 10k"),
        ("open Clusters, first (s)", "clusters_cold", ""),
        ("k change (s)", "k", "< 1.5 s at 10k"),
        ("k change, server CPU (s)", "k_server_cpu", ""),
        ("k change, browser CPU (s)", "k_browser_cpu", ""),
        ("open Clusters, warm, server CPU (s)", "clusters_server_cpu", ""),
        ("open Clusters, warm, browser CPU (s)", "clusters_browser_cpu", ""),
        ("open Clusters, warm, every point drawn (s)", "clusters_points", "(every-point map)"),
        ("k change, every point drawn (s)", "k_points", "(every-point map)"),
        ("reruns caused by clicks", "reruns_on_click", "0"),
    ]
    sizes = sorted(results)
    head = "| measure | " + " | ".join(f"{n:,} median / worst" for n in sizes) + " | target |"
    lines = [head, "|---|" + "---:|" * len(sizes) + "---|"]
    for title, key, target in rows:
        cells = []
        for n in sizes:
            values = results[n].get(key, [])
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.median(values):.2f} / {max(values):.2f}")
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines)


def map_server_side(n: int, n_labels: int = 100) -> None:
    """The Clusters map's server side at ``n`` points (issue 15 §4), no browser: the figure
    (density image, sample dots, names at the label centroids) and its JSON, cold (density
    image computed) then warm; and a box selection, checked against the coordinates."""
    import logging

    logging.disable(logging.WARNING)  # (Streamlit's caches warn when used outside a server)
    import plotly.io as pio
    import plotly.tools

    from imgcluster.projection import Projection
    from imgcluster.workspace import Workspace
    from imgcluster_app import clusters_view as cv
    from imgcluster_app.views import LabelTable

    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_labels, n)
    coords = (rng.normal(size=(n_labels, 2))[labels] * 5 + rng.normal(size=(n, 2))).astype(
        np.float32
    )
    ids = np.arange(n, dtype=np.int64) + 1
    proj = Projection(coords, "pca", True, ids)
    table = LabelTable([], ids, labels.astype(np.int64), [], 1)
    with tempfile.TemporaryDirectory(prefix="app-map-") as tmp:
        ws = Workspace(Path(tmp) / "ws", create=True)
        for run in ("cold", "warm"):
            t0, c0 = time.perf_counter(), time.process_time()
            fig, trace_ids = cv.map_figure(ws, "synthetic", table, proj)
            spec = pio.to_json(plotly.tools.return_figure_from_figure_or_data(fig, True))
            print(
                f"map of {n:,} points, {run}: {time.perf_counter() - t0:.2f} s wall, "
                f"{time.process_time() - c0:.2f} s CPU; {len(spec) / 1e3:,.0f} kB sent, "
                f"{sum(map(len, trace_ids)):,} dots, {len(fig.layout.images)} density image"
            )
    t0 = time.perf_counter()
    box = {"selection": {"points": [], "box": [{"x": [0, 3], "y": [-2, 1]}], "lasso": []}}
    chosen = cv.region_ids(box, proj)
    inside = (coords[:, 0] >= 0) & (coords[:, 0] <= 3) & (coords[:, 1] >= -2) & (coords[:, 1] <= 1)
    assert sorted(chosen) == ids[inside].tolist(), "the box missed images inside it"
    print(f"box selection: {len(chosen):,} images inside, {time.perf_counter() - t0:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        choices=("all", "clusters"),
        default="all",
        help="'clusters': only the Clusters page (open, k change), not the Label page",
    )
    parser.add_argument(
        "--map-points",
        type=int,
        help="only the map's server side at this many points (no workspace, no browser)",
    )
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.map_points:
        map_server_side(args.map_points)
        return
    from playwright.sync_api import sync_playwright

    results = {}
    with tempfile.TemporaryDirectory(prefix="app-speed-") as tmp, sync_playwright() as pw:
        home = Path(tmp)
        os.environ["BENCH_HOME"] = tmp
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", BROWSER_TAG]
        )

        def page_factory():
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            page.set_default_timeout(120_000)
            return page

        for n in args.sizes:
            print(f"{n:,} images", flush=True)
            results[n] = run_size(home, n, args.repeats, page_factory, args.only)
            print(report({n: results[n]}), flush=True)
        browser.close()
    print()
    print(f"load average at end: {os.getloadavg()}")
    print(report(results))


if __name__ == "__main__":
    main()
