"""The app's router: the page list, the frame every page shares, and the way in for a request
that Streamlit's file-based ``pages/`` mode serves.

Streamlit runs an app whose main script sits beside a ``pages/`` folder in its file-based mode
until `st.navigation` is first called in the server process: the very first request of a fresh
server (a bookmark of ``/label`` after a restart) runs ``pages/label.py`` by itself, without
``app.py``. Every page therefore starts with `enter`: inside the router it does nothing; run
on its own it runs the router right there (public `st.navigation`, which also ends the
file-based mode for the whole server process, as Streamlit documents), and the router runs the
requested page. Nothing private of Streamlit is touched, and only ``.py`` files that are pages
live directly in ``pages/`` (the helpers are this package).
"""

from __future__ import annotations

import threading

import streamlit as st

from imgcluster_app import common

#: The pages, in the sidebar's order: (script, title, icon).
PAGE_SPECS = (
    ("pages/start.py", "Workspace", ":material/folder_open:"),
    ("pages/images.py", "Images", ":material/photo_library:"),
    ("pages/features.py", "Features", ":material/memory:"),
    ("pages/clusters.py", "Clusters", ":material/scatter_plot:"),
    ("pages/label.py", "Label", ":material/sell:"),
    ("pages/export.py", "Export", ":material/output:"),
)

# Set while the router runs a page in this script thread (each session's script runs in its
# own thread, so one session's run never sees another's flag).
_routing = threading.local()


def pages() -> list[st.Page]:
    return [
        st.Page(script, title=title, icon=icon, default=i == 0)
        for i, (script, title, icon) in enumerate(PAGE_SPECS)
    ]


@st.cache_resource(show_spinner=False)
def _warm_numba_once() -> bool:
    """Start compiling UMAP's numba code in the background, once per server process (a
    one-off per machine: the compiled code is cached on disk), so the first map or refined
    clustering space of the day does not wait for it. Skipped when UMAP is off."""
    from imgcluster import settings

    if not settings.umap_enabled():
        return False
    try:
        from imgcluster.space_worker import warm_numba_cache
    except ImportError:  # an older library without the warm-up
        return False
    warm_numba_cache()
    return True


def run() -> None:
    """The whole app for one script run: page config, workspace from the URL, navigation,
    the sidebar, then the requested page."""
    _warm_numba_once()
    st.set_page_config(
        page_title="imgcluster",
        page_icon=":material/photo_library:",
        layout="wide",
        initial_sidebar_state="expanded",
    )
    common.restore_from_url()
    page = st.navigation(pages())
    common.sidebar_picker()
    common.sync_url()
    _routing.active = True
    try:
        page.run()
    finally:
        _routing.active = False


def enter() -> None:
    """First line of every page: make sure the page runs inside `run`.

    Outside the router (Streamlit's file-based mode served this request), run the router
    now, which runs this same page inside it, and end this outer run.
    """
    if getattr(_routing, "active", False):
        return
    run()
    st.stop()
