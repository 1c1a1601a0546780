"""Label page: one label at a time as a grid of photos, most typical first, misfits flagged.
Select images in the grid (in the browser, no round trip per click) and move, confirm, mark
unsure or exclude them; rename, merge, split, confirm; gather strays from other labels; undo
and redo; a larger view of one image with its nearest neighbours.

Where the annotator is (label, order, page) lives in the URL and survives a reload. Widgets
whose value the page changes itself (the label chooser after "next label", the page after a
label switch) are keyed with a counter instead of being written through the Session State
API, so each starts from the value the page wants and Streamlit never warns.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace
from imgcluster_app import common, compare, grid, router, views

router.enter()

PER_PAGE = 48
ORDERS = {
    "typicality": "Most typical first",
    "misfit": "Worst fit first",
    "relpath": "By file name",
}
SORTS = {"name": "Name", "size": "Size", "misfits": "Misfits"}
#: Most images a search lists (a search narrows a label; its pages are cut in Python).
SEARCH_LIMIT = 5000

V = common.VIEW_PREFIX
LABEL_KEY = f"{V}label"  # id of the label shown (the truth; widgets follow it)
ORDER_KEY = f"{V}label_order_value"
PAGE_DEFAULT = f"{V}label_page_start"  # the page a freshly keyed pagination starts on
NONCE = {
    "pick": f"{V}label_pick_nonce",
    "page": f"{V}label_page_nonce",
    "order": f"{V}label_order_nonce",
    "grid": f"{V}label_grid_nonce",
    "popover": f"{V}label_popover_nonce",
}
URL_SEEN = f"{V}label_url_seen"
VIEW_NOW = f"{V}label_view_now"
FOCUS_KEY = f"{V}focus"  # {"id": image id, "index": its place in the label's order or None}
RERUN_APP = f"{V}label_rerun_app"
SEARCH_KEY = f"{V}label_search"
SORT_KEY = f"{V}label_sort"
GATHER_KEY = f"{V}label_gather"
POPOVERS = {"rename": "label_pop_rename", "merge": "label_pop_merge", "split": "label_pop_split"}


def _nonce(name: str) -> int:
    return int(st.session_state.get(NONCE[name], 0))


def _bump(*names: str) -> None:
    for name in names:
        st.session_state[NONCE[name]] = _nonce(name) + 1


def show_label(label_id: int, *, page: int = 1, from_chooser: bool = False) -> None:
    """Open ``label_id`` on ``page``: the pagination starts afresh, no selection is kept, and
    the chooser follows (a fresh key) unless the pick came from the chooser itself."""
    st.session_state[LABEL_KEY] = label_id
    st.session_state[PAGE_DEFAULT] = page
    st.session_state.pop(FOCUS_KEY, None)
    _bump("page", "grid")
    if not from_chooser:
        _bump("pick")


# -- the place in the URL ---------------------------------------------------------------------


def _place_in_url() -> dict[str, str | None]:
    return {k: st.query_params.get(k) for k in ("label", "order", "page")}


def restore_place(table: views.LabelTable) -> None:
    """Take label, order and page from the URL when it says something this tab did not write
    (a reload, a shared link, a link from the Clusters page)."""
    wanted = _place_in_url()
    if wanted == st.session_state.get(URL_SEEN) or not any(wanted.values()):
        return
    by_name = {s.name: s.id for s in table.summaries}
    label_id = by_name.get(wanted["label"] or "")
    if label_id is None and (wanted["label"] or "").isdigit():
        # An older link form names the label by id (a name always wins over an id).
        label_id = next((s.id for s in table.summaries if str(s.id) == wanted["label"]), None)
    if label_id is not None:
        page = int(wanted["page"]) if (wanted["page"] or "").isdigit() else 1
        show_label(label_id, page=max(1, page))
    if wanted["order"] in ORDERS and wanted["order"] != st.session_state.get(ORDER_KEY):
        st.session_state[ORDER_KEY] = wanted["order"]
        _bump("order")
    st.session_state[URL_SEEN] = wanted


def write_place(name: str, order: str, page: int) -> None:
    """Mirror the place in the URL (page and order only when not the defaults)."""
    place = {"label": name, "order": None if order == "typicality" else order}
    place["page"] = str(page) if page > 1 else None
    for key, value in place.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != value:
            st.query_params[key] = value
    st.session_state[URL_SEEN] = _place_in_url()


# -- operations: one library call each, run as widget callbacks --------------------------------


def _close(popover: str) -> None:
    """Close a popover after its action: a fresh key makes a new popover, closed (setting the
    open state of the old one from a callback did not always reach the browser)."""
    st.session_state.pop(_popover_key(popover), None)
    _bump("popover")


def _popover_key(name: str) -> str:
    return f"{POPOVERS[name]}_{_nonce('popover')}"


def _rename(ws: Workspace, label_id: int, version: int) -> str:
    new = (st.session_state.get("label_rename_name") or "").strip()
    result = lb.rename(ws, label_id, new, actor=views.actor(), expected=version)
    st.session_state["label_rename_name"] = ""
    _close("rename")
    return result.summary


def _merge(ws: Workspace, label_id: int, version: int) -> str:
    others = st.session_state.get("label_merge_with") or []
    if not others:
        raise lb.UnknownLabel("choose the labels to merge into this one")
    result = lb.merge(ws, [label_id, *others], into=label_id, actor=views.actor(), expected=version)
    st.session_state["label_merge_with"] = []
    _close("merge")
    return result.summary


def _split(ws: Workspace, label_id: int, version: int) -> str:
    n = int(st.session_state.get("label_split_n") or 2)
    result = lb.split(ws, label_id, n, actor=views.actor(), expected=version)
    _close("split")
    return result.summary


def _confirm_label(ws: Workspace, label_id: int, shown: list[int] | None) -> str:
    return lb.confirm(ws, label_id, actor=views.actor(), expected=shown).summary


def _delete_empty(ws: Workspace, version: int) -> str:
    return lb.delete_empty_labels(ws, actor=views.actor(), expected=version).summary


def _next_label(ws: Workspace) -> str | None:
    nxt = lb.next_label_to_review(ws)
    if nxt is None:
        return "Every image has been reviewed"
    show_label(nxt.id)
    return None


def _apply(ws: Workspace, label_id: int, payload: dict[str, Any]) -> str:
    """One grid action on exactly the images it names (checked against what was shown)."""
    if payload.get("view") != st.session_state.get(VIEW_NOW):
        raise lb.StaleState("the page changed since these images were selected; select again")
    ids = [int(i) for i in payload.get("ids") or []]
    if not ids:
        raise lb.UnknownImage("select some images first")
    shown = dict.fromkeys(ids, label_id)
    kind = payload.get("kind")
    who = views.actor()
    if kind == "move":
        if payload.get("new_name"):
            target: int | str = lb.validate_name(str(payload["new_name"]).strip())
            result = lb.move(ws, ids, target, create=True, actor=who, expected=shown)
        else:
            target = int(payload["target"])
            result = lb.move(ws, ids, target, create=False, actor=who, expected=shown)
    elif kind == "confirm":
        result = lb.confirm_images(ws, ids, actor=who, expected=shown)
    elif kind in ("unsure", "excluded", "normal"):
        result = lb.set_state(ws, ids, kind, actor=who, expected=shown)
    else:
        raise lb.StaleState(f"unknown action {kind!r}")
    return result.summary


def _on_grid_action(ws: Workspace, label_id: int, payload: dict[str, Any]) -> None:
    views.callback(_apply, ws, label_id, payload)()
    _bump("grid")  # a new view: the selection that was used is gone


def _on_open(index_of: dict[int, int], image_id: int) -> None:
    st.session_state[FOCUS_KEY] = {"id": image_id, "index": index_of.get(image_id)}


# -- drawing ----------------------------------------------------------------------------------


def _describe(s: lb.LabelSummary) -> str:
    text = f"{s.name} — {s.count:,} images"
    if s.misfits:
        text += f", {s.misfits} misfit{'s' if s.misfits != 1 else ''}"
    if s.reviewed:
        text += f", {s.reviewed:,} reviewed"
    return text


def _sorted(summaries: list[lb.LabelSummary], how: str) -> list[lb.LabelSummary]:
    if how == "size":
        return sorted(summaries, key=lambda s: (-s.count, s.name.lower()))
    if how == "misfits":
        return sorted(summaries, key=lambda s: (-s.misfits, -s.count, s.name.lower()))
    return sorted(summaries, key=lambda s: s.name.lower())


def label_picker(ws: Workspace, table: views.LabelTable) -> lb.LabelSummary:
    """The label chooser (keyed: its identity never depends on the label shown), the label
    sort and the search box."""
    by_id = {s.id: s for s in table.summaries}
    if st.session_state.get(LABEL_KEY) not in by_id:
        # The chooser is rebuilt only when it showed a label that is gone.
        show_label(table.summaries[0].id, from_chooser=LABEL_KEY not in st.session_state)
    pick, sort, search = st.columns([5, 2, 3], vertical_alignment="bottom")
    how = (
        sort.segmented_control(
            "Sort labels by",
            list(SORTS),
            format_func=SORTS.__getitem__,
            default="name",
            key=SORT_KEY,
            required=True,
        )
        or "name"
    )
    ids = [s.id for s in _sorted(table.summaries, how)]
    key = common.choice_key(f"{V}label_pick_{_nonce('pick')}", (_describe(by_id[i]) for i in ids))

    def picked() -> None:
        chosen = st.session_state.get(key)
        if chosen is not None and chosen != st.session_state.get(LABEL_KEY):
            show_label(chosen, from_chooser=True)

    pick.selectbox(
        "Label",
        ids,
        index=ids.index(st.session_state[LABEL_KEY]),
        format_func=lambda i: _describe(by_id[i]),
        key=key,
        on_change=picked,
    )
    search.text_input(
        "Find files",
        key=SEARCH_KEY,
        placeholder="file name or folder",
        on_change=_searched,
    )
    return by_id[st.session_state[LABEL_KEY]]


def _searched() -> None:
    """A new search starts on its first page, with nothing selected."""
    st.session_state[PAGE_DEFAULT] = 1
    _bump("page", "grid")


def progress_panel(ws: Workspace, table: views.LabelTable, summary: lb.LabelSummary) -> None:
    """Where the work stands: this label and the whole workspace, and what to do next."""
    total = sum(s.count for s in table.summaries)
    reviewed = sum(s.reviewed for s in table.summaries)
    confirmed = sum(s.confirmed for s in table.summaries)
    by_hand = sum(s.by_hand for s in table.summaries)
    left, right = st.columns([4, 2], vertical_alignment="center")
    left.progress(
        reviewed / total if total else 1.0,
        text=f"Reviewed {reviewed:,} of {total:,} images · {confirmed:,} confirmed · "
        f"{by_hand:,} moved by hand · {len(table.summaries)} labels",
    )
    right.button(
        "Next label to review",
        key="label_next",
        icon=":material/skip_next:",
        help="The label with the most images nobody has reviewed yet",
        on_click=views.callback(_next_label, ws),
    )
    st.caption(
        f"**{common.md_escape(summary.name)}**: {summary.count:,} images · "
        f"{summary.reviewed:,} reviewed · {summary.confirmed:,} confirmed · "
        f"{summary.by_hand:,} moved by hand · {summary.misfits:,} misfits"
        + (f" · {summary.unsure:,} unsure" if summary.unsure else "")
        + (f" · {summary.excluded:,} excluded" if summary.excluded else "")
    )
    if table.empty:
        n = len(table.empty)
        cols = st.columns([4, 2], vertical_alignment="center")
        cols[0].caption(
            f"{n} empty label{'s' if n != 1 else ''} hidden: "
            + common.md_escape(", ".join(table.empty[:6]) + (", ..." if n > 6 else ""))
        )
        cols[1].button(
            f"Delete {n} empty label{'s' if n != 1 else ''}",
            key="label_delete_empty",
            icon=":material/delete_sweep:",
            on_click=views.callback(_delete_empty, ws, table.version),
        )


def _accept_name(ws: Workspace, label_id: int, name: str, version: int) -> str:
    return lb.rename(ws, label_id, name, actor=views.actor(), expected=version).summary


def suggestion(ws: Workspace, table: views.LabelTable, summary: lb.LabelSummary) -> None:
    """Beside a label still called ``cluster_NN``: a suggested name, accepted in one click."""
    if not summary.name.startswith("cluster_"):
        return
    session = lb.active_session(ws)
    if session is None:
        return
    name = views.suggested_names(ws, session.backbone).get(summary.id, "")
    if not name or name in table.names:
        return
    cols = st.columns([4, 2], vertical_alignment="center")
    cols[0].caption(
        f"Suggested name (ImageNet classes of its photos): **{common.md_escape(name)}**"
    )
    cols[1].button(
        f"Name it {name}",
        key="label_accept_name",
        icon=":material/auto_awesome:",
        on_click=views.callback(_accept_name, ws, summary.id, name, table.version),
    )


def label_tools(
    ws: Workspace, summary: lb.LabelSummary, table: views.LabelTable, shown: list[int] | None
) -> None:
    others = {s.id: s.name for s in table.summaries if s.id != summary.id}
    bar = st.container(horizontal=True, vertical_alignment="center")
    with bar.popover(
        "Rename", icon=":material/edit:", key=_popover_key("rename"), on_change="rerun"
    ):
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
    with bar.popover(
        "Merge", icon=":material/merge:", key=_popover_key("merge"), on_change="rerun"
    ):
        # The button sits above the list, so the list's dropdown never covers it.
        st.button(
            "Merge",
            key="label_merge",
            type="primary",
            on_click=views.callback(_merge, ws, summary.id, table.version),
        )
        st.multiselect(
            "Merge these labels into this one",
            list(others),
            format_func=others.__getitem__,
            key="label_merge_with",
            select_all=False,  # merging every label into one is never what anyone wants
            placeholder="Choose labels",
        )
        st.caption("Their images join this label; Undo splits them apart again.")
    with bar.popover(
        "Split", icon=":material/call_split:", key=_popover_key("split"), on_change="rerun"
    ):
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
        on_click=views.callback(_confirm_label, ws, summary.id, shown),
    )


def page_controls(summary: lb.LabelSummary, n_items: int) -> tuple[str, int]:
    """Order and page; both start where the page wants them (keyed by counters)."""
    left, right = st.columns([3, 4], vertical_alignment="center")
    order_key = f"{V}label_order_{_nonce('order')}"

    def ordered() -> None:
        st.session_state[ORDER_KEY] = st.session_state.get(order_key) or "typicality"
        st.session_state[PAGE_DEFAULT] = 1
        _bump("page", "grid")

    order = (
        left.segmented_control(
            "Order",
            list(ORDERS),
            format_func=ORDERS.__getitem__,
            default=st.session_state.get(ORDER_KEY, "typicality"),
            key=order_key,
            required=True,
            on_change=ordered,
            label_visibility="collapsed",
        )
        or "typicality"
    )
    pages = common.n_pages(n_items, PER_PAGE)
    page = 1
    if pages > 1:
        start = min(max(1, int(st.session_state.get(PAGE_DEFAULT, 1))), pages)
        with right:
            page = st.pagination(
                pages,
                default=start,
                key=f"{V}label_page_{summary.id}_{_nonce('page')}",
                on_change=_bump,
                args=("grid",),
            )
        page = min(page, pages)
    return order, page


def grid_section(
    ws: Workspace, table: views.LabelTable, summary: lb.LabelSummary
) -> list[lb.LabeledImage]:
    search = (st.session_state.get(SEARCH_KEY) or "").strip()
    n_items = summary.count
    if search:
        n_items = len(lb.label_images(ws, summary.id, limit=SEARCH_LIMIT, search=search))
    order, page = page_controls(summary, n_items)
    if search:
        found = lb.label_images(ws, summary.id, limit=SEARCH_LIMIT, order=order, search=search)
        items = found[(page - 1) * PER_PAGE : page * PER_PAGE]
        st.caption(f"{len(found):,} images of this label match “{common.md_escape(search)}”")
    else:
        items = lb.label_images(
            ws, summary.id, offset=(page - 1) * PER_PAGE, limit=PER_PAGE, order=order
        )
    if not items:
        st.info("No image to show here." if search else "This label holds no image.")
        return []
    view = "|".join(
        str(v) for v in (ws.path, summary.id, order, page, search, ws.revision, _nonce("grid"))
    )
    st.session_state[VIEW_NOW] = view
    index_of = {it.image_id: (page - 1) * PER_PAGE + i for i, it in enumerate(items)}
    path = str(ws.path)
    grid.selection_grid(
        key="label_grid",
        view=view,
        items=[
            {
                "id": it.image_id,
                "relpath": it.relpath,
                "src": grid.thumb_uri(path, it.sha256),
                "misfit": bool(it.misfit),
                "nearer": it.nearest_other,
                "confirmed": bool(it.confirmed),
                "state": it.state,
                "by_hand": bool(getattr(it, "by_hand", False)),
            }
            for it in items
        ],
        targets=[{"id": s.id, "name": s.name} for s in table.summaries if s.id != summary.id],
        on_action=lambda payload: _on_grid_action(ws, summary.id, payload),
        on_open=lambda image_id: _on_open(index_of, image_id),
        max_name=lb.MAX_NAME_LENGTH,
    )
    write_place(summary.name, order, page)
    return items


# -- gathering strays -------------------------------------------------------------------------


def _accept_strays(ws: Workspace, label_id: int, label_of: dict[int, int], payload: dict) -> str:
    if payload.get("kind") != "move":
        raise lb.StaleState("in this grid, only 'Move' applies: it gathers the selection here")
    ids = [int(i) for i in payload.get("ids") or []]
    expected = {i: label_of[i] for i in ids if i in label_of}
    return lb.accept_gathered(ws, label_id, ids, actor=views.actor(), expected=expected).summary


def gather_section(ws: Workspace, summary: lb.LabelSummary) -> None:
    """Images in other labels that look like this one, most likely first, to pull in at once."""
    if not st.toggle(
        f"Gather strays into {common.md_escape(summary.name)}",
        key=GATHER_KEY,
        help="Images of other labels whose nearest neighbours are more in this label than in any "
        "other, their own included",
    ):
        return
    try:
        strays = lb.gather(ws, summary.id, limit=PER_PAGE)
    except ImgclusterError as exc:
        common.show_error(exc)
        return
    if not strays:
        st.caption("No image of another label looks like this one.")
        return
    st.caption(
        f"{len(strays)} images of other labels look like {common.md_escape(summary.name)}, "
        "most likely first: select the ones that belong here and move them."
    )
    label_of = {s.image_id: s.label_id for s in strays}
    rows = common.image_rows_by_id(*common.ws_key(ws))
    path = str(ws.path)
    grid.selection_grid(
        key="label_gather_grid",
        view=f"gather|{ws.path}|{summary.id}|{ws.revision}|{_nonce('grid')}",
        items=[
            {
                "id": s.image_id,
                "relpath": s.relpath,
                "src": grid.thumb_uri(path, rows.get(s.image_id, (None, None))[1]),
                "misfit": False,
                "nearer": None,
                "confirmed": False,
                "state": "normal",
                "by_hand": False,
            }
            for s in strays
        ],
        targets=[{"id": summary.id, "name": summary.name}],
        moves_only=True,
        on_action=lambda payload: (
            views.callback(_accept_strays, ws, summary.id, label_of, payload)(),
            _bump("grid"),
        ),
        on_open=lambda image_id: st.session_state.__setitem__(
            FOCUS_KEY, {"id": image_id, "index": None}
        ),
    )


# -- the larger view --------------------------------------------------------------------------


def _close_focus() -> None:
    st.session_state.pop(FOCUS_KEY, None)


def _focus_nav(ws: Workspace, label_id: int, order: str, search: str, value: str) -> None:
    focus = st.session_state.get(FOCUS_KEY) or {}
    if value.startswith("id:"):
        st.session_state[FOCUS_KEY] = {"id": int(value[3:]), "index": None}
        return
    index = focus.get("index")
    if index is None:
        return
    index += -1 if value == "prev" else 1
    if index < 0:
        return
    found = lb.label_images(ws, label_id, offset=index, limit=1, order=order, search=search or None)
    if found:
        st.session_state[FOCUS_KEY] = {"id": found[0].image_id, "index": index}


def _focus_move(ws: Workspace, image_id: int, from_label: int | None, to_label: int) -> None:
    shown = {image_id: from_label} if from_label is not None else None

    def run() -> str:
        return lb.move(
            ws, [image_id], to_label, create=False, actor=views.actor(), expected=shown
        ).summary

    views.callback(run)()
    _close_focus()
    st.session_state[RERUN_APP] = True


@st.dialog("Image", width="large", on_dismiss=_close_focus)
def focus_dialog(ws: Workspace, table: views.LabelTable, label_id: int, order: str) -> None:
    focus = st.session_state.get(FOCUS_KEY) or {}
    image_id = focus.get("id")
    rows = common.image_rows_by_id(*common.ws_key(ws))
    if image_id not in rows:
        st.info("This image is no longer in the workspace.")
        return
    relpath = rows[image_id][0]
    label_of = dict(zip(table.image_ids.tolist(), table.label_ids.tolist(), strict=True))
    own = label_of.get(image_id)
    names = table.name_of()
    search = (st.session_state.get(SEARCH_KEY) or "").strip()
    index = focus.get("index")
    count = next((s.count for s in table.summaries if s.id == label_id), 0)
    preview = grid.preview_uri(str(ws.path), relpath)
    path = str(ws.path)
    neighbours = views.neighbours(ws, image_id, limit=8)
    grid.focus_view(
        key=f"label_focus_{image_id}",
        data={
            "id": image_id,
            "relpath": relpath,
            "label": names.get(own, "(no label)"),
            "src": preview[0] if preview else None,
            "width": preview[1] if preview else None,
            "height": preview[2] if preview else None,
            "position": f"{index + 1:,} of {count:,}" if index is not None and not search else "",
            "has_prev": index is not None and index > 0 and own == label_id,
            "has_next": index is not None and own == label_id and (search or index + 1 < count),
            "neighbours": [
                {
                    "id": n.image_id,
                    "relpath": n.relpath,
                    "src": grid.thumb_uri(path, n.sha256),
                    "label": n.label,
                    "label_id": n.label_id,
                    "similarity": float(n.similarity),
                    "movable": n.label_id is not None and n.label_id != own,
                }
                for n in neighbours
            ],
        },
        on_nav=lambda value: _focus_nav(ws, label_id, order, search, value),
        on_use=lambda target: _focus_move(ws, image_id, own, target),
    )
    if own is not None:
        shown = {image_id: own}
        views.move_form(
            ws,
            [image_id],
            [n for i, n in names.items() if i != own],
            key="label_focus_move",
            shown=shown,
            after=lambda: (_close_focus(), st.session_state.__setitem__(RERUN_APP, True)),
        )
    if st.session_state.pop(RERUN_APP, False):
        st.rerun()


def main() -> None:
    ws = common.require_workspace()
    st.title("Label")
    common.show_flash()
    table = views.label_table(ws)
    if table is None:
        st.info("Labeling starts from clusters: choose k on the Clusters page first.")
        st.page_link("pages/clusters.py", label="Clusters", icon=":material/arrow_back:")
        return
    if not table.summaries:
        st.info("Every label is empty.")
        return
    restore_place(table)
    compare.restore(table.summaries)
    summary = label_picker(ws, table)
    progress_panel(ws, table, summary)
    suggestion(ws, table, summary)
    views.history_bar(ws, key="label")
    tools_box = st.container()
    with st.columns(2)[1]:  # above the column it fills
        compared = compare.chooser(table.summaries, summary, _describe)
    if compared is None:
        items = grid_section(ws, table, summary)
    else:
        # Two columns on a wide screen (Streamlit stacks them on a narrow one).
        left, right = st.columns(2, gap="medium")
        with left:
            items = grid_section(ws, table, summary)
        with right:
            compare.column(
                ws,
                compared,
                view=st.session_state.get(VIEW_NOW) if items else None,
                on_action=lambda payload: _on_grid_action(ws, summary.id, payload),
            )
    with tools_box:
        fits = summary.count <= len(items) and not st.session_state.get(SEARCH_KEY)
        label_tools(ws, summary, table, [i.image_id for i in items] if fits else None)
    gather_section(ws, summary)
    if st.session_state.get(FOCUS_KEY):
        focus_dialog(ws, table, summary.id, st.session_state.get(ORDER_KEY, "typicality"))


main()
