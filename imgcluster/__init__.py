"""imgcluster: cluster product photos by CNN features and label the clusters into a dataset.

The library owns every step (images -> features -> clustering + projection -> labels ->
export); the CLI and the Streamlit app are thin shells over it. TensorFlow, scikit-learn and
umap are imported lazily, so ``import imgcluster`` stays fast.

Each SQLite table has one owning module, the only one whose SQL names it (the schema itself is
built by `imgcluster.migrations`; ``tests/test_architecture.py`` enforces this):

- ``meta``, ``images``: `imgcluster.workspace` (ingest, `imgcluster.images`, writes
  ``images``); others join the read-only view ``image_catalog`` or call its readers;
- ``feature_shards``, ``features``: `imgcluster.features.store`;
- ``clusterings``, ``assignments``: `imgcluster.runs` (readers: `run_info`,
  `run_assignments`, ...; `imgcluster.clustering` makes the runs);
- ``projections``: `imgcluster.spaces`;
- ``label_sessions``, ``labels``, ``image_labels``, ``audit_log``: `imgcluster.labels`.

Examples
--------
>>> import imgcluster as ic                                  # doctest: +SKIP
>>> ws = ic.Workspace("ws", create=True)                     # doctest: +SKIP
>>> ic.ingest(ws, "sample_data")                             # doctest: +SKIP
>>> ic.extract(ws)                                           # doctest: +SKIP
>>> run = ic.cluster(ws, "efficientnet-lite0", 6)            # doctest: +SKIP
>>> ic.labels.start_session(ws, run.id, actor="me")          # doctest: +SKIP
>>> ic.export_workspace(ws, "out")                           # doctest: +SKIP
"""

from imgcluster import labels
from imgcluster.backbones import DEFAULT_BACKBONE, get_backbone, list_backbones
from imgcluster.clustering import ClusterRun, cluster, find_run, load_run, suggest_k
from imgcluster.errors import ImgclusterError
from imgcluster.export import export_workspace, plan_workspace_export, zip_export
from imgcluster.features import ExtractReport, extract, load_extractor, load_features
from imgcluster.images import IngestReport, ingest, open_rgb
from imgcluster.projection import get_projection, start_background_projection
from imgcluster.workspace import Workspace

__all__ = [
    "DEFAULT_BACKBONE",
    "ClusterRun",
    "ExtractReport",
    "ImgclusterError",
    "IngestReport",
    "Workspace",
    "cluster",
    "export_workspace",
    "extract",
    "find_run",
    "get_backbone",
    "get_projection",
    "ingest",
    "labels",
    "list_backbones",
    "load_extractor",
    "load_features",
    "load_run",
    "open_rgb",
    "plan_workspace_export",
    "start_background_projection",
    "suggest_k",
    "zip_export",
]
