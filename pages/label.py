"""Label page: one label at a time as a thumbnail grid, most typical first, misfits flagged;
select images and move or exclude them; rename, merge, split, confirm; undo and redo; a
larger view of one image with its nearest neighbours."""

from __future__ import annotations

import streamlit as st

from imgcluster import labels as lb
from imgcluster.workspace import Workspace
from pages import _common as common
from pages import _views as views

common.require_router()

PER_PAGE = 48
COLUMNS = 8
ORDERS = {
    "typicality": "Most typical first",
    "misfit": "Worst fit first",
    "relpath": "By file name",
}
LABEL_KEY = f"{common.VIEW_PREFIX}label"
SELECTED_KEY = f"{common.VIEW_PREFIX}selected"
SEL_PREFIX = f"{common.VIEW_PREFIX}sel_"
FOCUS_KEY = f"{common.VIEW_PREFIX}focus"


# -- selection: kept apart from the checkboxes, whose state Streamlit drops off-page ------------


def selected() -> dict[int, int]:
    """Selected image id -> the label id it was shown in (checked again when acting)."""
    return st.session_state.setdefault(SELECTED_KEY, {})


def _toggle(image_id: int, label_id: int) -> None:
    if st.session_state.get(f"{SEL_PREFIX}{image_id}"):
        selected()[image_id] = label_id
    else:
        selected().pop(image_id, None)


def clear_selection() -> None:
    for key in [k for k in st.session_state if str(k).startswith(SEL_PREFIX)]:
        del st.session_state[key]
    st.session_state[SELECTED_KEY] = {}


def _select_page(items: list[lb.LabeledImage]) -> None:
    for item in items:
        st.session_state[f"{SEL_PREFIX}{item.image_id}"] = True
        selected()[item.image_id] = item.label_id


def _open(image_id: int) -> None:
    st.session_state[FOCUS_KEY] = image_id


# -- operations: one library call each, run as widget callbacks --------------------------------


def _rename(ws: Workspace, label_id: int, version: int) -> str:
    new = (st.session_state.get("label_rename_name") or "").strip()
    result = lb.rename(ws, label_id, new, actor=views.actor(), expected=version)
    st.session_state["label_rename_name"] = ""
    return result.summary


def _merge(ws: Workspace, label_id: int, version: int) -> str:
    others = st.session_state.get("label_merge_with") or []
    if not others:
        raise lb.UnknownCluster("choose the labels to merge into this one")
    result = lb.merge(ws, [label_id, *others], into=label_id, actor=views.actor(), expected=version)
    st.session_state["label_merge_with"] = []
    return result.summary


def _split(ws: Workspace, label_id: int, version: int) -> str:
    n = int(st.session_state.get("label_split_n") or 2)
    return lb.split(ws, label_id, n, actor=views.actor(), expected=version).summary


def _confirm(ws: Workspace, label_id: int, shown: list[int] | None) -> str:
    return lb.confirm(ws, label_id, actor=views.actor(), expected=shown).summary


def _delete(ws: Workspace, label_id: int, version: int) -> str:
    st.session_state.pop(LABEL_KEY, None)
    return lb.delete_label(ws, label_id, actor=views.actor(), expected=version).summary


def _set_state(ws: Workspace, state: str, images: dict[int, int] | None = None) -> str:
    chosen = dict(images if images is not None else selected())
    result = lb.set_state(ws, list(chosen), state, actor=views.actor(), expected=chosen)
    clear_selection()
    return result.summary


# -- drawing ----------------------------------------------------------------------------------


def label_picker(table: views.LabelTable) -> lb.LabelSummary:
    by_id = {s.id: s for s in table.summaries}
    ids = list(by_id)
    current = st.session_state.get(LABEL_KEY)
    if current not in by_id:
        current = ids[0]

    def describe(i: int) -> str:
        s = by_id[i]
        text = f"{s.name} — {s.count:,} images"
        if s.misfits:
            text += f", {s.misfits} misfit{'s' if s.misfits != 1 else ''}"
        if s.confirmed:
            text += f", {s.confirmed} confirmed"
        return text

    chosen = st.selectbox("Label", ids, index=ids.index(current), format_func=describe)
    if chosen != st.session_state.get(LABEL_KEY):
        st.session_state[LABEL_KEY] = chosen
        st.session_state.pop(f"{common.VIEW_PREFIX}label_page", None)
    return by_id[chosen]


def label_tools(
    ws: Workspace, summary: lb.LabelSummary, table: views.LabelTable, shown: list[int] | None
) -> None:
    others = {s.id: s.name for s in table.summaries if s.id != summary.id}
    bar = st.container(horizontal=True, vertical_alignment="center")
    with bar.popover("Rename", icon=":material/edit:"):
        st.text_input(
            "New name",
            key="label_rename_name",
            max_chars=lb.MAX_NAME_LENGTH,
            placeholder=summary.name,
        )
        st.button(
            "Rename",
            key="label_rename",
            type="primary",
            on_click=views.callback(_rename, ws, summary.id, table.version),
        )
    with bar.popover("Merge", icon=":material/merge:"):
        st.multiselect(
            "Merge these labels into this one",
            list(others),
            format_func=others.__getitem__,
            key="label_merge_with",
        )
        st.button(
            "Merge",
            key="label_merge",
            type="primary",
            on_click=views.callback(_merge, ws, summary.id, table.version),
        )
    with bar.popover("Split", icon=":material/call_split:"):
        st.number_input("Into how many labels", 2, 20, 2, key="label_split_n")
        st.caption("KMeans over the label's unconfirmed images; the largest part keeps the name.")
        st.button(
            "Split",
            key="label_split",
            type="primary",
            on_click=views.callback(_split, ws, summary.id, table.version),
        )
    bar.button(
        "Confirm label",
        key="label_confirm",
        icon=":material/verified:",
        help="Mark the label's images as checked (images marked unsure stay open).",
        # When the whole label is on the page, confirm exactly what was shown.
        on_click=views.callback(_confirm, ws, summary.id, shown),
    )
    if summary.count == 0:
        bar.button(
            "Delete label",
            key="label_delete",
            icon=":material/delete:",
            on_click=views.callback(_delete, ws, summary.id, table.version),
        )


def cell(ws: Workspace, item: lb.LabeledImage) -> None:
    flags = []
    if item.misfit:
        flags.append("⚠ misfit" + (f" → {item.nearest_other}" if item.nearest_other else ""))
    if item.confirmed:
        flags.append("✓ confirmed")
    if item.state != "normal":
        flags.append(item.state)
    name = common.md_escape(common.short_name(item.relpath, 14))
    square = common.square_thumbnail(str(ws.path), item.sha256)
    if square is not None:
        # Two caption lines in every cell, so the checkboxes line up across a row.
        flag_line = common.md_escape(" · ".join(flags)) or "\u00a0"
        st.image(square, width="stretch", caption=f"{name}  \n{flag_line}")
    pick, view = st.columns([3, 1], gap="small", vertical_alignment="center")
    pick.checkbox(
        name,
        label_visibility="collapsed",
        key=f"{SEL_PREFIX}{item.image_id}",
        value=item.image_id in selected(),
        on_change=_toggle,
        args=(item.image_id, item.label_id),
    )
    view.button(
        ":material/open_in_full:",
        key=f"label_view_{item.image_id}",
        type="tertiary",
        help="Larger view",
        on_click=_open,
        args=(item.image_id,),
    )


def grid(ws: Workspace, summary: lb.LabelSummary, order: str) -> list[lb.LabeledImage]:
    pages = common.n_pages(summary.count, PER_PAGE)
    page = 1
    if pages > 1:
        page = st.pagination(pages, key=f"{common.VIEW_PREFIX}label_page")
    items = lb.label_images(
        ws, summary.id, offset=(page - 1) * PER_PAGE, limit=PER_PAGE, order=order
    )
    for start in range(0, len(items), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, item in zip(cols, items[start : start + COLUMNS], strict=False):
            with col:
                cell(ws, item)
    return items


def selection_tools(ws: Workspace, table: views.LabelTable, items: list[lb.LabeledImage]) -> None:
    chosen = selected()
    with st.container(border=True):
        head = st.columns([3, 1, 1], vertical_alignment="center")
        head[0].markdown(
            f"**{len(chosen):,} selected**"
            + ("" if chosen else " · tick images below, or select the whole page")
        )
        head[1].button("Select page", key="label_select_page", on_click=_select_page, args=(items,))
        head[2].button("Clear", key="label_select_none", on_click=clear_selection)
        if not chosen:
            return
        views.move_form(
            ws,
            list(chosen),
            table.names,
            key="label_move",
            shown=dict(chosen),
            after=clear_selection,
        )
        cols = st.columns(3)
        cols[0].button(
            "Exclude from export",
            key="label_exclude",
            icon=":material/block:",
            on_click=views.callback(_set_state, ws, "excluded"),
        )
        cols[1].button(
            "Mark unsure",
            key="label_unsure",
            icon=":material/help:",
            on_click=views.callback(_set_state, ws, "unsure"),
        )
        cols[2].button(
            "Back to normal",
            key="label_normal",
            icon=":material/restart_alt:",
            on_click=views.callback(_set_state, ws, "normal"),
        )


def _move_to_neighbour(
    ws: Workspace, image_id: int, label_id: int, shown: dict[int, int] | None
) -> str:
    return lb.move(
        ws, [image_id], label_id, create=False, actor=views.actor(), expected=shown
    ).summary


def neighbour_grid(
    ws: Workspace, image_id: int, label_id: int | None, shown: dict[int, int] | None
) -> None:
    """The most similar images with their labels; one click moves the image to a neighbour's
    label (only offered where that label differs from its own)."""
    neighbours = views.neighbours(ws, image_id)
    if not neighbours:
        st.caption("No similar images to show (features not extracted yet).")
        return
    st.caption("Most similar images (cosine similarity of the features)")

    def caption(n: lb.Neighbour) -> str:
        return f"{n.label if n.label is not None else '(no label)'} · {n.similarity:.2f}"

    def move_button(index: int, _item: tuple) -> None:
        n = neighbours[index]
        if n.label_id is None or n.label_id == label_id:
            return
        st.button(
            "Use this label",
            key=f"label_focus_to_{n.image_id}",
            type="tertiary",
            icon=":material/drive_file_move:",
            help=f"Move this image to {common.md_escape(n.label)}",
            on_click=views.callback(_move_to_neighbour, ws, image_id, n.label_id, shown),
        )

    common.image_grid(
        ws, [(n.relpath, n.sha256, caption(n)) for n in neighbours], columns=6, cell=move_button
    )


@st.dialog("Image", width="large")
def focus_dialog(ws: Workspace, image_id: int, table: views.LabelTable) -> None:
    rows = common.image_rows_by_id(*common.ws_key(ws))
    if image_id not in rows:
        st.info("This image is no longer in the workspace.")
        return
    relpath = rows[image_id][0]
    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    label_id = label_of.get(image_id)
    label_name = table.name_of().get(label_id, "(no label)")
    st.markdown(f"**{common.md_escape(relpath)}** · {common.md_escape(label_name)}")
    preview = common.preview(str(ws.path), relpath)
    if preview is not None:
        st.image(preview, width="stretch")
    shown = {image_id: label_id} if label_id is not None else None
    neighbour_grid(ws, image_id, label_id, shown)
    views.move_form(ws, [image_id], table.names, key="label_focus_move", shown=shown)
    if shown:
        st.button(
            "Exclude from export",
            key="label_focus_exclude",
            icon=":material/block:",
            on_click=views.callback(_set_state, ws, "excluded", shown),
        )


def main() -> None:
    ws = common.require_workspace()
    st.title("Label")
    common.show_flash()
    table = views.label_table(ws)
    if table is None:
        st.info("Labeling starts from clusters: choose k on the Clusters page first.")
        st.page_link("pages/clusters.py", label="Clusters", icon=":material/arrow_back:")
        return
    summary = label_picker(table)
    views.history_bar(ws, key="label")
    if (focus := st.session_state.pop(FOCUS_KEY, None)) is not None:
        focus_dialog(ws, focus, table)
    # The tools sit above the grid but need what it shows: the grid is drawn first, into
    # the containers' order on the page.
    tools_box, selection_box = st.container(), st.container()
    order = (
        st.segmented_control(
            "Order",
            list(ORDERS),
            format_func=ORDERS.__getitem__,
            default="typicality",
            key=f"{common.VIEW_PREFIX}label_order",
            required=True,
        )
        or "typicality"
    )
    items = grid(ws, summary, order)
    with tools_box:
        fits = summary.count <= len(items)
        label_tools(ws, summary, table, [i.image_id for i in items] if fits else None)
    with selection_box:
        selection_tools(ws, table, items)


main()
