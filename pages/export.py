"""Export page: one folder per label (optionally split train/val/test), previewed before it is
written, then downloadable as a zip and kept on the server."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from imgcluster.errors import InvalidPath, NoLabelSession
from imgcluster.export import MODES
from imgcluster.workspace import Workspace
from pages import _common as common

common.require_router()

SPLITS = {
    "none": "No split: one folder per label",
    "0.8,0.2": "train / val 80:20",
    "0.7,0.15,0.15": "train / val / test 70:15:15",
}
MODE_HELP = {
    "copy": "Copy the images (independent of the sources)",
    "hardlink": "Hard links (no extra space; same filesystem only)",
    "symlink": "Symbolic links to the sources",
}
RESULT_KEY = f"{common.VIEW_PREFIX}export_result"


@st.cache_data(max_entries=16, show_spinner=False)
def preview(
    path: str,
    revision: int,
    confirmed_only: bool,
    include_unsure: bool,
    split: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Folder and image count per label under these options (per split too), and what is left
    out: the library's dry run, so the preview is what the export writes."""
    from imgcluster.export import plan_workspace_export

    plan = plan_workspace_export(
        common.workspace(path),
        confirmed_only=confirmed_only,
        include_unsure=include_unsure,
        split=split,
        seed=seed,
    )
    table = []
    for label, per_split in sorted(
        plan.counts.items(), key=lambda item: plan.folders[item[0]].lower()
    ):
        row = {"label": label, "folder": plan.folders[label], "images": sum(per_split.values())}
        if plan.splits:
            row |= per_split
        table.append(row)
    table += [
        {"label": f"(left out: {why})", "folder": "", "images": n}
        for why, n in sorted(plan.left_out.items())
    ]
    return table


def export_dir(ws: Workspace, name: str) -> Path:
    """Exports live inside the workspace, under a plain folder name (no path from the browser)."""
    name = name.strip()
    if not common.is_plain_name(name):
        raise InvalidPath(
            f"export name {name!r}: use letters, digits, '.', '_' or '-' (no folders)"
        )
    return ws.path / "exports" / name


def run_export(ws: Workspace, options: dict) -> None:
    from imgcluster.export import export_workspace, zip_export

    out = export_dir(ws, options.pop("name"))
    bar = common.ProgressBar("Writing the export", unit="files")
    result = export_workspace(ws, out, progress=bar, **options)
    bar.finish()
    with st.spinner("Zipping..."):
        archive = zip_export(out)
    st.session_state[RESULT_KEY] = {
        "out": str(result.out),
        "zip": str(archive),
        "n_files": result.n_files,
        "counts": result.counts,
        "folders": result.folders,
        "left_out": result.left_out,
        "warnings": result.warnings,
    }


def show_result(result: dict) -> None:
    st.success(
        f"Exported {result['n_files']:,} images into {len(result['folders'])} label folders.",
        icon=":material/check_circle:",
    )
    st.caption("On the server:")
    st.code(result["out"], language=None)
    archive = Path(result["zip"])
    if archive.is_file():
        st.download_button(
            f"Download {archive.name} ({archive.stat().st_size / 1e6:,.1f} MB)",
            # Read only when clicked, on Streamlit's download thread; nothing is held per rerun.
            data=lambda: archive.read_bytes(),
            file_name=archive.name,
            mime="application/zip",
            key="export_download",
            type="primary",
            icon=":material/download:",
        )
    for warning in result["warnings"]:
        st.warning(common.md_escape(warning))


def main() -> None:
    ws = common.require_workspace()
    st.title("Export")
    st.caption(
        "One folder per label, as Keras `image_dataset_from_directory` and torchvision "
        "`ImageFolder` read it, with `manifest.csv` and `labels.json`. Source images are only "
        "read."
    )
    left, right = st.columns([1, 1])
    with left:
        name = st.text_input("Export name", value="dataset", key="export_name", max_chars=64)
        split = st.radio("Split", list(SPLITS), format_func=SPLITS.__getitem__, key="export_split")
        seed = st.number_input(
            "Split seed", 0, 2**31 - 1, 0, key="export_seed", disabled=split == "none"
        )
        mode = st.radio(
            "Files",
            list(MODES),
            format_func=MODE_HELP.__getitem__,
            key="export_mode",
            horizontal=False,
        )
        confirmed_only = st.checkbox("Only confirmed images", key="export_confirmed_only")
        include_unsure = st.checkbox("Include images marked unsure", key="export_unsure")
        overwrite = st.checkbox("Replace an earlier export with this name", key="export_overwrite")
    with right:
        st.subheader("Preview")
        try:
            table = preview(
                *common.ws_key(ws),
                confirmed_only,
                include_unsure,
                None if split == "none" else split,
                int(seed),
            )
        except NoLabelSession:
            st.info("Nothing to export yet: labels start on the Clusters page.")
            st.page_link("pages/clusters.py", label="Clusters", icon=":material/arrow_back:")
            return
        st.dataframe(table, hide_index=True, width="stretch")
    if st.button("Export", key="export_go", type="primary", icon=":material/output:"):
        with common.guard():
            run_export(
                ws,
                {
                    "name": name,
                    "mode": mode,
                    "split": None if split == "none" else split,
                    "seed": int(seed),
                    "confirmed_only": confirmed_only,
                    "include_unsure": include_unsure,
                    "overwrite": overwrite,
                },
            )
    if result := st.session_state.get(RESULT_KEY):
        show_result(result)


main()
