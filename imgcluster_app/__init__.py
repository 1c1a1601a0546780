"""The Streamlit side of imgcluster: the router, the glue every page shares, the label views
and the selection-grid component. ``app.py`` and ``pages/`` import it; the library
(``imgcluster/``) never does.

- `router`: the page list and the frame around every page (also for Streamlit's file-based
  ``pages/`` mode on a fresh server's first request).
- `common`: the open workspace, caches keyed on ``(path, revision)``, errors, progress bars.
- `views`: label views shared by the Clusters and Label pages.
"""
