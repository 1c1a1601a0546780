"""Streamlit glue shared by the router and every page: the open workspace, safe paths, caches,
error display, progress bars and thumbnail grids.

Durable state lives in the workspace (SQLite); `st.session_state` only holds what this browser
tab is looking at. The open workspace is also mirrored in the URL (``?ws=...``) so a reload or a
shared link shows the same project. Cached readers take ``(workspace path, revision)`` as
arguments: every write bumps the revision, so a cache entry is never stale.

User-controlled text (file names, label names, error messages quoting them) is shown through
`md_escape` or plain-text elements, never as HTML.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import streamlit as st

from imgcluster import paths, settings
from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace

APP_DIR = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = APP_DIR / "sample_data" / "images"
SAMPLE_WORKSPACE_NAME = "sample"

#: Session keys. Everything starting with ``view_`` is per-workspace view state and is dropped
#: when another workspace is opened.
WS_KEY = "ws_path"
VIEW_PREFIX = "view_"

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=&\"'^])")


# -- text -------------------------------------------------------------------------------------


def choice_key(base: str, shown: Iterable[str]) -> str:
    """A selectbox key that changes whenever the texts its options show change.

    Streamlit keeps a selectbox's value as the *text* shown for it: once that text changes
    (a label's count after a move, a rename) the next run gets the stale text back as the
    value, not the option, and an ``on_change`` reads a string where it expects an id (the
    Label page jumped to the first label on the first click after any move). With the texts
    in the key, new texts make a new widget that starts from its ``index``.
    """
    digest = zlib.crc32("\x1f".join(shown).encode("utf-8", "surrogatepass"))
    return f"{base}_{digest:08x}"


def md_escape(text: object) -> str:
    """Text that Streamlit's Markdown shows literally (no links, images, HTML or directives).

    Captions, labels, alerts and widget labels are Markdown; a file called
    ``![x](http://evil/track.png).jpg`` must not load anything.
    """
    flat = " ".join(str(text).split("\n"))
    return _MD_SPECIAL.sub(r"\\\1", flat)


def plot_text(text: object) -> str:
    """Text for Plotly hover labels and legends, which interpret a subset of HTML tags."""
    return html.escape(str(text), quote=True)


# -- allowed folders (policy: `imgcluster.paths`) -------------------------------------------


def allowed_roots() -> list[Path]:
    """Folders whose sub-folders may be opened from the browser: ``IMGCLUSTER_ALLOWED_ROOTS``,
    else the current directory and the bundled ``sample_data/``."""
    return paths.allowed_roots(default=[os.getcwd(), APP_DIR / "sample_data"])


workspaces_home = paths.workspaces_home
resolve_under = paths.resolve_under
is_plain_name = paths.is_plain_name
known_workspaces = paths.known_workspaces


def new_workspace_dir(name: str) -> Path:
    """The folder for a new workspace called ``name`` under `workspaces_home`."""
    return paths.new_workspace_dir(name)


def open_workspace_path(text: str) -> Path:
    """Validate a workspace path from the browser (URL or text box): under the workspaces home
    or an allowed root, and really a workspace."""
    return paths.open_workspace_path(text, allowed_roots())


# -- the open workspace -----------------------------------------------------------------------


@st.cache_resource(max_entries=32, show_spinner=False)
def workspace(path: str) -> Workspace:
    # One object per path: opening runs the schema migration check, which takes the write lock.
    return Workspace(path)


def set_workspace(path: Path | str | None) -> None:
    """Open ``path`` in this tab (view state is reset) and mirror it in the URL."""
    old = st.session_state.get(WS_KEY)
    new = str(path) if path is not None else None
    if old != new:
        for key in [k for k in st.session_state if str(k).startswith(VIEW_PREFIX)]:
            del st.session_state[key]
    if new is None:
        st.session_state.pop(WS_KEY, None)
    else:
        st.session_state[WS_KEY] = new
    sync_url()


def url_value(path: Path) -> str:
    """Short form for the URL: the name for workspaces in the home folder, else the path."""
    home = workspaces_home()
    return path.name if path.parent == home else str(path)


def sync_url() -> None:
    """Keep ``?ws=`` equal to the open workspace (page switches drop query parameters)."""
    path = st.session_state.get(WS_KEY)
    if path:
        value = url_value(Path(path))
        if st.query_params.get("ws") != value:
            st.query_params["ws"] = value
    elif "ws" in st.query_params:
        del st.query_params["ws"]


def restore_from_url() -> None:
    """On a fresh session (reload, shared link), reopen the workspace named in the URL."""
    if st.session_state.get(WS_KEY):
        return
    value = st.query_params.get("ws")
    if not value:
        return
    try:
        st.session_state[WS_KEY] = str(open_workspace_path(value))
    except ImgclusterError as exc:
        st.session_state["_url_error"] = str(exc)
        del st.query_params["ws"]


def current_workspace() -> Workspace | None:
    """The workspace open in this tab, or None."""
    path = st.session_state.get(WS_KEY)
    if not path:
        return None
    try:
        return workspace(path)
    except ImgclusterError as exc:
        show_error(exc)
        set_workspace(None)
        return None


def require_workspace() -> Workspace:
    """The open workspace; otherwise explain what to do and stop this page."""
    ws = current_workspace()
    if ws is None:
        st.info("No workspace is open. Open or create one first.", icon=":material/folder_open:")
        next_step("pages/start.py", "Open or create a workspace")
        st.stop()
    if getattr(ws, "read_only", False):
        st.warning(
            f"{md_escape(ws.path)} is read-only here: you can browse and export, but changes "
            "are refused. Copy the workspace somewhere writable to edit it.",
            icon=":material/lock:",
        )
    return ws


def ws_key(ws: Workspace) -> tuple[str, int]:
    """Cache key of a workspace's current content."""
    return str(ws.path), ws.revision


# -- errors and progress ----------------------------------------------------------------------


def next_step(page: str, label: str) -> None:
    """A link to the page that comes next in the workflow."""
    st.page_link(page, label=label, icon=":material/arrow_forward:")


def show_error(exc: BaseException) -> None:
    st.error(md_escape(str(exc)), icon=":material/error:")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show an `ImgclusterError` (a mistake the user can fix) as an error box; anything else is
    a bug and propagates to Streamlit's exception display."""
    try:
        yield
    except ImgclusterError as exc:
        show_error(exc)


def flash(message: str) -> None:
    """A success message that survives the `st.rerun` after an action."""
    st.session_state.setdefault("_flash", []).append(("success", message, None))


def flash_error(message: str) -> None:
    """An error message shown after the rerun (from a widget callback)."""
    st.session_state.setdefault("_flash", []).append(("error", message, None))


def flash_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A warning with a table of ``(name, reason)`` rows, shown after the next rerun."""
    st.session_state.setdefault("_flash", []).append(("table", title, list(rows)))


def show_flash() -> None:
    """Show (once) what `flash`/`flash_table` queued."""
    for kind, message, rows in st.session_state.pop("_flash", []):
        if kind == "success":
            st.success(md_escape(message), icon=":material/check_circle:")
        elif kind == "error":
            st.error(md_escape(message), icon=":material/error:")
        else:
            st.warning(f"{md_escape(message)}: {len(rows)}", icon=":material/warning:")
            st.dataframe(
                {"file": [r[0] for r in rows], "reason": [r[1] for r in rows]},
                hide_index=True,
            )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressBar:
    """A ``(done, total)`` callback driving `st.progress` with a rate and an ETA.

    Updates are throttled: a websocket message per image would slow a 100k-image run.
    """

    def __init__(self, label: str, *, unit: str = "images", min_interval: float = 0.2) -> None:
        self.label = label
        self.unit = unit
        self.min_interval = min_interval
        self.bar = st.progress(0.0, text=f"{label}: starting...")
        self.start = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is None:
            # Rate from the first report on: model loading before it is not per-image work.
            self.first = (now, done)
        if done < total and now - self.last_draw < self.min_interval:
            return
        self.last_draw = now
        frac = 1.0 if total <= 0 else min(1.0, done / total)
        text = f"{self.label}: {done:,} / {total:,} {self.unit}"
        t0, d0 = self.first
        if done > d0 and now > t0:
            rate = (done - d0) / (now - t0)
            text += f" · {rate:,.1f}/s"
            if done < total:
                text += f" · about {_duration((total - done) / rate)} left"
        self.bar.progress(frac, text=text)

    def finish(self, text: str | None = None) -> None:
        elapsed = _duration(time.monotonic() - self.start)
        self.bar.progress(1.0, text=text or f"{self.label}: done in {elapsed}")


# -- thumbnails -------------------------------------------------------------------------------


def thumbnail(ws: Workspace, sha256: str | None) -> str | None:
    """Path of an image's thumbnail, regenerated from its source if it was deleted by hand;
    None when no verified source is left."""
    if not sha256:
        return None
    path = ws.thumbnail_path(sha256)
    if path.is_file():
        return str(path)
    from imgcluster.images import ensure_thumbnail

    made = ensure_thumbnail(ws, sha256)
    return str(made) if made is not None else None


@st.cache_data(max_entries=4096, show_spinner=False)
def square_thumbnail(path: str, sha256: str | None, side: int = 256) -> bytes | None:
    """The thumbnail letterboxed on a white square (`imgcluster.images.square_thumbnail`),
    cached by content hash; None when the thumbnail file is missing."""
    from imgcluster.images import square_thumbnail as square

    thumb = thumbnail(workspace(path), sha256)
    return square(thumb, side) if thumb is not None else None


@st.cache_data(max_entries=64, show_spinner=False)
def preview(path: str, relpath: str, side: int = 768) -> bytes | None:
    """A JPEG of a source image at most ``side`` pixels wide (originals can be 50 MB)."""
    import io

    from imgcluster.images import ImageRejected, make_thumbnail, open_rgb

    try:
        decoded = open_rgb(workspace(path).source_path(relpath), draft_size=(side, side))
    except (ImageRejected, OSError, ImgclusterError):
        return None
    buf = io.BytesIO()
    make_thumbnail(decoded.image, side).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def short_name(relpath: str, limit: int = 28) -> str:
    """The file name of a relative path, shortened in the middle (ends tell files apart)."""
    name = relpath.rsplit("/", 1)[-1]
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head) :]


def image_grid(
    ws: Workspace,
    items: Sequence[tuple[str, str | None, str]],
    *,
    columns: int = 6,
    cell: Callable[[int, tuple[str, str | None, str]], None] | None = None,
) -> None:
    """Thumbnails in rows of ``columns``; ``items`` are ``(relpath, sha256, caption)``.

    ``cell(index, item)`` draws extra widgets under each thumbnail (checkboxes, buttons).
    """
    for start in range(0, len(items), columns):
        cols = st.columns(columns)
        for offset, item in enumerate(items[start : start + columns]):
            with cols[offset]:
                relpath, sha, caption = item
                path = thumbnail(ws, sha)
                if path is None:
                    st.caption(f"(no thumbnail) {md_escape(short_name(relpath))}")
                else:
                    st.image(path, caption=md_escape(caption), width="stretch")
                if cell is not None:
                    cell(start + offset, item)


def n_pages(n_items: int, per_page: int) -> int:
    return max(1, math.ceil(n_items / per_page))


# -- cached readers ---------------------------------------------------------------------------


@st.cache_data(max_entries=64, show_spinner=False)
def image_counts(path: str, revision: int) -> dict[str, int]:
    return workspace(path).image_counts()


@st.cache_data(max_entries=64, show_spinner=False)
def images_version(path: str, revision: int) -> tuple[int, int, str]:
    """The image list's fingerprint (`imgcluster.workspace.images_version`), looked up once
    per revision: a label write bumps the revision but leaves the images as they were."""
    from imgcluster.workspace import images_version as version

    return version(workspace(path))


@st.cache_resource(max_entries=8, show_spinner=False)
def _image_rows(path: str, version: tuple[int, int, str]) -> list[tuple[int, str, str | None]]:
    # Keyed on the images' own fingerprint, not the revision: a move re-reads no image.
    # (A shared resource, not a copy per call: callers only read it.)
    return [(r.id, r.relpath, r.sha256) for r in workspace(path).images()]


@st.cache_resource(max_entries=8, show_spinner=False)
def _image_rows_by_id(
    path: str, version: tuple[int, int, str]
) -> dict[int, tuple[str, str | None]]:
    return {i: (rel, sha) for i, rel, sha in _image_rows(path, version)}


def image_rows(path: str, revision: int) -> list[tuple[int, str, str | None]]:
    """``(id, relpath, sha256)`` of the usable images, by relative path (read-only: shared
    by every session)."""
    return _image_rows(path, images_version(path, revision))


def image_rows_by_id(path: str, revision: int) -> dict[int, tuple[str, str | None]]:
    """``id -> (relpath, sha256)`` of the usable images (read-only: shared by every
    session)."""
    return _image_rows_by_id(path, images_version(path, revision))


@st.cache_data(max_entries=16, show_spinner=False)
def skipped(path: str, revision: int) -> list[tuple[str, str]]:
    return workspace(path).skipped()


def feature_counts(ws: Workspace) -> dict[str, int]:
    """Usable images with a vector, per backbone; recounted only when the images or the stored
    vectors changed, not after each label write (a join over every image: seconds at 1M)."""
    path, revision = ws_key(ws)
    return _feature_counts(path, *_feature_stamps(path, revision))


@st.cache_data(max_entries=16, show_spinner=False)
def _feature_stamps(path: str, revision: int) -> tuple[tuple, tuple]:
    """The images and shards stamps, read once per revision (a rerun without a write reads
    nothing; after a label write, two small scans instead of the join)."""
    from imgcluster.features import shards_version
    from imgcluster.workspace import images_version

    ws = workspace(path)
    return images_version(ws), shards_version(ws)


@st.cache_data(max_entries=64, show_spinner=False)
def _feature_counts(path: str, images: tuple, shards: tuple) -> dict[str, int]:
    from imgcluster.features import feature_counts as counts

    return counts(workspace(path))


# -- features and maps ------------------------------------------------------------------------


@st.cache_resource(max_entries=2, show_spinner=False)
def extractor(backbone: str):
    """The loaded network, shared by every session (never mutated; transform is thread-safe)."""
    from imgcluster.features import load_extractor

    return load_extractor(backbone)


def active_backbone(ws: Workspace) -> str:
    """The backbone this tab works with: the one chosen here, else the one the labels are
    based on, else the default if it has vectors, else the one with most vectors."""
    from imgcluster.backbones import DEFAULT_BACKBONE

    chosen = st.session_state.get(f"{VIEW_PREFIX}backbone")
    if chosen:
        return chosen
    session_backbone = labels_backbone(ws)
    if session_backbone:
        return session_backbone
    counts = feature_counts(ws)
    if counts.get(DEFAULT_BACKBONE) or not counts:
        return DEFAULT_BACKBONE
    return max(counts, key=lambda name: counts[name])


def labels_backbone(ws: Workspace) -> str | None:
    """Backbone of the clustering run the workspace's labels come from, if any."""
    from imgcluster.labels import active_session

    session = active_session(ws)
    return session.backbone if session is not None else None


def set_backbone(name: str) -> None:
    st.session_state[f"{VIEW_PREFIX}backbone"] = name


def umap_enabled() -> bool:
    """Whether the background UMAP map is on (``IMGCLUSTER_UMAP``, read by the library)."""
    return settings.umap_enabled()


def start_projection(ws: Workspace, backbone: str) -> None:
    """Make sure the UMAP map is stored or being made in its own process (never blocks)."""
    if not umap_enabled():
        return
    from imgcluster.projection import start_background_projection

    start_background_projection(ws, backbone)


# -- sidebar ----------------------------------------------------------------------------------

_ACTOR_KEY = "_session_actor"


def session_actor() -> str:
    """This browser session's default annotator name (``annotator-<4 hex>``), made once per
    session: undo is per session unless the annotator types a name (issue 14 §9)."""
    name = st.session_state.get(_ACTOR_KEY)
    if not name:
        import secrets

        name = f"annotator-{secrets.token_hex(2)}"
        st.session_state[_ACTOR_KEY] = name
    return name


def sidebar_picker() -> None:
    """The workspace switcher shown on every page."""
    with st.sidebar:
        if err := st.session_state.pop("_url_error", None):
            st.warning(md_escape(err))
        current = st.session_state.get(WS_KEY)
        options = [str(p) for p in known_workspaces()]
        if current and current not in options:
            options.insert(0, current)
        if not options:
            st.caption("No workspace yet.")
            return
        picked = st.selectbox(
            "Workspace",
            options,
            index=options.index(current) if current in options else None,
            format_func=lambda p: Path(p).name,
            placeholder="Choose a workspace",
            # No key on purpose: the widget's identity then follows `index`, so opening a
            # workspace elsewhere (the start page) moves this box along instead of fighting it.
        )
        if picked and picked != current:
            set_workspace(picked)
            st.rerun()
        ws = current_workspace()
        if ws is not None:
            counts = image_counts(*ws_key(ws))
            st.caption(
                f"{counts['ok']:,} images · {counts['skipped']:,} skipped  \n"
                f"{md_escape(str(ws.path))}"
            )
        st.text_input(
            "Your name",
            key="who",
            placeholder=session_actor(),
            max_chars=40,
            help="Recorded with each change in the workspace's history; Undo undoes your own "
            "steps. Kept in the page address.",
            bind="query-params",
        )
        if not (st.session_state.get("who") or "").strip():
            st.caption(
                f"No name: your steps are recorded as {md_escape(session_actor())}, and Undo "
                "undoes only this browser tab's steps. Type a name to undo across tabs and "
                "reloads."
            )
