"""The Clusters page's drawing helpers: cluster strips, the label-size and k-curve charts, the
map (every point up to a few thousand, a server-side density image plus a sample of points
above) with photos on hover, and the map selection panel.

Streamlit lives here, not in the library: the page calls these, and these call
`imgcluster.labels` / `imgcluster.projection` for the data.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace
from imgcluster_app import common, views

SORT_KEY = f"{common.VIEW_PREFIX}strip_sort"
STRIP_PAGE_KEY = f"{common.VIEW_PREFIX}strip_page"
STRIP_LEN = 10
STRIPS_PER_PAGE = 24
STRIP_CELL = 128
#: Marker symbols cycled with the palette, so label 25 is not label 1's twin (WebGL-safe set).
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star")
SORTS = {"size": "Size", "name": "Name", "misfits": "Misfits"}
#: The names labeling starts with: a label still called so was never named by anyone.
AUTO_NAME = re.compile(r"cluster_\d+")
ASSETS = Path(__file__).with_name("assets")


# -- charts -----------------------------------------------------------------------------------


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
    names = views.suggested_names(ws, common.active_backbone(ws))
    strip_rows = [
        strip_row(ws, slot, summary, members.get(summary.id, []), names.get(summary.id))
        for slot, summary in enumerate(shown)  # one per row: reading order is the sort order
    ]
    _strips_component()(
        key="clusters_strips",
        data={"strips": strip_rows},
        on_open_change=_strip_opened,
        on_accept_change=lambda: _strip_accepted(ws),
    )


@cache
def _strips_component() -> Any:
    return st.components.v2.component(
        "imgcluster_cluster_strips",
        css=(ASSETS / "strips.css").read_text(encoding="utf-8"),
        js=(ASSETS / "strips.js").read_text(encoding="utf-8"),
    )


def _strip_trigger(name: str) -> Any:
    value = st.session_state.get("clusters_strips")
    try:
        return value.get(name) if value is not None else None
    except AttributeError:
        return None


def _strip_opened() -> None:
    if isinstance(name := _strip_trigger("open"), str):
        open_label(name)


def _strip_accepted(ws: Workspace) -> None:
    value = _strip_trigger("accept")
    if isinstance(value, dict) and isinstance(value.get("id"), int) and value.get("name"):
        views.callback(_accept_name, ws, value["id"], str(value["name"]))()


def strip_meta(summary: lb.LabelSummary) -> str:
    """A label's size, misfits and confirmed images in one line ("1,234 images · 3 misfits ·
    2 confirmed"; misfits and confirmed only when there are some)."""
    parts = [f"{summary.count:,} image{'s' if summary.count != 1 else ''}"]
    if summary.misfits:
        parts.append(f"{summary.misfits} misfit{'s' if summary.misfits != 1 else ''}")
    if summary.confirmed:
        parts.append(f"{summary.confirmed} confirmed")
    return " · ".join(parts)


def strip_row(
    ws: Workspace, slot: int, summary: lb.LabelSummary, shas: list[str], suggestion: str | None
) -> dict[str, Any]:
    """One strip as the component draws it; ``key`` changes when its photos do."""
    jpeg = strip_image(str(ws.path), tuple(shas)) if shas else b""
    return {
        "slot": slot,
        "id": summary.id,
        "name": summary.name,
        "meta": strip_meta(summary),
        "suggestion": suggestion if suggestion and AUTO_NAME.fullmatch(summary.name) else None,
        "src": strip_uri(jpeg) if jpeg else None,
        "key": hash(jpeg),
    }


@st.cache_data(max_entries=1024, show_spinner=False)
def strip_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _accept_name(ws: Workspace, label_id: int, name: str) -> str:
    return lb.rename(ws, label_id, name, actor=views.actor()).summary


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


#: Above this many images the browser gets a density image of the map (drawn here, one PNG) and
#: a fixed sample of points for hover and clicks, not every point: drawing 10k WebGL points in a
#: software-GL browser costs seconds per redraw.
DENSITY_MIN = 3_000
#: Points drawn over the density image (hover photos, clicks); a box or lasso selects every
#: image inside it by its coordinates, drawn or not. The browser's redraw of the map after a k
#: change grows with it (Chromium, SVG: ~350 ms of main thread at 1,500, ~220 ms at 750).
SAMPLE_POINTS = 1_000
#: Up to this many drawn points the map is SVG, not WebGL: a WebGL context costs more to set up
#: in a software-GL browser than drawing a couple of thousand SVG dots.
SVG_MAX_POINTS = 2_000
#: Density image bins (stretched over the map: a bin is ~3-4 screen pixels).
DENSITY_SIZE = (360, 220)
#: The annotator's "draw every point" choice (kept across pages; off by default above
#: `DENSITY_MIN`).
EVERY_POINT_KEY = f"{common.VIEW_PREFIX}map_every_point"


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
    """Rows drawn as points when every point is drawn: all up to `views.MAP_MAX_POINTS`, else a
    fixed random sample (the same on every rerun, so a selection keeps its meaning)."""
    from imgcluster.projection import point_sample

    return point_sample(n, views.MAP_MAX_POINTS)


def every_point(n: int) -> bool:
    """Whether the map draws every point (small maps, or the annotator asked) rather than a
    density image plus a sample."""
    return n <= DENSITY_MIN or bool(st.session_state.get(EVERY_POINT_KEY))


def drawn_rows(n: int) -> np.ndarray:
    """Rows of the projection drawn as points (seeded: the same dots on every rerun)."""
    from imgcluster.projection import point_sample

    return map_sample(n) if every_point(n) else point_sample(n, SAMPLE_POINTS)


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


def inside_polygon(xy: np.ndarray, xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
    """Which points lie inside the polygon (even-odd rule, one vectorised pass per edge)."""
    px, py = xy[:, 0], xy[:, 1]
    inside = np.zeros(len(xy), dtype=bool)
    n = len(xs)
    for i in range(n):
        x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        if y0 == y1:
            continue
        crosses = (py < y0) != (py < y1)
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def region_ids(event: Any, proj) -> list[int] | None:
    """Every image inside the drawn boxes and lassos, by its coordinates (server side, so a box
    over a density image selects the images it covers, not only the drawn dots); None when the
    event holds no region (a click on points)."""
    from imgcluster.projection import select_box

    try:
        selection = event["selection"]
    except (KeyError, TypeError):
        return None
    boxes, lassos = selection.get("box") or [], selection.get("lasso") or []
    if not boxes and not lassos:
        return None
    chosen: list[int] = []
    for box in boxes:
        if len(box.get("x", ())) == 2 and len(box.get("y", ())) == 2:
            chosen.extend(select_box(proj, tuple(box["x"]), tuple(box["y"])).tolist())
    for lasso in lassos:
        xs, ys = list(lasso.get("x", ())), list(lasso.get("y", ()))
        if len(xs) >= 3 and len(xs) == len(ys):
            chosen.extend(proj.image_ids[inside_polygon(proj.coords, xs, ys)].tolist())
    return list(dict.fromkeys(int(i) for i in chosen))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    value = hex_colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


#: The palette as RGB rows, and the grey of images without a label.
_PALETTE_RGB = np.array([_rgb(c) for c in views.PALETTE], dtype=np.float64)
_NO_LABEL_RGB = np.array(_rgb("#bbbbbb"), dtype=np.float64)


def label_colours(label_ids: np.ndarray) -> np.ndarray:
    """Each point's label colour as an RGB row (`views.color`, vectorised: one Python call per
    point cost more than the density image itself at 10k points)."""
    colours = _PALETTE_RGB[np.maximum(label_ids, 0) % len(_PALETTE_RGB)]
    colours[label_ids < 0] = _NO_LABEL_RGB
    return colours.reshape(-1, 3)


def density_rgba(coords: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, tuple]:
    """An RGBA image of the map: each bin the mean colour of its points' labels, more opaque
    where more points fall (log scale); and its (x_min, x_max, y_min, y_max) extent."""
    from imgcluster.projection import density_image

    width, height = DENSITY_SIZE
    dens = density_image(coords, width=width, height=height)
    x_min, x_max, y_min, y_max = dens.extent
    if not len(coords):
        return np.zeros((height, width, 4), np.uint8), dens.extent
    col = np.clip(((coords[:, 0] - x_min) / (x_max - x_min) * width).astype(int), 0, width - 1)
    row = np.clip(((coords[:, 1] - y_min) / (y_max - y_min) * height).astype(int), 0, height - 1)
    pixel = (height - 1 - row) * width + col
    counts = np.bincount(pixel, minlength=width * height).astype(np.float64)
    rgba = np.zeros((width * height, 4), np.float64)
    for c in range(3):
        rgba[:, c] = np.bincount(pixel, weights=colours[:, c], minlength=width * height)
    filled = counts > 0
    rgba[filled, :3] /= counts[filled, None]
    scale = np.log1p(counts.max()) or 1.0
    rgba[filled, 3] = 255 * np.clip(0.35 + 0.65 * np.log1p(counts[filled]) / scale, 0, 1)
    return rgba.reshape(height, width, 4).clip(0, 255).astype(np.uint8), dens.extent


@st.cache_data(max_entries=8, show_spinner=False)
def density_layer(
    path: str, revision: int, backbone: str, method: str, n: int, _proj, _labels: np.ndarray
) -> dict:
    """The density image as a Plotly layout image (a PNG data URI over the map's extent),
    cached per workspace content, so an unchanged map sends the same bytes."""
    from PIL import Image

    colours = label_colours(_labels)
    rgba, (x_min, x_max, y_min, y_max) = density_rgba(_proj.coords, colours)
    buf = io.BytesIO()
    # Fast compression: the PNG is remade on every k change and a move; a few KB more on the
    # loopback cost nothing next to `optimize=True`'s extra passes.
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return dict(
        source="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
        xref="x",
        yref="y",
        x=x_min,
        y=y_max,
        sizex=x_max - x_min,
        sizey=y_max - y_min,
        sizing="stretch",
        layer="below",
        xanchor="left",
        yanchor="top",
    )


def point_labels(proj, table: views.LabelTable) -> np.ndarray:
    """The label id of each point of the map (-1: no label), aligned with ``proj.image_ids``."""
    return table.labels_of(proj.image_ids)


def centroids(proj, labels: np.ndarray, names: dict[int, str]) -> list[tuple]:
    """(x, y, name) at each label's median point, over every image (not just the drawn ones);
    ``labels`` is `point_labels`. One sort, then a median per label's slice."""
    keep = np.flatnonzero(labels >= 0)
    if not len(keep):
        return []
    order = keep[np.argsort(labels[keep], kind="stable")]
    ordered = labels[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]).tolist()
    out = []
    for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
        cx, cy = np.median(proj.coords[order[start:stop]], axis=0)
        name = names.get(int(ordered[start]), "?")
        out.append((float(cx), float(cy), common.plot_text(name)))
    return out


def map_figure(
    ws: Workspace,
    backbone: str,
    table: views.LabelTable,
    proj,
    hover_index: dict[int, int] | None = None,
) -> tuple[Any, list]:
    """The map coloured by label with names at the centroids (every point, or above
    `DENSITY_MIN` a density image plus `SAMPLE_POINTS` dots); and the image ids per trace.

    The traces are plain dicts in a figure made with ``_validate=False``: Plotly's property
    validation (per point, for the hover data) cost more than everything else the map does
    on a k change; what is sent is the same JSON. Browser tests read the drawn traces back.
    """
    import plotly.graph_objects as go

    labels = point_labels(proj, table)
    names = table.name_of()
    rows_by_id = common.image_rows_by_id(*common.ws_key(ws))
    hover = hover_index or {}
    n = len(proj.image_ids)
    dense = not every_point(n)
    shown = drawn_rows(n)
    groups: dict[int, list[int]] = {}
    for row in shown.tolist():
        groups.setdefault(int(labels[row]), []).append(row)
    traces: list[dict] = []
    trace_ids: list[list[int]] = []
    points = "scatter" if len(shown) <= SVG_MAX_POINTS else "scattergl"
    for label_id in sorted(groups, key=lambda lid: (lid < 0, names.get(lid, "").lower())):
        rows = groups[label_id]
        ids = proj.image_ids[rows].tolist()
        xy = proj.coords[rows]
        marker = dict(
            size=5 if dense else 7,
            color=views.color(label_id) if label_id >= 0 else "#bbbbbb",
            symbol=marker_symbol(label_id),
            opacity=0.9 if dense else 0.85,
        )
        if dense:
            marker["line"] = dict(width=0.5, color="white")
        traces.append(
            dict(
                type=points,
                x=xy[:, 0],
                y=xy[:, 1],
                mode="markers",
                name=common.plot_text(names.get(label_id, "(no label)")),
                marker=marker,
                # User text only ever goes in as data, escaped; never into the template.
                # (file name, cell in the hover sprite or -1)
                customdata=[
                    [common.plot_text(rows_by_id.get(i, ("?",))[0]), hover.get(i, -1)] for i in ids
                ],
                hovertemplate="%{customdata[0]}<br><b>%{fullData.name}</b><extra></extra>",
            )
        )
        trace_ids.append(ids)
    names_at = centroids(proj, labels, names)
    if names_at:
        traces.append(
            dict(
                type="scatter",
                x=[c[0] for c in names_at],
                y=[c[1] for c in names_at],
                text=[c[2] for c in names_at],
                mode="text",
                textfont=dict(size=12, color="#111827"),
                hoverinfo="skip",
                showlegend=False,
                name="names",
            )
        )
        trace_ids.append([])  # names are not selectable points
    images = []
    if dense:
        path, revision = common.ws_key(ws)
        images.append(density_layer(path, revision, backbone, proj.method, n, proj, labels))
        note = f" (density; {len(shown):,} sample points for hover; a box selects all inside)"
    else:
        note = f" (a sample of {len(shown):,} shown)" if len(shown) < n else ""
    coords = proj.coords if n else np.zeros((0, 2))
    axes = {}
    for name, column in (("xaxis", 0), ("yaxis", 1)):
        axes[name] = dict(showticklabels=False, showgrid=False, zeroline=False)
        if (span := robust_range(coords[:, column]) if n else None) is not None:
            axes[name]["range"] = span
    layout = dict(
        height=640,
        margin=dict(l=10, r=10, t=30, b=10),
        dragmode="select",
        uirevision=f"{ws.path}:{backbone}:{proj.method}",  # keep zoom when colours change
        legend=dict(itemsizing="constant"),
        title=dict(text=f"{proj.method.upper()} map of {n:,} images{note}"),
        plot_bgcolor="white",
        images=images,
        **axes,
    )
    return go.Figure(data=traces, layout=layout, _validate=False), trace_ids


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
    const hide = () => { tip.style.display = "none"; };
    gd.on("plotly_unhover", hide);
    // Plotly does not always send an unhover (a fast exit, a drag, a scroll): the photo
    // never outlives the pointer over the map.
    gd.addEventListener("mouseleave", hide);
    gd.on("plotly_selecting", hide);
  };
  const hideOnScroll = () => { tip.style.display = "none"; };
  window.addEventListener("scroll", hideOnScroll, { capture: true, passive: true });
  if (!window.__icTipGuard) {
    // A redrawn map sends no unhover for the chart it replaced: any pointer move off a map
    // hides the photo.
    window.__icTipGuard = true;
    document.addEventListener("pointermove", (e) => {
      const over = e.target && e.target.closest && e.target.closest(".js-plotly-plot");
      if (!over) tip.style.display = "none";
    }, { passive: true });
  }
  attach();
  const timer = setInterval(attach, 700);
  return () => {
    clearInterval(timer);
    window.removeEventListener("scroll", hideOnScroll, { capture: true });
    tip.style.display = "none";
  };
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
    ids = proj.image_ids[drawn_rows(n)][:HOVER_MAX].tolist()
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
    """The map at the page's width; returns the image ids of the box/lasso selection (every
    image inside the region, by coordinates)."""
    proj = views.map_coordinates(ws, backbone, n)
    if proj.method != "umap" and common.umap_enabled():
        views.umap_notice(ws, backbone)
    n_points = len(proj.image_ids)
    left, right = st.columns(2)
    with left:
        hover_index = hover_photos(ws, proj)
    if n_points > DENSITY_MIN:
        right.toggle(
            "Draw every point",
            value=bool(st.session_state.get(EVERY_POINT_KEY)),
            key="clusters_every_point",
            on_change=_remember_every_point,
            help=f"Above {DENSITY_MIN:,} images the map is a density image with a sample of "
            "points (fast to draw); a box or lasso always selects every image inside it.",
        )
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
    region = region_ids(event, proj)
    return region if region is not None else selected_ids(event, trace_ids)


def _remember_every_point() -> None:
    st.session_state[EVERY_POINT_KEY] = bool(st.session_state.get("clusters_every_point"))


def selection_panel(ws: Workspace, ids: list[int], table: views.LabelTable) -> None:
    st.markdown(f"**{len(ids):,} images selected on the map**")
    rows = common.image_rows_by_id(*common.ws_key(ws))
    selected = table.labels_of(np.asarray(ids, dtype=np.int64))
    label_of = {i: int(lab) for i, lab in zip(ids, selected.tolist(), strict=True) if lab >= 0}
    names = table.name_of()
    views.move_form(
        ws,
        ids,
        [s.name for s in table.summaries],
        key="clusters_move",
        shown=label_of,
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


def go_to_label() -> None:
    """A strip was clicked: open its label on the Label page (after the callbacks ran)."""
    name = st.session_state.pop(f"{common.VIEW_PREFIX}open_label", None)
    if name is None:
        return
    params = {"label": name, "page": "1"}
    if ws_param := st.query_params.get("ws"):
        params["ws"] = ws_param
    st.switch_page("pages/label.py", query_params=params)
