"""imgcluster in the browser: `streamlit run app.py`.

The router: the page list, and the workspace switcher every page shares. Each page is a thin
script over the library in ``pages/``; their common glue is ``pages/_common.py``.

Streamlit (1.67) runs an app with a ``pages/`` folder beside its main script in legacy
file-based navigation until `st.navigation` is first called, so the first request of a server
to a deep link such as ``/label`` would run that page without this router; every page starts
with ``common.require_router()``, which leaves that mode and hands the request back here.
"""

import streamlit as st

from pages import _common as common

st.set_page_config(
    page_title="imgcluster",
    page_icon=":material/photo_library:",
    layout="wide",
    initial_sidebar_state="expanded",
)

common.restore_from_url()

PAGES = [
    st.Page("pages/start.py", title="Workspace", icon=":material/folder_open:", default=True),
    st.Page("pages/images.py", title="Images", icon=":material/photo_library:"),
    st.Page("pages/features.py", title="Features", icon=":material/memory:"),
    st.Page("pages/clusters.py", title="Clusters", icon=":material/scatter_plot:"),
    st.Page("pages/label.py", title="Label", icon=":material/sell:"),
    st.Page("pages/export.py", title="Export", icon=":material/output:"),
]

page = st.navigation(PAGES)
common.sidebar_picker()
common.sync_url()
page.run()
