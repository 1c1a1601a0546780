"""Images page: what was read from the collection, what was skipped and why, a look at them."""

from __future__ import annotations

import streamlit as st

from imgcluster.images import IMAGE_EXTENSIONS, ingest
from imgcluster.uploads import save_uploads
from imgcluster.workspace import Workspace
from imgcluster_app import common, router

router.enter()

PER_PAGE = 48


def rescan(ws: Workspace) -> None:
    bar = common.ProgressBar("Reading images")
    report = ingest(ws, ws.collection_root, progress=bar)
    bar.finish()
    common.flash(
        f"{report.new:,} new, {report.changed:,} changed, {report.unchanged:,} unchanged, "
        f"{report.missing:,} gone, {report.n_skipped:,} skipped"
    )
    st.rerun()


def upload_more(ws: Workspace) -> None:
    """Workspaces made from uploads can take more uploads (the collection is their own folder)."""
    with st.expander("Add more images"):
        files = st.file_uploader(
            "Images or zip archives",
            type=[ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS)] + ["zip"],
            accept_multiple_files=True,
            key="images_upload_files",
        )
        if st.button("Add", key="images_upload_add") and files:
            report = save_uploads(((f.name, f) for f in files), ws.collection_root)
            if report.rejected:
                common.flash_table("Refused from the upload", report.rejected)
            rescan(ws)


def relocate_panel(ws: Workspace) -> None:
    """The photos were moved: point the workspace at their new folder (checked by content)."""
    from imgcluster.images import relocate

    with st.expander("The photos moved? Point this workspace at their new folder"):
        st.caption(
            "Every image is looked up in the new folder and compared by content; nothing "
            "changes unless they match. Labels, features and runs stay as they are."
        )
        folder = st.text_input("New image folder", key="images_relocate_path")
        if st.button("Check and relocate", key="images_relocate_go"):
            with common.guard():
                target = common.resolve_under(folder, common.allowed_roots())
                bar = common.ProgressBar("Checking images")
                report = relocate(ws, target, progress=bar)
                bar.finish()
                common.flash(
                    f"Now reading the photos from {report.new_root}: {report.verified:,} "
                    f"verified, {len(report.missing):,} not found there"
                )
                st.rerun()


def main() -> None:
    ws = common.require_workspace()
    st.title("Images")
    common.show_flash()
    root = ws.collection_root
    st.caption(f"Collection: {common.md_escape(root) if root else 'none yet'}")
    counts = common.image_counts(*common.ws_key(ws))
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Usable images", f"{counts['ok']:,}")
    c2.metric("Skipped", f"{counts['skipped']:,}")
    c3.metric("Exact duplicates", f"{counts['duplicates']:,}")
    c4.metric("Gone from the folder", f"{counts['missing']:,}")

    if root is not None:
        with common.guard():
            if st.button("Scan the folder again", key="images_rescan", icon=":material/refresh:"):
                rescan(ws)
        if ws.takes_uploads:
            upload_more(ws)
        else:
            relocate_panel(ws)

    skipped = common.skipped(*common.ws_key(ws))
    if skipped:
        st.subheader(f"Skipped files ({len(skipped):,})")
        st.dataframe(
            {"file": [s[0] for s in skipped], "reason": [s[1] for s in skipped]},
            hide_index=True,
            width="stretch",
        )

    rows = common.image_rows(*common.ws_key(ws))
    if not rows:
        st.info("No usable image yet.")
        return
    st.subheader("Images")
    n = common.n_pages(len(rows), PER_PAGE)
    page = st.pagination(n, key=f"{common.VIEW_PREFIX}images_page") if n > 1 else 1
    chunk = rows[(page - 1) * PER_PAGE : page * PER_PAGE]
    items = [(rel, sha, common.short_name(rel)) for _id, rel, sha in chunk]
    common.image_grid(ws, items, columns=8)
    common.next_step("pages/features.py", "Next: compute features")


main()
