"""Export the labels as a folder tree a trainer reads directly: ``OUT/<label>/<file>``.

The layout is what ``keras.utils.image_dataset_from_directory`` and torchvision's
``ImageFolder`` expect: one folder per class, image files only inside class folders, nothing
nested deeper. With a split, each split is such a tree: ``OUT/train/<label>/``,
``OUT/val/<label>/`` (and ``OUT/test/<label>/``). ``manifest.csv`` (one row per exported file),
``left_out.csv`` (images left out because of their file), ``labels.json`` (label names,
folders, counts, provenance) and the marker ``.imgcluster-export`` sit at OUT's root, where
both loaders ignore plain files. In a split export every label has its folder in every split,
even when a small label left one empty, so classes get the same indices in train and val.

The export writes only what it verified and only what trainers decode: every source is
re-hashed as it is copied and refused (left out, with the reason) unless it is still the
ingested content; files are new 0644 files whatever the source's mode; formats keras cannot
read are re-encoded as PNG under a matching extension (`imgcluster.export.formats`).

An export is built in a temporary folder beside OUT and renamed into place only once
complete (`imgcluster.export.staging`); source images are only ever read.

Modules, one concern each: `names` (portable folder and file names), `formats` (what is
written, re-encoding), `plan` (items, split, file names: pure), `files` (one verified file),
`staging` (lock, build folder, swap, recovery), `tree` (`export_items`), `workspace_export`
(the workspace's labels: `plan_workspace_export`, `export_workspace`, `export_warnings`),
`archive` (`zip_export`).
"""

from __future__ import annotations

from imgcluster.export.archive import zip_export
from imgcluster.export.files import FILE_MODE, ExportWriteError
from imgcluster.export.formats import FORMAT_CHOICES, FORMATS, KERAS_EXTENSIONS
from imgcluster.export.names import (
    MAX_FILE_BYTES,
    MAX_FOLDER_BYTES,
    assign_folders,
    safe_file_name,
    safe_folder_name,
)
from imgcluster.export.plan import (
    LABELS_NAME,
    LEFT_OUT_NAME,
    MANIFEST_NAME,
    SPLIT_NAMES,
    ExportItem,
    PlannedFile,
    parse_split,
    plan_export,
    split_items,
)
from imgcluster.export.staging import EXPORT_MARKER, is_export
from imgcluster.export.tree import (
    LEFT_OUT_COLUMNS,
    MANIFEST_COLUMNS,
    MODES,
    ExportResult,
    LeftOut,
    Progress,
    export_items,
    read_left_out,
    read_manifest,
)
from imgcluster.export.workspace_export import (
    MIN_IMAGES_PER_LABEL,
    ExportWarning,
    WorkspaceExportPlan,
    export_warnings,
    export_workspace,
    plan_workspace_export,
)

#: Kept for callers of earlier versions: extensions keras' directory loader lists.
KERAS_FORMATS = KERAS_EXTENSIONS

__all__ = [
    "EXPORT_MARKER",
    "FILE_MODE",
    "FORMATS",
    "FORMAT_CHOICES",
    "KERAS_FORMATS",
    "LABELS_NAME",
    "LEFT_OUT_COLUMNS",
    "LEFT_OUT_NAME",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "MAX_FILE_BYTES",
    "MAX_FOLDER_BYTES",
    "MIN_IMAGES_PER_LABEL",
    "MODES",
    "SPLIT_NAMES",
    "ExportItem",
    "ExportResult",
    "ExportWarning",
    "ExportWriteError",
    "LeftOut",
    "PlannedFile",
    "Progress",
    "WorkspaceExportPlan",
    "assign_folders",
    "export_items",
    "export_warnings",
    "export_workspace",
    "is_export",
    "parse_split",
    "plan_export",
    "plan_workspace_export",
    "read_left_out",
    "read_manifest",
    "safe_file_name",
    "safe_folder_name",
    "split_items",
    "zip_export",
]
