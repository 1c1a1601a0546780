"""An annotator's whole day in a real Chromium against a real `streamlit run app.py`.

Create a workspace from ``sample_data/`` with the server-folder picker, compute features,
cluster, change k, box-select points on the map with the mouse, move them to a new label,
rename it, undo and redo, export, download the zip, and check the exported folders on disk.
A screenshot of every page goes to ``test-artifacts/``.

One test, one person's session: the steps run in order inside it (no step relies on another
test having run, nor on shared module state); a failing step names where the flow broke.
"""

from __future__ import annotations

import csv
import io
import socket
import zipfile

import pytest

from tests.browser.conftest import ARTIFACTS, PROJECT, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NEW_LABEL = "Trousers & <b>pants</b>"  # markup in a name must show as text
RENAMED = "trousers"


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def success(page, text: str) -> None:
    """The green confirmation an action leaves at the top of the page."""
    page.get_by_test_id("stAlertContentSuccess").get_by_text(text).wait_for()


def choose(page, label: str, text: str) -> None:
    """Pick the first option of a selectbox that contains ``text`` (typed to filter)."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    settle(page)


def go(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    settle(page)
    page.get_by_role("heading", name=title, level=1).wait_for()


def test_server_listens_on_loopback_only(app_server):
    """The bundled config binds 127.0.0.1: another local address (as seen from the network
    card) gets no answer."""
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex(("127.0.0.2", app_server["port"])) != 0


def step_01_create_workspace_from_server_folder(page, app_server):
    page.goto(app_server["url"])
    page.get_by_text("Try it on the sample images").wait_for()
    settle(page)
    shot(page, "01-workspace")
    page.get_by_role("tab", name="New from a server folder").click()
    # The picker refuses a path that climbs out of the allowed folders.
    # enough "../" to reach / from wherever the project is cloned, then into /etc
    climb = "../" * (len(PROJECT.parts) - 1) + "etc"
    page.get_by_label("Image folder").fill(climb)
    page.get_by_label("Workspace name").first.fill("browser")
    page.get_by_role("button", name="Create workspace", exact=True).click()
    settle(page)
    page.get_by_text("is outside the folders this server may read").wait_for()
    page.get_by_label("Image folder").fill("sample_data/images")
    page.get_by_role("button", name="Create workspace", exact=True).click()
    page.get_by_text("Workspace browser created: 120 images").wait_for(timeout=120_000)
    settle(page)
    assert "ws=browser" in page.url
    assert (app_server["workspaces"] / "browser" / "imgcluster.sqlite").is_file()


def step_02_images_page(page):
    go(page, "Images")
    page.get_by_test_id("stMetric").first.wait_for()
    assert "120" in page.get_by_test_id("stMetric").first.inner_text()
    # The page's photos arrive while its script runs: wait for them, not for the first one.
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=\"stImage\"]').length >= 40"
    )
    shot(page, "02-images")


def step_03_extract_features(page):
    go(page, "Features")
    page.get_by_role("button", name="Compute features").click()
    page.get_by_text("All 120 images have efficientnet-lite0 features").wait_for(timeout=300_000)
    settle(page)
    shot(page, "03-features")


def step_04_cluster_and_change_k(page):
    go(page, "Clusters")
    page.get_by_text("features · 8 labels").wait_for()
    k_box = page.get_by_label("k", exact=True)
    k_box.fill("6")
    k_box.press("Enter")
    settle(page)
    page.get_by_text("features · 6 labels").wait_for()
    page.get_by_test_id("stPlotlyChart").first.wait_for()
    shot(page, "04-clusters")


def step_05_box_select_and_move_to_new_label(page, app_server):
    chart = page.get_by_test_id("stPlotlyChart").first
    chart.scroll_into_view_if_needed()
    chart.hover()
    chart.locator('.modebar-btn[data-title="Box Select"]').click()
    area = chart.locator(".nsewdrag").first.bounding_box()
    assert area is not None
    # A box over the left third of the map: on the sample images that is one or two groups.
    page.mouse.move(area["x"] + 2, area["y"] + 2)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * 0.4, area["y"] + area["height"] * 0.98, steps=15)
    page.mouse.up()
    settle(page)
    header = page.get_by_text("images selected on the map")
    header.wait_for()
    n_selected = int(header.inner_text().split()[0])
    assert n_selected > 0
    shot(page, "05-selection")
    page.get_by_label("New label name").fill(NEW_LABEL)
    page.get_by_role("button", name=f"Move {n_selected} images").click()
    settle(page)
    success(page, f"move {n_selected} images to")
    # Shown as text, not as bold markup.
    assert page.locator("b", has_text="pants").count() == 0
    shot(page, "06-moved")
    return n_selected


def step_06_rename_undo_redo_on_label_page(page):
    go(page, "Label")
    choose(page, "Label", "Trousers")
    page.locator("[data-relpath]").first.wait_for()  # the selection grid
    page.get_by_test_id("stPopoverButton").filter(has_text="Rename").click()
    body = page.get_by_test_id("stPopoverBody")
    body.get_by_label("New name").fill(RENAMED)
    body.get_by_role("button", name="Rename").click()
    settle(page)
    success(page, f"to '{RENAMED}'")
    page.get_by_role("button", name="Undo").first.click()
    settle(page)
    success(page, "undo rename")
    page.get_by_role("button", name="Redo").first.click()
    settle(page)
    success(page, "redo rename")
    shot(page, "07-label")


def step_07_export_and_download(page, app_server, tmp_path, n_selected: int):
    go(page, "Export")
    # The preview table (a canvas grid; its cells exist for screen readers).
    page.locator('[role="gridcell"]', has_text=RENAMED).first.wait_for(state="attached")
    shot(page, "08-export-preview")
    page.get_by_role("button", name="Export", exact=True).click()
    page.get_by_text("Exported 120 images").wait_for(timeout=120_000)
    settle(page)
    shot(page, "09-exported")
    out = app_server["workspaces"] / "browser" / "exports" / "dataset"
    folders = {p.name: p for p in out.iterdir() if p.is_dir()}
    assert RENAMED in folders
    assert len(list(folders[RENAMED].iterdir())) == n_selected
    assert sum(len(list(f.iterdir())) for f in folders.values()) == 120
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["label"] == RENAMED for r in rows) == n_selected

    with page.expect_download() as info:
        page.get_by_role("button", name="Download dataset.zip").click()
    saved = tmp_path / "dl.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as zf:
        names = zf.namelist()
        assert (
            sum(n.startswith(f"dataset/{RENAMED}/") and not n.endswith("/") for n in names)
            == n_selected
        )
        manifest = zf.read("dataset/manifest.csv").decode("utf-8")
    assert len(list(csv.DictReader(io.StringIO(manifest)))) == 120


def step_08_reload_keeps_workspace_and_labels(page, app_server):
    page.reload()
    settle(page)
    page.get_by_role("heading", name="Export", level=1).wait_for()
    go(page, "Label")
    choose(page, "Label", RENAMED)
    shown = page.get_by_role("combobox", name="Label", exact=True).input_value()
    assert shown.startswith(f"{RENAMED} — ")


def test_an_annotators_day(browser_page, app_server, tmp_path):
    page = browser_page
    step_01_create_workspace_from_server_folder(page, app_server)
    step_02_images_page(page)
    step_03_extract_features(page)
    step_04_cluster_and_change_k(page)
    n_selected = step_05_box_select_and_move_to_new_label(page, app_server)
    step_06_rename_undo_redo_on_label_page(page)
    step_07_export_and_download(page, app_server, tmp_path, n_selected)
    step_08_reload_keeps_workspace_and_labels(page, app_server)
