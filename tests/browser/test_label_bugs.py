"""Issue 12's Label-page bugs, each as an annotator met it, in a real Chromium against a real
`streamlit run`.

Each test gets its own copy of one workspace made through the library (300 small real PNGs,
class-blob vectors, labels started from k = 4; see `make_label_workspace`), so no test depends
on another's clicks. What the page shows is checked against what the workspace holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser.conftest import (
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

SESSION_STATE_WARNING = "created with a default value but also had its value set via"


def _assert_shows_label(page, path: Path, label: str) -> None:
    assert chosen_label(page) == label
    names = shown_names(page)
    assert names, "the grid shows no image"
    label_of = label_of_files(path)
    assert {label_of[n] for n in names} == {label}, f"grid does not show {label}"


def test_bug1_the_label_chooser_follows_every_pick(browser_page, app_server, labws):
    page = browser_page
    name, path, info = labws
    a, b, c = info["by_class"]
    open_label_page(page, app_server["url"], name)
    for label in (b, c, a, b, c):  # every second pick used to be ignored
        pick_label(page, label)
        _assert_shows_label(page, path, label)


def test_bug2_clear_unticks_every_box_and_the_counter_matches(browser_page, app_server, labws):
    page = browser_page
    name, path, info = labws
    open_label_page(page, app_server["url"], name)
    per_page = len(shown_names(page))
    press_button(page, "Select page")
    assert counter(page) == ticked(page) == per_page
    press_button(page, "Clear")
    assert counter(page) == ticked(page) == 0
    tick(page, 5)
    assert counter(page) == ticked(page) == 1
    page.get_by_role("button", name="Move 1 image").first.wait_for()
    # Mark two images unsure: afterwards nothing stays selected, and a new tick counts 1.
    tick(page, 6)
    unsure = ticked_names(page)
    assert len(unsure) == counter(page) == 2
    press_button(page, "Mark unsure")
    assert counter(page) == ticked(page) == 0
    tick(page, 0)
    assert counter(page) == ticked(page) == 1
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    label_id = next(s.id for s in lb.list_labels(Workspace(path)) if s.name == info["by_class"][0])
    states = {
        i.relpath.rsplit("/", 1)[-1]: i.state
        for i in lb.label_images(Workspace(path), label_id, offset=0, limit=1000)
    }
    assert sorted(n for n, s in states.items() if s == "unsure") == sorted(unsure)


def test_bug3_a_label_opens_on_its_first_page(browser_page, app_server, labws):
    page = browser_page
    name, path, info = labws
    big, _other, second = info["by_class"]  # 154 images (4 pages) and 79 (2 pages)
    open_label_page(page, app_server["url"], name)
    pick_label(page, big)
    per_page = len(shown_names(page))
    page.get_by_role("button", name="Page 3", exact=True).click()
    settle(page)
    assert shown_names(page) == library_page(path, big, 3, per_page)
    pick_label(page, second)
    assert shown_names(page) == library_page(path, second, 1, per_page)
    active = page.get_by_test_id("stPaginationPageActive")
    assert active.inner_text().strip() == "1"
    assert "page=3" not in page.url
    page.get_by_role("button", name="Page 2", exact=True).click()
    settle(page)
    assert shown_names(page) == library_page(path, second, 2, per_page)


def test_bug4_a_move_leaves_the_moved_images_unconfirmed(browser_page, app_server, labws):
    """Moving is a decision about a label, not a review of each image: the moved images stay
    unconfirmed and the move carries exactly the selected images."""
    page = browser_page
    name, path, info = labws
    _source, target, _ = info["by_class"]
    open_label_page(page, app_server["url"], name)
    for i in (1, 3, 4):
        tick(page, i)
    chosen = ticked_names(page)
    assert len(chosen) == counter(page) == 3
    _choose_move_target(page, target)
    press_button(page, "Move 3 images")
    label_of = label_of_files(path)
    moved = sorted(n for n in label_of if label_of[n] == target and n.startswith("c0_"))
    assert moved == sorted(chosen)
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    target_id = next(s.id for s in lb.list_labels(Workspace(path)) if s.name == target)
    rows = lb.label_images(Workspace(path), target_id, offset=0, limit=1000)
    confirmed = {i.relpath.rsplit("/", 1)[-1] for i in rows if i.confirmed}
    assert not confirmed & set(chosen), "moved images were marked confirmed"


def test_bug6_empty_labels_are_hidden_and_can_be_deleted(browser_page, app_server, labws):
    page = browser_page
    name, path, info = labws
    open_label_page(page, app_server["url"], name)
    page.get_by_role("combobox", name="Label", exact=True).click()
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    assert options, "the chooser offers no label"
    assert not [o for o in options if o.startswith(info["empty"])], options
    press_button(page, "Delete 1 empty label")
    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    assert info["empty"] not in {s.name for s in lb.list_labels(Workspace(path))}


def test_bug7_no_session_state_warning_in_the_server_log(browser_page, app_server, labws):
    page = browser_page
    name, _path, _info = labws
    open_label_page(page, app_server["url"], name)
    press_button(page, "Select page")
    press_button(page, "Clear")
    tick(page, 2)
    press_button(page, "Select page")
    settle(page)
    log = Path(app_server["log"]).read_text(encoding="utf-8", errors="replace")
    assert SESSION_STATE_WARNING not in log


def test_bug8_selection_stays_with_its_label(browser_page, app_server, labws):
    page = browser_page
    name, _path, info = labws
    a, b, _c = info["by_class"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, a)
    tick(page, 0)
    tick(page, 1)
    assert counter(page) == 2
    pick_label(page, b)
    assert counter(page) == ticked(page) == 0
    assert page.get_by_role("button", name=re.compile(r"^Move 2 images")).count() == 0


def test_bug8_merge_list_and_popovers(browser_page, app_server, labws):
    """The Merge list has no "Select all", its dropdown leaves the Merge button visible, and
    popovers close once their action ran."""
    page = browser_page
    name, path, info = labws
    a, b, _c = info["by_class"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, a)
    page.get_by_test_id("stPopoverButton").filter(has_text="Merge").click()
    body = page.get_by_test_id("stPopoverBody")
    body.get_by_role("combobox").first.click()
    listbox = page.get_by_role("listbox").first
    listbox.wait_for()
    assert listbox.get_by_text("Select all").count() == 0
    merge_button = body.get_by_role("button", name="Merge", exact=True)
    box, button = listbox.bounding_box(), merge_button.bounding_box()
    assert box and button
    overlaps = not (
        box["x"] + box["width"] <= button["x"]
        or button["x"] + button["width"] <= box["x"]
        or box["y"] + box["height"] <= button["y"]
        or button["y"] + button["height"] <= box["y"]
    )
    assert not overlaps, "the dropdown covers the Merge button"
    page.keyboard.type(b)
    page.keyboard.press("Enter")
    settle(page)
    merge_button.click()  # reachable with the dropdown still open
    settle(page)
    page.get_by_test_id("stAlertContentSuccess").first.wait_for()
    _assert_popover_closed(page)
    assert b not in set(label_of_files(path).values())
    # Rename closes its popover too.
    page.get_by_test_id("stPopoverButton").filter(has_text="Rename").click()
    settle(page)  # opening the popover reruns the page: type into what that run drew
    field = page.get_by_test_id("stPopoverBody").get_by_label("New name")
    field.wait_for()
    field.fill("tops")
    field.press("Tab")  # commit the text before the click (as a person's click would)
    settle(page)
    page.get_by_test_id("stPopoverBody").get_by_role("button", name="Rename").click()
    settle(page)
    # What the action sent, read back from the workspace (the success note may already have
    # given way to the next rerun on a loaded machine).
    for _ in range(120):
        if "tops" in set(label_of_files(path).values()):
            break
        page.wait_for_timeout(500)
    assert "tops" in set(label_of_files(path).values()), "the rename was not applied"
    _assert_popover_closed(page)


def _assert_popover_closed(page) -> None:
    bodies = page.get_by_test_id("stPopoverBody")
    for i in range(bodies.count()):
        bodies.nth(i).wait_for(state="hidden", timeout=5_000)  # raises: the popover stayed open


def _choose_move_target(page, label: str) -> None:
    """Pick ``label`` as the move target (the grid's own list, or the Streamlit selectbox)."""
    own = page.locator("select[aria-label='Move to label']")
    if own.count():
        own.first.select_option(label=label)
        return
    box = page.get_by_role("combobox", name="Move to label", exact=True)
    box.click()
    page.keyboard.type(label)
    page.keyboard.press("Enter")
    settle(page)
