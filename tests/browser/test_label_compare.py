"""The Label page's "compare with another label", as an annotator works with it, in a real
Chromium against a real `streamlit run`: choose a label to compare with, select photos in the
grid, move them there from the comparison column; the workspace holds exactly those images in
the compared label (unconfirmed), the comparison stays (also in the URL, across a reload), and
the chooser never offers the label shown or an empty label.
"""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import (
    GRID_CELL,
    chosen_label,
    counter,
    label_of_files,
    open_label_page,
    pick_label,
    settle,
    shown_names,
    tick,
    ticked,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

COMPARE = "Compare with"


def compare_options(page) -> list[str]:
    """Label names the "Compare with" chooser offers (its list opened, then closed)."""
    page.get_by_role("combobox", name=COMPARE, exact=True).click()
    page.get_by_role("listbox").first.wait_for()
    texts = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return [t.split(" — ")[0].strip() for t in texts]


def pick_compare(page, name: str) -> None:
    box = page.get_by_role("combobox", name=COMPARE, exact=True)
    box.click()
    page.get_by_role("listbox").first.wait_for()
    page.keyboard.type(name)
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} — ")).first.click()
    settle(page)


def compared(page) -> str:
    value = page.get_by_role("combobox", name=COMPARE, exact=True).input_value()
    return value.split(" — ")[0].strip()


def test_compare_move_the_selection_there_and_the_chooser_follows(browser_page, app_server, labws):
    page = browser_page
    name, path, info = labws
    a, b, c = info["by_class"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, a)
    offered = compare_options(page)
    assert a not in offered and info["empty"] not in offered
    assert {b, c} <= set(offered)

    pick_compare(page, b)
    column = page.locator(f".icc[data-compare='{b}']")
    column.wait_for()
    in_b_before = {n for n, lab in label_of_files(path).items() if lab == b}
    shown_b = column.locator("[data-compare-relpath]").evaluate_all(
        "els => els.map(e => e.getAttribute('data-compare-relpath').split('/').pop())"
    )
    assert shown_b and set(shown_b) <= in_b_before, "the column shows photos of B"
    assert f"compare={b}" in page.url

    names = shown_names(page)
    move_here = column.get_by_role("button", name=re.compile(r"^Move "))
    assert move_here.is_disabled(), "nothing selected yet, nothing to move"
    tick(page, 1)
    tick(page, 4)
    assert counter(page) == ticked(page) == 2
    chosen = {names[1], names[4]}
    assert move_here.inner_text() == f"Move 2 images to {b}"
    move_here.click()
    settle(page)

    label_of = label_of_files(path)
    in_b_after = {n for n, lab in label_of.items() if lab == b}
    assert in_b_after - in_b_before == chosen and in_b_before <= in_b_after
    assert chosen.isdisjoint(shown_names(page)), "the moved photos left the grid"
    assert counter(page) == ticked(page) == 0
    assert chosen_label(page) == a and compared(page) == b, "the comparison still shows B"
    page.locator(f".icc[data-compare='{b}']").wait_for()

    from imgcluster import labels as lb
    from imgcluster.workspace import Workspace

    workspace = Workspace(path)
    moved = [i for i in lb.current_labels(workspace) if i.relpath.rsplit("/", 1)[-1] in chosen]
    assert {i.label for i in moved} == {b}
    assert not any(i.confirmed for i in moved), "a move never confirms images"

    page.reload()  # the comparison is in the URL
    page.get_by_role("heading", name="Label", level=1).wait_for()
    settle(page)
    assert chosen_label(page) == a and compared(page) == b

    pick_label(page, c)
    assert compared(page) == b
    assert c not in compare_options(page)
    pick_label(page, b)  # the label compared with becomes the one shown: the comparison goes
    assert b not in compare_options(page)
    assert page.locator(".icc").count() == 0
    assert "compare=" not in page.url
    assert page.locator(GRID_CELL).count() > 0


def test_a_click_after_a_move_keeps_the_label_and_the_comparison(browser_page, app_server, labws):
    """Streamlit keeps a chooser's value as the text it shows; a move changes a label's count
    and so that text, and the next click anywhere brought the stale text back: the page
    jumped to the first label and the comparison closed (issue 13's gather test met it)."""
    page = browser_page
    name, path, info = labws
    _a, b, c = info["by_class"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, b)
    pick_compare(page, c)
    in_b = sum(label == b for label in label_of_files(path).values())
    for step in range(2):
        tick(page, 0)
        if step == 0:  # from the grid's own bar
            page.get_by_role("button", name="Move 1 image").first.click()
        else:  # from the comparison column
            page.locator(f".icc[data-compare='{c}']").get_by_role(
                "button", name=re.compile(r"^Move ")
            ).click()
        settle(page)
        assert chosen_label(page) == b and compared(page) == c
        # Any other widget: the labels' sort order, then back.
        page.get_by_role("radio", name="Size" if step == 0 else "Name", exact=True).click()
        settle(page)
        assert chosen_label(page) == b, f"after move {step + 1}, a click opened another label"
        assert compared(page) == c, f"after move {step + 1}, a click closed the comparison"
    assert sum(label == b for label in label_of_files(path).values()) == in_b - 2
