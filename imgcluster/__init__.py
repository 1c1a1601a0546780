"""imgcluster: cluster product photos by CNN features and label the clusters into a dataset.

The library owns every step; the CLI and the Streamlit app are thin shells over it.
TensorFlow is imported lazily, so ``import imgcluster`` stays fast.
"""

from imgcluster.errors import ImgclusterError
from imgcluster.images import IngestReport, ingest, open_rgb
from imgcluster.workspace import Workspace

__all__ = ["ImgclusterError", "IngestReport", "Workspace", "ingest", "open_rgb"]
