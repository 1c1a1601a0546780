"""imgcluster in the browser: `streamlit run app.py`.

The router: the page list, and the workspace switcher every page shares. Each page is a thin
script over the library in ``app_pages/``; their common glue is ``app_pages/_common.py``.

The folder is deliberately not called ``pages/``: Streamlit (1.67) switches to its legacy
file-based navigation whenever a ``pages/`` folder sits beside the main script until the first
`st.navigation` call, so the first request after a server start to a deep link such as
``/label`` would run that page alone, without this router (no sidebar, no workspace from the
URL), and every later run would stay in that mode.
"""

import streamlit as st

from app_pages import _common as common

st.set_page_config(
    page_title="imgcluster",
    page_icon=":material/photo_library:",
    layout="wide",
    initial_sidebar_state="expanded",
)

common.restore_from_url()

PAGES = [
    st.Page("app_pages/start.py", title="Workspace", icon=":material/folder_open:", default=True),
    st.Page("app_pages/images.py", title="Images", icon=":material/photo_library:"),
    st.Page("app_pages/features.py", title="Features", icon=":material/memory:"),
    st.Page("app_pages/clusters.py", title="Clusters", icon=":material/scatter_plot:"),
    st.Page("app_pages/label.py", title="Label", icon=":material/sell:"),
    st.Page("app_pages/export.py", title="Export", icon=":material/output:"),
]

page = st.navigation(PAGES)
common.sidebar_picker()
common.sync_url()
page.run()
