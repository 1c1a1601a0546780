"""Label views shared by the Clusters and Label pages: the label table, the map's coordinates,
the move form, undo/redo and the annotator's name.

Every change goes through one `imgcluster.labels` call inside a widget callback, so it runs
before the page is drawn: the page then shows the new state, and a failed call (a name taken, a
view gone stale because someone else changed the labels) is shown as a message, never a
half-applied change. Callbacks report through `common.flash`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError, NoLabelSession
from imgcluster.metrics import find_sorted
from imgcluster.workspace import Workspace
from imgcluster_app import common

SELECTION_PREVIEW = 24
MAP_MAX_POINTS = 40_000
#: The "new label" entry of a move menu: not a string, so no label name can collide with it.
NEW_LABEL = None
NEW_LABEL_TEXT = "+ New label…"

# Qualitative colours that stay distinct on white; labels keep their colour by id, so a rename
# or a move does not repaint the map.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#3182bd",
    "#fd8d3c",
    "#74c476",
    "#9e9ac8",
    "#969696",
    "#6baed6",
    "#fdae6b",
    "#a1d99b",
    "#bcbddc",
)


def color(label_id: int) -> str:
    return PALETTE[label_id % len(PALETTE)]


def actor() -> str:
    """Who acts, for undo stacks and the audit log: the sidebar's name box, else a name of this
    browser session's own (issue 14 §9: two tabs without a name never undo each other)."""
    return (st.session_state.get("who") or "").strip() or common.session_actor()


# -- from k to labels -------------------------------------------------------------------------


@st.cache_data(max_entries=32, show_spinner=False)
def _session_info(path: str, revision: int) -> tuple[Any, int | None, int]:
    """(session, its run's k, number of edits still in effect) or (None, None, 0)."""
    from imgcluster.clustering import load_run

    ws = common.workspace(path)
    session = lb.active_session(ws)
    if session is None:
        return None, None, 0
    return session, load_run(ws, session.run_id).k, session.n_edits


def session_info(ws: Workspace) -> tuple[Any, int | None, int]:
    return _session_info(*common.ws_key(ws))


def suggest_new(ws: Workspace) -> str:
    suggestions = lb.suggest_for_new_images(ws, actor=actor())
    return f"{len(suggestions):,} new images labeled by their neighbours (not confirmed)"


# -- label table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTable:
    """The active session's labels and which label each image has (for the map and charts)."""

    summaries: list[lb.LabelSummary]
    image_ids: np.ndarray  # int64
    label_ids: np.ndarray  # int64, aligned with image_ids
    version: int
    #: Names of the labels that hold no image (hidden from lists; see `delete_empty_labels`).
    empty: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.summaries]

    def name_of(self) -> dict[int, str]:
        return {s.id: s.name for s in self.summaries}

    @cached_property
    def _by_image(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.image_ids, kind="stable")
        return self.image_ids[order], self.label_ids[order]

    def labels_of(self, image_ids: np.ndarray) -> np.ndarray:
        """The label id of each image (-1: none); one sorted lookup in numpy (a dict per image
        cost ~1 s at 1M images)."""
        ids, labels = self._by_image
        pos, found = find_sorted(ids, image_ids)
        out = np.full(len(found), -1, dtype=np.int64)
        out[found] = labels[pos]
        return out


@st.cache_resource(max_entries=6, show_spinner=False)
def _label_table(path: str, revision: int) -> LabelTable | None:
    # A shared resource, not a copy per call (a page asks for it several times a rerun):
    # nobody mutates a LabelTable. Few entries: an old revision's table is never asked again
    # by a page that is up to date, and one is large on a big workspace.
    from imgcluster.labels.queries import label_arrays

    ws = common.workspace(path)
    try:
        every = lb.list_labels(ws, include_empty=True)
        image_ids, label_ids = label_arrays(ws)
        session = lb.active_session(ws)
    except NoLabelSession:
        return None
    return LabelTable(
        summaries=[s for s in every if s.count],
        image_ids=image_ids,
        label_ids=label_ids,
        version=session.version if session else 0,
        empty=[s.name for s in every if not s.count],
    )


def label_table(ws: Workspace) -> LabelTable | None:
    return _label_table(*common.ws_key(ws))


# -- suggested names (issue 13 §5) ----------------------------------------------------------


def suggested_names(ws: Workspace, backbone: str) -> dict[int, str]:
    """Label id -> a name from its images' top ImageNet classes ("sandal / clog"); empty when
    the vectors came without class probabilities. One computation per revision for every
    label, shared by the Clusters strips and the Label page."""
    return _suggested_names(*common.ws_key(ws), backbone)


@st.cache_data(max_entries=8, show_spinner=False)
def _suggested_names(path: str, revision: int, backbone: str) -> dict[int, str]:
    from imgcluster import spaces
    from imgcluster.features import suggest_names

    ws = common.workspace(path)
    table = _label_table(path, revision)
    if table is None or not len(table.label_ids):
        return {}
    try:
        top = _top_classes(path, backbone, spaces.feature_state(ws, backbone)[1])
        if not len(top[0]):
            return {}
        order = np.argsort(table.label_ids, kind="stable")
        labels, starts = np.unique(table.label_ids[order], return_index=True)
        groups = {
            int(label): table.image_ids[rows]
            for label, rows in zip(labels, np.split(order, starts[1:]), strict=True)
        }
        return suggest_names(ws, backbone, groups, top=top)
    except ImgclusterError:
        return {}


@st.cache_resource(max_entries=4, show_spinner=False)
def _top_classes(path: str, backbone: str, feature_set_id: str) -> tuple[Any, Any]:
    """The feature set's stored top classes, read once per feature set (a k change or a move
    regroups them without reading every feature row again); read-only for callers."""
    from imgcluster.features import feature_top_classes

    return feature_top_classes(common.workspace(path), backbone)


# -- actions ----------------------------------------------------------------------------------


def _callback(fn: Callable[..., str | None], *args: Any, **kwargs: Any) -> Callable[[], None]:
    """A widget callback running one library operation and reporting its outcome."""

    def run() -> None:
        try:
            message = fn(*args, **kwargs)
        except ImgclusterError as exc:
            common.flash_error(str(exc))
            return
        if message:
            common.flash(message)

    return run


def callback(fn: Callable[..., str | None], *args: Any, **kwargs: Any) -> Callable[[], None]:
    return _callback(fn, *args, **kwargs)


def history_bar(ws: Workspace, key: str) -> None:
    """Undo / Redo (this annotator's own steps) and the last step."""
    cols = st.columns([1, 1, 6], vertical_alignment="center")
    cols[0].button(
        "Undo",
        key=f"{key}_undo",
        icon=":material/undo:",
        on_click=_callback(lambda: lb.undo(ws, actor=actor()).summary),
    )
    cols[1].button(
        "Redo",
        key=f"{key}_redo",
        icon=":material/redo:",
        on_click=_callback(lambda: lb.redo(ws, actor=actor()).summary),
    )
    try:
        last = lb.history(ws, limit=1)
    except NoLabelSession:
        last = []
    if last:
        step = last[0]
        cols[2].caption(
            f"Last step: {common.md_escape(step.summary)} ({common.md_escape(step.actor)})"
        )


def _move(
    ws: Workspace,
    ids: Sequence[int],
    target_key: str,
    new_key: str,
    shown: dict[int, int] | None,
    after: Callable[[], None] | None,
) -> str:
    target = st.session_state.get(target_key)
    if target is NEW_LABEL:
        target = (st.session_state.get(new_key) or "").strip()
        if not target:
            raise lb.InvalidLabelName("type a name for the new label")
        lb.validate_name(target)
    result = lb.move(ws, list(ids), target, actor=actor(), expected=shown or None)
    if after is not None:
        after()
    return result.summary


def move_form(
    ws: Workspace,
    ids: Sequence[int],
    label_names: Sequence[str],
    *,
    key: str,
    shown: dict[int, int] | None = None,
    after: Callable[[], None] | None = None,
    compact: bool = False,
) -> None:
    """Move ``ids`` to an existing label or a new one.

    ``shown`` maps each image to the label id it was shown in; if any of them changed label
    meanwhile (another annotator), nothing moves and the page says so.
    """
    options = [NEW_LABEL, *label_names]
    target_key = common.choice_key(f"{key}_target", label_names)
    cols = st.columns([1] if compact else [2, 2, 1], vertical_alignment="bottom")
    target_col, name_col, go_col = (cols[0], cols[0], cols[0]) if compact else cols
    target = target_col.selectbox(
        "Move to label",
        options,
        key=target_key,
        format_func=lambda o: NEW_LABEL_TEXT if o is NEW_LABEL else o,
    )
    if target is NEW_LABEL:
        name_col.text_input("New label name", key=f"{key}_new", max_chars=lb.MAX_NAME_LENGTH)
    go_col.button(
        f"Move {len(ids):,} image{'s' if len(ids) != 1 else ''}",
        key=f"{key}_go",
        type="primary",
        icon=":material/drive_file_move:",
        disabled=not ids,
        on_click=_callback(_move, ws, list(ids), target_key, f"{key}_new", shown, after),
    )


# -- figures ----------------------------------------------------------------------------------


@st.cache_data(max_entries=8, show_spinner=False)
def _projection(path: str, backbone: str, n_features: int, want_umap: bool):
    from imgcluster.projection import get_projection

    return get_projection(common.workspace(path), backbone)


def map_coordinates(ws: Workspace, backbone: str, n_features: int):
    """The map shown in this tab. It stays the same until the user asks for the UMAP map, so
    points never jump under a selection being drawn."""
    key = f"{common.VIEW_PREFIX}map_umap_seen"
    proj = _projection(str(ws.path), backbone, n_features, st.session_state.get(key, False))
    if proj.ready:
        st.session_state[key] = True
    return proj


def _umap_status(ws: Workspace, backbone: str) -> str:
    from imgcluster.projection import projection_status

    return projection_status(ws, backbone)


def umap_notice(ws: Workspace, backbone: str) -> None:
    """While the map is PCA, say that UMAP is on its way and offer it once it is stored."""

    @st.fragment(run_every=5)
    def poll() -> None:
        status = _umap_status(ws, backbone)
        if status == "ready":
            st.button(
                "The UMAP map is ready: show it",
                key="clusters_show_umap",
                icon=":material/refresh:",
                on_click=lambda: st.session_state.__setitem__(
                    f"{common.VIEW_PREFIX}map_umap_seen", True
                ),
            )
        elif status.startswith("failed"):
            st.caption(f"UMAP failed; showing PCA. {common.md_escape(status)}")
        else:
            st.caption("Showing a quick PCA map; the UMAP map is being computed...")

    poll()


def clear_map_selection() -> None:
    """A fresh chart key drops the plot's selection after its images were moved."""
    key = f"{common.VIEW_PREFIX}scatter_nonce"
    st.session_state[key] = st.session_state.get(key, 0) + 1


def neighbours(ws: Workspace, image_id: int, limit: int = 12) -> list[lb.Neighbour]:
    """The images most similar to one image, with their labels (empty without features)."""
    try:
        return lb.nearest_neighbours(ws, image_id, limit=limit)
    except ImgclusterError:  # the image or the session went away meanwhile
        return []
