"""imgcluster in the browser: `streamlit run app.py`.

The router: `st.navigation` over the page list, and the workspace switcher every page shares
(`imgcluster_app.router`). Each page is a thin script over the library in ``pages/``; their
common Streamlit glue is the ``imgcluster_app`` package beside it (outside ``pages/``, where
every ``.py`` file is a page).
"""

from imgcluster_app import router

router.run()
