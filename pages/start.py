"""Workspace page: open a project, or create one from a server folder, uploads or the sample."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from imgcluster.errors import InvalidPath
from imgcluster.images import IMAGE_EXTENSIONS, ingest
from imgcluster.uploads import save_uploads
from imgcluster.workspace import DB_NAME, Workspace
from imgcluster_app import common, router

router.enter()


def create_and_ingest(dest: Path, source: Path | None, uploads: list | None = None) -> None:
    """Create the workspace ``dest``, fill it from ``source`` or ``uploads``, open it."""
    ws = Workspace(dest, create=True)
    if uploads is not None:
        source = ws.uploads_dir
        report = save_uploads(((f.name, f) for f in uploads), source)
        if report.rejected:
            common.flash_table("Refused from the upload", report.rejected)
    bar = common.ProgressBar("Reading images")
    result = ingest(ws, source, progress=bar)
    bar.finish()
    common.set_workspace(ws.path)
    message = f"Workspace {ws.path.name} created: {result.ok:,} images"
    if result.n_skipped:
        message += f", {result.n_skipped:,} files skipped (see Images)"
    common.flash(message)
    st.rerun()


def sample_panel() -> None:
    if not common.SAMPLE_IMAGES.is_dir():
        return
    target = common.workspaces_home() / common.SAMPLE_WORKSPACE_NAME
    with st.container(border=True):
        st.subheader("Try it on the sample images")
        st.caption(
            "180 small product pictures in 6 kinds, bundled with imgcluster. Everything runs "
            "on this machine, no download needed."
        )
        if (target / DB_NAME).is_file():
            if st.button("Open the sample workspace", key="start_sample", type="primary"):
                common.set_workspace(target)
                st.rerun()
        elif st.button("Create the sample workspace", key="start_sample", type="primary"):
            with common.guard():
                create_and_ingest(target, common.SAMPLE_IMAGES)


def open_tab() -> None:
    known = common.known_workspaces()
    if known:
        pick = st.selectbox(
            f"Workspaces in {common.md_escape(common.workspaces_home())}",
            known,
            format_func=lambda p: p.name,
            key="start_open_pick",
        )
        if st.button("Open", key="start_open", type="primary") and pick is not None:
            common.set_workspace(pick)
            st.rerun()
    else:
        st.caption("No workspace in the workspaces folder yet.")
    path = st.text_input("Or a workspace folder on the server", key="start_open_path")
    if st.button("Open this folder", key="start_open_path_go"):
        with common.guard():
            common.set_workspace(common.open_workspace_path(path))
            st.rerun()


def folder_tab() -> None:
    roots = common.allowed_roots()
    st.caption(
        "Folders this server may read: "
        + ", ".join(f"`{common.md_escape(r)}`" for r in roots)
        + ". A relative path is looked up in each of them. Source images are only read, never "
        "changed."
    )
    folder = st.text_input(
        "Image folder", key="start_folder", placeholder="e.g. sample_data/images"
    )
    name = st.text_input(
        "Workspace name", key="start_folder_name", placeholder="defaults to the folder's name"
    )
    if st.button("Create workspace", key="start_folder_create", type="primary"):
        with common.guard():
            source = common.resolve_under(folder, roots)
            if not source.is_dir():
                raise InvalidPath(f"{folder!r} is not a folder")
            create_and_ingest(common.new_workspace_dir(name or source.name), source)


def upload_tab() -> None:
    st.caption(
        "Image files or .zip archives of images. Zip entries are checked: no absolute paths, "
        "no '..', size limits, images only. Files are stored inside the new workspace."
    )
    files = st.file_uploader(
        "Images or zip archives",
        type=[ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS)] + ["zip"],
        accept_multiple_files=True,
        key="start_upload_files",
    )
    name = st.text_input("Workspace name", key="start_upload_name", placeholder="e.g. shoes-2024")
    if st.button("Create workspace from uploads", key="start_upload_create", type="primary"):
        with common.guard():
            if not files:
                raise InvalidPath("choose some images or a zip first")
            create_and_ingest(common.new_workspace_dir(name), None, uploads=list(files))


def main() -> None:
    st.title("imgcluster")
    st.markdown(
        "Group unlabeled product photos by what they look like, name the groups, fix the "
        "misfits, and export one folder per label."
    )
    common.show_flash()
    ws = common.current_workspace()
    if ws is not None:
        with st.container(border=True):
            st.markdown(f"**Open workspace:** {common.md_escape(ws.path.name)}")
            st.caption(common.md_escape(ws.path))
            common.next_step("pages/images.py", "Continue with Images")
    sample_panel()
    st.subheader("Workspaces")
    tab_open, tab_folder, tab_upload = st.tabs(
        ["Open", "New from a server folder", "New from uploads"]
    )
    with tab_open:
        open_tab()
    with tab_folder:
        folder_tab()
    with tab_upload:
        upload_tab()


main()
