"""What the labels API returns: plain frozen dataclasses, no connection, no numpy."""

from __future__ import annotations

from dataclasses import dataclass

#: One image's labeling state as the audit log records it: label id, confirmed, state,
#: confidence (only for suggestions), moved by hand. ``None`` = no label in the session.
#: Audit rows written before ``by_hand`` existed hold 4 values; they read as by_hand = 0.
ImageState = tuple[int, int, str, float | None, int]
#: One label as the audit log records it: name and origin cluster. ``None`` = deleted/absent.
LabelState = tuple[str, int | None]


@dataclass(frozen=True)
class Session:
    """The active labeling session. ``version`` grows with every operation (an ``expected``
    token for stale-view checks); ``n_edits`` counts the recorded steps besides the start
    (undo/redo included): 0 means nobody decided anything, so the labels may follow k."""

    id: int
    run_id: int
    backbone: str
    version: int
    created_by: str
    created_at: str
    n_edits: int = 0


@dataclass(frozen=True)
class LabelSummary:
    """One label with its counts (images of usable files only).

    ``by_hand`` counts images a person moved into the label; ``reviewed`` those with a
    decision (confirmed, moved by hand, excluded or marked unsure).
    """

    id: int
    name: str
    count: int
    confirmed: int
    excluded: int
    unsure: int
    misfits: int
    by_hand: int = 0
    reviewed: int = 0

    @property
    def unreviewed(self) -> int:
        return self.count - self.reviewed


@dataclass(frozen=True)
class Progress:
    """How far labeling has come, per label and in total (`imgcluster.labels.progress`)."""

    images: int
    reviewed: int
    confirmed: int
    by_hand: int
    excluded: int
    unsure: int
    labels: tuple[LabelSummary, ...]

    @property
    def fraction_reviewed(self) -> float:
        return self.reviewed / self.images if self.images else 1.0


@dataclass(frozen=True)
class LabeledImage:
    """One image in a label grid. ``distance`` / ``silhouette`` are None without features."""

    image_id: int
    relpath: str
    sha256: str
    label: str
    confirmed: bool
    state: str
    distance: float | None
    silhouette: float | None
    misfit: bool
    label_id: int = 0
    confidence: float | None = None
    nearest_other: str | None = None
    by_hand: bool = False


@dataclass(frozen=True)
class ExportRow:
    """What export needs per image: its label, origin cluster in the session's run, flags."""

    image_id: int
    relpath: str
    sha256: str
    label: str
    cluster: int | None
    confirmed: bool
    state: str
    #: The image row's status: "ok", or "missing" (its file is gone; `current_labels`
    #: lists those only with ``include_missing=True``, so export can report them).
    status: str = "ok"


@dataclass(frozen=True)
class Applied:
    """The outcome of an operation. ``entry_id`` is its audit row (None if nothing changed)."""

    entry_id: int | None
    op: str
    summary: str
    n_images: int
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class HistoryEntry:
    """One audit row. ``status`` of a ``do`` row: done, undone, or dropped (no longer
    redoable); None for undo/redo rows and the session start."""

    id: int
    at: str
    actor: str
    op: str
    kind: str
    summary: str
    status: str | None
    target_id: int | None
    n_images: int
    n_labels: int


@dataclass(frozen=True)
class Neighbour:
    """An image similar to another one: ``similarity`` is the cosine of their feature vectors
    (1 = same direction). ``label`` / ``label_id`` are None for an image without a label."""

    image_id: int
    relpath: str
    sha256: str
    label: str | None
    similarity: float
    label_id: int | None = None


@dataclass(frozen=True)
class Suggestion:
    """A label given to a new image by its nearest labeled neighbours."""

    image_id: int
    relpath: str
    label: str
    confidence: float


@dataclass(frozen=True)
class Stray:
    """An image in another label that looks like the gathering label (`gather`).

    ``score`` is the share of its nearest labeled neighbours' (distance-weighted) vote that
    goes to the gathering label (1 = every neighbour is there); `gather` offers it only when
    that share is at least its own label's.
    """

    image_id: int
    relpath: str
    sha256: str
    label: str
    label_id: int
    score: float


@dataclass(frozen=True)
class Following:
    """What `follow_k` did: ``status`` is ``"started"`` (no labels before), ``"same"``
    (the labels already come from this k), ``"restarted"`` (untouched labels followed k) or
    ``"kept"`` (the labels carry edits: nothing changed, the caller asks the annotator).
    ``session_k`` is the k the active labels come from."""

    status: str
    session: Session
    session_k: int
    k: int
    run_id: int
