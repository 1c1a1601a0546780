"""The Label page's two custom components (Streamlit components v2, inline HTML/CSS/JS shipped
in ``assets/``; no build step, no CDN: the app runs offline).

- `selection_grid`: a page of thumbnails where clicking, shift-clicking, the keyboard and the
  "select ..." buttons change a selection kept in the browser (no server round trip per
  click); an action (move, confirm, unsure, exclude, back to normal) sends it, once.
- `focus_view`: the larger view of one image with its nearest neighbours and previous/next.

Python hears from them only through trigger values, handled in widget callbacks before the
page is drawn, so the page after an action already shows its result.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import streamlit as st

from imgcluster_app import common

ASSETS = Path(__file__).with_name("assets")
#: Thumbnail side sent to the grid (cells are ~130-180 CSS px wide).
GRID_SIDE = 192


@cache
def _grid_component() -> Callable[..., Any]:
    return st.components.v2.component(
        "imgcluster_selection_grid",
        css=(ASSETS / "grid.css").read_text(encoding="utf-8"),
        js=(ASSETS / "grid.js").read_text(encoding="utf-8"),
    )


@cache
def _focus_component() -> Callable[..., Any]:
    return st.components.v2.component(
        "imgcluster_focus_view",
        css=(ASSETS / "focus.css").read_text(encoding="utf-8"),
        js=(ASSETS / "focus.js").read_text(encoding="utf-8"),
    )


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


@st.cache_data(max_entries=6000, show_spinner=False)
def thumb_uri(path: str, sha256: str | None, side: int = GRID_SIDE) -> str | None:
    """A small JPEG of an image's stored thumbnail as a data URI (cached by content hash), or
    None when the thumbnail file is missing."""
    from PIL import Image

    thumb = common.thumbnail(common.workspace(path), sha256)
    if thumb is None:
        return None
    with Image.open(thumb) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=82)
    return _data_uri(buf.getvalue())


@st.cache_data(max_entries=64, show_spinner=False)
def preview_uri(path: str, relpath: str, side: int = 1024) -> tuple[str, int, int] | None:
    """The source image at most ``side`` px as a data URI with its width and height (the
    larger view never upscales it past twice that), or None if it cannot be read now."""
    from PIL import Image

    jpeg = common.preview(path, relpath, side)
    if jpeg is None:
        return None
    with Image.open(io.BytesIO(jpeg)) as img:
        width, height = img.size
    return _data_uri(jpeg), width, height


def _trigger(key: str, name: str) -> Any:
    value = st.session_state.get(key)
    try:
        return value.get(name) if value is not None else None
    except AttributeError:
        return None


def selection_grid(
    *,
    key: str,
    view: str,
    items: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    on_action: Callable[[dict[str, Any]], None],
    on_open: Callable[[int], None],
    max_name: int = 200,
    moves_only: bool = False,
) -> None:
    """Draw the grid. ``items``: ``{id, relpath, src, misfit, nearer, confirmed, state,
    by_hand}``; ``targets``: ``{id, name}`` of the labels a selection can move to (digits 1-9
    pick the first nine). ``view`` identifies what is shown; a selection never outlives it.
    ``moves_only``: only "Move" to one of ``targets`` (no new label, no confirm / unsure /
    exclude buttons), for a grid whose only action is a move, as gathering strays.

    ``on_action({"kind", "ids", "view", "target" | "new_name"})`` and ``on_open(image_id)``
    run as widget callbacks.
    """

    def action() -> None:
        payload = _trigger(key, "action")
        if isinstance(payload, dict):
            on_action(payload)

    def open_() -> None:
        image_id = _trigger(key, "open")
        if isinstance(image_id, int):
            on_open(image_id)

    _grid_component()(
        key=key,
        data={
            "view": view,
            "items": list(items),
            "targets": list(targets),
            "max_name": max_name,
            "moves_only": moves_only,
        },
        on_action_change=action,
        on_open_change=open_,
    )


def focus_view(
    *,
    key: str,
    data: dict[str, Any],
    on_nav: Callable[[str], None],
    on_use: Callable[[int], None],
) -> None:
    """Draw the larger view; ``on_nav("prev" | "next" | "id:<n>")`` and ``on_use(label_id)``
    run as widget callbacks."""

    def nav() -> None:
        value = _trigger(key, "nav")
        if isinstance(value, str):
            on_nav(value)

    def use() -> None:
        value = _trigger(key, "use")
        if isinstance(value, int):
            on_use(value)

    _focus_component()(key=key, data=data, on_nav_change=nav, on_use_change=use)
