"""Clusters page: choose k, read every cluster at a glance (a strip of its most typical photos),
see every image on a map coloured by label, select on the map and move the selection.

The labels follow the k control only while nobody has edited them. Once they carry decisions, a
k change asks first, offers to add clusters among the unconfirmed images instead, and the
destructive "start over" needs a second click that names what it discards.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace
from imgcluster_app import common, router, views

router.enter()

K_KEY = f"{common.VIEW_PREFIX}k"
#: The k the user asked for with the controls and that the labels do not follow yet (set only
#: by a user's change of the control, cleared when the labels were made to follow or kept).
PENDING_KEY = f"{common.VIEW_PREFIX}k_pending"
CONFIRM_KEY = f"{common.VIEW_PREFIX}k_confirm_restart"
SORT_KEY = f"{common.VIEW_PREFIX}strip_sort"
STRIP_PAGE_KEY = f"{common.VIEW_PREFIX}strip_page"
K_CEILING = 200
STRIP_LEN = 10
STRIPS_PER_PAGE = 24
STRIP_CELL = 128
#: Marker symbols cycled with the palette, so label 25 is not label 1's twin (WebGL-safe set).
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star")
SORTS = {"size": "Size", "name": "Name", "misfits": "Misfits"}
#: The names labeling starts with: a label still called so was never named by anyone.
AUTO_NAME = re.compile(r"cluster_\d+")


# -- the k control ----------------------------------------------------------------------------


def k_range_max(n: int) -> int:
    """Largest k offered: half the images (beyond that clusters are pairs), at most 200, so
    the slider stays usable at small k."""
    return max(2, min(K_CEILING, n // 2))


def _sync_k(source: str) -> None:
    """The slider and the number box show one k; whichever was moved sets it (a user's ask)."""
    value = int(st.session_state[source])
    st.session_state[K_KEY] = value
    st.session_state[PENDING_KEY] = value
    st.session_state.pop(CONFIRM_KEY, None)
    for key in (f"{K_KEY}_slider", f"{K_KEY}_input"):
        if key != source:
            st.session_state[key] = value


def set_k(k: int) -> None:
    """Show ``k`` in the controls without asking the labels to change."""
    for key in (K_KEY, f"{K_KEY}_slider", f"{K_KEY}_input"):
        st.session_state[key] = k
    st.session_state.pop(PENDING_KEY, None)
    st.session_state.pop(CONFIRM_KEY, None)


def k_controls(k_max: int, default: int) -> int:
    k = max(2, min(int(st.session_state.get(K_KEY, default)), k_max))
    for key in (K_KEY, f"{K_KEY}_slider", f"{K_KEY}_input"):
        if st.session_state.get(key) != k:
            st.session_state[key] = k
    left, right = st.columns([1, 4], vertical_alignment="bottom")
    left.number_input(
        "k",
        2,
        k_max,
        step=1,
        key=f"{K_KEY}_input",
        on_change=_sync_k,
        args=(f"{K_KEY}_input",),
    )
    right.slider(
        "Number of clusters (k)",
        2,
        k_max,
        key=f"{K_KEY}_slider",
        on_change=_sync_k,
        args=(f"{K_KEY}_slider",),
    )
    return k


# -- labels that follow k, without dropping anyone's work -------------------------------------


def labels_state(ws: Workspace) -> tuple[Any, int | None, int, list[lb.LabelSummary]]:
    """(session, its run's k, edits in effect, live labels), or (None, None, 0, [])."""
    session, run_k, edits = views.session_info(ws)
    table = views.label_table(ws) if session is not None else None
    return session, run_k, edits, (table.summaries if table else [])


def default_k(ws: Workspace, k_max: int) -> int:
    """What the control shows on arrival: the number of labels there are (so an arrival never
    reads as a request to change them), else a middle-of-the-road 8."""
    session, run_k, _edits, summaries = labels_state(ws)
    if session is not None:
        return min(max(2, len(summaries) or run_k or 8), k_max)
    return min(8, k_max)


def _start(ws: Workspace, backbone: str, k: int, *, replace: bool) -> None:
    from imgcluster.clustering import cluster

    bar = common.ProgressBar(f"Clustering into {k}", unit="steps")
    run = cluster(ws, backbone, k, progress=bar)
    bar.bar.empty()
    lb.start_session(ws, run.id, actor=views.actor(), replace=replace)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def what_is_lost(edits: int, summaries: Sequence[lb.LabelSummary]) -> str:
    """The work a start-over discards, in the annotator's terms ("31 labels (4 named by hand),
    412 image decisions and 57 edits")."""
    decided = sum(getattr(s, "reviewed", s.confirmed + s.excluded + s.unsure) for s in summaries)
    named = sum(1 for s in summaries if not AUTO_NAME.fullmatch(s.name))
    parts = [f"{_plural(len(summaries), 'label')} ({named} named by hand)"]
    if decided:
        parts.append(_plural(decided, "image decision"))
    parts.append(_plural(edits, "edit"))
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _restart(ws: Workspace, backbone: str, k: int) -> str:
    from imgcluster.clustering import cluster

    run = cluster(ws, backbone, k)  # (a callback: no progress bar, the page is not drawn yet)
    lb.start_session(ws, run.id, actor=views.actor(), replace=True)
    set_k(k)
    return f"Started over from k = {k}; the previous labels stay in the workspace's history"


def _add(ws: Workspace, n_new: int, k: int) -> str:
    summary = lb.recluster_unconfirmed(ws, n_new, actor=views.actor()).summary
    set_k(k)  # the labels now number k: nothing is pending any more (issue 12, bug 5)
    return summary


def follow_k(ws: Workspace, backbone: str, k: int) -> None:
    """Make the labels follow the k control; ask first once they carry edits."""
    session, _run_k, edits, summaries = labels_state(ws)
    if session is None:
        _start(ws, backbone, k, replace=False)
        st.session_state.pop(PENDING_KEY, None)
        return
    pending = st.session_state.get(PENDING_KEY)
    if pending is None or pending != k or (session.backbone == backbone and k == len(summaries)):
        st.session_state.pop(PENDING_KEY, None)
        return
    if edits == 0:
        _start(ws, backbone, k, replace=True)
        st.session_state.pop(PENDING_KEY, None)
        return
    restart_warning(ws, backbone, k, session, edits, summaries)


def restart_warning(
    ws: Workspace,
    backbone: str,
    k: int,
    session: Any,
    edits: int,
    summaries: Sequence[lb.LabelSummary],
) -> None:
    n_labels = len(summaries)
    lost = what_is_lost(edits, summaries)
    with st.container(border=True, key="clusters_k_warning"):
        st.warning(
            f"Your {n_labels} labels ({session.backbone}) carry {_plural(edits, 'edit')}. "
            f"Starting over with k = {k} would discard {lost}.",
            icon=":material/warning:",
        )
        cols = st.columns(3)
        if session.backbone == backbone and k > n_labels:
            cols[0].button(
                f"Add {k - n_labels} clusters from unconfirmed images",
                key="clusters_add",
                type="primary",
                icon=":material/add:",
                on_click=views.callback(_add, ws, k - n_labels, k),
            )
        cols[1].button(
            f"Keep my {n_labels} labels",
            key="clusters_keep",
            on_click=set_k,
            args=(max(2, n_labels),),
        )
        cols[2].button(
            f"Start over with k = {k}…",
            key="clusters_restart",
            icon=":material/restart_alt:",
            on_click=lambda: st.session_state.__setitem__(CONFIRM_KEY, k),
        )
        if st.session_state.get(CONFIRM_KEY) == k:
            st.error(f"Start over with k = {k}? This discards {lost}.", icon=":material/delete:")
            yes, no = st.columns(2)
            yes.button(
                f"Discard them and start over with k = {k}",
                key="clusters_restart_confirm",
                on_click=views.callback(_restart, ws, backbone, k),
            )
            no.button(
                "Cancel",
                key="clusters_restart_cancel",
                on_click=lambda: st.session_state.pop(CONFIRM_KEY, None),
            )


# -- the k-suggestion curve ---------------------------------------------------------------------


#: Beyond this many ks the curve skips the stability score (one clustering per k, not three).
STABLE_CURVE_MAX_K = 40


@st.cache_data(max_entries=8, show_spinner=False)
def k_curve(path: str, backbone: str, n_features: int, k_max: int, _progress: Any = None):
    """Silhouette for every k the control offers (keyed on the feature count: labels do not
    change it); ``_progress`` (not part of the key) draws the bar while it computes."""
    from imgcluster.clustering import suggest_k

    ws = common.workspace(path)
    seeds = {} if k_max <= STABLE_CURVE_MAX_K else {"n_seeds": 1}
    try:
        return suggest_k(ws, 2, k_max, backbone=backbone, progress=_progress, **seeds)
    except TypeError:  # a clustering module without n_seeds
        return suggest_k(ws, 2, k_max, backbone=backbone, progress=_progress)


def space_note(ws: Workspace, backbone: str) -> None:
    """Which space the clusters are computed in, and where the refined one stands (issue 13:
    it is made in the background; the page never waits for it). Reads no vectors."""
    try:
        from imgcluster import spaces

        status = spaces.space_status(ws, backbone)
    except (ImportError, AttributeError, ImgclusterError):
        return
    if status.state == "ready":
        st.caption("Clustering space: refined (UMAP, 10-d), computed once for these features.")
    elif status.state == "running":
        done = f" ({status.fraction:.0%})" if status.fraction is not None else ""
        st.caption(
            f"Clustering space: PCA for now; the refined space is being computed{done} and "
            "takes over when ready (your labels never change under you)."
        )
    elif status.state == "failed":
        st.caption(f"Refined space failed; clustering uses PCA. {common.md_escape(status.message)}")


def curve_figure(curve, k: int):
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(
            x=list(curve.ks),
            y=list(curve.silhouette),
            mode="lines+markers",
            marker=dict(size=4),
            hovertemplate="k = %{x}: silhouette %{y:.3f}<extra></extra>",
        )
    )
    for best in curve.best[:3]:
        fig.add_vline(x=best, line_dash="dot", line_color="#2563eb")
    fig.add_vline(x=k, line_color="#dc2626", line_width=1)
    fig.update_layout(
        height=220,
        margin=dict(l=10, r=10, t=24, b=10),
        title=dict(text="Silhouette by k (red: yours, dotted: best)", font=dict(size=13)),
        xaxis_title=None,
        yaxis_title=None,
        showlegend=False,
    )
    return fig


def suggestion_panel(ws: Workspace, backbone: str, n: int, k_max: int, k: int) -> None:
    flag = f"{common.VIEW_PREFIX}suggest"
    if not st.session_state.get(flag):
        st.caption(
            f"Which k? The silhouette curve over k = 2..{k_max} (higher = tighter, better "
            "separated clusters) is a hint; how many kinds of product you expect matters more."
        )
        st.button(
            "Compute the k curve",
            key="clusters_suggest",
            icon=":material/show_chart:",
            on_click=lambda: st.session_state.__setitem__(flag, True),
        )
        return
    with common.guard():
        bar = common.ProgressBar(f"Clustering for each k in 2..{k_max}", unit="k")
        curve = k_curve(str(ws.path), backbone, n, k_max, bar)
        bar.bar.empty()
        st.plotly_chart(
            curve_figure(curve, k), key="clusters_suggest_plot", config={"displayModeBar": False}
        )
        if curve.best:
            st.caption(f"Best by silhouette: k = {', '.join(map(str, curve.best))}")
            if advice := getattr(curve, "advice", ""):
                st.caption(common.md_escape(advice))  # says how confident the advice is
            best = [b for b in curve.best if b != k][:3]
            cols = st.columns(max(1, len(best)))
            for col, b in zip(cols, best, strict=False):
                col.button(f"Use k = {b}", key=f"clusters_use_{b}", on_click=_sync_best, args=(b,))


def _sync_best(k: int) -> None:
    st.session_state[f"{K_KEY}_input"] = k
    _sync_k(f"{K_KEY}_input")


# -- strips: every cluster at a glance --------------------------------------------------------


@st.cache_data(max_entries=16, show_spinner=False)
def strip_members(path: str, revision: int, label_ids: tuple[int, ...]) -> dict[int, list[str]]:
    """The thumbnails' content hashes of each label's most typical images (one indexed page
    query per label)."""
    ws = common.workspace(path)
    rows = common.image_rows_by_id(path, revision)
    out: dict[int, list[str]] = {}
    for label_id in label_ids:
        try:
            page = lb.label_images(ws, label_id, limit=STRIP_LEN, order="typicality")
        except ImgclusterError:  # deleted meanwhile
            continue
        out[label_id] = [rows[r.image_id][1] or "" for r in page if r.image_id in rows]
    return out


@st.cache_resource(max_entries=4096, show_spinner=False)
def strip_cell(path: str, sha: str):
    """One thumbnail letterboxed in a white square (a PIL image, kept in memory: a k change
    then costs only the pasting of strips, not the decoding of their photos)."""
    from PIL import Image, ImageOps

    thumb = common.thumbnail(common.workspace(path), sha)
    if thumb is None:
        return None
    with Image.open(thumb) as img:
        return ImageOps.pad(img.convert("RGB"), (STRIP_CELL, STRIP_CELL), color="white")


@st.cache_data(max_entries=1024, show_spinner=False)
def strip_image(path: str, shas: tuple[str, ...]) -> bytes:
    """One JPEG of a strip's thumbnails side by side in equal squares (one image per strip
    keeps the page light; cached by content, so a rename costs nothing)."""
    from PIL import Image

    gap = 4
    canvas = Image.new("RGB", (STRIP_LEN * (STRIP_CELL + gap) - gap, STRIP_CELL), "white")
    for i, sha in enumerate(shas):
        cell = strip_cell(path, sha)
        if cell is not None:
            canvas.paste(cell, (i * (STRIP_CELL + gap), 0))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def open_label(name: str) -> None:
    """Open a label on the Label page at its first page; the URL carries it
    (``?label=<name>&page=1``, the Label page's own place), so it survives a reload."""
    st.session_state[f"{common.VIEW_PREFIX}open_label"] = name


def sorted_labels(summaries: Sequence[lb.LabelSummary], how: str) -> list[lb.LabelSummary]:
    live = [s for s in summaries if s.count > 0]
    if how == "name":
        return sorted(live, key=lambda s: (s.name.lower(), s.id))
    if how == "misfits":
        return sorted(live, key=lambda s: (-s.misfits, -s.count, s.id))
    return sorted(live, key=lambda s: (-s.count, s.name.lower(), s.id))


def strips(ws: Workspace, table: views.LabelTable) -> None:
    """For every non-empty label, its most typical photos with its size and misfits."""
    head, sort_col = st.columns([3, 2], vertical_alignment="bottom")
    head.subheader("Clusters at a glance")
    how = sort_col.segmented_control(
        "Sort by", list(SORTS), format_func=SORTS.__getitem__, key=SORT_KEY, default="size"
    )
    labels = sorted_labels(table.summaries, how or "size")
    if not labels:
        st.info("No label has images yet.")
        return
    n_pages = common.n_pages(len(labels), STRIPS_PER_PAGE)
    page = 1
    if n_pages > 1:
        page = st.pagination(n_pages, key=STRIP_PAGE_KEY) if hasattr(st, "pagination") else 1
    shown = labels[(page - 1) * STRIPS_PER_PAGE : page * STRIPS_PER_PAGE]
    members = strip_members(*common.ws_key(ws), tuple(s.id for s in shown))
    names = suggested_names(*common.ws_key(ws), common.active_backbone(ws))
    for summary in shown:  # one per row: reading order is the sort order
        with st.container(border=True, key=f"clusters_strip_{summary.id}"):
            strip(ws, summary, members.get(summary.id, []), names.get(summary.id))


@st.cache_data(max_entries=8, show_spinner=False)
def suggested_names(path: str, revision: int, backbone: str) -> dict[int, str]:
    """A name for each label from its images' top ImageNet classes (issue 13 §5); empty when
    the vectors came without class probabilities."""
    try:
        from imgcluster.features import suggest_names
    except ImportError:
        return {}
    ws = common.workspace(path)
    table = views.label_table(ws)
    if table is None:
        return {}
    groups: dict[int, list[int]] = {}
    for image_id, label_id in zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True):
        groups.setdefault(int(label_id), []).append(int(image_id))
    try:
        return suggest_names(ws, backbone, groups)
    except ImgclusterError:
        return {}


def _accept_name(ws: Workspace, label_id: int, name: str) -> str:
    return lb.rename(ws, label_id, name, actor=views.actor()).summary


def strip(
    ws: Workspace, summary: lb.LabelSummary, shas: list[str], suggestion: str | None = None
) -> None:
    misfits = f" · {summary.misfits} misfit{'s' if summary.misfits != 1 else ''}"
    confirmed = f" · {summary.confirmed} confirmed" if summary.confirmed else ""
    st.button(
        f"**{common.md_escape(summary.name)}** · {summary.count:,} image"
        f"{'s' if summary.count != 1 else ''}{misfits if summary.misfits else ''}{confirmed}",
        key=f"clusters_open_{summary.id}",
        type="tertiary",
        icon=":material/arrow_forward:",
        icon_position="right",
        help=f"Open {common.md_escape(summary.name)} on the Label page",
        on_click=open_label,
        args=(summary.name,),
    )
    if suggestion and AUTO_NAME.fullmatch(summary.name):
        st.button(
            f"Name it “{common.md_escape(suggestion)}”",
            key=f"clusters_accept_{summary.id}",
            icon=":material/auto_awesome:",
            help="Suggested from the ImageNet classes its photos look like; one click renames",
            on_click=views.callback(_accept_name, ws, summary.id, suggestion),
        )
    if shas:
        st.image(strip_image(str(ws.path), tuple(shas)), width="stretch")


# -- empty labels (issue 12, bug 6) ---------------------------------------------------------


@st.cache_data(max_entries=16, show_spinner=False)
def empty_labels(path: str, revision: int) -> list[tuple[int, str]]:
    """(id, name) of the labels that hold no image (the library hides them by default)."""
    return [
        (s.id, s.name)
        for s in lb.list_labels(common.workspace(path), include_empty=True)
        if s.count == 0
    ]


def _delete_empty(ws: Workspace) -> str:
    applied = lb.delete_empty_labels(ws, actor=views.actor())
    return f"{applied.summary} (Undo brings them back)"


def empty_labels_notice(ws: Workspace) -> None:
    """Issue 12 bug 6: empty labels are hidden from the chart and strips; say so, offer to
    delete them (one undoable step)."""
    empty = empty_labels(*common.ws_key(ws))
    if not empty:
        return
    names = ", ".join(name for _id, name in empty[:6]) + (" …" if len(empty) > 6 else "")
    n = len(empty)
    with st.container(key="clusters_empty"):
        st.caption(f"{n} empty label{'s' if n != 1 else ''} hidden: {common.md_escape(names)}")
        st.button(
            f"Delete {n} empty label{'s' if n != 1 else ''}",
            key="clusters_delete_empty",
            icon=":material/delete_sweep:",
            on_click=views.callback(_delete_empty, ws),
        )


def sizes_figure(table: views.LabelTable):
    import plotly.graph_objects as go

    summaries = sorted((s for s in table.summaries if s.count > 0), key=lambda s: s.count)
    fig = go.Figure(
        go.Bar(
            x=[s.count for s in summaries],
            y=[common.plot_text(s.name) for s in summaries],
            orientation="h",
            marker_color=[views.color(s.id) for s in summaries],
            hovertemplate="%{y}: %{x} images<extra></extra>",
        )
    )
    fig.update_layout(
        height=max(260, 20 * len(summaries) + 60),
        margin=dict(l=10, r=10, t=30, b=10),
        title="Images per label",
        xaxis_title=None,
        yaxis=dict(automargin=True),
    )
    return fig


# -- the map ----------------------------------------------------------------------------------


def marker_symbol(label_id: int) -> str:
    """Colours repeat every len(PALETTE) labels; the symbol changes when they do."""
    return SYMBOLS[(label_id // len(views.PALETTE)) % len(SYMBOLS)] if label_id >= 0 else "circle"


def robust_range(values: np.ndarray) -> list[float] | None:
    """Axis range holding the central 98% of the points plus a margin: a few far outliers
    no longer squash the mass into a corner (they stay selectable after a zoom out)."""
    if len(values) < 20:
        return None
    lo, hi = np.percentile(values, [1, 99])
    full_lo, full_hi = float(values.min()), float(values.max())
    pad = (hi - lo) * 0.08 or 1.0
    return [max(full_lo - pad * 0.1, lo - pad), min(full_hi + pad * 0.1, hi + pad)]


def map_sample(n: int) -> np.ndarray:
    """Rows drawn on the map: all up to `views.MAP_MAX_POINTS`, else a fixed random sample (the
    same on every rerun, so a selection keeps its meaning)."""
    if n <= views.MAP_MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, views.MAP_MAX_POINTS, replace=False))


def selected_ids(event: Any, trace_ids: list[list[int]]) -> list[int]:
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


def map_figure(
    ws: Workspace,
    backbone: str,
    table: views.LabelTable,
    proj,
    hover_index: dict[int, int] | None = None,
) -> tuple[Any, list]:
    """The map coloured by label with names at the centroids; and the image ids per trace."""
    import plotly.graph_objects as go

    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    names = table.name_of()
    rows_by_id = common.image_rows_by_id(*common.ws_key(ws))
    hover = hover_index or {}
    shown = map_sample(len(proj.image_ids))
    groups: dict[int, list[int]] = {}
    for row in shown.tolist():
        groups.setdefault(label_of.get(int(proj.image_ids[row]), -1), []).append(row)
    fig = go.Figure()
    trace_ids: list[list[int]] = []
    centroids: list[tuple[float, float, str]] = []
    for label_id in sorted(groups, key=lambda lid: (lid < 0, names.get(lid, "").lower())):
        rows = groups[label_id]
        ids = proj.image_ids[rows].tolist()
        name = names.get(label_id, "(no label)")
        xy = proj.coords[rows]
        fig.add_trace(
            go.Scattergl(
                x=xy[:, 0],
                y=xy[:, 1],
                mode="markers",
                name=common.plot_text(name),
                marker=dict(
                    size=7,
                    color=views.color(label_id) if label_id >= 0 else "#bbbbbb",
                    symbol=marker_symbol(label_id),
                    opacity=0.85,
                ),
                # User text only ever goes in as data, escaped; never into the template.
                # (file name, cell in the hover sprite or -1)
                customdata=[
                    [common.plot_text(rows_by_id.get(i, ("?",))[0]), hover.get(i, -1)] for i in ids
                ],
                hovertemplate="%{customdata[0]}<br><b>%{fullData.name}</b><extra></extra>",
            )
        )
        trace_ids.append(ids)
        if label_id >= 0 and len(rows):
            cx, cy = np.median(xy, axis=0)
            centroids.append((float(cx), float(cy), common.plot_text(name)))
    if centroids:
        fig.add_trace(
            go.Scatter(
                x=[c[0] for c in centroids],
                y=[c[1] for c in centroids],
                text=[c[2] for c in centroids],
                mode="text",
                textfont=dict(size=12, color="#111827"),
                hoverinfo="skip",
                showlegend=False,
                name="names",
            )
        )
        trace_ids.append([])  # names are not selectable points
    sample_note = f" (a sample of {len(shown):,} shown)" if len(shown) < len(proj.image_ids) else ""
    coords = proj.coords[shown] if len(shown) else np.zeros((0, 2))
    fig.update_layout(
        height=640,
        margin=dict(l=10, r=10, t=30, b=10),
        dragmode="select",
        uirevision=f"{ws.path}:{backbone}:{proj.method}",  # keep zoom when colours change
        legend=dict(itemsizing="constant"),
        title=f"{proj.method.upper()} map of {len(proj.image_ids):,} images{sample_note}",
        xaxis=dict(
            showticklabels=False,
            showgrid=False,
            zeroline=False,
            title=None,
            range=robust_range(coords[:, 0]) if len(coords) else None,
        ),
        yaxis=dict(
            showticklabels=False,
            showgrid=False,
            zeroline=False,
            title=None,
            range=robust_range(coords[:, 1]) if len(coords) else None,
        ),
    )
    return fig, trace_ids


HOVER_MAX = 2500
HOVER_CELL = 80
HOVER_COLUMNS = 50
HOVER_KEY = f"{common.VIEW_PREFIX}map_photos"
HOVER_JS = """
export default function ({ data }) {
  const tip = document.getElementById("icmap-tip") || (() => {
    const node = document.createElement("div");
    node.id = "icmap-tip";
    node.style.cssText = "position:fixed;z-index:1000;display:none;pointer-events:none;" +
      "border:2px solid #fff;box-shadow:0 2px 10px rgba(0,0,0,.35);border-radius:6px;" +
      "background-repeat:no-repeat;background-color:#fff;";
    document.body.append(node);
    return node;
  })();
  const cell = data.cell, columns = data.columns, scale = 1.5;
  const sprite = () => {
    const img = document.querySelector(".st-key-clusters_hover_sprite img");
    return img ? img.src : null;
  };
  const attach = () => {
    const gd = Array.from(document.querySelectorAll(".js-plotly-plot")).find((g) => {
      const title = g.layout && g.layout.title;
      return String((title && title.text) || title || "").includes("map of");
    });
    if (!gd || gd.__icHover || !gd.on) return;
    gd.__icHover = true;
    gd.on("plotly_hover", (ev) => {
      const point = ev.points && ev.points[0];
      const index = point && point.customdata ? Number(point.customdata[1]) : -1;
      const src = sprite();
      if (index < 0 || !src) return;
      const x = (index % columns) * cell * scale, y = Math.floor(index / columns) * cell * scale;
      tip.style.width = tip.style.height = `${cell * scale}px`;
      tip.style.backgroundImage = `url("${src}")`;
      tip.style.backgroundSize = `${columns * cell * scale}px auto`;
      tip.style.backgroundPosition = `-${x}px -${y}px`;
      const e = ev.event || {};
      tip.style.left = `${(e.clientX || 0) + 16}px`;
      tip.style.top = `${(e.clientY || 0) + 16}px`;
      tip.style.display = "block";
    });
    gd.on("plotly_unhover", () => { tip.style.display = "none"; });
  };
  attach();
  const timer = setInterval(attach, 700);
  return () => { clearInterval(timer); tip.style.display = "none"; };
}
"""


@st.cache_resource(show_spinner=False)
def _hover_component():
    return st.components.v2.component("imgcluster_map_hover", js=HOVER_JS)


@st.cache_data(max_entries=4, show_spinner=False)
def hover_sprite(path: str, shas: tuple[str, ...]) -> bytes:
    """The map's hover photos as one JPEG grid (cell i = point i), cached by content: the
    browser gets it once, as one media file, and shows a cell next to the hovered point."""
    from PIL import Image, ImageOps

    rows = -(-len(shas) // HOVER_COLUMNS)
    sheet = Image.new("RGB", (HOVER_COLUMNS * HOVER_CELL, max(1, rows) * HOVER_CELL), "white")
    ws = common.workspace(path)
    for i, sha in enumerate(shas):
        thumb = common.thumbnail(ws, sha)
        if thumb is None:
            continue
        with Image.open(thumb) as img:
            img.draft("RGB", (HOVER_CELL * 2, HOVER_CELL * 2))
            cell = ImageOps.pad(img.convert("RGB"), (HOVER_CELL, HOVER_CELL), color="white")
        sheet.paste(cell, ((i % HOVER_COLUMNS) * HOVER_CELL, (i // HOVER_COLUMNS) * HOVER_CELL))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def hover_photos(ws: Workspace, proj) -> dict[int, int]:
    """Photos on hover (on by default up to 1,000 images; a toggle beyond): the sprite goes
    to the browser as a hidden image, a tiny component shows its cells. Returns image id ->
    cell."""
    n = len(proj.image_ids)
    if HOVER_KEY not in st.session_state:
        st.session_state[HOVER_KEY] = n <= 1000
    st.toggle("Photos on hover", key=HOVER_KEY, help=f"Up to {HOVER_MAX:,} points of the map")
    if not st.session_state[HOVER_KEY] or n == 0:
        return {}
    rows_by_id = common.image_rows_by_id(*common.ws_key(ws))
    ids = proj.image_ids[map_sample(n)][:HOVER_MAX].tolist()
    ids = [i for i in ids if i in rows_by_id]
    shas = tuple(rows_by_id[i][1] or "" for i in ids)
    sprite = hover_sprite(str(ws.path), shas)
    st.html("<style>.st-key-clusters_hover_sprite{display:none}</style>")
    with st.container(key="clusters_hover_sprite"):
        st.image(sprite)
    _hover_component()(
        key="clusters_map_hover", data={"cell": HOVER_CELL, "columns": HOVER_COLUMNS}
    )
    return {image_id: i for i, image_id in enumerate(ids)}


def scatter(ws: Workspace, backbone: str, table: views.LabelTable, n: int) -> list[int]:
    """The map at the page's width; returns the image ids of the box/lasso selection."""
    proj = views.map_coordinates(ws, backbone, n)
    if proj.method != "umap" and common.umap_enabled():
        views.umap_notice(ws, backbone)
    hover_index = hover_photos(ws, proj)
    fig, trace_ids = map_figure(ws, backbone, table, proj, hover_index)
    nonce = st.session_state.get(f"{common.VIEW_PREFIX}scatter_nonce", 0)
    event = st.plotly_chart(
        fig,
        key=f"{common.VIEW_PREFIX}scatter_{nonce}",
        on_select="rerun",
        selection_mode=("box", "lasso"),
        width="stretch",
        config={"displaylogo": False, "modeBarButtonsToRemove": ["toImage"]},
    )
    return selected_ids(event, trace_ids)


def selection_panel(ws: Workspace, ids: list[int], table: views.LabelTable) -> None:
    st.markdown(f"**{len(ids):,} images selected on the map**")
    rows = common.image_rows_by_id(*common.ws_key(ws))
    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    names = table.name_of()
    views.move_form(
        ws,
        ids,
        [s.name for s in table.summaries],
        key="clusters_move",
        shown={i: label_of[i] for i in ids if i in label_of},
        after=views.clear_map_selection,
    )
    preview = [i for i in ids[: views.SELECTION_PREVIEW] if i in rows]
    common.image_grid(
        ws,
        [(rows[i][0], rows[i][1], names.get(label_of.get(i, -1), "(no label)")) for i in preview],
        columns=8,
    )
    if len(ids) > views.SELECTION_PREVIEW:
        st.caption(f"...and {len(ids) - views.SELECTION_PREVIEW:,} more")


# -- the page ---------------------------------------------------------------------------------


def new_images_notice(ws: Workspace, n: int, table: views.LabelTable) -> None:
    unlabeled = n - len(table.image_ids)
    if unlabeled <= 0:
        return
    st.info(
        f"{unlabeled:,} images were added after labeling started and have no label yet.",
        icon=":material/fiber_new:",
    )
    st.button(
        "Give them the label of their nearest labeled neighbours",
        key="clusters_suggest_new",
        on_click=views.callback(views.suggest_new, ws),
    )


def go_to_label() -> None:
    """A strip was clicked: open its label on the Label page (after the callbacks ran)."""
    name = st.session_state.pop(f"{common.VIEW_PREFIX}open_label", None)
    if name is None:
        return
    params = {"label": name, "page": "1"}
    if ws_param := st.query_params.get("ws"):
        params["ws"] = ws_param
    st.switch_page("pages/label.py", query_params=params)


def main() -> None:
    go_to_label()
    ws = common.require_workspace()
    st.title("Clusters")
    common.show_flash()
    backbone = common.active_backbone(ws)
    n = common.feature_counts(*common.ws_key(ws)).get(backbone, 0)
    if n < 3:
        st.info(f"Compute {backbone} features first.")
        st.page_link("pages/features.py", label="Features", icon=":material/arrow_back:")
        return
    k_max = k_range_max(n)
    controls, curve = st.columns([3, 2])
    with controls:
        k = k_controls(k_max, default_k(ws, k_max))
        with common.guard():
            follow_k(ws, backbone, k)
    table = views.label_table(ws)
    if table is None:
        return
    with controls:
        n_live = sum(1 for s in table.summaries if s.count > 0)
        st.caption(
            f"{n:,} images with {backbone} features · {n_live} labels · drag a box or lasso "
            "on the map to select images"
        )
        space_note(ws, backbone)
        new_images_notice(ws, n, table)
    with curve:
        suggestion_panel(ws, backbone, n, k_max, k)
    views.history_bar(ws, key="clusters")
    common.start_projection(ws, backbone)
    ids = scatter(ws, backbone, table, n)
    if ids:
        with st.container(border=True):
            selection_panel(ws, ids, table)
    else:
        st.caption(
            "Select images with the box or lasso tool (top right of the map) to see them "
            "here and move them to a label."
        )
    left, right = st.columns([3, 1])
    with left:
        strips(ws, table)
    with right:
        empty_labels_notice(ws)
        st.plotly_chart(sizes_figure(table), key="clusters_sizes", config={"displayModeBar": False})
    common.next_step("pages/label.py", "Next: review each label")


main()
