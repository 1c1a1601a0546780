"""A real `streamlit run app.py` on a free loopback port, and Debian's Chromium driving it.

The server runs from the project folder (so `.streamlit/config.toml` applies exactly as for a
user) with its workspaces in a temporary folder. Its log is kept in ``test-artifacts/`` next
to the screenshots, for CI to upload when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT

ARTIFACTS = PROJECT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not become healthy in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, object]]:
    """Start the app; yields ``url``, ``port``, ``workspaces`` (its workspaces folder)."""
    pytest.importorskip("playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    home = tmp_path_factory.mktemp("browser-app")
    workspaces = home / "workspaces"
    port = _free_port()
    env = {
        **os.environ,
        "IMGCLUSTER_WORKSPACES": str(workspaces),
        "PYTHONUNBUFFERED": "1",
        # The background UMAP worker only for modules that say ``APP_UMAP = True``: elsewhere
        # it would compete for the CPU and, once the refined space is ready, move untouched
        # clusters to it in the middle of a test (what the app does for a user, on purpose).
        "IMGCLUSTER_UMAP": "1" if getattr(request.module, "APP_UMAP", False) else "0",
    }
    env.pop("IMGCLUSTER_ALLOWED_ROOTS", None)  # the defaults: the project folder, sample_data/
    # One log per test module: modules (and people) running at once never share one.
    log = ARTIFACTS / f"streamlit-server-{request.module.__name__.rsplit('.', 1)[-1]}.log"
    with open(log, "wb") as log_fh:
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
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the UMAP worker dies with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, timeout=90)
        yield {"url": url, "port": port, "workspaces": workspaces, "log": log}
    finally:
        with_group = os.getpgid(proc.pid) if proc.poll() is None else None
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if with_group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(with_group, signal.SIGKILL)
        # UMAP workers run in their own session; each names its pid in a lock file.
        for lock in workspaces.glob("*/runs/projection-*.lock"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(lock.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="module")
def browser_page(app_server: dict[str, object]) -> Iterator[object]:
    """One Chromium page for the whole flow (a user's tab), 1440x1000."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.add_init_script(WATCH_SCRIPT_RUNS)  # what `settle` waits on
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            context.close()
            browser.close()


# -- a workspace made for the Label page -------------------------------------------------------

#: Cluster sizes of `make_label_workspace`: one label of 4 pages (48 a page), one of 2, ...
LABEL_SIZES = (150, 71, 52, 27)
SYNTHETIC = "synthetic"  # the feature set's name: class-blob vectors, no CNN


def make_label_workspace(path: Path, *, n_strays: int = 4) -> dict[str, object]:
    """A workspace for Label-page tests, built through the library in a few seconds.

    Real PNG files (tiny, one colour per class plus noise) are ingested; each class gets a
    well-separated blob of vectors (the CNN is not what these tests are about), KMeans with
    k = 4 finds the classes exactly, and labeling starts from it. Then ``n_strays`` images of
    the second-largest class are moved into the largest one (so it has misfits) and every image
    of the smallest class into the third (so one label is empty).

    Returns ``{"by_class": [label names of classes 0-2], "empty": the label of class 3 (now
    empty), "strays": [relpaths moved into class 0's label]}``: class 0's label has 154 images
    (4 pages), class 2's 79 (2 pages), class 1's 67 (2 pages).
    """
    import numpy as np
    from PIL import Image

    from imgcluster import labels as lb
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    photos = path.parent / f"{path.name}-photos"
    rng = np.random.default_rng(0)
    for cls, size in enumerate(LABEL_SIZES):
        folder = photos / f"class{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(60 * cls + 40) % 256, (150 - 30 * cls) % 256, (90 * cls) % 256])
        for i in range(size):
            noise = rng.integers(-25, 25, size=(24, 32, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"c{cls}_{i:03d}.png")
    workspace = Workspace(path, create=True)
    ingest(workspace, photos)
    images = workspace.images()
    centres = rng.normal(size=(len(LABEL_SIZES), 16)) * 4.0
    cls_of = [int(im.relpath.split("/")[0].removeprefix("class")) for im in images]
    vectors = np.array([centres[c] + rng.normal(size=16) for c in cls_of])
    save_vectors(workspace, SYNTHETIC, [im.sha256 for im in images], vectors)
    run = cluster(workspace, SYNTHETIC, len(LABEL_SIZES))
    lb.start_session(workspace, run.id, actor="setup")
    by_class: dict[int, str] = {}
    for item in lb.current_labels(workspace):
        by_class.setdefault(int(item.relpath.split("/")[0].removeprefix("class")), item.label)
    id_of = {s.name: s.id for s in lb.list_labels(workspace)}
    strays = [im for im, c in zip(images, cls_of, strict=True) if c == 1][:n_strays]
    lb.move(workspace, [im.id for im in strays], id_of[by_class[0]], actor="setup")
    smallest = [im.id for im, c in zip(images, cls_of, strict=True) if c == 3]
    lb.move(workspace, smallest, id_of[by_class[2]], actor="setup")
    return {
        "by_class": [by_class[0], by_class[1], by_class[2]],
        "empty": by_class[3],
        "strays": [im.relpath for im in strays],
    }


@pytest.fixture(scope="module")
def label_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One `make_label_workspace` per test module (built once, copied by `labws`)."""
    path = tmp_path_factory.mktemp("label-template") / "ws"
    return path, make_label_workspace(path)


@pytest.fixture()
def labws(label_template, app_server, request) -> tuple[str, Path, dict]:
    """A private copy of the template in the server's workspaces folder: (name, path, info).

    Each test gets its own copy, so no test depends on another's clicks.
    """
    source, info = label_template
    name, dest = copy_to_server(source, app_server, request)
    return name, dest, info


def copy_to_server(source: Path, app_server, request) -> tuple[str, Path]:
    """A private copy of workspace ``source`` in the server's workspaces folder, named after
    the test: (name, path)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    dest = Path(app_server["workspaces"]) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest)
    return name, dest


# -- driving the Label page --------------------------------------------------------------------
# The helpers work on the page's grid whether it is drawn by the selection-grid component
# (cells carrying ``data-relpath``) or, as before it, by `st.image` + `st.checkbox`; a bug's
# test thus runs unchanged on the code before and after its fix.

GRID_CELL = "[data-relpath]"


#: Installed in every page before the app's own scripts: it reads Streamlit's websocket frames
#: (protobuf; only their top-level field numbers are needed) and stamps, on the page's clock,
#: the last user input, the last script run the page asked for (an automatic fragment rerun
#: does not count) and the last run the server finished (a run cut short for another one does
#: not count). `settle` waits on these, not on how long a rerun usually takes to start: the
#: 300 ms it used to sleep could pass before a loaded machine had even sent the click's rerun,
#: and the test then acted on the old page while the new one was being drawn.
WATCH_SCRIPT_RUNS = """
(() => {
  if (window.__icRuns) return;
  const runs = window.__icRuns = { input: 0, asked: 0, done: 0 };
  const stamp = () => { runs.input = performance.now(); };
  for (const type of ["pointerdown", "pointerup", "click", "keydown"]) {
    window.addEventListener(type, stamp, true);
  }
  // Top-level fields of a protobuf message: {field number: varint value, or the bytes}.
  const fields = (bytes) => {
    const out = {};
    let i = 0;
    const varint = () => {
      let value = 0, shift = 0, byte;
      do { byte = bytes[i++]; value += (byte & 0x7f) * 2 ** shift; shift += 7; }
      while (byte & 0x80 && i < bytes.length);
      return value;
    };
    while (i < bytes.length) {
      const tag = varint(), field = Math.floor(tag / 8), wire = tag & 7;
      if (wire === 0) out[field] = varint();
      else if (wire === 2) { const n = varint(); out[field] = bytes.subarray(i, i + n); i += n; }
      else if (wire === 1) i += 8;
      else if (wire === 5) i += 4;
      else break;
    }
    return out;
  };
  const RERUN_SCRIPT = 11, IS_AUTO_RERUN = 6;  // BackMsg.rerun_script, ClientState.is_auto_rerun
  const SCRIPT_FINISHED = 6, EARLY_FOR_RERUN = 2;  // ForwardMsg.script_finished, its status
  const Native = window.WebSocket;
  class Watched extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        if (!(event.data instanceof ArrayBuffer)) return;
        const msg = fields(new Uint8Array(event.data));
        if (msg[SCRIPT_FINISHED] !== undefined && msg[SCRIPT_FINISHED] !== EARLY_FOR_RERUN) {
          // After the app's own handler has dispatched it (it awaits before dispatching).
          setTimeout(() => { runs.done = performance.now(); }, 0);
        }
      });
    }
    send(data) {
      try {
        const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
          : ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
          : null;
        const msg = bytes ? fields(bytes) : {};
        if (msg[RERUN_SCRIPT] !== undefined && !fields(msg[RERUN_SCRIPT])[IS_AUTO_RERUN]) {
          runs.asked = performance.now();
        }
      } catch (err) { /* never break the app's socket */ }
      return super.send(data);
    }
  }
  window.WebSocket = Watched;
})();
"""
#: How long an action may take to send its rerun request before `settle` decides it made none
#: (a click on something that does not rerun the script, such as the selection grid's cells).
ASK_GRACE_MS = 2_000
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def settle(page, timeout: float = 120_000) -> None:
    """Wait until the script run the last action asked for has finished and the page shows it.

    Keyed on the page's own state (see `WATCH_SCRIPT_RUNS`): first the rerun request the
    action sent after the last input (or `ASK_GRACE_MS` without one: it made none), then the
    server's "script finished" for a run asked after it, with the app idle, twice two animation
    frames apart (so a message still being dispatched cannot pass for the end).
    """
    if not page.evaluate("() => Boolean(window.__icRuns)"):  # a page made without the watcher
        page.wait_for_timeout(500)
        page.wait_for_selector(IDLE, timeout=timeout)
        return
    with contextlib.suppress(Exception):  # playwright's TimeoutError: no rerun was asked for
        page.wait_for_function(
            "() => window.__icRuns.asked >= window.__icRuns.input", timeout=ASK_GRACE_MS
        )
    done = """() => {
        const app = document.querySelector('[data-testid="stApp"]');
        return window.__icRuns.done >= window.__icRuns.asked
            && app && app.getAttribute("data-test-script-state") === "notRunning";
    }"""
    frames = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
    for _ in range(2):
        page.wait_for_function(done, timeout=timeout)
        page.evaluate(frames)
    page.wait_for_function(done, timeout=timeout)


def open_label_page(page, url: str, ws_name: str, query: str = "") -> None:
    """A fresh tab's first view of the Label page of workspace ``ws_name``."""
    page.goto(f"{url}/label?ws={ws_name}{query}")
    page.get_by_role("heading", name="Label", level=1).wait_for()
    settle(page)
    # The grid component's script loads on its own after the first run: wait for its cells
    # (every label these tests open has images) before anyone reads the grid.
    page.locator(GRID_CELL).first.wait_for()


def uses_grid_component(page) -> bool:
    return page.locator(GRID_CELL).count() > 0


def shown_names(page) -> list[str]:
    """File names (last path part) of the images in the grid, in order."""
    if uses_grid_component(page):
        paths = page.locator(GRID_CELL).evaluate_all(
            "els => els.map(e => e.getAttribute('data-relpath'))"
        )
        return [p.rsplit("/", 1)[-1] for p in paths]
    captions = page.get_by_test_id("stImageCaption").all_inner_texts()
    return [c.strip().split("\n")[0].strip() for c in captions]


def tick(page, index: int, *, shift: bool = False) -> None:
    """Select the ``index``-th image of the grid (a click on the photo, or its checkbox)."""
    if uses_grid_component(page):
        page.locator(GRID_CELL).nth(index).click(modifiers=["Shift"] if shift else None)
        page.wait_for_timeout(50)
    else:
        page.get_by_test_id("stCheckbox").nth(index).click()
        settle(page)


def ticked(page) -> int:
    """How many images the grid draws as selected."""
    if uses_grid_component(page):
        return page.locator(f"{GRID_CELL}[aria-selected='true']").count()
    return page.locator('[data-testid="stCheckbox"] input:checked').count()


def ticked_names(page) -> list[str]:
    if uses_grid_component(page):
        paths = page.locator(f"{GRID_CELL}[aria-selected='true']").evaluate_all(
            "els => els.map(e => e.getAttribute('data-relpath'))"
        )
        return [p.rsplit("/", 1)[-1] for p in paths]
    names = shown_names(page)
    boxes = page.get_by_test_id("stCheckbox").locator("input")
    return [n for i, n in enumerate(names) if boxes.nth(i).is_checked()]


def counter(page) -> int:
    """The number in the page's "N selected" text."""
    import re

    text = page.get_by_text(re.compile(r"\d[\d,]* selected")).first.inner_text()
    match = re.search(r"(\d[\d,]*) selected", text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def press_button(page, name: str) -> None:
    """Click the visible button called ``name`` (in the grid or a Streamlit button) and wait."""
    page.get_by_role("button", name=name, exact=True).first.click()
    settle(page)


def pick_label(page, name: str) -> None:
    """Choose label ``name`` in the Label page's chooser (typed to filter, then its option)."""
    import re

    box = page.get_by_role("combobox", name="Label", exact=True)
    box.click()
    page.get_by_role("listbox").first.wait_for()
    page.keyboard.type(name)
    option = page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} — "))
    option.first.click()
    settle(page)


def chosen_label(page) -> str:
    """The label name the chooser shows (its text starts with the name)."""
    value = page.get_by_role("combobox", name="Label", exact=True).input_value()
    return value.split(" — ")[0].strip()


def library_page(workspace_path: Path, label: str, page_no: int, per_page: int) -> list[str]:
    """File names of page ``page_no`` of ``label`` in typicality order, from the library."""
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    workspace = Workspace(workspace_path)
    label_id = next(s.id for s in lb.list_labels(workspace) if s.name == label)
    items = lb.label_images(
        workspace, label_id, offset=(page_no - 1) * per_page, limit=per_page, order="typicality"
    )
    return [i.relpath.rsplit("/", 1)[-1] for i in items]


def label_of_files(workspace_path: Path) -> dict[str, str]:
    """File name -> its label now, from the workspace."""
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    return {
        r.relpath.rsplit("/", 1)[-1]: r.label for r in lb.current_labels(Workspace(workspace_path))
    }
