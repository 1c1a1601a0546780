"""Exporting a workspace: its current labels, as `plan_workspace_export` selects them.

The plan (the dry run a preview shows) reads only the database: the labels through
`imgcluster.labels.label_state_counts` (counts; `current_labels` rows with a split), the files
through `Workspace.source_files` (one query, no file touched, when the export builds its
items), the run through `imgcluster.clustering.run_info`. `export_workspace` exports
exactly the plan's items; `export_warnings` says what an annotator should look at first.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from imgcluster.errors import ExportError, UnknownCluster
from imgcluster.export.files import MISSING
from imgcluster.export.names import assign_folders
from imgcluster.export.plan import ROOT_FILES, ExportItem, parse_split, plan_counts
from imgcluster.export.tree import (
    ExportResult,
    LeftOut,
    Progress,
    absolute_target,
    export_items,
)
from imgcluster.workspace import Workspace

#: Labels with fewer images than this get a warning before export (too few to learn from).
MIN_IMAGES_PER_LABEL = 5
#: The names `imgcluster.labels.start_session` gives; still having one means nobody named it.
DEFAULT_NAME = re.compile(r"cluster_\d+")


@dataclass
class WorkspaceExportPlan:
    """What `export_workspace` would write with the same options, without writing anything.

    ``folders`` maps each exported label to its folder; ``counts[label][split]`` (``"all"``
    without a split) and ``left_out`` (reason -> images) are the numbers the export reports,
    and ``left_out_files`` lists labeled images known to be missing, with their label.
    ``confirmed[label]`` counts the label's confirmed images (exported or not) and
    ``sizes[label]`` all its images, for `export_warnings`. ``items`` (the `ExportItem` list
    the export writes) is built on first use: a preview never needs it.
    """

    folders: dict[str, str]
    counts: dict[str, dict[str, int]]
    splits: tuple[str, ...]
    left_out: dict[str, int]
    n_labeled: int
    left_out_files: list[LeftOut] = field(default_factory=list)
    confirmed: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    format: str = "auto"
    n_files: int = 0
    workspace: Workspace | None = field(default=None, repr=False)
    #: (confirmed_only, include_unsure): what `rows` re-selects when it reads the labels.
    options: tuple[bool, bool] = (False, False)
    _rows: list[Any] | None = field(default=None, repr=False)
    _items: list[ExportItem] | None = field(default=None, repr=False)

    @property
    def rows(self) -> list[Any]:
        """The exported images' label rows (with their clusters), read on first use: the
        preview is built from counts, only the export needs one row per image."""
        if self._rows is None:
            if self.workspace is None:
                raise ExportError("this plan has no workspace to read its images from")
            self._rows = _kept_rows(self.workspace, self.options, self.n_files)
        return self._rows

    @property
    def items(self) -> list[ExportItem]:
        """The images to export, with their source paths and recorded formats."""
        if self._items is None:
            self._items = _export_items(self.workspace, self.rows) if self.n_files else []
        return self._items

    @property
    def n_left_out(self) -> int:
        """Images left out, all reasons together (the preview's "left out" row)."""
        return sum(self.left_out.values())


def _export_items(workspace: Workspace | None, rows: Sequence[Any]) -> list[ExportItem]:
    if not rows:
        return []
    if workspace is None:
        raise ExportError("this plan has no workspace to read its images from")
    with workspace.read() as conn:
        files = workspace.source_files(conn)
    items = []
    for row in rows:
        source, fmt = files.get(row.relpath, (None, None))
        if source is None:
            raise ExportError(
                f"image {row.relpath!r} has no file in the image collection; ingest a folder first"
            )
        items.append(
            ExportItem(source, row.relpath, row.label, row.sha256, row.cluster, row.confirmed, fmt)
        )
    return items


def _unsafe(relpath: str) -> bool:
    """A relative path that would leave the collection (never produced by ingest)."""
    return (
        relpath.startswith("/")
        or "\0" in relpath
        or (".." in relpath and ".." in relpath.split("/"))
    )


@dataclass(frozen=True)
class ExportWarning:
    """Something to look at before exporting: ``kind`` is one of ``default_name``,
    ``small_label``, ``unreviewed``, ``left_out``, ``missing``; ``labels`` the labels
    concerned (empty for whole-export warnings)."""

    kind: str
    message: str
    labels: tuple[str, ...] = ()


@dataclass
class _Selection:
    """What the options select from the labeled images (counts, and the rows when read)."""

    kept: Counter[str] = field(default_factory=Counter)
    left_out: Counter[str] = field(default_factory=Counter)
    missing: list[LeftOut] = field(default_factory=list)
    confirmed: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    n_usable: int = 0
    n_labeled: int = 0
    rows: list[Any] = field(default_factory=list)

    def add(self, row: Any, options: tuple[bool, bool], n: int = 1) -> str | None:
        """Count ``n`` images like ``row``; the reason they are left out, or None."""
        usable = getattr(row, "status", "ok") == "ok"
        self.n_labeled += n
        self.n_usable += n * usable
        self.sizes[row.label] += n
        if row.confirmed:
            self.confirmed[row.label] += n
        reason = _reason(row, *options)
        unsafe = getattr(row, "unsafe", None)
        if unsafe is None:
            unsafe = _unsafe(row.relpath)
        if reason is None and (not usable or unsafe):
            reason = MISSING if not usable else "outside the collection"
            if hasattr(row, "relpath"):
                self.missing.append(LeftOut(row.relpath, row.label, reason))
        if reason is not None:
            self.left_out[reason] += n
        else:
            self.kept[row.label] += n
        return reason


def _select_rows(rows: Sequence[Any], options: tuple[bool, bool]) -> _Selection:
    """The per-row selection: what the export's items are (and what a test holds the counts to)."""
    selection = _Selection()
    for row in rows:
        if selection.add(row, options) is None:
            selection.rows.append(row)
    return selection


def _select_counts(workspace: Workspace, options: tuple[bool, bool]) -> _Selection:
    """The same selection from counts: one GROUP BY, plus the rows of the few labeled images
    export cannot write (missing files, unsafe paths), to list them by name."""
    from imgcluster import labels

    selection = _Selection()
    for group in labels.label_state_counts(workspace):
        selection.add(group, options, group.count)
    for row in labels.unusable_labels(workspace):
        if _reason(row, *options) is None:
            reason = MISSING if row.status != "ok" else "outside the collection"
            selection.missing.append(LeftOut(row.relpath, row.label, reason))
    return selection


def _kept_rows(workspace: Workspace, options: tuple[bool, bool], expected: int) -> list[Any]:
    """The rows the export writes (with their clusters), checked against the preview."""
    from imgcluster import labels

    kept = _select_rows(labels.current_labels(workspace, include_missing=True), options).rows
    if len(kept) != expected:
        raise ExportError(
            f"the labels changed since this export was planned ({expected} images then, "
            f"{len(kept)} now); preview the export again"
        )
    return kept


class _Hashed(NamedTuple):
    """What the split of one exported image depends on (a tuple: 1M are built quickly)."""

    label: str
    sha256: str


def _hashes(workspace: Workspace, options: tuple[bool, bool], expected: int) -> list[_Hashed]:
    from imgcluster import labels

    confirmed_only, include_unsure = options
    states = ("normal", "unsure") if include_unsure else ("normal",)
    pairs = labels.labeled_hashes(workspace, states=states, confirmed_only=confirmed_only)
    if len(pairs) != expected:
        raise ExportError(
            f"the labels changed while the preview read them ({expected} then {len(pairs)} "
            "images); preview the export again"
        )
    return [_Hashed(label, sha) for label, sha in pairs]


def plan_workspace_export(
    workspace: Workspace,
    *,
    confirmed_only: bool = False,
    include_unsure: bool = False,
    split: str | Sequence[float] | None = None,
    random_state: int = 0,
    format: str = "auto",
) -> WorkspaceExportPlan:
    """Dry run of `export_workspace`: the folders, per-label counts and what is left out.

    `export_workspace` exports exactly this plan's ``items``, so a preview built from it shows
    what the export will hold. Excluded images are always left out; images marked unsure are
    left out unless ``include_unsure``; with ``confirmed_only`` unconfirmed images are left
    out; labeled images whose file is missing are left out as ``missing`` (listed with their
    label); usable images without a label are counted as ``unlabeled``. Reads only the
    database (no file is opened): counts (one GROUP BY, plus the few images export cannot
    write), and with ``split`` each exported image's label and content hash (what the split
    depends on); ``items`` are read when first used (the export).

    Raises
    ------
    NoLabelSession
        Labeling has not started.
    ExportError
        ``split`` is not valid proportions.

    Examples
    --------
    >>> plan = plan_workspace_export(Workspace("ws"), confirmed_only=True)  # doctest: +SKIP
    >>> plan.counts["sneakers"], plan.left_out                              # doctest: +SKIP
    ({'all': 12}, {'unconfirmed': 168})
    """
    options = (bool(confirmed_only), bool(include_unsure))
    proportions = parse_split(split)
    # Counts, not a row per image: at 1M images rows are most of a preview's time.
    selection = _select_counts(workspace, options)  # NoLabelSession before labeling
    n_files = sum(selection.kept.values())
    if proportions is None:
        counts = {label: {"all": n} for label, n in sorted(selection.kept.items())}
        folders = assign_folders(selection.kept, reserved=ROOT_FILES)
        splits: tuple[str, ...] = ()
    else:
        # The split needs each exported image's label and content hash (nothing else).
        hashed = _hashes(workspace, options, n_files)
        counts, folders, splits = plan_counts(hashed, split=proportions, random_state=random_state)
    unlabeled = workspace.image_counts()["ok"] - selection.n_usable
    if unlabeled > 0:
        selection.left_out["unlabeled"] = unlabeled
    return WorkspaceExportPlan(
        folders=folders,
        counts=counts,
        splits=splits,
        left_out=dict(sorted(selection.left_out.items())),
        n_labeled=selection.n_labeled,
        left_out_files=selection.missing,
        confirmed=dict(selection.confirmed),
        sizes=dict(selection.sizes),
        format=format,
        n_files=n_files,
        workspace=workspace,
        options=options,
    )


def _reason(row: Any, confirmed_only: bool, include_unsure: bool) -> str | None:
    """Why a labeled image is left out by the options, or None."""
    if row.state == "normal":
        return "unconfirmed" if confirmed_only and not row.confirmed else None
    if row.state == "excluded":
        return "excluded"
    if row.state == "unsure" and not include_unsure:
        return "unsure"
    if confirmed_only and not row.confirmed:
        return "unconfirmed"
    return None


def export_warnings(plan: WorkspaceExportPlan, progress: Any = None) -> list[ExportWarning]:
    """What to look at before writing ``plan``: the Export page shows these above the button.

    Labels still named ``cluster_NN`` (nobody named them), labels with fewer than
    `MIN_IMAGES_PER_LABEL` exported images, labels nobody reviewed, labeled images whose
    file is missing, and images left out for any reason. Reads nothing.

    Parameters
    ----------
    plan : WorkspaceExportPlan
    progress : imgcluster.labels.Progress, optional
        `imgcluster.labels.progress` of the workspace: a label none of whose images has a
        decision (confirmed, moved by hand, excluded, unsure) is "unreviewed". Without it, a
        label with no confirmed image is.

    Examples
    --------
    >>> plan = plan_workspace_export(ws)                          # doctest: +SKIP
    >>> [w.kind for w in export_warnings(plan, labels.progress(ws))]  # doctest: +SKIP
    ['default_name', 'small_label']
    """
    warnings: list[ExportWarning] = []
    exported = {label: sum(per.values()) for label, per in plan.counts.items()}
    default = sorted(label for label in exported if DEFAULT_NAME.fullmatch(label))
    if default:
        warnings.append(
            ExportWarning(
                "default_name",
                f"{len(default)} label(s) still have their automatic name ({_few(default)}): "
                "rename them so the folders say what they hold",
                tuple(default),
            )
        )
    small = sorted(label for label, n in exported.items() if n < MIN_IMAGES_PER_LABEL)
    if small:
        warnings.append(
            ExportWarning(
                "small_label",
                f"{len(small)} label(s) have fewer than {MIN_IMAGES_PER_LABEL} images "
                f"({_few(small)}): too few to learn from; merge them or add images",
                tuple(small),
            )
        )
    if progress is not None:
        reviewed = {summary.name: summary.reviewed for summary in progress.labels}
    else:
        reviewed = plan.confirmed
    unreviewed = sorted(label for label in exported if not reviewed.get(label))
    if unreviewed:
        warnings.append(
            ExportWarning(
                "unreviewed",
                f"{len(unreviewed)} label(s) nobody has reviewed yet ({_few(unreviewed)}): "
                "look through them on the Label page",
                tuple(unreviewed),
            )
        )
    warnings.extend(_left_out_warnings(plan))
    return warnings


def _left_out_warnings(plan: WorkspaceExportPlan) -> list[ExportWarning]:
    warnings = []
    if plan.left_out_files:
        by_label: dict[str, int] = defaultdict(int)
        for item in plan.left_out_files:
            by_label[item.label or ""] += 1
        labels = tuple(sorted(by_label))
        detail = ", ".join(f"{n} in {label}" for label, n in sorted(by_label.items())[:5])
        warnings.append(
            ExportWarning(
                "missing",
                f"{len(plan.left_out_files)} labeled image(s) are missing from the collection "
                f"({detail}), e.g. {plan.left_out_files[0].relpath}; they are left out "
                "(scan the folder again once they are back)",
                labels,
            )
        )
    if plan.n_left_out:
        reasons = ", ".join(f"{n} {why}" for why, n in plan.left_out.items())
        warnings.append(
            ExportWarning("left_out", f"{plan.n_left_out} image(s) left out ({reasons})")
        )
    return warnings


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def export_workspace(
    workspace: Workspace,
    out: str | os.PathLike[str],
    *,
    mode: str = "copy",
    split: str | Sequence[float] | None = None,
    random_state: int = 0,
    confirmed_only: bool = False,
    include_unsure: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    format: str = "auto",
) -> ExportResult:
    """Export the active labeling session's current labels to ``out``.

    What is exported is `plan_workspace_export` with the same options: excluded images are
    always left out; images marked unsure are left out unless ``include_unsure`` (a training
    set should hold what annotators stand behind); with ``confirmed_only`` only confirmed
    images are exported; every file is verified against its ingested hash as it is copied.
    What was left out, and why, is in the result, ``labels.json`` and ``left_out.csv``.
    The workspace is only read.

    Parameters
    ----------
    workspace : Workspace
    out : path
        The export folder; see `export_items` for ``mode``, ``split``, ``random_state``,
        ``overwrite``, ``progress`` and ``format``.
    confirmed_only : bool, default=False
    include_unsure : bool, default=False

    Returns
    -------
    ExportResult

    Raises
    ------
    NoLabelSession
        Labeling has not started.
    ExportError
        See `export_items`; also when ``out`` is inside the image collection (the next ingest
        would take the copies for new images) or would contain the workspace.

    Examples
    --------
    >>> result = export_workspace(Workspace("ws"), "dataset", split="0.8,0.2")  # doctest: +SKIP
    >>> result.counts["sneakers"]                                               # doctest: +SKIP
    {'train': 24, 'val': 6}
    """
    plan = plan_workspace_export(
        workspace,
        confirmed_only=confirmed_only,
        include_unsure=include_unsure,
        split=split,
        random_state=random_state,
        format=format,
    )
    out_path = _check_out(workspace, out)
    if not plan.items:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(plan.left_out.items()))
        raise ExportError(
            f"nothing to export: {plan.n_labeled} labeled images, all left out "
            f"({reasons or 'none'})"
        )
    metadata = _provenance(workspace)
    metadata["options"] = {"confirmed_only": confirmed_only, "include_unsure": include_unsure}
    return export_items(
        plan.items,
        out_path,
        mode=mode,
        split=split,
        random_state=random_state,
        overwrite=overwrite,
        metadata=metadata,
        left_out=plan.left_out,
        left_out_files=plan.left_out_files,
        progress=progress,
        format=format,
    )


def _check_out(workspace: Workspace, out: str | os.PathLike[str]) -> Path:
    root = workspace.collection_root
    out_path = absolute_target(Path(out))
    if root is not None and out_path.is_relative_to(root.resolve()):
        raise ExportError(
            f"export folder {out_path} is inside the image collection {root}; "
            "choose a folder outside it"
        )
    if workspace.path.is_relative_to(out_path):
        raise ExportError(f"export folder {out_path} would contain the workspace {workspace.path}")
    return out_path


def _provenance(workspace: Workspace) -> dict[str, Any]:
    """Where the export comes from, for ``labels.json``."""
    from imgcluster.clustering import run_info
    from imgcluster.labels import active_session

    root = workspace.collection_root
    metadata: dict[str, Any] = {
        "workspace": str(workspace.path),
        "collection_root": str(root) if root else None,
        "workspace_revision": workspace.revision,
    }
    session = active_session(workspace)
    if session is not None:
        try:
            k = run_info(workspace, session.run_id).k
        except UnknownCluster:
            k = None
        metadata |= {
            "session_id": session.id,
            "session_version": session.version,
            "run_id": session.run_id,
            "backbone": session.backbone,
            "k": k,
        }
    return metadata
