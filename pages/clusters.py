"""Clusters page: choose k, read every cluster at a glance (a strip of its most typical photos),
see every image on a map coloured by label, select on the map and move the selection.

The labels follow the k control only while nobody has edited them. Once they carry decisions, a
k change asks first, offers to add clusters among the unconfirmed images instead, and the
destructive "start over" needs a second click that names what it discards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from imgcluster import labels as lb
from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace
from imgcluster_app import clusters_view as cv
from imgcluster_app import common, router, views

router.enter()

K_KEY = f"{common.VIEW_PREFIX}k"
#: The k the user asked for with the controls and that the labels do not follow yet (set only
#: by a user's change of the control, cleared when the labels were made to follow or kept).
PENDING_KEY = f"{common.VIEW_PREFIX}k_pending"
CONFIRM_KEY = f"{common.VIEW_PREFIX}k_confirm_restart"
K_CEILING = 200
#: While a run redraws the page, Streamlit fades the elements it has not re-sent yet with an
#: animated opacity; in a software-raster browser every frame of that fade repaints the whole
#: page (bench/README.md, "App speed"). The fade stays, without the animation.
STALE_CSS = (
    "<style>[data-stale],[data-stale] *{transition:none!important;animation:none!important}</style>"
)


# -- the k control ----------------------------------------------------------------------------


def k_range_max(n: int) -> int:
    """Largest k offered: half the images (beyond that clusters are pairs), at most 200, so
    the slider stays usable at small k."""
    return max(2, min(K_CEILING, n // 2))


def _sync_k(source: str) -> None:
    """The slider and the number box show one k; whichever was moved sets it (a user's ask)."""
    value = int(st.session_state[source])
    st.session_state[K_KEY] = value
    st.session_state[PENDING_KEY] = value
    st.session_state.pop(CONFIRM_KEY, None)
    for key in (f"{K_KEY}_slider", f"{K_KEY}_input"):
        if key != source:
            st.session_state[key] = value


def set_k(k: int) -> None:
    """Show ``k`` in the controls without asking the labels to change."""
    for key in (K_KEY, f"{K_KEY}_slider", f"{K_KEY}_input"):
        st.session_state[key] = k
    st.session_state.pop(PENDING_KEY, None)
    st.session_state.pop(CONFIRM_KEY, None)


def k_controls(k_max: int, default: int) -> int:
    k = max(2, min(int(st.session_state.get(K_KEY, default)), k_max))
    for key in (K_KEY, f"{K_KEY}_slider", f"{K_KEY}_input"):
        if st.session_state.get(key) != k:
            st.session_state[key] = k
    left, right = st.columns([1, 4], vertical_alignment="bottom")
    left.number_input(
        "k",
        2,
        k_max,
        step=1,
        key=f"{K_KEY}_input",
        on_change=_sync_k,
        args=(f"{K_KEY}_input",),
    )
    right.slider(
        "Number of clusters (k)",
        2,
        k_max,
        key=f"{K_KEY}_slider",
        on_change=_sync_k,
        args=(f"{K_KEY}_slider",),
    )
    return k


# -- labels that follow k, without dropping anyone's work -------------------------------------


def labels_state(ws: Workspace) -> tuple[Any, int | None, int, list[lb.LabelSummary]]:
    """(session, its run's k, edits in effect, live labels), or (None, None, 0, [])."""
    session, run_k, edits = views.session_info(ws)
    table = views.label_table(ws) if session is not None else None
    return session, run_k, edits, (table.summaries if table else [])


def default_k(ws: Workspace, k_max: int) -> int:
    """What the control shows on arrival: the number of labels there are (so an arrival never
    reads as a request to change them), else a middle-of-the-road 8."""
    session, run_k, _edits, summaries = labels_state(ws)
    if session is not None:
        return min(max(2, len(summaries) or run_k or 8), k_max)
    return min(8, k_max)


def _start(ws: Workspace, backbone: str, k: int, *, replace: bool) -> None:
    from imgcluster.clustering import cluster

    bar = common.ProgressBar(f"Clustering into {k}", unit="steps")
    run = cluster(ws, backbone, k, progress=bar)
    bar.bar.empty()
    lb.start_session(ws, run.id, actor=views.actor(), replace=replace)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def what_is_lost(edits: int, summaries: Sequence[lb.LabelSummary]) -> str:
    """The work a start-over discards, in the annotator's terms ("31 labels (4 named by hand),
    412 image decisions and 57 edits")."""
    decided = sum(getattr(s, "reviewed", s.confirmed + s.excluded + s.unsure) for s in summaries)
    named = sum(1 for s in summaries if not cv.AUTO_NAME.fullmatch(s.name))
    parts = [f"{_plural(len(summaries), 'label')} ({named} named by hand)"]
    if decided:
        parts.append(_plural(decided, "image decision"))
    parts.append(_plural(edits, "edit"))
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _restart(ws: Workspace, backbone: str, k: int) -> str:
    from imgcluster.clustering import cluster

    run = cluster(ws, backbone, k)  # (a callback: no progress bar, the page is not drawn yet)
    lb.start_session(ws, run.id, actor=views.actor(), replace=True)
    set_k(k)
    return f"Started over from k = {k}; the previous labels stay in the workspace's history"


def _add(ws: Workspace, n_new: int, k: int) -> str:
    summary = lb.recluster_unconfirmed(ws, n_new, actor=views.actor()).summary
    set_k(k)  # the labels now number k: nothing is pending any more (issue 12, bug 5)
    return summary


def follow_k(ws: Workspace, backbone: str, k: int) -> None:
    """Make the labels follow the k control; ask first once they carry edits."""
    session, run_k, edits, summaries = labels_state(ws)
    if session is None:
        _start(ws, backbone, k, replace=False)
        st.session_state.pop(PENDING_KEY, None)
        return
    pending = st.session_state.get(PENDING_KEY)
    if pending is None or pending != k or (session.backbone == backbone and k == len(summaries)):
        st.session_state.pop(PENDING_KEY, None)
        if edits == 0 and session.backbone == backbone and _refined_waiting(ws, backbone, session):
            # Issue 13 §1: the refined space became ready before anyone labeled anything:
            # the clusters move to it (same k). Once there is an edit, only the offer
            # (`refined_offer`) re-clusters, keeping the decisions.
            _start(ws, backbone, int(run_k or len(summaries)), replace=True)
            st.toast("Clusters moved to the refined space, now ready (nothing was labeled yet)")
        return
    if edits == 0:
        _start(ws, backbone, k, replace=True)
        st.session_state.pop(PENDING_KEY, None)
        return
    restart_warning(ws, backbone, k, session, edits, summaries)


def restart_warning(
    ws: Workspace,
    backbone: str,
    k: int,
    session: Any,
    edits: int,
    summaries: Sequence[lb.LabelSummary],
) -> None:
    n_labels = len(summaries)
    lost = what_is_lost(edits, summaries)
    with st.container(border=True, key="clusters_k_warning"):
        st.warning(
            f"Your {n_labels} labels ({session.backbone}) carry {_plural(edits, 'edit')}. "
            f"Starting over with k = {k} would discard {lost}.",
            icon=":material/warning:",
        )
        cols = st.columns(3)
        if session.backbone == backbone and k > n_labels:
            cols[0].button(
                f"Add {k - n_labels} clusters from unconfirmed images",
                key="clusters_add",
                type="primary",
                icon=":material/add:",
                on_click=views.callback(_add, ws, k - n_labels, k),
            )
        cols[1].button(
            f"Keep my {n_labels} labels",
            key="clusters_keep",
            on_click=set_k,
            args=(max(2, n_labels),),
        )
        cols[2].button(
            f"Start over with k = {k}…",
            key="clusters_restart",
            icon=":material/restart_alt:",
            on_click=lambda: st.session_state.__setitem__(CONFIRM_KEY, k),
        )
        if st.session_state.get(CONFIRM_KEY) == k:
            st.error(f"Start over with k = {k}? This discards {lost}.", icon=":material/delete:")
            yes, no = st.columns(2)
            yes.button(
                f"Discard them and start over with k = {k}",
                key="clusters_restart_confirm",
                on_click=views.callback(_restart, ws, backbone, k),
            )
            no.button(
                "Cancel",
                key="clusters_restart_cancel",
                on_click=lambda: st.session_state.pop(CONFIRM_KEY, None),
            )


# -- the k-suggestion curve ---------------------------------------------------------------------


#: Beyond this many ks the curve skips the stability score (one clustering per k, not three).
STABLE_CURVE_MAX_K = 40


@st.cache_data(max_entries=8, show_spinner=False)
def k_curve(path: str, backbone: str, n_features: int, k_max: int, _progress: Any = None):
    """Silhouette for every k the control offers (keyed on the feature count: labels do not
    change it); ``_progress`` (not part of the key) draws the bar while it computes."""
    from imgcluster.clustering import suggest_k

    ws = common.workspace(path)
    seeds = {} if k_max <= STABLE_CURVE_MAX_K else {"n_seeds": 1}
    return suggest_k(ws, 2, k_max, backbone=backbone, progress=_progress, **seeds)


@st.cache_data(max_entries=16, show_spinner=False)
def run_space(path: str, run_id: int) -> str:
    """The space a stored run clustered in (a run never changes, so its id is the key)."""
    from imgcluster.clustering import load_run

    return load_run(common.workspace(path), run_id).preprocess


def _offer_key(session: Any) -> str:
    return f"{common.VIEW_PREFIX}refined_offer_{session.id}"


def _recluster_refined(ws: Workspace, backbone: str, session: Any) -> str:
    from imgcluster import spaces

    preprocess = spaces.best_preprocess(ws, backbone)
    applied = lb.recluster_unconfirmed(ws, 0, actor=views.actor(), preprocess=preprocess)
    st.session_state[_offer_key(session)] = "done"
    return f"{applied.summary}, in the refined space; your decisions kept (Undo reverts it)"


def _refined_waiting(ws: Workspace, backbone: str, session: Any) -> bool:
    """The session's run is not in the refined space, and the refined space is ready."""
    from imgcluster import spaces

    try:
        if run_space(str(ws.path), session.run_id) == spaces.REFINED_PREPROCESS:
            return False
        return spaces.best_preprocess(ws, backbone) == spaces.REFINED_PREPROCESS
    except ImgclusterError:
        return False


def refined_offer(ws: Workspace, backbone: str) -> None:
    """Issue 13 §1: once the refined space is ready and labeling has started, offer to
    re-cluster the undecided images in it, keeping every decision (confirmed, moved by hand,
    excluded). Labels never change by themselves: only this button does it, and Undo reverts."""
    session, _run_k, edits = views.session_info(ws)
    if session is None or edits == 0 or session.backbone != backbone:
        return
    if st.session_state.get(_offer_key(session)) or not _refined_waiting(ws, backbone, session):
        return
    with st.container(border=True, key="clusters_refined_offer"):
        st.info(
            "The refined clustering space is ready: clusters there usually need fewer fixes. "
            "Re-clustering moves only the undecided images; confirmed, moved-by-hand and "
            "excluded images keep their label, and no label is removed.",
            icon=":material/auto_awesome:",
        )
        go, later = st.columns(2)
        go.button(
            "Re-cluster in the refined space, keeping your decisions",
            key="clusters_refined_recluster",
            icon=":material/autorenew:",
            on_click=views.callback(_recluster_refined, ws, backbone, session),
        )
        later.button(
            "Not now",
            key="clusters_refined_later",
            on_click=lambda: st.session_state.__setitem__(_offer_key(session), "later"),
        )


def space_note(ws: Workspace, backbone: str) -> None:
    """Which space the clusters are computed in, and where the refined one stands (issue 13:
    it is made in the background; the page never waits for it). Reads no vectors.

    While the space is being made the note polls (a fragment, every 5 s); when it becomes
    ready the whole page reruns once, so untouched clusters move to it (`follow_k`) and
    edited ones get the offer (`refined_offer`) without the annotator having to click.
    """
    try:
        from imgcluster import spaces

        status = spaces.space_status(ws, backbone)
    except (ImportError, AttributeError, ImgclusterError):
        return
    waiting = status.state == "running" or (status.state == "not started" and common.umap_enabled())

    @st.fragment(run_every=5 if waiting else None)
    def note() -> None:
        now = spaces.space_status(ws, backbone) if waiting else status
        if waiting and now.state == "ready":
            st.rerun()  # the whole page, once: the clusters follow the new space
        _space_caption(now)

    note()


def _space_caption(status: Any) -> None:
    if status.state == "ready":
        st.caption("Clustering space: refined (UMAP, 10-d), computed once for these features.")
    elif status.state == "running":
        done = f" ({status.fraction:.0%})" if status.fraction is not None else ""
        st.caption(
            f"Clustering space: PCA for now; the refined space is being computed{done} and "
            "takes over when ready (labels you have edited never change under you)."
        )
    elif status.state == "failed":
        st.caption(f"Refined space failed; clustering uses PCA. {common.md_escape(status.message)}")


def suggestion_panel(ws: Workspace, backbone: str, n: int, k_max: int, k: int) -> None:
    flag = f"{common.VIEW_PREFIX}suggest"
    if not st.session_state.get(flag):
        st.caption(
            f"Which k? The silhouette curve over k = 2..{k_max} (higher = tighter, better "
            "separated clusters) is a hint; how many kinds of product you expect matters more."
        )
        st.button(
            "Compute the k curve",
            key="clusters_suggest",
            icon=":material/show_chart:",
            on_click=lambda: st.session_state.__setitem__(flag, True),
        )
        return
    with common.guard():
        bar = common.ProgressBar(f"Clustering for each k in 2..{k_max}", unit="k")
        curve = k_curve(str(ws.path), backbone, n, k_max, bar)
        bar.bar.empty()
        st.plotly_chart(
            cv.curve_figure(curve, k), key="clusters_suggest_plot", config={"displayModeBar": False}
        )
        if curve.best:
            st.caption(f"Best by silhouette: k = {', '.join(map(str, curve.best))}")
            if advice := getattr(curve, "advice", ""):
                st.caption(common.md_escape(advice))  # says how confident the advice is
            best = [b for b in curve.best if b != k][:3]
            cols = st.columns(max(1, len(best)))
            for col, b in zip(cols, best, strict=False):
                col.button(f"Use k = {b}", key=f"clusters_use_{b}", on_click=_sync_best, args=(b,))


def _sync_best(k: int) -> None:
    st.session_state[f"{K_KEY}_input"] = k
    _sync_k(f"{K_KEY}_input")


# -- the page ---------------------------------------------------------------------------------


def new_images_notice(ws: Workspace, n: int, table: views.LabelTable) -> None:
    unlabeled = n - len(table.image_ids)
    if unlabeled <= 0:
        return
    st.info(
        f"{unlabeled:,} images were added after labeling started and have no label yet.",
        icon=":material/fiber_new:",
    )
    st.button(
        "Give them the label of their nearest labeled neighbours",
        key="clusters_suggest_new",
        on_click=views.callback(views.suggest_new, ws),
    )


def main() -> None:
    st.html(STALE_CSS)
    cv.go_to_label()
    ws = common.require_workspace()
    st.title("Clusters")
    common.show_flash()
    backbone = common.active_backbone(ws)
    n = common.feature_counts(ws).get(backbone, 0)
    if n < 3:
        st.info(f"Compute {backbone} features first.")
        st.page_link("pages/features.py", label="Features", icon=":material/arrow_back:")
        return
    k_max = k_range_max(n)
    controls, curve = st.columns([3, 2])
    with controls:
        k = k_controls(k_max, default_k(ws, k_max))
        with common.guard():
            follow_k(ws, backbone, k)
    table = views.label_table(ws)
    if table is None:
        return
    with controls:
        n_live = sum(1 for s in table.summaries if s.count > 0)
        st.caption(
            f"{n:,} images with {backbone} features · {n_live} labels · drag a box or lasso "
            "on the map to select images"
        )
        space_note(ws, backbone)
        refined_offer(ws, backbone)
        new_images_notice(ws, n, table)
    with curve:
        suggestion_panel(ws, backbone, n, k_max, k)
    views.history_bar(ws, key="clusters")
    common.start_projection(ws, backbone)
    ids = cv.scatter(ws, backbone, table, n)
    if ids:
        with st.container(border=True):
            cv.selection_panel(ws, ids, table)
    else:
        st.caption(
            "Select images with the box or lasso tool (top right of the map) to see them "
            "here and move them to a label."
        )
    left, right = st.columns([3, 1])
    with left:
        cv.strips(ws, table)
    with right:
        cv.empty_labels_notice(ws)
        st.plotly_chart(
            cv.sizes_figure(table), key="clusters_sizes", config={"displayModeBar": False}
        )
    common.next_step("pages/label.py", "Next: review each label")


main()
