"""`export_items`: write a list of `ExportItem` as a labeled folder tree, atomically.

``OUT/<label>/<file>`` (or ``OUT/<split>/<label>/<file>``), with ``manifest.csv`` (one row per
exported file), ``left_out.csv`` (one row per image left out because of its file: missing,
changed since ingest, unreadable...), ``labels.json`` (names, folders, counts, provenance) and
the `EXPORT_MARKER` file at OUT's root, where trainers' loaders ignore plain files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgcluster.errors import ExportError
from imgcluster.export.files import FILE_MODE, export_file, peek_format
from imgcluster.export.formats import FORMAT_CHOICES, KERAS_EXTENSIONS
from imgcluster.export.plan import (
    LABELS_NAME,
    LEFT_OUT_NAME,
    MANIFEST_NAME,
    SPLIT_NAMES,
    ExportItem,
    PlannedFile,
    count_planned,
    parse_split,
    plan_export,
    source_under,
)
from imgcluster.export.staging import (
    EXPORT_MARKER,
    build_folder,
    check_target,
    export_lock,
    recover_abandoned,
    storage_error,
    swap_into_place,
)

#: How files get into the export. ``copy`` writes verified 0644 files independent of the
#: sources; ``hardlink`` costs no space but shares the file with the source (editing one edits
#: both, and its mode bits are the source's); ``symlink`` points at the absolute source path,
#: so the export breaks if the collection moves. Both link modes expose the source as it is.
MODES = ("copy", "hardlink", "symlink")

MANIFEST_COLUMNS = (
    "path",
    "source",
    "label",
    "split",
    "cluster",
    "confirmed",
    "sha256",
    "format",
)
LEFT_OUT_COLUMNS = ("source", "label", "reason")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LeftOut:
    """One image left out of an export because of its file (or its state), and why."""

    relpath: str
    label: str | None
    reason: str


@dataclass
class ExportResult:
    """What an export wrote.

    ``counts[label][split]`` uses the split name, or ``"all"`` without a split; it counts the
    files written. ``left_out`` counts images left out by reason; ``left_out_files`` lists the
    ones left out because of their file (also in ``left_out.csv``).
    """

    out: Path
    n_files: int
    folders: dict[str, str]
    counts: dict[str, dict[str, int]]
    splits: tuple[str, ...]
    mode: str
    left_out: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    left_out_files: list[LeftOut] = field(default_factory=list)
    format: str = "auto"


def export_items(
    items: Sequence[ExportItem],
    out: str | os.PathLike[str],
    *,
    mode: str = "copy",
    split: str | Sequence[float] | None = None,
    random_state: int = 0,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    left_out: dict[str, int] | None = None,
    left_out_files: Sequence[LeftOut] = (),
    progress: Progress | None = None,
    format: str = "auto",
) -> ExportResult:
    """Write ``items`` as a labeled folder tree at ``out``, atomically.

    Every source is verified as it is copied (its sha256 must be the ingested one); a source
    that is missing, changed, unreadable or not a regular file is left out with the reason
    (in the result, ``labels.json`` and ``left_out.csv``) and the export goes on.

    Parameters
    ----------
    items : sequence of ExportItem
    out : path
        The export folder. It must not exist (an empty folder is fine) unless ``overwrite``.
    mode : {"copy", "hardlink", "symlink"}, default="copy"
        ``hardlink`` falls back to a copy where a link is impossible (another filesystem)
        and says so in ``warnings``. Links expose the source as it is (mode bits included).
    split : str or sequence of float, optional
        ``"0.8,0.2"`` (train, val) or ``"0.7,0.15,0.15"`` (train, val, test).
    random_state : int, default=0
        Seed of the split's shuffle: the same items and ``random_state`` give the same split.
    overwrite : bool, default=False
        Replace an existing export -- only after the new one is complete.
    metadata : dict, optional
        Provenance stored in ``labels.json`` (workspace, backbone, k, run id...); its
        ``"options"`` entry is merged into the recorded options.
    left_out : dict, optional
        Images the caller filtered out, by reason (recorded in the result and ``labels.json``).
    left_out_files : sequence of LeftOut, optional
        Images the caller found missing, listed in ``left_out.csv`` with the export's own.
    progress : callable(done, total), optional
    format : {"auto", "png", "jpeg", "keep"}, default="auto"
        See `imgcluster.export.formats`: ``auto`` writes JPEG, PNG, GIF and BMP as they are
        and re-encodes every other format as PNG, each under the extension of its content.

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        ``out`` exists (without ``overwrite``), would contain a source image, cannot be
        written (read-only, disk full: nothing is left behind), or the split, mode or format
        is invalid. With ``overwrite``, a non-empty ``out`` that is not an imgcluster export
        is refused too, so a mistyped path never deletes someone's folder.
    Busy
        Another export to ``out`` is running.
    """
    _check_options(mode, format)
    proportions = parse_split(split)
    out_path = absolute_target(Path(out))
    for item in items:
        if source_under(item, out_path):
            raise ExportError(
                f"export folder {out_path} contains the source image {item.source}; "
                "choose a folder outside the image collection"
            )
    if format != "keep":
        items = [_with_format(item) for item in items]
    planned, folders = plan_export(
        items, split=proportions, random_state=random_state, format=format
    )
    splits = SPLIT_NAMES[len(proportions)] if proportions else ()
    with export_lock(out_path):
        recover_abandoned(out_path)
        check_target(out_path, overwrite=overwrite)
        with build_folder(out_path) as (tmp, aside):
            try:
                result, written = _build(tmp, out_path, planned, folders, splits, mode, progress)
                result.format = format
                _finish(result, left_out, left_out_files)
                _write_root_files(tmp, result, written, proportions, random_state, metadata or {})
            except OSError as exc:
                raise storage_error(exc, out_path.parent) from None
            swap_into_place(tmp, out_path, aside, overwrite=overwrite)
    return result


def _with_format(item: ExportItem) -> ExportItem:
    """``item`` with its format read from its first bytes when the caller did not record one
    (a TIFF named ``.jpg`` must be planned as PNG, not as a JPEG from its extension)."""
    if item.format is not None:
        return item
    fmt = peek_format(Path(item.source))
    return item if fmt is None else dataclasses.replace(item, format=fmt)


def _check_options(mode: str, format: str) -> None:
    if mode not in MODES:
        raise ExportError(f"mode={mode!r} should be one of {', '.join(MODES)}")
    if format not in FORMAT_CHOICES:
        raise ExportError(f"format={format!r} should be one of {', '.join(FORMAT_CHOICES)}")


def absolute_target(out: Path) -> Path:
    """Absolute, with the parent resolved but OUT itself not (a symlink there is refused)."""
    out = Path(os.path.abspath(out.expanduser()))
    if out.name in ("", ".", ".."):
        raise ExportError(f"export folder {out} is not a usable folder name")
    return out.parent.resolve() / out.name


def _target(root: Path, planned: PlannedFile) -> Path:
    """The destination, refusing anything that would land outside ``root``."""
    parts = [p for p in (planned.split, planned.folder, planned.filename) if p]
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ExportError(f"unsafe export path component {part!r}")
    return root.joinpath(*parts)


def _make_folders(
    root: Path, planned: Sequence[PlannedFile], folders: dict[str, str], splits: tuple[str, ...]
) -> None:
    """Every label folder in every split, even if empty, so that loaders that infer classes
    from folder names give the same class indices for train and val."""
    labels_used = {p.item.label for p in planned}
    for split in splits or (None,):
        base = root / split if split else root
        for label in labels_used:
            (base / folders[label]).mkdir(parents=True, exist_ok=True)


def _build(
    root: Path,
    out: Path,
    planned: Sequence[PlannedFile],
    folders: dict[str, str],
    splits: tuple[str, ...],
    mode: str,
    progress: Progress | None,
) -> tuple[ExportResult, list[PlannedFile]]:
    """Write every planned file into the build folder ``root``; return what was written."""
    _make_folders(root, planned, folders, splits)
    total = len(planned)
    if progress:
        progress(0, total)
    written: list[PlannedFile] = []
    refused: list[LeftOut] = []
    fallbacks = reencoded = 0
    for done, p in enumerate(planned, start=1):
        outcome = export_file(p, _target(root, p), mode)
        if outcome.written:
            written.append(p)
            fallbacks += outcome.copied_instead_of_linked
            reencoded += outcome.reencoded
        else:
            refused.append(LeftOut(p.item.relpath, p.item.label, outcome.reason or "?"))
        if progress:
            progress(done, total)
    result = ExportResult(
        out=out,
        n_files=len(written),
        folders=folders,
        counts=count_planned(written, splits) if written else {},
        splits=splits,
        mode=mode,
        left_out_files=refused,
    )
    result.counts = _all_labels(result.counts, planned, splits)
    result.warnings = _warnings(written, refused, fallbacks, reencoded, mode)
    return result, written


def _all_labels(
    counts: dict[str, dict[str, int]], planned: Sequence[PlannedFile], splits: tuple[str, ...]
) -> dict[str, dict[str, int]]:
    """Keep a label whose every file was refused, with zero counts (its folder exists)."""
    for label in sorted({p.item.label for p in planned} - set(counts)):
        counts[label] = dict.fromkeys(splits or ("all",), 0)
    return dict(sorted(counts.items()))


def _finish(
    result: ExportResult, left_out: dict[str, int] | None, extra: Sequence[LeftOut]
) -> None:
    """Merge the caller's left-out counts and files with the export's own refusals."""
    counts = Counter(left_out or {})
    counts.update(item.reason for item in result.left_out_files)
    result.left_out_files = sorted([*extra, *result.left_out_files], key=lambda x: x.relpath)
    result.left_out = dict(sorted(counts.items()))
    if not result.n_files:
        reasons = ", ".join(f"{n} {why}" for why, n in result.left_out.items())
        raise ExportError(f"nothing to export: every image was left out ({reasons})")


def _warnings(
    written: Sequence[PlannedFile],
    refused: Sequence[LeftOut],
    fallbacks: int,
    reencoded: int,
    mode: str,
) -> list[str]:
    warnings = []
    if refused:
        by_reason = Counter(r.reason for r in refused)
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(by_reason.items()))
        warnings.append(
            f"{len(refused)} image(s) left out because of their file ({reasons}), e.g. "
            f"{refused[0].relpath} ({refused[0].label}); see {LEFT_OUT_NAME}; "
            "re-run ingest to review them"
        )
    if fallbacks:
        warnings.append(
            f"{fallbacks} file(s) copied instead of hard-linked "
            "(the export folder is on another filesystem than the images)"
        )
    if reencoded and mode != "copy":
        warnings.append(
            f"{reencoded} file(s) re-encoded into a format trainers read, so written as files "
            f"instead of {mode}s"
        )
    odd = Counter(
        Path(p.filename).suffix.lower() or "(none)"
        for p in written
        if Path(p.filename).suffix.lower() not in KERAS_EXTENSIONS
    )
    if odd:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(odd.items()))
        warnings.append(
            f"keras image_dataset_from_directory skips these formats: {kinds} "
            "(export with format 'auto' to convert them)"
        )
    return warnings


def _write_root_files(
    root: Path,
    result: ExportResult,
    written: Sequence[PlannedFile],
    proportions: tuple[float, ...] | None,
    random_state: int,
    metadata: dict[str, Any],
) -> None:
    _write_csv(root / MANIFEST_NAME, MANIFEST_COLUMNS, (_manifest_row(p) for p in written))
    _write_csv(
        root / LEFT_OUT_NAME,
        LEFT_OUT_COLUMNS,
        ((x.relpath, x.label or "", x.reason) for x in result.left_out_files),
    )
    _write_labels_json(root / LABELS_NAME, result, proportions, random_state, metadata)
    marker = root / EXPORT_MARKER
    marker.write_text("imgcluster export: ingest never scans this folder\n", encoding="utf-8")
    for name in (MANIFEST_NAME, LEFT_OUT_NAME, LABELS_NAME, EXPORT_MARKER):
        os.chmod(root / name, FILE_MODE)


def _manifest_row(p: PlannedFile) -> list[object]:
    return [
        p.path,
        p.item.relpath,
        p.item.label,
        p.split or "",
        "" if p.item.cluster is None else p.item.cluster,
        int(p.item.confirmed),
        p.item.sha256,
        p.format or "",
    ]


def _write_csv(path: Path, columns: Sequence[str], rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)


def _write_labels_json(
    path: Path,
    result: ExportResult,
    proportions: tuple[float, ...] | None,
    random_state: int,
    metadata: dict[str, Any],
) -> None:
    document = {
        "format": "imgcluster-export/1",
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **metadata,
        "options": {
            "mode": result.mode,
            "split": list(proportions) if proportions else None,
            "seed": random_state if proportions else None,  # key kept for readers of v1
            "format": result.format,
            **metadata.get("options", {}),
        },
        "splits": list(result.splits),
        "n_files": result.n_files,
        # keras and torchvision number classes by sorted folder name.
        "class_names": sorted(result.folders[label] for label in result.counts),
        "labels": [
            {
                "name": label,
                "folder": result.folders[label],
                "count": sum(per_split.values()),
                "counts": per_split,
            }
            for label, per_split in result.counts.items()
        ],
        "left_out": result.left_out,
        "warnings": result.warnings,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, ensure_ascii=False, indent=2)
        fh.write("\n")


def read_manifest(out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an export's ``manifest.csv`` (for checks and tools)."""
    with open(Path(out) / MANIFEST_NAME, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_left_out(out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an export's ``left_out.csv`` (source, label, reason)."""
    path = Path(out) / LEFT_OUT_NAME
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
