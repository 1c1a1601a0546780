"""Operations on labels: start, rename, merge, split, move, mark, confirm, delete, re-cluster.

Each is one transaction (`imgcluster.labels.audit.operation`), audited and undoable. Labels are
given by id (an int) or by name (a str, matched by `imgcluster.labels.names.name_key`); a
string is always a name. Operations act on the *current* state, read inside their transaction;
a caller that wants to act only on what it showed passes ``expected``: the session
`Session.version` the view was built from (any change since refuses), or for `move` /
`set_state` a mapping of image to the label it was shown in, or for `confirm` the image ids
the label was shown with. A mismatch raises `StaleState` and changes nothing.

A move is a decision about a label, not a review of each image (issue 12 §4): moved images
are marked "moved by hand" (``by_hand``), stay unconfirmed and keep their misfit flags; only
`confirm` / `confirm_images` confirm.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from imgcluster.errors import (
    ImgclusterError,
    InvalidLabelName,
    InvalidParameter,
    StaleState,
    UnknownImage,
    UnknownLabel,
)
from imgcluster.labels import geometry
from imgcluster.labels._store import (
    ATTEMPTS,
    chunked_rows,
    distinct,
    find_label,
    image_states,
    is_int,
    label,
    live_labels,
    n_images,
    no_label_message,
    relpaths,
    resolve_image_map,
    resolve_images,
    session_row,
    session_rows,
)
from imgcluster.labels.audit import Op, Recorder, actor_name, operation, record
from imgcluster.labels.names import MAX_NAME_LENGTH, validate_name
from imgcluster.labels.results import Applied, ImageState, Suggestion
from imgcluster.workspace import Workspace

__all__ = [
    "STATES",
    "confirm",
    "confirm_images",
    "delete_empty_labels",
    "delete_label",
    "merge",
    "move",
    "recluster_unconfirmed",
    "rename",
    "set_state",
    "split",
    "suggest_for_new_images",
]

#: Image states: ``excluded`` images are not exported, ``unsure`` ones are flagged for review.
STATES = ("normal", "excluded", "unsure")


# -- operations -------------------------------------------------------------------------------


def rename(
    workspace: Workspace,
    old: int | str,
    new: str,
    *,
    actor: str = "cli",
    expected: int | None = None,
) -> Applied:
    """Rename a label (no image moves: the geometry is untouched).

    Raises
    ------
    InvalidLabelName
        If ``new`` breaks the naming rules or another label already has that name (merge
        them instead).
    UnknownLabel
        If ``old`` names no label (e.g. someone renamed it meanwhile).
    """
    actor = actor_name(actor)
    name = validate_name(new)
    with operation(workspace, expected, moves=False) as op:
        conn, sid = op.conn, op.sid
        lab = label(conn, sid, old)
        other = find_label(conn, sid, name)
        if other is not None and other["id"] != lab["id"]:
            raise InvalidLabelName(
                f"a label named {other['name']!r} already exists; merge the two instead"
            )
        if name == lab["name"]:
            return Applied(None, "rename", f"{name!r} already has that name", 0, (lab["id"],))
        rec = op.recorder()
        rec.set_label(lab["id"], (name, lab["cluster"]))
        summary = f"rename {lab['name']!r} to {name!r}"
        args = {"label": lab["id"], "old": lab["name"], "new": name}
        entry = record(conn, sid, actor, "rename", summary, args, rec)
    return Applied(entry, "rename", summary, 0, (lab["id"],))


def merge(
    workspace: Workspace,
    labels: Sequence[int | str],
    *,
    into: str | int | None = None,
    actor: str = "cli",
    expected: int | None = None,
) -> Applied:
    """Merge labels into one; the others are deleted, their images keep their flags.

    Parameters
    ----------
    labels : sequence of str or int
        Labels to merge (ids or names).
    into : str or int, optional
        The result: an existing label (an id, or a name; listed or not) receives the others;
        a new name renames the first listed label, which receives the others. Default: the
        first listed label.
    """
    actor = actor_name(actor)
    with operation(workspace, expected) as op:
        conn, sid = op.conn, op.sid
        sources = distinct([label(conn, sid, ref) for ref in labels])
        if not sources:
            raise UnknownLabel("merge needs labels")
        target, new_name = sources[0], None
        if into is not None:
            found = find_label(conn, sid, into)
            if found is not None:
                target = found
                if isinstance(into, str):
                    typed = validate_name(into)
                    new_name = typed if typed != found["name"] else None
            else:
                if not isinstance(into, str):
                    raise UnknownLabel(no_label_message(conn, sid, into))
                new_name = validate_name(into)
        others = [lab for lab in sources if lab["id"] != target["id"]]
        if not others:
            raise UnknownLabel(
                f"nothing to merge: give at least two different labels (got {target['name']!r})"
            )
        rec = op.recorder()
        other_ids = [lab["id"] for lab in others]
        before = image_states(conn, sid, label_ids=other_ids)
        rec.set_images(before, {i: (target["id"], *b[1:]) for i, b in before.items()})
        for lab in others:
            rec.set_label(lab["id"], None)
        if new_name is not None:
            rec.set_label(target["id"], (new_name, target["cluster"]))
        final = new_name or target["name"]
        summary = (
            f"merge {', '.join(repr(lab['name']) for lab in sources)} into {final!r} "
            f"({len(before)} images)"
        )
        args = {"labels": other_ids, "into": target["id"], "name": final}
        entry = record(conn, sid, actor, "merge", summary, args, rec)
    return Applied(entry, "merge", summary, len(before), (target["id"],))


def split(
    workspace: Workspace,
    label_ref: int | str,
    n: int,
    *,
    actor: str = "cli",
    random_state: int = 0,
    expected: int | None = None,
) -> Applied:
    """Split a label into ``n`` by KMeans over its unconfirmed images.

    The largest group stays in the label; the others become new labels ``<name>_2`` ...
    ``<name>_n``. Confirmed and excluded images, and images without features, stay. Images
    moved in by hand take part: moving is no review of each image.

    Raises
    ------
    imgcluster.clustering.NotEnoughImages
        If fewer than ``n`` unconfirmed images with features are in the label.
    """
    from imgcluster.clustering import NotEnoughImages, fit_kmeans

    actor = actor_name(actor)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise InvalidParameter(f"n={n!r} should be an integer >= 2")
    for _attempt in range(ATTEMPTS):
        with workspace.read() as conn:
            session = session_row(conn)
            sid = session["id"]
            lab = label(conn, sid, label_ref)
            snapshot = image_states(conn, sid, label_ids=[lab["id"]])
        movable = [i for i, s in snapshot.items() if not s[1] and s[2] != "excluded"]
        ids, space = geometry.space_rows(workspace, session, movable)
        if len(ids) < n:
            raise NotEnoughImages(
                f"label {lab['name']!r} has {len(ids)} unconfirmed images with features; "
                f"cannot split it into {n}"
            )
        groups = fit_kmeans(space, int(n), random_state=random_state).labels
        with operation(workspace, expected) as op:
            conn = op.conn
            if op.sid != sid or image_states(conn, sid, label_ids=[lab["id"]]) != snapshot:
                continue
            lab = label(conn, sid, lab["id"])
            rec = op.recorder()
            new_ids = [
                rec.create_label(_free_name(conn, sid, lab["name"], i), None)
                for i in range(2, int(n) + 1)
            ]
            after = {
                int(i): (new_ids[g - 1], *snapshot[int(i)][1:])
                for i, g in zip(ids.tolist(), groups.tolist(), strict=True)
                if g > 0
            }
            rec.set_images(snapshot, after)
            names = [lab["name"], *(label(conn, sid, i)["name"] for i in new_ids)]
            summary = f"split {lab['name']!r} into {', '.join(map(repr, names))}"
            args = {"label": lab["id"], "n": int(n), "seed": random_state, "new": new_ids}
            entry = record(conn, sid, actor, "split", summary, args, rec)
            return Applied(entry, "split", summary, len(after), (lab["id"], *new_ids))
    raise StaleState(f"label {label_ref!r} kept changing while it was being split; try again")


def move(
    workspace: Workspace,
    images: Iterable[int | str],
    to_label: int | str,
    *,
    create: bool = True,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Move images to a label (created if it does not exist); they are marked "moved by
    hand", stay unconfirmed and keep their state (excluded / unsure) and misfit flags.

    A move is a decision about where images go, not a review of each of them: confirm the
    ones you looked at with `confirm_images`. Images added after the session started (no
    label yet) can be moved too.

    Parameters
    ----------
    images : iterable of int or str
        Image ids or paths relative to the collection root (absolute paths inside it work).
    to_label : str or int
        Target label: an id, or a name; a new name creates it when ``create`` is True.
    expected : int or mapping, optional
        Session version of the caller's view, or ``{image: label it was shown in}`` (None =
        shown without a label). On any mismatch nothing moves and `StaleState` is raised.
    """
    actor = actor_name(actor)
    with operation(workspace, _version(expected)) as op:
        conn, sid = op.conn, op.sid
        ids = resolve_images(conn, images)
        if not ids:
            raise UnknownImage("no images given to move")
        if isinstance(expected, Mapping):
            _check_shown_labels(conn, sid, expected)
        rec = op.recorder()
        target_id, target_name, created = _target(conn, sid, rec, to_label, create)
        before = image_states(conn, sid, image_ids=ids)
        after: dict[int, ImageState | None] = {}
        for i in ids:
            old = before.get(i)
            if old is not None and old[0] == target_id:
                continue  # already there: moving it again decides nothing new
            after[i] = (target_id, 0, old[2] if old else "normal", None, 1)
        rec.set_images(before, after)
        if not after and not created:
            return Applied(None, "move", f"already in {target_name!r}", 0, (target_id,))
        summary = f"move {n_images(len(after))} to {target_name!r}" + (
            " (new label)" if created else ""
        )
        args = {"images": list(after), "to": target_id, "created": created}
        entry = record(conn, sid, actor, "move", summary, args, rec)
    return Applied(entry, "move", summary, len(after), (target_id,))


def _target(
    conn: Any, sid: int, rec: Recorder, to_label: int | str, create: bool
) -> tuple[int, str, bool]:
    """The move target's id and name, creating it from a new name; and whether it is new."""
    target = find_label(conn, sid, to_label)
    if target is not None:
        return int(target["id"]), target["name"], False
    if not create or not isinstance(to_label, str):
        raise UnknownLabel(no_label_message(conn, sid, to_label))
    name = validate_name(to_label)
    return rec.create_label(name, None), name, True


def set_state(
    workspace: Workspace,
    images: Iterable[int | str],
    state: str,
    *,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Mark images ``excluded`` (not exported), ``unsure`` (for review) or back to ``normal``.

    The label and confirmation are unchanged. ``expected`` works as in `move`.
    """
    if state not in STATES:
        raise InvalidParameter(f"state={state!r} should be one of {STATES}")
    actor = actor_name(actor)
    with operation(workspace, _version(expected)) as op:
        conn, sid = op.conn, op.sid
        before = _labeled_states(
            conn, sid, images, expected, hint="move them to a label (or suggest labels) first"
        )
        after = {i: (b[0], b[1], state, b[3], b[4]) for i, b in before.items() if b[2] != state}
        if not after:
            return Applied(None, "set_state", f"already {state}", 0)
        rec = op.recorder()
        rec.set_images(before, after)
        summary = f"mark {n_images(len(after))} {state}"
        args = {"images": list(after), "state": state}
        entry = record(conn, sid, actor, "set_state", summary, args, rec)
    return Applied(entry, "set_state", summary, len(after))


def confirm(
    workspace: Workspace,
    label_ref: int | str,
    *,
    actor: str = "cli",
    expected: int | Collection[int | str] | None = None,
) -> Applied:
    """Confirm a whole label: its ``normal`` images become confirmed (unsure ones stay open).

    ``expected`` may be the session version or the collection of images the label was shown
    with; if the label's members differ now, nothing is confirmed (`StaleState`).
    """
    actor = actor_name(actor)
    with operation(workspace, _version(expected), moves=False) as op:
        conn, sid = op.conn, op.sid
        lab = label(conn, sid, label_ref)
        before = image_states(conn, sid, label_ids=[lab["id"]])
        if expected is not None and not is_int(expected):
            shown = set(resolve_images(conn, expected))  # type: ignore[arg-type]
            if shown != set(before):
                raise StaleState(
                    f"label {lab['name']!r} changed since it was shown ({len(before)} images "
                    f"now, {len(shown)} shown); look again before confirming"
                )
        after = {
            i: (b[0], 1, b[2], None, b[4])
            for i, b in before.items()
            if b[2] == "normal" and not b[1]
        }
        if not after:
            return Applied(None, "confirm", f"{lab['name']!r} has nothing to confirm", 0)
        rec = op.recorder()
        rec.set_images(before, after)
        summary = f"confirm {lab['name']!r} ({n_images(len(after))})"
        entry = record(conn, sid, actor, "confirm", summary, {"label": lab["id"]}, rec)
    return Applied(entry, "confirm", summary, len(after), (lab["id"],))


def confirm_images(
    workspace: Workspace,
    images: Iterable[int | str],
    *,
    actor: str = "cli",
    expected: int | Mapping[int | str, int | str | None] | None = None,
) -> Applied:
    """Confirm exactly the given images in their current labels (the ones a person saw).

    Excluded images stay unconfirmed (they are not exported anyway); ``expected`` works as in
    `move`, so a confirm from a stale view changes nothing.
    """
    actor = actor_name(actor)
    with operation(workspace, _version(expected), moves=False) as op:
        conn, sid = op.conn, op.sid
        before = _labeled_states(conn, sid, images, expected, hint="move them to a label first")
        after = {
            i: (b[0], 1, b[2], None, b[4])
            for i, b in before.items()
            if not b[1] and b[2] != "excluded"
        }
        if not after:
            return Applied(None, "confirm", "nothing to confirm", 0)
        rec = op.recorder()
        rec.set_images(before, after)
        labels = tuple(sorted({a[0] for a in after.values()}))
        summary = f"confirm {n_images(len(after))}"
        entry = record(conn, sid, actor, "confirm", summary, {"images": list(after)}, rec)
    return Applied(entry, "confirm", summary, len(after), labels)


def delete_label(
    workspace: Workspace, label_ref: int | str, *, actor: str = "cli", expected: int | None = None
) -> Applied:
    """Delete an empty label (move or merge its images first)."""
    actor = actor_name(actor)
    with operation(workspace, expected, moves=False) as op:
        conn, sid = op.conn, op.sid
        lab = label(conn, sid, label_ref)
        count = len(session_rows(conn, sid).members(lab["id"]))
        if count:
            raise ImgclusterError(
                f"label {lab['name']!r} still has {n_images(count)}; move or merge them first"
            )
        rec = op.recorder()
        rec.set_label(lab["id"], None)
        summary = f"delete label {lab['name']!r}"
        entry = record(conn, sid, actor, "delete", summary, {"label": lab["id"]}, rec)
    return Applied(entry, "delete", summary, 0, (lab["id"],))


def delete_empty_labels(
    workspace: Workspace, *, actor: str = "cli", expected: int | None = None
) -> Applied:
    """Delete every label that holds no image, in one undoable step (issue 12 §6)."""
    actor = actor_name(actor)
    with operation(workspace, expected, moves=False) as op:
        conn, sid = op.conn, op.sid
        used = set(np.unique(session_rows(conn, sid).label).tolist())
        empty = [r for r in live_labels(conn, sid) if r["id"] not in used]
        if not empty:
            return Applied(None, "delete", "no empty label", 0)
        rec = op.recorder()
        for row in empty:
            rec.set_label(row["id"], None)
        names = ", ".join(repr(r["name"]) for r in empty[:5]) + (", ..." if len(empty) > 5 else "")
        summary = f"delete {len(empty)} empty label{'s' if len(empty) != 1 else ''} ({names})"
        args = {"labels": [r["id"] for r in empty]}
        entry = record(conn, sid, actor, "delete", summary, args, rec)
    return Applied(entry, "delete", summary, 0, tuple(r["id"] for r in empty))


def recluster_unconfirmed(
    workspace: Workspace,
    n_new: int,
    *,
    random_state: int = 0,
    actor: str = "cli",
    preprocess: str | None = None,
) -> Applied:
    """Re-cluster the undecided images around the existing labels plus ``n_new`` new ones.

    ``preprocess`` picks the space: None keeps the session's clustering space (its run's);
    ``"umap"`` (the refined space, computed and stored when missing: blocking) or any
    `imgcluster.spaces.PREPROCESSING` choice re-clusters there, e.g.
    ``preprocess=spaces.best_preprocess(workspace, backbone)`` for "re-cluster in the refined
    space, keeping your decisions" (issue 13 §1). The session stays the same one either way.

    Every existing label with images is a fixed seed at its centroid (of its decided images
    — confirmed or moved by hand — if it has any, else of its ``normal`` images), so
    undecided images that look like a labeled group join it;
    `imgcluster.clustering.kmeans_with_fixed_centroids` learns ``n_new`` more centroids, which
    become labels ``cluster_NN`` (numbers continue after the highest used). Confirmed,
    moved-by-hand and excluded images never change label, no label is removed, and the number
    of labels grows by exactly ``n_new``.
    """
    from imgcluster.clustering import kmeans_with_fixed_centroids

    actor = actor_name(actor)
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral) or n_new < 0:
        raise InvalidParameter(f"n_new={n_new!r} should be an integer >= 0")
    for _attempt in range(ATTEMPTS):
        with workspace.read() as conn:
            session = session_row(conn)
            sid, version = session["id"], session["version"]
            states = image_states(conn, sid)
            live = [r["id"] for r in live_labels(conn, sid)]
        ids, space = _recluster_space(workspace, session, list(states), preprocess)
        rows = [states[i] for i in ids.tolist()]
        label_ids = np.array([s[0] for s in rows], dtype=np.int64)
        decided = np.array([bool(s[1]) or bool(s[4]) for s in rows], dtype=bool)
        normal = np.array([s[2] == "normal" for s in rows], dtype=bool)
        seeds, fixed = [], []
        for lab in live:
            mine = (label_ids == lab) & normal
            chosen = mine & decided if (mine & decided).any() else mine
            if chosen.any():
                seeds.append(lab)
                fixed.append(space[chosen].mean(axis=0))
        movable = ~decided & np.array([s[2] != "excluded" for s in rows], dtype=bool)
        if not movable.any():
            raise ImgclusterError(
                "nothing to re-cluster: every image is confirmed, moved by hand or excluded"
            )
        fixed_arr = np.array(fixed, np.float32).reshape(-1, space.shape[1])
        result = kmeans_with_fixed_centroids(
            space[movable], fixed_arr, int(n_new), random_state=random_state
        )
        with operation(workspace, None) as op:
            conn = op.conn
            if not _still_at(op, sid, version):
                continue
            rec = op.recorder()
            new_ids = _create_cluster_labels(conn, sid, rec, int(n_new))
            targets = [*seeds, *new_ids]
            after = {}
            for i, g in zip(ids[movable].tolist(), result.labels.tolist(), strict=True):
                old = states[i]
                new = (targets[g], 0, old[2], None, old[4])
                if new != old:
                    after[i] = new
            rec.set_images(states, after)
            summary = (
                f"re-cluster {int(movable.sum())} unconfirmed images: "
                f"{len(after)} changed label, {int(n_new)} new labels"
            )
            args = {"n_new": int(n_new), "seed": random_state, "new": new_ids}
            if preprocess is not None:
                args["preprocess"] = preprocess
            entry = record(conn, sid, actor, "recluster", summary, args, rec)
            return Applied(entry, "recluster", summary, len(after), tuple(new_ids))
    raise StaleState("labels kept changing while re-clustering; try again")


def _recluster_space(
    workspace: Workspace, session: Any, image_ids: list[int], preprocess: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The session images with features and their points in ``preprocess``'s space (None:
    the session's own space). Called outside any write transaction: a refined space that is
    not stored yet is computed here."""
    if preprocess is None:
        return geometry.space_rows(workspace, session, image_ids)
    from imgcluster.spaces import space_of

    ids, space = space_of(workspace, session["backbone"], preprocess)
    rows = np.flatnonzero(np.isin(ids, np.asarray(image_ids, dtype=np.int64)))
    return ids[rows], space[rows]


def suggest_for_new_images(
    workspace: Workspace, *, k: int = 5, actor: str = "cli"
) -> list[Suggestion]:
    """Give images that have features but no label the label of their nearest neighbours.

    Neighbours are the ``k`` nearest decided (confirmed or moved by hand) ``normal`` images
    in the session's clustering space (all labeled ``normal`` images when nothing is decided
    yet); votes are weighted by inverse distance and ``confidence`` is the winning label's
    share (`imgcluster.metrics.knn_vote`). Suggested images are unconfirmed and keep their
    confidence until a person moves or confirms them.
    """
    from imgcluster.metrics import knn_vote

    actor = actor_name(actor)
    for _attempt in range(ATTEMPTS):
        with workspace.read() as conn:
            session = session_row(conn)
            sid, version = session["id"], session["version"]
            states = image_states(conn, sid)
        ids, space = geometry.space_rows(workspace, session, None)
        id_list = ids.tolist()
        new_rows = np.array([i not in states for i in id_list], dtype=bool)
        if not new_rows.any():
            return []
        refs = np.array(
            [
                i in states and states[i][2] == "normal" and bool(states[i][1] or states[i][4])
                for i in id_list
            ]
        )
        if not refs.any():
            refs = np.array([i in states and states[i][2] == "normal" for i in id_list])
        if not refs.any():
            raise ImgclusterError("no labeled images to suggest from; label some images first")
        ref_labels = np.array([states[i][0] for i in ids[refs].tolist()], dtype=np.int64)
        winners, confidences = knn_vote(space[new_rows], space[refs], ref_labels, k)
        with operation(workspace, None) as op:
            conn = op.conn
            if not _still_at(op, sid, version):
                continue
            new_ids = ids[new_rows].tolist()
            after = {
                int(i): (int(w), 0, "normal", round(float(c), 4), 0)
                for i, w, c in zip(new_ids, winners.tolist(), confidences.tolist(), strict=True)
            }
            rec = op.recorder()
            rec.set_images({}, after)
            summary = f"suggest labels for {n_images(len(after))}"
            record(conn, sid, actor, "suggest", summary, {"k": k}, rec)
            names = {r["id"]: r["name"] for r in live_labels(conn, sid)}
            paths = dict(
                chunked_rows(
                    conn, "SELECT id, relpath FROM image_catalog WHERE id IN ({})", new_ids
                )
            )
            return [
                Suggestion(i, paths[i], names[after[i][0]], float(after[i][3] or 0.0))
                for i in new_ids
            ]
    raise StaleState("labels kept changing while suggesting; try again")


# -- helpers ----------------------------------------------------------------------------------


def _labeled_states(
    conn: Any,
    sid: int,
    images: Iterable[int | str],
    expected: object,
    *,
    hint: str,
) -> dict[int, tuple]:
    """States of ``images`` by id, for an operation on images a person picked: refuses any the
    session has not labeled yet (``hint`` says what to do) and, when ``expected`` maps images
    to the labels they were shown in, any that left that label since (`StaleState`)."""
    ids = resolve_images(conn, images)
    if isinstance(expected, Mapping):
        _check_shown_labels(conn, sid, expected)
    before = image_states(conn, sid, image_ids=ids)
    unlabeled = [i for i in ids if i not in before]
    if unlabeled:
        raise UnknownImage(
            f"{n_images(len(unlabeled))} ({relpaths(conn, unlabeled)}) have no label in "
            f"this session yet; {hint}"
        )
    return before


def _still_at(op: Op, sid: int, version: int) -> bool:
    """Whether the write transaction ``op`` is on session ``sid`` still at ``version``.

    The slow work (re-clustering, neighbour votes) runs on a read taken before the write
    transaction; if anyone changed the labels meanwhile its result is stale and the caller
    retries.
    """
    now = op.conn.execute("SELECT version FROM label_sessions WHERE id = ?", (sid,)).fetchone()[0]
    return op.sid == sid and now == version


def _version(expected: object) -> int | None:
    """The session-version part of an ``expected`` precondition (None for other kinds)."""
    return int(expected) if is_int(expected) else None  # type: ignore[call-overload]


def _check_shown_labels(
    conn: Any, sid: int, expected: Mapping[int | str, int | str | None]
) -> None:
    """Refuse if any image is no longer in the label the caller's view showed it in."""
    ids = resolve_image_map(conn, list(expected))
    states = image_states(conn, sid, image_ids=list(ids.values()))
    stale = []
    for ref, image_id in ids.items():
        shown, now = expected[ref], states.get(image_id)
        if shown is None or now is None:
            ok = shown is None and now is None
        else:
            lab = find_label(conn, sid, shown)
            ok = lab is not None and lab["id"] == now[0]
        if not ok:
            stale.append(image_id)
    if stale:
        raise StaleState(
            f"{n_images(len(stale))} ({relpaths(conn, stale)}) changed label since this view "
            "was loaded (someone else moved them); nothing was changed, reload and try again"
        )


def _free_name(conn: Any, sid: int, base: str, i: int) -> str:
    """``<base>_<i>`` (then ``_<i>_2``...), within the length limit and not taken."""
    for extra in range(1000):
        suffix = f"_{i}" + (f"_{extra + 1}" if extra else "")
        name = base[: MAX_NAME_LENGTH - len(suffix)] + suffix
        if find_label(conn, sid, name) is None:
            return name
    raise InvalidLabelName(f"no free name for part {i} of {base!r}")


def _create_cluster_labels(conn: Any, sid: int, rec: Recorder, n: int) -> list[int]:
    top = conn.execute(
        "SELECT COALESCE(MAX(cluster), -1) FROM labels WHERE session_id = ?", (sid,)
    ).fetchone()[0]
    ids = []
    c = int(top) + 1
    while len(ids) < n:
        name = f"cluster_{c:02d}"
        if find_label(conn, sid, name) is None:
            ids.append(rec.create_label(name, c))
        c += 1
    return ids
