"""The Label page's "compare with another label": a chooser of the other labels and, beside the
label's grid, the compared label's most typical photos with one button that moves the grid's
selection there (so the annotator sees whether two labels should be merged, or where a misfit
belongs, and acts on it without leaving the page).

Thin on purpose: the photos come from `imgcluster.labels.label_images`; the move goes through
the page's own grid action (the same `labels.move`, the same stale-state check, never a
confirmation). The compared label is kept in the session and mirrored in the URL
(``?compare=<name>``), like the label, order and page.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import streamlit as st

from imgcluster import labels as lb
from imgcluster.workspace import Workspace
from imgcluster_app import common, grid

ASSETS = Path(__file__).with_name("assets")
PARAM = "compare"
#: How many of the compared label's most typical photos are shown.
SHOWN = 24

V = common.VIEW_PREFIX
KEY = f"{V}label_compare"  # id of the compared label, or None (the truth; the chooser follows)
NONCE = f"{V}label_compare_nonce"
SEEN = f"{V}label_compare_url_seen"  # the URL value this tab last read or wrote
NONE_TEXT = "(no comparison)"


@cache
def _component() -> Callable[..., Any]:
    return st.components.v2.component(
        "imgcluster_compare_column",
        css=(ASSETS / "compare.css").read_text(encoding="utf-8"),
        js=(ASSETS / "compare.js").read_text(encoding="utf-8"),
    )


def _choices(summaries: list[lb.LabelSummary], current: int) -> list[lb.LabelSummary]:
    """Labels one can compare with: every non-empty label but the one shown."""
    return [s for s in summaries if s.id != current and s.count > 0]


def _set(label_id: int | None) -> None:
    st.session_state[KEY] = label_id
    st.session_state[NONCE] = int(st.session_state.get(NONCE, 0)) + 1


def restore(summaries: list[lb.LabelSummary]) -> None:
    """Take the compared label from the URL when it says something this tab did not write
    (a reload, a shared link)."""
    wanted = st.query_params.get(PARAM)
    if wanted == st.session_state.get(SEEN):
        return
    st.session_state[SEEN] = wanted
    if wanted:
        by_name = {s.name: s.id for s in summaries}
        if wanted in by_name:
            _set(by_name[wanted])


def _write(name: str | None) -> None:
    if name is None:
        if PARAM in st.query_params:
            del st.query_params[PARAM]
    elif st.query_params.get(PARAM) != name:
        st.query_params[PARAM] = name
    st.session_state[SEEN] = name


def chooser(
    summaries: list[lb.LabelSummary], current: lb.LabelSummary, describe: Callable[..., str]
) -> lb.LabelSummary | None:
    """The "Compare with" chooser; returns the compared label (None: no comparison).

    Keyed by the label shown and a counter, so it starts from the compared label the page
    keeps (never written through the Session State API) and its options never hold the label
    shown. Comparing a label with itself is dropped.
    """
    others = {s.id: s for s in _choices(summaries, current.id)}
    chosen = st.session_state.get(KEY)
    if chosen is not None and chosen not in others:
        chosen = None
        st.session_state[KEY] = None
    options: list[int | None] = [None, *others]
    key = common.choice_key(
        f"{KEY}_pick_{current.id}_{int(st.session_state.get(NONCE, 0))}",
        (describe(s) for s in others.values()),
    )

    def picked() -> None:
        st.session_state[KEY] = st.session_state.get(key)

    st.selectbox(
        "Compare with",
        options,
        index=options.index(chosen),
        format_func=lambda i: NONE_TEXT if i is None else describe(others[i]),
        key=key,
        on_change=picked,
        help="Another label's most typical photos beside this one: should they be merged, "
        "where does a misfit belong? Move the selection there in one click.",
    )
    _write(others[chosen].name if chosen is not None else None)
    return others.get(chosen) if chosen is not None else None


def column(
    workspace: Workspace,
    other: lb.LabelSummary,
    *,
    view: str | None,
    on_action: Callable[[dict[str, Any]], None],
) -> None:
    """The compared label's most typical photos and "Move N selected to <label>", which sends
    the main grid's selection (of ``view``) to ``on_action`` as a move to ``other``."""
    items = lb.label_images(workspace, other.id, limit=SHOWN, order="typicality")
    path = str(workspace.path)
    more = other.count - len(items)
    key = "label_compare_column"

    def action() -> None:
        value = st.session_state.get(key)
        payload = getattr(value, "get", lambda _name: None)("action")
        if isinstance(payload, dict):
            on_action(payload)

    _component()(
        key=key,
        data={
            "name": other.name,
            "target": other.id,
            "view": view,
            "title": f"{other.name} — {other.count:,} images, most typical first",
            "items": [
                {"relpath": it.relpath, "src": grid.thumb_uri(path, it.sha256)} for it in items
            ],
            "more": f"and {more:,} more" if more > 0 else "",
        },
        on_action_change=action,
    )
