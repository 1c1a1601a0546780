"""Clusters page: choose k, see every image on a map coloured by label, select on the map and
move the selection to a label, and compare label sizes."""

from __future__ import annotations

import streamlit as st

from imgcluster.workspace import Workspace
from pages import _common as common
from pages import _views as views

common.require_router()

K_KEY = f"{common.VIEW_PREFIX}k"


def _sync_k(source: str) -> None:
    """The slider and the number box show one k; whichever was moved sets it."""
    value = int(st.session_state[source])
    st.session_state[K_KEY] = value
    for key in (f"{K_KEY}_slider", f"{K_KEY}_input"):
        if key != source:
            st.session_state[key] = value


def k_controls(k_max: int, default: int) -> int:
    k = max(2, min(int(st.session_state.get(K_KEY, default)), k_max))
    for key in (K_KEY, f"{K_KEY}_slider", f"{K_KEY}_input"):
        if st.session_state.get(key) != k:
            st.session_state[key] = k
    left, right = st.columns([5, 1], vertical_alignment="bottom")
    left.slider(
        "Number of clusters (k)",
        2,
        k_max,
        key=f"{K_KEY}_slider",
        on_change=_sync_k,
        args=(f"{K_KEY}_slider",),
    )
    right.number_input(
        "k",
        2,
        k_max,
        step=1,
        key=f"{K_KEY}_input",
        on_change=_sync_k,
        args=(f"{K_KEY}_input",),
    )
    return k


def suggestion_panel(ws: Workspace, backbone: str, n: int) -> None:
    flag = f"{common.VIEW_PREFIX}suggest"
    with st.expander("Which k? Silhouette for each k", expanded=bool(st.session_state.get(flag))):
        st.caption(
            "Higher = tighter, better separated clusters. How many kinds of product you "
            "expect matters more: take this as a hint."
        )
        if not st.session_state.get(flag):
            st.button(
                "Compute the curve",
                key="clusters_suggest",
                on_click=lambda: st.session_state.__setitem__(flag, True),
            )
            return
        with common.guard(), st.spinner("Clustering for each k..."):
            curve = views.k_suggestion(str(ws.path), backbone, n)
            st.plotly_chart(views.suggestion_figure(curve), key="clusters_suggest_plot")
            if curve.best:
                best = curve.best[0]
                st.caption(f"Best by silhouette: k = {', '.join(map(str, curve.best))}")
                st.button(
                    f"Use k = {best}", key="clusters_use_best", on_click=views._set_k, args=(best,)
                )


def selection_panel(ws: Workspace, ids: list[int], table: views.LabelTable) -> None:
    st.markdown(f"**{len(ids):,} images selected on the map**")
    rows = common.image_rows_by_id(*common.ws_key(ws))
    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    names = table.name_of()
    views.move_form(
        ws,
        ids,
        table.names,
        key="clusters_move",
        shown={i: label_of[i] for i in ids if i in label_of},
        after=views.clear_map_selection,
        compact=True,
    )
    shown = [i for i in ids[: views.SELECTION_PREVIEW] if i in rows]
    common.image_grid(
        ws,
        [(rows[i][0], rows[i][1], names.get(label_of.get(i, -1), "(no label)")) for i in shown],
        columns=4,
    )
    if len(ids) > views.SELECTION_PREVIEW:
        st.caption(f"...and {len(ids) - views.SELECTION_PREVIEW:,} more")


def main() -> None:
    ws = common.require_workspace()
    st.title("Clusters")
    common.show_flash()
    backbone = common.active_backbone(ws)
    n = common.feature_counts(*common.ws_key(ws)).get(backbone, 0)
    if n < 3:
        st.info(f"Compute {backbone} features first.")
        st.page_link("pages/features.py", label="Features", icon=":material/arrow_back:")
        return
    k_max = min(views.K_MAX, n - 1)
    k = k_controls(k_max, views.default_k(ws, backbone, k_max))
    with common.guard():
        views.ensure_labels(ws, backbone, k)
    table = views.label_table(ws)
    if table is None:
        return
    st.caption(
        f"{n:,} images with {backbone} features · {len(table.summaries)} labels · "
        "drag a box or lasso on the map to select images"
    )
    views.history_bar(ws, key="clusters")
    unlabeled = n - len(table.image_ids)
    if unlabeled > 0:
        st.info(
            f"{unlabeled:,} images were added after labeling started and have no label yet.",
            icon=":material/fiber_new:",
        )
        st.button(
            "Give them the label of their nearest labeled neighbours",
            key="clusters_suggest_new",
            on_click=views.callback(views.suggest_new, ws),
        )
    common.start_projection(ws, backbone)
    left, right = st.columns([3, 2])
    with left:
        ids = views.scatter(ws, backbone, table, n)
    with right:
        if ids:
            with st.container(border=True):
                selection_panel(ws, ids, table)
        else:
            st.caption(
                "Select images with the box or lasso tool (top right of the map) to "
                "see them here and move them to a label."
            )
        st.plotly_chart(
            views.sizes_figure(table), key="clusters_sizes", config={"displayModeBar": False}
        )
    suggestion_panel(ws, backbone, n)
    common.next_step("pages/label.py", "Next: review each label")


main()
