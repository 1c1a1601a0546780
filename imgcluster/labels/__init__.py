"""Annotation state: clusters become editable labels, and no decision a person made is lost.

A *labeling session* starts from one clustering run: cluster ``c`` becomes the label
``cluster_0c`` and every clustered image gets that label, unconfirmed. People then rename,
merge, split, move, exclude, mark unsure, confirm and delete; each operation is one
transaction, audited, and undoable (`imgcluster.labels.audit`).

The package, by concern:

* `imgcluster.labels.names`: the normal form of names, validation, comparison;
* `imgcluster.labels.sessions`: starting a session, and `follow_k` (the app's k control);
* `imgcluster.labels.ops`: the operations on labels and images;
* `imgcluster.labels.audit`: the audit log, undo/redo, stale-state checks;
* `imgcluster.labels.queries`: read-only queries (labels, pages, misfits, progress);
* `imgcluster.labels.geometry`: typicality and misfits (held in process, not in SQLite: its
  docstring says why) and the package's caches;
* `imgcluster.labels.gather`: gathering strays from other labels into one.

Tables owned here (no other module reads or writes them with its own SQL): ``label_sessions``,
``labels``, ``image_labels`` and ``audit_log`` (the former ``label_geometry`` table is
dropped by a migration: geometry is derived in process). The package reads other
owners' tables through their readers (`imgcluster.clustering.run_info` / ``latest_run`` /
``run_assignments``, `imgcluster.workspace.read_collection_root`,
`imgcluster.features.feature_set_id`) and joins ``images`` for paths and status.

A label is named by its id (an ``int``) or its name (a ``str``): a string is always a name.
The maths (distances, silhouettes, kNN votes) lives in `imgcluster.metrics`.

Examples
--------
On a workspace where ``sample_data/images`` was ingested, extracted and clustered:

>>> from imgcluster import labels                                     # doctest: +SKIP
>>> labels.start_session(ws, actor="ana")                             # doctest: +SKIP
1
>>> labels.rename(ws, "cluster_03", "sneakers 👟", actor="ana").summary  # doctest: +SKIP
"rename 'cluster_03' to 'sneakers 👟'"
>>> labels.move(ws, ["fmnist_00012.png"], "sandals", actor="ana")     # doctest: +SKIP
>>> labels.undo(ws, actor="ana").summary                              # doctest: +SKIP
"undo move 1 image to 'sandals' (new label)"
"""

from imgcluster.errors import (
    ImgclusterError,
    InvalidLabelName,
    NoLabelSession,
    NothingToUndo,
    StaleState,
    UnknownCluster,
    UnknownImage,
    UnknownLabel,
)
from imgcluster.labels.audit import history, redo, undo
from imgcluster.labels.gather import accept_gathered, gather
from imgcluster.labels.geometry import MISFIT_MIN_LABEL_SIZE, label_geometry, refresh_geometry
from imgcluster.labels.names import (
    MAX_NAME_LENGTH,
    clean_actor,
    forbidden_character,
    looks_like_id,
    name_key,
    normal_form,
    validate_name,
)
from imgcluster.labels.ops import (
    STATES,
    confirm,
    confirm_images,
    delete_empty_labels,
    delete_label,
    merge,
    move,
    recluster_unconfirmed,
    rename,
    set_state,
    split,
    suggest_for_new_images,
)
from imgcluster.labels.queries import (
    ORDERS,
    active_session,
    current_labels,
    label_by_id,
    label_by_name,
    label_images,
    label_state_counts,
    labeled_hashes,
    list_labels,
    misplaced,
    nearest_neighbours,
    next_label_to_review,
    page_sql,
    progress,
    unusable_labels,
)
from imgcluster.labels.results import (
    Applied,
    ExportRow,
    Following,
    HistoryEntry,
    LabeledImage,
    LabelSummary,
    Neighbour,
    Progress,
    Session,
    Stray,
    Suggestion,
)
from imgcluster.labels.sessions import follow_k, start_session

__all__ = [
    "MAX_NAME_LENGTH",
    "MISFIT_MIN_LABEL_SIZE",
    "ORDERS",
    "STATES",
    "Applied",
    "ExportRow",
    "Following",
    "HistoryEntry",
    "ImgclusterError",
    "InvalidLabelName",
    "LabelSummary",
    "LabeledImage",
    "Neighbour",
    "NoLabelSession",
    "NothingToUndo",
    "Progress",
    "Session",
    "StaleState",
    "Stray",
    "Suggestion",
    "UnknownCluster",
    "UnknownImage",
    "UnknownLabel",
    "accept_gathered",
    "active_session",
    "clean_actor",
    "confirm",
    "confirm_images",
    "current_labels",
    "delete_empty_labels",
    "delete_label",
    "follow_k",
    "forbidden_character",
    "gather",
    "history",
    "label_by_id",
    "label_by_name",
    "label_geometry",
    "label_images",
    "label_state_counts",
    "labeled_hashes",
    "list_labels",
    "looks_like_id",
    "merge",
    "misplaced",
    "move",
    "name_key",
    "nearest_neighbours",
    "next_label_to_review",
    "normal_form",
    "page_sql",
    "progress",
    "recluster_unconfirmed",
    "redo",
    "refresh_geometry",
    "rename",
    "set_state",
    "split",
    "start_session",
    "suggest_for_new_images",
    "undo",
    "unusable_labels",
    "validate_name",
]
