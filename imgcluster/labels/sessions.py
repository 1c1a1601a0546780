"""Labeling sessions: start one from a clustering run, or let the labels follow a k control.

A session is the unit of labeling: its labels start as the run's clusters (``cluster_NN``),
every clustered image unconfirmed in its cluster's label. `follow_k` is what the app calls
while it draws the Clusters page: it starts or restarts untouched labels, never edited ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from imgcluster.errors import ImgclusterError, UnknownCluster
from imgcluster.labels import geometry
from imgcluster.labels._store import base_json, n_steps, session_from_row, session_row
from imgcluster.labels.audit import Recorder, actor_name, record, start_reference
from imgcluster.labels.results import Following
from imgcluster.workspace import Workspace

__all__ = ["follow_k", "start_session"]


def start_session(
    workspace: Workspace,
    run_id: int | None = None,
    *,
    actor: str = "cli",
    replace: bool = False,
) -> int:
    """Start labeling from a clustering run: each cluster becomes a label ``cluster_NN``.

    Parameters
    ----------
    workspace : Workspace
    run_id : int, optional
        The clustering run (`imgcluster.clustering.cluster`); the newest run if omitted
        (newest as `imgcluster.clustering.latest_run` means it).
    actor : str, default="cli"
        Who starts it (recorded in the audit log).
    replace : bool, default=False
        Start over although a session is active. The old session is kept (inactive) with
        its history if anyone did anything in it; an untouched one (only its start) is
        deleted, as it holds no decision.

    Returns
    -------
    int
        The new session id.

    Raises
    ------
    UnknownCluster
        If there is no such run (or no run at all).
    ImgclusterError
        If a session is already active and ``replace`` is False, so a stray click never
        hides an annotator's work.
    """
    from imgcluster.clustering import latest_run, run_info
    from imgcluster.runs import run_cluster_arrays

    actor = actor_name(actor)
    pending = None
    with workspace.read() as conn:  # the space is prepared outside the write lock
        ahead = latest_run(conn) if run_id is None else run_info(conn, run_id)
        # A stored run's assignments never change: read them outside the write lock as well
        # (inside it the same read cost 14x more at 10k images).
        assigned_ahead = run_cluster_arrays(conn, ahead.id) if ahead is not None else None
    if ahead is not None:
        geometry.session_space(workspace, ahead.backbone, ahead.id)
    with workspace.transaction() as conn:
        if run_id is None:
            run = latest_run(conn)
            if run is None:
                raise UnknownCluster(
                    "no clustering run yet; cluster the images first (`imgcluster cluster`)"
                )
        else:
            run = run_info(conn, run_id)
        active = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        if active is not None and not replace:
            raise ImgclusterError(
                f"labeling session {active['id']} (from run {active['run_id']}, "
                f"{n_steps(conn, active['id'])} "
                "operations) is active; continue it, or start over with replace=True "
                "(`--replace`): the old session is kept, inactive"
            )
        if active is not None and not n_steps(conn, active["id"]):
            # Nothing was decided in it (the app restarts untouched labels on every k change):
            # drop it instead of keeping a copy of every image's row per k tried.
            conn.execute("DELETE FROM label_sessions WHERE id = ?", (active["id"],))
        conn.execute("UPDATE label_sessions SET active = 0 WHERE active = 1")
        sid = int(
            conn.execute(
                "INSERT INTO label_sessions(run_id, backbone, created_by) VALUES (?, ?, ?)",
                (run.id, run.backbone, actor),
            ).lastrowid
            or 0
        )
        same_run = ahead is not None and assigned_ahead is not None and ahead.id == run.id
        ids, clusters = assigned_ahead if same_run else run_cluster_arrays(conn, run.id)
        keep = _usable(conn, ids)
        left_out = ids[~keep]
        ids, clusters = ids[keep], clusters[keep]
        present = np.unique(clusters).tolist()
        all_clusters = sorted(set(range(int(run.k))) | set(present))
        width = max(2, len(str(all_clusters[-1]))) if all_clusters else 2
        rec = Recorder(conn, sid)
        label_of = {c: rec.create_label(f"cluster_{c:0{width}d}", c) for c in all_clusters}
        keys = np.asarray(all_clusters, np.int64)
        label_ids = np.asarray([label_of[c] for c in all_clusters], np.int64)
        labels = label_ids[np.searchsorted(keys, clusters)] if len(ids) else clusters
        # The start rows stay implicit (`imgcluster.labels._store.session_base`): no row
        # per image, and the audit row names them by reference to the run.
        conn.execute(
            "UPDATE label_sessions SET base = ? WHERE id = ?",
            (base_json(run.id, label_of, left_out.tolist()), sid),
        )
        rec.started = {**start_reference(run.id, left_out.tolist()), "n_images": len(ids)}
        record(
            conn,
            sid,
            actor,
            "start",
            f"start labeling from clustering run {run.id} (k={run.k}, {run.backbone}; "
            f"{len(all_clusters)} labels, {len(ids)} images)",
            {"run_id": run.id},
            rec,
            status=None,
        )
        session = conn.execute("SELECT * FROM label_sessions WHERE id = ?", (sid,)).fetchone()
        if len(ids):
            pending = geometry.refresh(workspace, conn, session, None, known=(ids, labels))
    geometry.publish(pending)
    return sid


def _usable(conn: Any, ids: np.ndarray) -> np.ndarray:
    """Which of a run's image ids a new session labels: not skipped or missing, and still
    in the catalogue. The few unusable images come from the status index (an IN list of
    every assigned id costs a query per 900 images: seconds at 1M)."""
    unusable = np.asarray(
        [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM image_catalog WHERE status IN ('skipped', 'missing')"
            )
        ],
        np.int64,
    )
    top = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM image_catalog").fetchone()[0])
    return (ids <= top) & ~np.isin(ids, unusable)


def follow_k(
    workspace: Workspace,
    backbone: str,
    k: int,
    *,
    actor: str = "cli",
    progress: Callable[..., Any] | None = None,
    **cluster_options: Any,
) -> Following:
    """Make the labels follow a k control without ever dropping an annotator's work.

    No labels yet, or labels nobody has edited (``n_edits == 0``): cluster ``backbone`` with
    ``k`` (a stored run comes back at once) and start labeling from that run. Labels already
    from this backbone and k: nothing to do. Labels with edits and another k: nothing is
    changed (``status="kept"``); the caller asks the annotator (start over with
    `start_session` ``replace=True``, or add clusters with `recluster_unconfirmed`).

    Parameters
    ----------
    workspace : Workspace
    backbone : str
    k : int
    actor : str, default="cli"
    progress : callable, optional
        Passed to `imgcluster.clustering.cluster` (the app's progress bar).
    **cluster_options
        Passed to `imgcluster.clustering.cluster` (``algorithm``, ``preprocess``...).

    Returns
    -------
    Following
    """
    from imgcluster.clustering import cluster, run_info

    with workspace.read() as conn:
        row = conn.execute("SELECT * FROM label_sessions WHERE active = 1").fetchone()
        session = None if row is None else session_from_row(conn, row)
        session_k = None if session is None else run_info(conn, session.run_id).k
    if session is not None and session.backbone == backbone and session_k == k:
        return Following("same", session, int(k), int(k), session.run_id)
    if session is not None and session.n_edits:
        return Following("kept", session, int(session_k or 0), int(k), session.run_id)
    run = cluster(workspace, backbone, k, progress=progress, **cluster_options)
    start_session(workspace, run.id, actor=actor, replace=session is not None)
    with workspace.read() as conn:
        new = session_from_row(conn, session_row(conn))
    status = "started" if session is None else "restarted"
    return Following(status, new, int(k), int(k), run.id)
