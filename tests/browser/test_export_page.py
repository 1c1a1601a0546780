"""The Export page in a real Chromium against a real `streamlit run app.py` (issue 12, "Export
warns before writing"): warnings first, the "left out" row, an overwrite error that points at
the page's own control, and no stale success message after a new action."""

from __future__ import annotations

import pytest

from imgcluster import labels as lb
from tests.browser._helpers_clusters import labeled_workspace, open_page, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_export_warns_first_and_its_messages_fit_the_app(browser_page, app_server):
    page = browser_page
    ws = labeled_workspace(app_server["workspaces"], "export", k=10)
    rows = lb.current_labels(ws)
    lb.move(ws, [r.image_id for r in rows[:3]], "odd ones", actor="ana")  # a label of 3
    first = lb.list_labels(ws)[0]
    lb.rename(ws, first.id, "hats", actor="ana")
    open_page(page, app_server, "export", "export")
    page.get_by_role("heading", name="Preview").wait_for()
    main = page.get_by_test_id("stMain")
    # Warnings before writing: automatic names, too small, nobody reviewed.
    main.get_by_text("still have their automatic name").wait_for()
    assert main.get_by_text("fewer than 5 images").count() == 1
    assert main.get_by_text("'odd ones'").count() >= 1
    assert main.get_by_text("nobody has reviewed").count() == 1
    # The preview says what is left out, even when nothing is.
    page.get_by_test_id("stDataFrame").wait_for()
    main.get_by_text("Left out: none").wait_for()

    page.get_by_role("button", name="Export", exact=True).click()
    settle(page)
    page.get_by_text("Exported 120 images").wait_for()
    # A new choice makes the old success message go.
    page.get_by_text("train / val 80:20").click()
    settle(page)
    assert page.get_by_text("Exported 120 images").count() == 0
    page.get_by_text("No split: one folder per label").click()
    settle(page)

    # Exporting again under the same name: the error names the page's own control.
    page.get_by_role("button", name="Export", exact=True).click()
    settle(page)
    error = page.get_by_test_id("stAlertContentError")
    error.wait_for()
    text = error.inner_text()
    assert "Replace an earlier export with this name" in text
    assert "--overwrite" not in text and "overwrite=True" not in text
    assert page.get_by_text("Exported 120 images").count() == 0
    # ... and that control works.
    page.get_by_text("Replace an earlier export with this name", exact=True).click()
    settle(page)
    page.get_by_role("button", name="Export", exact=True).click()
    settle(page)
    page.get_by_text("Exported 120 images").wait_for()
    assert page.get_by_test_id("stAlertContentError").count() == 0
