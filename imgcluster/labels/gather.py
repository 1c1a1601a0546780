"""Gather the strays (issue 13 §7): images in *other* labels that look like one label.

After clustering, the remaining work is often single misfits scattered over many labels, one
move each. `gather` collects, for one label, the images elsewhere whose nearest labeled
neighbours vote for that label more than for any other, their own included (a kNN vote,
MorphoCluster's "grow"); `accept_gathered` moves the ones a person accepts in one audited,
undoable step.

The vote runs on the L2-normalised vectors (cosine neighbours), not in the session's
clustering space: that space (PCA, and far more the refined UMAP space) is built to make
clusters compact, so there a stray's nearest neighbours are the other strays of its own
cluster and the vote keeps it where it is (the first version: 17 strays over all labels at
precision 0.24 in the refined space; this vote: about 0.36 on first pages of 60). Requiring
the label to *lead* the vote, not only to match the image's own label, keeps out the strays
of other classes (their own share is low, so they passed for every label near them): on
scattered single misfits first pages went from 0.15 to 0.28 of the label's class for the same
actions (`bench/annotate.py --scattered`). A logistic-regression probe
trained out of fold on the current labels ranked no better (0.27-0.38) at 10-100x the cost, nor
did one trained on each label's core (its most central 30-70% in the clustering space: 0.14-0.28).
The features cap any gather model here: a probe trained out of fold on the *true* classes
reaches 0.38-0.44 on first pages (10 seeds), and the top of this vote's pages (first 5-10:
~0.4) is already near that (`bench/annotate.py --variants`, "true-label probe (bound)").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from imgcluster.labels import geometry
from imgcluster.labels._store import chunked_rows, image_states, label, session_row
from imgcluster.labels.ops import move
from imgcluster.labels.results import Applied, Stray
from imgcluster.metrics import knn_scores
from imgcluster.workspace import Workspace

__all__ = ["accept_gathered", "gather"]

#: Candidates (nearest to the label's centre) whose neighbours are polled: bounds the cost at
#: 100k images to a few hundred queries.
_SHORTLIST = 400
#: Labeled images the neighbours are drawn from at most (a random sample beyond): bounds the
#: distance matrix at 100k images; vote shares stay unbiased.
_MAX_REFS = 20_000


def gather(
    workspace: Workspace,
    label_ref: int | str,
    *,
    limit: int = 60,
    k: int = 20,
    min_score: float = 0.0,
    misfits_only: bool = False,
    random_state: int = 0,
) -> list[Stray]:
    """Images in other labels that look like this one, most likely first.

    Parameters
    ----------
    workspace : Workspace
    label_ref : int or str
        The gathering label: an id or a name.
    limit : int, default=60
        At most this many strays (one grid page).
    k : int, default=20
        Neighbours in the vote (cosine, on the L2-normalised vectors).
    min_score : float, default=0.0
        Smallest score. The score is the share of the image's ``k`` nearest labeled
        neighbours' distance-weighted vote that goes to this label; an image is offered only
        when this label leads its vote (no other label, its own included, gets a larger
        share: the kNN classifier puts it here), a rule that means the same whatever the
        number of labels. Raise it for fewer, surer strays.
    misfits_only : bool, default=False
        Only images flagged as misfits where they are (`imgcluster.labels.misplaced`).
    random_state : int, default=0
        The sample of labeled neighbours above 20,000 labeled images.

    Notes
    -----
    Neighbours are every ``normal`` labeled image (the candidate itself left out), so the
    vote is the current labels' view of where an image belongs. Only unconfirmed images that
    nobody moved by hand are offered: a suggestion never undoes a person's decision.
    On the 600 clothing photos (refined space, labels renamed to their majority class,
    nothing confirmed, k=10, 3 seeds; `bench/annotate.py --variants`), first pages of 60 hold
    0.36 of the label's class (10x the base rate of ~0.03), as many as a probe trained on the
    true classes ranks there. ``min_score=0.5`` (most of the neighbours' vote) shows fewer.

    Returns
    -------
    list of Stray
        Unconfirmed, not moved by hand, ``normal`` images of other labels, by descending
        score. Empty without features or when there are fewer than two labels.
    """
    with workspace.read() as conn:
        session = session_row(conn)
        sid = int(session["id"])
        target = int(label(conn, sid, label_ref)["id"])
        states = image_states(conn, sid)
        poor = geometry.poor_fit_ids(workspace, conn, session)
    ids, space = _vectors(workspace, session["backbone"])
    if not len(ids):
        return []
    rows = [states.get(i) for i in ids.tolist()]
    labeled = np.array([s is not None and s[2] == "normal" for s in rows], bool)
    label_of = np.array([s[0] if s is not None else -1 for s in rows], np.int64)
    decided = np.array([s is not None and (bool(s[1]) or bool(s[4])) for s in rows], bool)
    mine = labeled & (label_of == target)
    eligible = labeled & ~decided & (label_of != target)
    if misfits_only:
        eligible &= np.isin(ids, np.fromiter(poor, np.int64, len(poor)))
    if not mine.any() or not eligible.any():
        return []
    norms = np.sqrt(np.einsum("ij,ij->i", space, space))
    norms[norms == 0] = 1.0
    centre = (space[mine] / norms[mine, None]).mean(axis=0)
    candidates = np.flatnonzero(eligible)
    near = (space[candidates] @ centre) / norms[candidates]
    candidates = candidates[np.argsort(-near, kind="stable")[: max(_SHORTLIST, 5 * int(limit))]]
    refs = np.flatnonzero(labeled)
    if len(refs) > _MAX_REFS:
        rng = np.random.default_rng(random_state)
        refs = np.sort(rng.choice(refs, _MAX_REFS, replace=False))
    position = np.full(len(ids), -1, np.int64)
    position[refs] = np.arange(len(refs))
    votes = knn_scores(
        space[candidates] / norms[candidates, None],
        space[refs] / norms[refs, None],
        label_of[refs],
        k,
        skip_self=position[candidates],
    )
    columns = np.unique(label_of[refs])
    share = votes[:, np.searchsorted(columns, target)]
    # Offered where this label leads the vote (no label, the image's own included, gets
    # more): the kNN classifier's answer. "At least its own label's share" let in the strays
    # of *other* classes (their own share is low), half of a page (bench/README.md).
    leads = share >= votes.max(axis=1)
    order = np.argsort(-share, kind="stable")
    chosen = [int(r) for r in order if leads[r] and share[r] > 0 and share[r] >= min_score]
    chosen = chosen[: int(limit)]
    return _strays(workspace, ids, label_of, candidates, chosen, share)


def _vectors(workspace: Workspace, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    """Image ids and stored vectors of the session's backbone (memoised per feature set)."""
    features = geometry.session_features(workspace, backbone)
    return np.asarray(features.image_ids, np.int64), features.vectors


def _strays(
    workspace: Workspace,
    ids: np.ndarray,
    label_of: np.ndarray,
    candidates: np.ndarray,
    chosen: list[int],
    score: np.ndarray,
) -> list[Stray]:
    picked = [int(ids[candidates[r]]) for r in chosen]
    with workspace.read() as conn:
        info = {
            int(r[0]): (r[1], r[2])
            for r in chunked_rows(
                conn, "SELECT id, relpath, sha256 FROM image_catalog WHERE id IN ({})", picked
            )
        }
        names = dict(
            chunked_rows(
                conn,
                "SELECT id, name FROM labels WHERE id IN ({})",
                sorted({int(label_of[candidates[r]]) for r in chosen}),
            )
        )
    return [
        Stray(
            image_id=i,
            relpath=info[i][0],
            sha256=info[i][1],
            label=names[int(label_of[candidates[r]])],
            label_id=int(label_of[candidates[r]]),
            score=float(score[r]),
        )
        for i, r in zip(picked, chosen, strict=True)
    ]


def accept_gathered(
    workspace: Workspace,
    label_ref: int | str,
    images: Iterable[int | str],
    *,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Move the accepted strays into the gathering label: one audit entry, undoable.

    The label must exist (a gather never creates one); the images are "moved by hand" and
    stay unconfirmed like any move. ``expected`` as in `imgcluster.labels.move` (pass
    ``{stray.image_id: stray.label}`` to refuse strays someone moved meanwhile).
    """
    return move(workspace, images, label_ref, create=False, actor=actor, expected=expected)
