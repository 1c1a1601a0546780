"""Features page: choose the CNN backbone (or the fusion of two) and compute (or reuse) one
vector per image."""

from __future__ import annotations

import streamlit as st

from imgcluster.backbones import FeatureSet, list_feature_sets
from imgcluster.workspace import Workspace
from imgcluster_app import common, router

router.enter()


def describe(backbone: FeatureSet) -> str:
    # Must not change when vectors are computed: the browser matches the radio's selection by
    # these texts, and a changed text shows no choice selected.
    if backbone.offline:
        where = "works offline"
    else:
        where = "downloads its weights from the internet on first use"
    return f"**{backbone.name}** · {where}  \n{backbone.description}"


def run_extraction(ws: Workspace, name: str, todo: int) -> None:
    from imgcluster.features import extract

    with st.spinner(f"Loading {name} (about 10 s the first time)..."):
        extractor = common.extractor(name)
    bar = common.ProgressBar(f"Computing {name} features")
    report = extract(ws, extractor, progress=bar)
    bar.finish()
    common.set_backbone(name)
    common.start_projection(ws, name)
    message = f"{report.extracted:,} new vectors in {report.seconds:.1f} s ({report.runtime})"
    if report.reused:
        message += f"; {report.reused:,} reused from before"
    common.flash(message)
    if report.failed:
        common.flash_table("Images that could not be read now", report.failed)
    st.rerun()


def main() -> None:
    ws = common.require_workspace()
    st.title("Features")
    st.caption(
        "A pretrained network turns each image into a vector; similar-looking products get "
        "similar vectors. Vectors are stored in the workspace and reused: only new images are "
        "computed."
    )
    common.show_flash()
    total = common.image_counts(*common.ws_key(ws))["ok"]
    if not total:
        st.info("No usable image in this workspace yet.")
        st.page_link("pages/images.py", label="Images", icon=":material/arrow_back:")
        return
    done = common.feature_counts(ws)
    # Offline ones first; "best quality: Lite0 + Lite2" (a fusion) is one of the choices.
    backbones = sorted(list_feature_sets(), key=lambda b: not b.offline)
    names = [b.name for b in backbones]
    by_name = {b.name: b for b in backbones}
    current = common.active_backbone(ws)
    choice = st.radio(
        "Backbone",
        names,
        index=names.index(current) if current in names else 0,
        format_func=lambda n: describe(by_name[n]),
        key=f"{common.VIEW_PREFIX}features_backbone",
    )
    backbone = by_name[choice]
    have = done.get(choice, 0)
    if choice != current and have >= total:
        common.set_backbone(choice)
    if not backbone.offline:
        st.warning(
            f"{backbone.name} is not on this machine yet: computing downloads its weights "
            "from the internet (it fails with a clear message when offline).",
            icon=":material/cloud_download:",
        )
    if have >= total:
        st.success(
            f"All {total:,} images have {choice} features (stored; nothing to compute).",
            icon=":material/check_circle:",
        )
        common.next_step("pages/clusters.py", "Next: clusters")
    else:
        label = "Compute features" if not have else f"Compute the {total - have:,} missing"
        if st.button(label, key="features_extract", type="primary", icon=":material/play_arrow:"):
            with common.guard():
                run_extraction(ws, choice, total - have)


main()
