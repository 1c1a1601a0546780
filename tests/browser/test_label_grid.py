"""The Label page's selection grid in a real Chromium: clicks, shift-click ranges, misfits,
the keyboard, Esc; the count always matches the ticks drawn; selecting never reruns the
script; a move sends exactly the selected images (checked in the workspace); the larger view;
the place (label, order, page) survives a reload.

One server for the module; each test works on its own copy of the workspace.
"""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import (
    GRID_CELL,
    chosen_label,
    counter,
    label_of_files,
    library_page,
    open_label_page,
    pick_label,
    press_button,
    settle,
    shown_names,
    tick,
    ticked,
    ticked_names,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Records every change of the app's script state (a rerun shows as "running").
WATCH_RUNS = """
window.__runs = [];
setInterval(() => {
  const app = document.querySelector('[data-testid=stApp]');
  const state = app && app.getAttribute('data-test-script-state');
  if (state && window.__last !== state) { window.__runs.push(state); window.__last = state; }
}, 5);
"""


def consistent(page) -> int:
    """The count shown equals the ticks drawn; returns it."""
    n = counter(page)
    assert n == ticked(page), f"count says {n}, {ticked(page)} drawn as selected"
    return n


def test_click_toggles_shift_click_selects_a_range_and_no_click_reruns(
    browser_page, app_server, labws
):
    page = browser_page
    name, _path, _info = labws
    open_label_page(page, app_server["url"], name)
    page.evaluate(WATCH_RUNS)
    names = shown_names(page)
    tick(page, 2)
    assert consistent(page) == 1 and ticked_names(page) == [names[2]]
    tick(page, 2)
    assert consistent(page) == 0
    tick(page, 2)
    tick(page, 7, shift=True)
    assert consistent(page) == 6 and ticked_names(page) == names[2:8]
    press_button(page, "Invert")
    assert consistent(page) == len(names) - 6
    assert not set(ticked_names(page)) & set(names[2:8])
    page.locator(GRID_CELL).first.click()
    page.keyboard.press("Escape")
    assert consistent(page) == 0
    assert "running" not in page.evaluate("window.__runs"), "a click in the grid reran the app"


def test_select_misfits_selects_exactly_the_flagged_photos(browser_page, app_server, labws):
    page = browser_page
    name, _path, info = labws
    open_label_page(page, app_server["url"], name)
    pick_label(page, info["by_class"][0])  # holds the strays moved in from another class
    page.get_by_role("combobox", name="Label", exact=True).wait_for()
    page.get_by_text("Worst fit first", exact=True).click()
    settle(page)
    flagged = page.locator(f"{GRID_CELL}:has(.badge.misfit)").evaluate_all(
        "els => els.map(e => e.getAttribute('data-relpath'))"
    )
    assert sorted(flagged) == sorted(info["strays"]), "the strays are the flagged misfits"
    page.get_by_role("button", name=re.compile(r"^Select misfits")).click()
    assert consistent(page) == len(flagged)
    assert sorted(ticked_names(page)) == sorted(p.rsplit("/", 1)[-1] for p in flagged)


def test_keyboard_moves_the_focus_selects_and_a_digit_moves_the_selection(
    browser_page, app_server, labws
):
    page = browser_page
    name, path, info = labws
    source, target, _ = info["by_class"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, source)
    names = shown_names(page)
    cells = page.locator(GRID_CELL)
    per_row = cells.evaluate_all(
        "els => els.filter(e => e.getBoundingClientRect().top"
        " === els[0].getBoundingClientRect().top).length"
    )
    cells.first.click()  # selects the first photo and gives the grid the keyboard
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Space")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Space")
    assert consistent(page) == 3
    chosen = [names[0], names[2], names[2 + per_row]]
    assert ticked_names(page) == sorted(chosen, key=names.index)
    # The keys are shown on the page, digit 1 is the first other label.
    legend = page.get_by_text(re.compile(r"Digit: move the selection to 1 ")).inner_text()
    first_target = legend.split("to 1 ", 1)[1].split(" · ")[0].strip()
    assert first_target == target  # labels listed by name: cluster_00 shown, cluster_01 first
    page.keyboard.press("1")
    settle(page)
    label_of = label_of_files(path)
    assert sorted(n for n, lab in label_of.items() if lab == target and n.startswith("c0_")) == (
        sorted(chosen)
    )
    assert consistent(page) == 0  # the selection went with the move


def test_larger_view_fits_the_screen_and_steps_through_the_label(browser_page, app_server, labws):
    page = browser_page
    name, path, _info = labws
    open_label_page(page, app_server["url"], name)
    label = chosen_label(page)
    first, second = library_page(path, label, 1, 2)
    page.locator(GRID_CELL).first.click()
    page.keyboard.press("Escape")  # nothing selected; the focus stays on the first photo
    page.locator(".icg .grid").press("Enter")
    settle(page)
    dialog = page.get_by_role("dialog")
    dialog.locator(".icf img.main").wait_for()
    assert dialog.get_by_text(re.compile(re.escape(first))).count()
    size = dialog.locator(".icf img.main").evaluate(
        "img => [img.naturalWidth, img.naturalHeight, img.getBoundingClientRect().width,"
        " img.getBoundingClientRect().height, window.innerHeight]"
    )
    natural_w, natural_h, shown_w, shown_h, viewport_h = size
    assert shown_w <= 2 * natural_w + 1 and shown_h <= 2 * natural_h + 1  # never past 2x
    assert shown_h < viewport_h
    strip = dialog.locator(".icf .nb")
    assert strip.count() == 8
    last = strip.last.bounding_box()
    assert last and last["y"] + last["height"] <= viewport_h, "neighbours need scrolling"
    dialog.locator(".icf").press("ArrowRight")
    settle(page)
    page.get_by_role("dialog").get_by_text(re.compile(re.escape(second))).first.wait_for()


def test_the_place_survives_a_reload(browser_page, app_server, labws):
    page = browser_page
    name, _path, info = labws
    label = info["by_class"][2]  # 79 images: 2 pages
    open_label_page(page, app_server["url"], name)
    pick_label(page, label)
    page.get_by_text("By file name", exact=True).click()
    settle(page)
    page.get_by_role("button", name="Page 2", exact=True).click()
    settle(page)
    before = shown_names(page)
    assert f"label={label}" in page.url and "page=2" in page.url and "order=relpath" in page.url
    page.reload()
    page.get_by_role("heading", name="Label", level=1).wait_for()
    settle(page)
    page.locator(GRID_CELL).first.wait_for()  # the grid's script loads after the first run
    assert chosen_label(page) == label
    assert shown_names(page) == before
    assert page.get_by_test_id("stPaginationPageActive").inner_text().strip() == "2"
