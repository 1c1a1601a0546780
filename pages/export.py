"""Export page: one folder per label (optionally split train/val/test), previewed before it is
written with what deserves a look first (labels nobody named, reviewed or filled), then
downloadable as a zip and kept on the server."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ExportError, ImgclusterError, NoLabelSession
from imgcluster.export import MODES
from imgcluster.workspace import Workspace
from imgcluster_app import common, router

router.enter()

SPLITS = {
    "none": "No split: one folder per label",
    "0.8,0.2": "train / val 80:20",
    "0.7,0.15,0.15": "train / val / test 70:15:15",
}
MODE_HELP = {
    "copy": "Copy the images (independent of the sources)",
    "hardlink": "Hard links (no extra space; same filesystem only)",
    "symlink": "Symbolic links to the sources (the export exposes them as they are)",
}
RESULT_KEY = f"{common.VIEW_PREFIX}export_result"
REPLACE_LABEL = "Replace an earlier export with this name"
WARNING_ICONS = {
    "default_name": ":material/edit:",
    "small_label": ":material/data_alert:",
    "unreviewed": ":material/visibility_off:",
    "missing": ":material/image_not_supported:",
    "left_out": ":material/block:",
}


@st.cache_data(max_entries=16, show_spinner=False)
def preview(
    path: str,
    revision: int,
    confirmed_only: bool,
    include_unsure: bool,
    split: str | None = None,
    random_state: int = 0,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Folder and image count per label under these options (per split too), one row per
    reason images are left out, and the warnings to read first: the library's dry run, so the
    preview is what the export writes."""
    from imgcluster.export import export_warnings, plan_workspace_export

    plan = plan_workspace_export(
        common.workspace(path),
        confirmed_only=confirmed_only,
        include_unsure=include_unsure,
        split=split,
        random_state=random_state,
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
    if not plan.left_out:
        table.append({"label": "(left out)", "folder": "", "images": 0})
    # "Reviewed" = any decision on one of the label's images (confirmed, moved, excluded...).
    progress = lb.progress(common.workspace(path)) if hasattr(lb, "progress") else None
    found = export_warnings(plan, progress)
    warnings = [(w.kind, w.message) for w in found if w.kind != "left_out"]  # the table says it
    return table, warnings


def left_out_line(table: list[dict]) -> str:
    """The preview's "left out" rows in one sentence under the table."""
    rows = [r for r in table if r["label"].startswith("(left out")]
    total = sum(r["images"] for r in rows)
    if not total:
        return "Left out: none (every labeled image goes into the export)"
    reasons = ", ".join(f"{r['images']:,} {r['label'][11:-1]}" for r in rows if r["images"])
    return f"Left out: {total:,} images ({reasons})"


def clear_result() -> None:
    """Any new choice or action makes the last export's success message history."""
    st.session_state.pop(RESULT_KEY, None)


def export_dir(ws: Workspace, name: str) -> Path:
    """Exports live inside the workspace, under a plain folder name (no path from the browser)."""
    return ws.export_dir(name.strip())


def taken_message(name: str) -> str:
    return (
        f"An export named “{name}” already exists on the server. Tick “{REPLACE_LABEL}” "
        "above to write over it, or choose another export name."
    )


def run_export(ws: Workspace, options: dict) -> None:
    from imgcluster.export import export_workspace, zip_export

    name = options.pop("name").strip()
    out = export_dir(ws, name)
    if not options["overwrite"] and out.exists() and any(out.iterdir()):
        st.error(taken_message(name), icon=":material/folder_off:")
        return
    bar = common.ProgressBar("Writing the export", unit="files")
    try:
        result = export_workspace(ws, out, progress=bar, **options)
    except ExportError as exc:
        if "already exists" in str(exc) or "not empty" in str(exc):
            st.error(taken_message(name), icon=":material/folder_off:")  # lost a race
            return
        raise
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
            # No rerun: a rerun started by the click would register a new deferred id and
            # drop this one before the download request reaches the server (seen in CI).
            on_click="ignore",
            type="primary",
            icon=":material/download:",
        )
    for warning in result["warnings"]:
        st.warning(common.md_escape(warning))


def show_warnings(warnings: list[tuple[str, str]]) -> None:
    """What to look at before writing, with where to fix it."""
    if not warnings:
        st.caption("Every label is named, reviewed and has at least 5 images.")
        return
    for kind, message in warnings:
        st.warning(common.md_escape(message), icon=WARNING_ICONS.get(kind, ":material/info:"))
    st.page_link("pages/label.py", label="Fix them on the Label page", icon=":material/arrow_back:")


def options_form() -> dict:
    name = st.text_input(
        "Export name", value="dataset", key="export_name", max_chars=64, on_change=clear_result
    )
    split = st.radio(
        "Split",
        list(SPLITS),
        format_func=SPLITS.__getitem__,
        key="export_split",
        on_change=clear_result,
    )
    random_state = st.number_input(
        "Split random state (the same number gives the same split)",
        0,
        2**31 - 1,
        0,
        key="export_random_state",
        disabled=split == "none",
        on_change=clear_result,
    )
    mode = st.radio(
        "Files",
        list(MODES),
        format_func=MODE_HELP.__getitem__,
        key="export_mode",
        on_change=clear_result,
    )
    return {
        "name": name,
        "mode": mode,
        "split": None if split == "none" else split,
        "random_state": int(random_state),
        "confirmed_only": st.checkbox(
            "Only confirmed images", key="export_confirmed_only", on_change=clear_result
        ),
        "include_unsure": st.checkbox(
            "Include images marked unsure", key="export_unsure", on_change=clear_result
        ),
        "overwrite": st.checkbox(REPLACE_LABEL, key="export_overwrite", on_change=clear_result),
    }


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
        options = options_form()
    with right:
        st.subheader("Preview")
        try:
            table, warnings = preview(
                *common.ws_key(ws),
                options["confirmed_only"],
                options["include_unsure"],
                options["split"],
                options["random_state"],
            )
        except NoLabelSession:
            st.info("Nothing to export yet: labels start on the Clusters page.")
            st.page_link("pages/clusters.py", label="Clusters", icon=":material/arrow_back:")
            return
        except ImgclusterError as exc:
            common.show_error(exc)
            return
        st.dataframe(table, hide_index=True, width="stretch")
        st.caption(left_out_line(table))
        show_warnings(warnings)
    if st.button(
        "Export", key="export_go", type="primary", icon=":material/output:", on_click=clear_result
    ):
        with common.guard():
            run_export(ws, options)
    if result := st.session_state.get(RESULT_KEY):
        show_result(result)


main()
