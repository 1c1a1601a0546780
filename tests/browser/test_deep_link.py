"""A server's very first request may be a deep link (a bookmark, a shared URL after a restart).

With a ``pages/`` folder beside ``app.py``, Streamlit 1.67 serves a fresh server's first
request in its legacy file-based navigation, which runs ``pages/label.py`` alone. The page's
first line (`imgcluster_app.router.enter`) then runs the router, with public API only: this
test checks the result is the routed app (its sidebar, exactly the six declared pages). This
module starts its own server so that its first request is the deep link.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGE_TITLES = ["Workspace", "Images", "Features", "Clusters", "Label", "Export"]


def test_first_request_to_a_deep_link_runs_inside_the_router(browser_page, app_server):
    page = browser_page
    page.goto(f"{app_server['url']}/label")
    page.get_by_text("No workspace is open").wait_for()  # the Label page's own notice
    # The router's sidebar: its workspace switcher and exactly the six declared pages.
    page.get_by_text("No workspace yet.").wait_for()
    links = page.get_by_test_id("stSidebarNavLink")
    titles = [links.nth(i).inner_text().split()[-1] for i in range(links.count())]
    assert titles == PAGE_TITLES  # (each link text starts with its icon name)
    # Later requests stay routed too.
    page.goto(f"{app_server['url']}/clusters")
    page.get_by_text("No workspace is open").wait_for()
    page.get_by_text("No workspace yet.").wait_for()
    assert page.get_by_test_id("stSidebarNavLink").count() == len(PAGE_TITLES)
