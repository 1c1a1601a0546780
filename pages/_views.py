"""Label views shared by the Clusters and Label pages: the k-to-labels step, the label table,
the map, the size chart, the move form and undo/redo.

Every change goes through one `imgcluster.labels` call inside a widget callback, so it runs
before the page is drawn: the page then shows the new state, and a failed call (a name taken, a
view gone stale because someone else changed the labels) is shown as a message, never a
half-applied change. Callbacks report through `_common.flash`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError, NoLabelSession
from imgcluster.workspace import Workspace
from pages import _common as common

K_MAX = 200
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
    """Who acts, for undo stacks and the audit log (the sidebar's name box)."""
    return (st.session_state.get("who") or "").strip() or "annotator"


# -- from k to labels -------------------------------------------------------------------------


@st.cache_data(max_entries=32, show_spinner=False)
def _session_info(path: str, revision: int) -> tuple[Any, int | None, int]:
    """(session, its run's k, number of edits still in effect) or (None, None, 0)."""
    from imgcluster.clustering import load_run

    ws = common.workspace(path)
    session = lb.active_session(ws)
    if session is None:
        return None, None, 0
    run = load_run(ws, session.run_id)
    entries = lb.history(ws, limit=500)
    edits = sum(1 for e in entries if e.kind == "do" and e.status == "done")
    return session, run.k, edits


def session_info(ws: Workspace) -> tuple[Any, int | None, int]:
    return _session_info(*common.ws_key(ws))


def default_k(ws: Workspace, backbone: str, k_max: int) -> int:
    """The session's k, else a middle-of-the-road 8 (the suggestion curve is one click away)."""
    session, k, _edits = session_info(ws)
    if session is not None and session.backbone == backbone and k:
        return min(k, k_max)
    return min(8, k_max)


def _start_from_k(ws: Workspace, backbone: str, k: int, *, replace: bool) -> None:
    from imgcluster.clustering import cluster

    bar = common.ProgressBar(f"Clustering into {k}", unit="steps")
    run = cluster(ws, backbone, k, progress=bar)
    bar.bar.empty()
    lb.start_session(ws, run.id, actor=actor(), replace=replace)


def ensure_labels(ws: Workspace, backbone: str, k: int) -> None:
    """Make the labels follow the k control, without ever dropping an annotator's work.

    No labels yet, or labels nobody has edited: cluster with k (a stored run comes back
    instantly) and start labeling from it. Labels with edits: ask first, and offer to add
    clusters among the unconfirmed images instead of starting over.
    """
    session, session_k, edits = session_info(ws)
    if session is None:
        _start_from_k(ws, backbone, k, replace=False)
        return
    if session.backbone == backbone and session_k == k:
        return
    if edits == 0:
        _start_from_k(ws, backbone, k, replace=True)
        return
    with st.container(border=True):
        st.warning(
            f"The labels come from k = {session_k} ({session.backbone}) and have {edits} "
            f"edit(s). Starting over with k = {k} replaces them (the current session and its "
            "history stay in the workspace).",
            icon=":material/warning:",
        )
        cols = st.columns(3)
        cols[0].button(
            f"Start over with k = {k}",
            key="clusters_restart",
            type="primary",
            on_click=_callback(_restart, ws, backbone, k),
        )
        if session.backbone == backbone and session_k and k > session_k:
            cols[1].button(
                f"Add {k - session_k} clusters from unconfirmed images",
                key="clusters_add",
                on_click=_callback(_add_clusters, ws, k - session_k),
            )
        cols[2].button(
            f"Keep my labels (k = {session_k})",
            key="clusters_keep",
            on_click=_set_k,
            args=(session_k,),
        )


def _restart(ws: Workspace, backbone: str, k: int) -> str:
    from imgcluster.clustering import cluster

    run = cluster(ws, backbone, k)
    lb.start_session(ws, run.id, actor=actor(), replace=True)
    return f"Started over from k = {k}"


def _add_clusters(ws: Workspace, n_new: int) -> str:
    return lb.recluster_unconfirmed(ws, n_new, actor=actor()).summary


def suggest_new(ws: Workspace) -> str:
    suggestions = lb.suggest_for_new_images(ws, actor=actor())
    return f"{len(suggestions):,} new images labeled by their neighbours (not confirmed)"


def _set_k(k: int | None) -> None:
    if k:
        for key in ("k", "k_slider", "k_input"):
            st.session_state[f"{common.VIEW_PREFIX}{key}"] = k


# -- label table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTable:
    """The active session's labels and which label each image has (for the map and charts)."""

    summaries: list[lb.LabelSummary]
    image_ids: np.ndarray  # int64
    label_ids: np.ndarray  # int64, aligned with image_ids
    relpaths: list[str]
    version: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.summaries]

    def name_of(self) -> dict[int, str]:
        return {s.id: s.name for s in self.summaries}


@st.cache_data(max_entries=16, show_spinner=False)
def _label_table(path: str, revision: int) -> LabelTable | None:
    ws = common.workspace(path)
    try:
        summaries = lb.list_labels(ws)
        rows = lb.current_labels(ws)
        session = lb.active_session(ws)
    except NoLabelSession:
        return None
    by_name = {s.name: s.id for s in summaries}
    return LabelTable(
        summaries=summaries,
        image_ids=np.array([r.image_id for r in rows], dtype=np.int64),
        label_ids=np.array([by_name.get(r.label, -1) for r in rows], dtype=np.int64),
        relpaths=[r.relpath for r in rows],
        version=session.version if session else 0,
    )


def label_table(ws: Workspace) -> LabelTable | None:
    return _label_table(*common.ws_key(ws))


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
    cols = st.columns([1] if compact else [2, 2, 1], vertical_alignment="bottom")
    target_col, name_col, go_col = (cols[0], cols[0], cols[0]) if compact else cols
    target = target_col.selectbox(
        "Move to label",
        options,
        key=f"{key}_target",
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
        on_click=_callback(_move, ws, list(ids), f"{key}_target", f"{key}_new", shown, after),
    )


# -- figures ----------------------------------------------------------------------------------


def suggestion_figure(curve):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=curve.ks, y=curve.silhouette, mode="lines+markers", name="silhouette")
    )
    for k in curve.best[:1]:
        fig.add_vline(x=k, line_dash="dot", line_color="#2563eb")
    fig.update_layout(
        height=260,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="k",
        yaxis_title="silhouette",
        showlegend=False,
    )
    return fig


def sizes_figure(table: LabelTable):
    import plotly.graph_objects as go

    summaries = sorted(table.summaries, key=lambda s: s.count)
    fig = go.Figure(
        go.Bar(
            x=[s.count for s in summaries],
            y=[common.plot_text(s.name) for s in summaries],
            orientation="h",
            marker_color=[color(s.id) for s in summaries],
            hovertemplate="%{y}: %{x} images<extra></extra>",
        )
    )
    fig.update_layout(
        height=max(260, 22 * len(summaries) + 60),
        margin=dict(l=10, r=10, t=30, b=10),
        title="Images per label",
        xaxis_title=None,
        yaxis=dict(automargin=True),
    )
    return fig


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


def scatter(ws: Workspace, backbone: str, table: LabelTable, n_features: int) -> list[int]:
    """The map coloured by label; returns the image ids of the current box/lasso selection."""
    import plotly.graph_objects as go

    proj = map_coordinates(ws, backbone, n_features)
    if proj.method != "umap" and common.umap_enabled():
        umap_notice(ws, backbone)
    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    names = table.name_of()
    relpath_of = common.image_rows_by_id(*common.ws_key(ws))
    rows_shown = _map_sample(len(proj.image_ids))
    groups: dict[int, list[int]] = {}
    for row in rows_shown.tolist():
        groups.setdefault(label_of.get(int(proj.image_ids[row]), -1), []).append(row)
    fig = go.Figure()
    trace_ids: list[list[int]] = []
    for label_id in sorted(groups, key=lambda lid: (lid < 0, names.get(lid, "").lower())):
        rows = groups[label_id]
        ids = proj.image_ids[rows].tolist()
        name = names.get(label_id, "(no label)")
        fig.add_trace(
            go.Scattergl(
                x=proj.coords[rows, 0],
                y=proj.coords[rows, 1],
                mode="markers",
                name=common.plot_text(name),
                marker=dict(
                    size=7, color=color(label_id) if label_id >= 0 else "#bbbbbb", opacity=0.85
                ),
                # User text only ever goes in as data, escaped; never into the template.
                # The label is the trace's name, so each point carries only its file name.
                customdata=[common.plot_text(relpath_of.get(i, ("?",))[0]) for i in ids],
                hovertemplate="%{customdata}<br><b>%{fullData.name}</b><extra></extra>",
            )
        )
        trace_ids.append(ids)
    fig.update_layout(
        height=620,
        margin=dict(l=10, r=10, t=30, b=10),
        dragmode="select",
        uirevision=f"{ws.path}:{backbone}:{proj.method}",  # keep zoom when colours change
        legend=dict(itemsizing="constant"),
        title=f"{proj.method.upper()} map of {len(proj.image_ids):,} images"
        + (
            f" (a sample of {len(rows_shown):,} shown)"
            if len(rows_shown) < len(proj.image_ids)
            else ""
        ),
        xaxis=dict(showticklabels=False, showgrid=False, zeroline=False, title=None),
        yaxis=dict(showticklabels=False, showgrid=False, zeroline=False, title=None),
    )
    nonce = st.session_state.get(f"{common.VIEW_PREFIX}scatter_nonce", 0)
    event = st.plotly_chart(
        fig,
        key=f"{common.VIEW_PREFIX}scatter_{nonce}",
        on_select="rerun",
        selection_mode=("box", "lasso"),
        config={"displaylogo": False, "modeBarButtonsToRemove": ["toImage"]},
    )
    return _selected_ids(event, trace_ids)


def _map_sample(n: int) -> np.ndarray:
    """Rows drawn on the map: all of them up to `MAP_MAX_POINTS`, else a fixed random sample
    (the same on every rerun, so a selection keeps its meaning). Each point costs ~40 bytes
    sent to the browser on every rerun of the page."""
    if n <= MAP_MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAP_MAX_POINTS, replace=False))


def _selected_ids(event: Any, trace_ids: list[list[int]]) -> list[int]:
    """Image ids of the selected points, mapped by (trace, index) so no text is trusted."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    chosen: list[int] = []
    for point in points:
        curve = point.get("curve_number")
        index = point.get("point_index", point.get("point_number"))
        if curve is None or index is None or not 0 <= curve < len(trace_ids):
            continue
        ids = trace_ids[curve]
        if 0 <= index < len(ids):
            chosen.append(ids[index])
    return list(dict.fromkeys(chosen))


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


@st.cache_data(max_entries=8, show_spinner=False)
def k_suggestion(path: str, backbone: str, n_features: int):
    """The silhouette curve over k (keyed on the feature count: labels do not change it)."""
    from imgcluster.clustering import suggest_k

    return suggest_k(common.workspace(path), 2, 30, backbone=backbone)
