"""The Label page's "Gather strays" tool in a real Chromium (issue 13 §7), as an annotator uses
it: open a label, turn gathering on, see the strays of its class that sit in another label,
pick some, move them in; the rest stay offered; off and on again; undo, redo; another label.

The workspace starts from a deliberately wrong partition (`store_partition`): five images whose
vectors sit in class 1's blob are in class 0's cluster, so the kNN vote puts them in class 1's
label and nothing else anywhere. What the grid shows and what a move does are checked against
the workspace.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import (
    GRID_CELL,
    SYNTHETIC,
    chosen_label,
    copy_to_server,
    label_of_files,
    make_label_workspace,
    open_label_page,
    pick_label,
    settle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

N_STRAYS = 5
GATHER_GRID = ".st-key-label_gather_grid"


@pytest.fixture(scope="module")
def gather_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from imgcluster import labels as lb
    from imgcluster.clustering import store_partition
    from imgcluster.runs import run_assignments
    from imgcluster.workspace import Workspace

    path = tmp_path_factory.mktemp("gather-template") / "ws"
    make_label_workspace(path)
    ws = Workspace(path)
    images = {im.id: im.relpath for im in ws.images()}
    assignment = run_assignments(ws, lb.active_session(ws).run_id)
    cls = {i: int(images[i].split("/")[0].removeprefix("class")) for i in assignment}
    cluster_of = {c: assignment[next(i for i in assignment if cls[i] == c)] for c in range(4)}
    strays = sorted(i for i in assignment if cls[i] == 1)[:N_STRAYS]
    for image_id in strays:
        assignment[image_id] = cluster_of[0]
    run_id = store_partition(ws, SYNTHETIC, assignment)
    lb.start_session(ws, run_id, actor="setup", replace=True)
    label_of = {r.image_id: r.label for r in lb.current_labels(ws)}
    home = next(label_of[i] for i in assignment if cls[i] == 1 and i not in strays)
    return path, {
        "home": home,
        "away": label_of[strays[0]],
        "strays": sorted(images[i].rsplit("/", 1)[-1] for i in strays),
    }


@pytest.fixture()
def gatherws(gather_template, app_server, request) -> tuple[str, Path, dict]:
    source, info = gather_template
    name, dest = copy_to_server(source, app_server, request)
    return name, dest, info


def gathered(page) -> list[str]:
    """File names in the gather grid, in its order."""
    paths = page.locator(f"{GATHER_GRID} {GRID_CELL}").evaluate_all(
        "els => els.map(e => e.getAttribute('data-relpath'))"
    )
    return [p.rsplit("/", 1)[-1] for p in paths]


def gather_toggle(page, label: str) -> None:
    page.get_by_text(f"Gather strays into {label}", exact=True).click()
    settle(page)


def test_gather_offers_the_strays_and_moves_exactly_the_picked_ones(
    browser_page, app_server, gatherws
):
    page = browser_page
    name, path, info = gatherws
    home, away, strays = info["home"], info["away"], info["strays"]
    open_label_page(page, app_server["url"], name)
    pick_label(page, home)
    gather_toggle(page, home)
    page.locator(f"{GATHER_GRID} {GRID_CELL}").first.wait_for()
    assert sorted(gathered(page)) == strays, "the grid offers exactly the strays of this label"
    assert page.get_by_text(f"{N_STRAYS} images of other labels look like {home}").count() == 1
    # Its one action is a move here: no confirm / unsure / exclude, no new label.
    bar = page.locator(GATHER_GRID)
    assert bar.get_by_role("button", name="Confirm").count() == 0
    assert bar.locator("option").all_inner_texts() == [home]

    # Pick the first and the third, move them in: exactly those two change label.
    shown = gathered(page)
    cells = page.locator(f"{GATHER_GRID} {GRID_CELL}")
    cells.nth(0).click()
    cells.nth(2).click()
    page.locator(GATHER_GRID).get_by_role("button", name="Move 2 images").click()
    settle(page)
    labels = label_of_files(path)
    picked = {shown[0], shown[2]}
    assert all(labels[f] == home for f in picked)
    assert all(labels[f] == away for f in set(strays) - picked)
    # The grid now offers the other three only, none selected.
    expect(page.locator(f"{GATHER_GRID} {GRID_CELL}")).to_have_count(N_STRAYS - 2)
    assert sorted(gathered(page)) == sorted(set(strays) - picked)
    assert page.locator(f"{GATHER_GRID} {GRID_CELL}[aria-selected='true']").count() == 0

    # Off and on again: the same three; pick one more and move it.
    gather_toggle(page, home)
    assert chosen_label(page) == home, "a click after a move kept the label shown"
    assert page.locator(f"{GATHER_GRID} {GRID_CELL}").count() == 0
    gather_toggle(page, home)
    page.locator(f"{GATHER_GRID} {GRID_CELL}").first.wait_for()
    assert sorted(gathered(page)) == sorted(set(strays) - picked)
    last = gathered(page)[1]
    page.locator(f"{GATHER_GRID} {GRID_CELL}").nth(1).click()
    page.locator(GATHER_GRID).get_by_role("button", name="Move 1 image").click()
    settle(page)
    assert label_of_files(path)[last] == home
    expect(page.locator(f"{GATHER_GRID} {GRID_CELL}")).to_have_count(N_STRAYS - 3)
    # Undo takes that one back where it was, and it is offered again.
    page.get_by_role("button", name="Undo", exact=True).click()
    settle(page)
    assert label_of_files(path)[last] == away
    expect(page.locator(f"{GATHER_GRID} {GRID_CELL}")).to_have_count(N_STRAYS - 2)
    assert last in gathered(page) and chosen_label(page) == home
    # Redo moves it in again.
    page.get_by_role("button", name="Redo", exact=True).click()
    settle(page)
    assert label_of_files(path)[last] == home
    expect(page.locator(f"{GATHER_GRID} {GRID_CELL}")).to_have_count(N_STRAYS - 3)

    # Another label: gathering stays on, and nothing elsewhere looks like this one.
    pick_label(page, away)
    page.get_by_text("No image of another label looks like this one.").wait_for()
    assert page.locator(f"{GATHER_GRID} {GRID_CELL}").count() == 0
    # Nothing else changed: 3 moves' worth of images in home, the rest where they were.
    after = label_of_files(path)
    assert sum(after[f] == home for f in strays) == 3
