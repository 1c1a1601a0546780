"""Export the labels as a folder tree a trainer reads directly: ``OUT/<label>/<file>``.

The layout is what ``keras.utils.image_dataset_from_directory`` and torchvision's
``ImageFolder`` expect: one folder per class, image files only inside class folders, nothing
nested deeper. With a split, each split is such a tree: ``OUT/train/<label>/``,
``OUT/val/<label>/`` (and ``OUT/test/<label>/``). ``manifest.csv`` (one row per exported file)
and ``labels.json`` (label names, folders, counts, provenance) sit at OUT's root, where both
loaders ignore plain files. In a split export every label has its folder in every split, even
when a small label left one empty, so classes get the same indices in train and val (keras
accepts empty class folders; torchvision's ``ImageFolder`` needs ``allow_empty=True``).

Label names are free Unicode text typed by annotators; folder names must work on Linux, macOS
and Windows, so every name goes through `safe_folder_name` and collisions (including names that
differ only by case, since macOS and Windows folders are case-insensitive) get distinct folders.

An export is built in a temporary folder beside OUT (same filesystem) and renamed into place
only once complete: a crash or an error midway leaves the previous export untouched, and the
next export to the same OUT removes what a killed one left behind. Source images are only
ever read.

The core, `export_items`, is a pure function of a list of `ExportItem`; `export_workspace`
feeds it the workspace's current labels as `plan_workspace_export` selects them (the dry run
a preview shows).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from imgcluster._process import pid_alive
from imgcluster.errors import ExportError
from imgcluster.workspace import Workspace

#: How files get into the export. ``copy`` is independent of the sources; ``hardlink`` costs no
#: space but shares the file with the source (editing one edits both); ``symlink`` points at the
#: absolute source path, so the export breaks if the collection moves.
MODES = ("copy", "hardlink", "symlink")

#: Split folder names for 2 or 3 proportions.
SPLIT_NAMES = {2: ("train", "val"), 3: ("train", "val", "test")}

#: Longest folder / file name, in UTF-8 bytes. Filesystems cap a name at 255 bytes; staying well
#: below leaves room for a collision suffix, and keeps full paths short for Windows tools.
MAX_FOLDER_BYTES = 120
MAX_FILE_BYTES = 150

_LOCK_SUFFIX = ".lock"

MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.json"
MANIFEST_COLUMNS = ("path", "source", "label", "split", "cluster", "confirmed", "sha256")

#: Extensions ``keras.utils.image_dataset_from_directory`` loads; others are silently skipped
#: by it, so the export warns about them.
KERAS_FORMATS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png"})

#: Already compressed formats are stored in the zip as they are (deflating them again costs time
#: and gains nothing).
_COMPRESSED = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})

_FORBIDDEN = frozenset('/\\<>:"|?*')
#: Bidirectional overrides can make a name display as something else ("gpj.exe" tricks).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{dev}{n}" for dev in ("com", "lpt") for n in "123456789\u00b9\u00b2\u00b3"}
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportItem:
    """One image to export, as plain data (so the core needs no workspace).

    Parameters
    ----------
    source : Path
        Absolute path of the source image (only read).
    relpath : str
        Its path relative to the collection root (for the manifest and file names).
    label : str
        The label name (the folder it goes to, after `safe_folder_name`).
    sha256 : str
        Content hash: exact duplicates share it and always land in the same split.
    cluster : int, optional
        Cluster id in the clustering run the labels come from.
    confirmed : bool, default=False
        Whether an annotator confirmed this image's label.
    """

    source: Path
    relpath: str
    label: str
    sha256: str
    cluster: int | None = None
    confirmed: bool = False


@dataclass(frozen=True)
class PlannedFile:
    """Where one item goes: ``[split/]folder/filename`` under OUT."""

    item: ExportItem
    split: str | None
    folder: str
    filename: str

    @property
    def path(self) -> str:
        """Path relative to OUT, with forward slashes."""
        parts = [self.split] if self.split else []
        return "/".join([*parts, self.folder, self.filename])


@dataclass
class ExportResult:
    """What an export wrote.

    ``counts[label][split]`` uses the split name, or ``"all"`` without a split.
    """

    out: Path
    n_files: int
    folders: dict[str, str]
    counts: dict[str, dict[str, int]]
    splits: tuple[str, ...]
    mode: str
    left_out: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# -- names ------------------------------------------------------------------------------------


def safe_folder_name(label: str, *, max_bytes: int = MAX_FOLDER_BYTES) -> str:
    """A folder name for ``label`` that is valid and harmless on Linux, macOS and Windows.

    Unicode is kept (NFC-normalised: Chinese, accents, spaces, emoji); path separators,
    characters Windows forbids (``<>:"|?*``) and control characters become ``_``; leading and
    trailing spaces and dots are dropped (Windows drops trailing ones itself, and a leading dot
    hides the folder -- keras skips it); Windows device names (``CON``, ``nul.txt``, ``COM1``)
    get a ``_`` prefix; the result is cut to ``max_bytes`` UTF-8 bytes on a character boundary.
    A name with nothing left (``"   "``, ``".."``) becomes ``_label_<hash of the name>``.

    Distinct labels can map to the same name (``a/b`` and ``a_b``); `assign_folders` resolves
    such collisions.

    Parameters
    ----------
    label : str
    max_bytes : int, default=120

    Returns
    -------
    str

    Examples
    --------
    >>> safe_folder_name("../../etc")
    '_.._etc'
    >>> safe_folder_name("CON")
    '_CON'
    >>> safe_folder_name("T恤 / 短袖")
    'T恤 _ 短袖'
    """
    name = _clean(label, max_bytes)
    return name or f"_label_{_short_hash(label)}"


def _clean(text: str, max_bytes: int) -> str:
    text = unicodedata.normalize("NFC", text)
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        if (
            ch in _FORBIDDEN
            or ch in _BIDI
            or category in ("Cc", "Cs", "Zl", "Zp")
            or (category == "Zs" and ch != " ")
        ):
            # Tabs, newlines, no-break and other odd spaces all become a visible "_" (a plain
            # space stays: "red shirt" is a fine folder name).
            chars.append("_")
        else:
            chars.append(ch)
    name = _strip("".join(chars))
    if name.split(".", 1)[0].rstrip(" ").casefold() in _RESERVED:
        name = "_" + name
    return _truncate(name, max_bytes)


def _strip(name: str) -> str:
    # U+200D (zero-width joiner) left dangling at an edge after a cut is invisible noise.
    return name.strip(" .\u200d")


def _truncate(name: str, max_bytes: int) -> str:
    encoded = name.encode("utf-8")
    if len(encoded) <= max_bytes:
        return name
    return _strip(encoded[:max_bytes].decode("utf-8", "ignore"))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _key(name: str) -> str:
    """What two names must differ in to be different files everywhere: case-insensitive
    (macOS, Windows) and normalisation-insensitive (macOS)."""
    return unicodedata.normalize("NFC", name).casefold()


def _with_suffix(base: str, suffix: str, max_bytes: int) -> str:
    room = max_bytes - len(suffix.encode("utf-8"))
    return _truncate(base, room) + suffix


def assign_folders(
    labels: Iterable[str],
    *,
    reserved: Iterable[str] = (),
    max_bytes: int = MAX_FOLDER_BYTES,
) -> dict[str, str]:
    """Map each label to a distinct safe folder name.

    Labels whose name is already safe keep it exactly; the others get `safe_folder_name`, and
    a name already taken (compared case-insensitively, as macOS and Windows do) gets a
    `` (2)``, `` (3)``... suffix. The result depends only on the set of labels, so
    re-exporting the same labels gives the same folders.

    Parameters
    ----------
    labels : iterable of str
    reserved : iterable of str, default=()
        Names that must not be used (files beside the folders, e.g. ``manifest.csv``).
    max_bytes : int, default=120

    Returns
    -------
    dict
        label -> folder name.
    """
    unique = sorted(set(labels))
    used = {_key(name) for name in reserved}
    folders: dict[str, str] = {}
    # First pass: names that need no change claim themselves, so "a_b" keeps "a_b" even when
    # "a/b" (which also maps to "a_b") sorts first.
    for label in unique:
        base = safe_folder_name(label, max_bytes=max_bytes)
        if base == label and _key(base) not in used:
            folders[label] = base
            used.add(_key(base))
    for label in unique:
        if label in folders:
            continue
        base = safe_folder_name(label, max_bytes=max_bytes)
        name, n = base, 2
        while _key(name) in used:
            name = _with_suffix(base, f" ({n})", max_bytes)
            n += 1
        folders[label] = name
        used.add(_key(name))
    return folders


def safe_file_name(name: str, *, fallback: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A portable file name keeping ``name``'s stem and extension where possible."""
    name = unicodedata.normalize("NFC", name)
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    ext = _clean(ext, 16) if ext else ""
    suffix = f".{ext}" if ext else ""
    stem = _clean(stem, max_bytes - len(suffix.encode("utf-8")))
    return (stem or fallback) + suffix


def _disambiguate(name: str, relpath: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """``stem_<hash of relpath>.ext``: stable whatever else is exported."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    suffix = f"_{_short_hash(relpath)}" + (f".{ext}" if ext else "")
    return _with_suffix(stem, suffix, max_bytes)


# -- planning ---------------------------------------------------------------------------------


def parse_split(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Parse ``"0.8,0.2"`` or ``"0.7,0.15,0.15"`` (``"0.8"`` means ``0.8,0.2``).

    Raises
    ------
    ExportError
        Not 2 or 3 positive numbers summing to 1.
    """
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise ExportError(
                f"split={text!r} should be proportions like 0.8,0.2 or 0.7,0.15,0.15"
            ) from None
    else:
        values = tuple(float(v) for v in text)
    if len(values) == 1 and 0 < values[0] < 1:
        values = (values[0], 1 - values[0])
    if (
        len(values) not in SPLIT_NAMES
        or any(not v > 0 for v in values)
        or abs(sum(values) - 1) > 1e-6
    ):
        raise ExportError(
            f"split={text!r} should be 2 or 3 positive proportions summing to 1 "
            "(train,val or train,val,test), e.g. 0.8,0.2"
        )
    return values


def split_items(
    items: Sequence[ExportItem], proportions: Sequence[float], *, seed: int = 0
) -> list[str]:
    """Stratified split: each label is split in ``proportions``, duplicates kept together.

    Images with the same content hash form one group that goes to one split as a whole (even
    across labels: otherwise an image would be trained on and validated on). A group counts
    towards the label most of its images carry. Within a label, groups are shuffled with
    ``seed`` and each goes to the split furthest below its target, the first always to
    ``train``, so a label with one image is trained on rather than only validated on. A
    label's split depends only on its own images and ``seed``.

    Returns
    -------
    list of str
        The split name of each item, aligned with ``items``.
    """
    names = SPLIT_NAMES[len(proportions)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.sha256].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for sha, members in groups.items():
        votes = Counter(items[i].label for i in members)
        top = max(votes.values())
        label = min(name for name, n in votes.items() if n == top)
        by_label[label].append(sha)
    result: list[str] = [""] * len(items)
    for label in sorted(by_label):
        shas = sorted(by_label[label])
        # One generator per label: adding or renaming another label leaves this one's split.
        random.Random(f"{seed}:{label}").shuffle(shas)
        total = sum(len(groups[sha]) for sha in shas)
        targets = [p * total for p in proportions]
        filled = [0] * len(names)
        for n, sha in enumerate(shas):
            if n == 0:
                chosen = 0
            else:
                deficits = [t - f for t, f in zip(targets, filled, strict=True)]
                chosen = max(range(len(names)), key=lambda j: (deficits[j], -j))
            filled[chosen] += len(groups[sha])
            for i in groups[sha]:
                result[i] = names[chosen]
    return result


def plan_export(
    items: Sequence[ExportItem],
    *,
    split: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[list[PlannedFile], dict[str, str]]:
    """Decide every exported file's split, folder and name (nothing is written).

    File names are the source file names (made portable); names that clash inside one folder
    (same name from different source folders, or differing only by case) all get a short hash
    of their source path appended, so no file overwrites another and the name does not depend
    on what else is exported.

    Returns
    -------
    (list of PlannedFile, dict)
        Files in source-path order, and label -> folder.
    """
    folders = assign_folders((item.label for item in items), reserved=(MANIFEST_NAME, LABELS_NAME))
    splits: list[str | None] = (
        list(split_items(items, split, seed=seed)) if split else [None] * len(items)
    )
    order = sorted(range(len(items)), key=lambda i: items[i].relpath)
    by_folder: dict[tuple[str | None, str], list[int]] = defaultdict(list)
    names: dict[int, str] = {}
    for i in order:
        item = items[i]
        base = item.relpath.rsplit("/", 1)[-1]
        names[i] = safe_file_name(base, fallback=f"image_{_short_hash(item.relpath)}")
        by_folder[(splits[i], folders[item.label])].append(i)
    for members in by_folder.values():
        clashes = Counter(_key(names[i]) for i in members)
        used: set[str] = set()
        for i in members:
            if clashes[_key(names[i])] > 1:
                names[i] = _disambiguate(names[i], items[i].relpath)
            name, n = names[i], 2
            while _key(name) in used:  # a hashed name equal to another file's own name
                name = _disambiguate(names[i], f"{items[i].relpath}#{n}")
                n += 1
            names[i] = name
            used.add(_key(name))
    planned = [PlannedFile(items[i], splits[i], folders[items[i].label], names[i]) for i in order]
    return planned, folders


# -- writing ----------------------------------------------------------------------------------


def export_items(
    items: Sequence[ExportItem],
    out: str | os.PathLike[str],
    *,
    mode: str = "copy",
    split: str | Sequence[float] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    left_out: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``items`` as a labeled folder tree at ``out``, atomically.

    Parameters
    ----------
    items : sequence of ExportItem
    out : path
        The export folder. It must not exist (an empty folder is fine) unless ``overwrite``.
    mode : {"copy", "hardlink", "symlink"}, default="copy"
        ``hardlink`` falls back to a copy where a link is impossible (another filesystem)
        and says so in ``warnings``.
    split : str or sequence of float, optional
        ``"0.8,0.2"`` (train, val) or ``"0.7,0.15,0.15"`` (train, val, test).
    seed : int, default=0
        Seed of the split's shuffle: the same items and seed give the same split.
    overwrite : bool, default=False
        Replace an existing export -- only after the new one is complete.
    metadata : dict, optional
        Provenance stored in ``labels.json`` (workspace, backbone, k, run id...); its
        ``"options"`` entry is merged into the recorded options.
    left_out : dict, optional
        Images the caller filtered out, by reason (recorded in the result and ``labels.json``).
    progress : callable(done, total), optional

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        ``out`` exists (without ``overwrite``), would contain a source image, a source is
        unreadable, or the split or mode is invalid. With ``overwrite``, a non-empty ``out``
        that is not an imgcluster export (no ``labels.json``) is refused too, so a mistyped
        path never deletes someone's folder.
    """
    if mode not in MODES:
        raise ExportError(f"mode={mode!r} should be one of {', '.join(MODES)}")
    proportions = parse_split(split)
    out_path = _absolute(Path(out))
    for item in items:
        if Path(item.source).resolve().is_relative_to(out_path):
            raise ExportError(
                f"export folder {out_path} contains the source image {item.source}; "
                "choose a folder outside the image collection"
            )
    _recover_abandoned(out_path)
    _check_target(out_path, overwrite=overwrite)
    missing = [str(item.source) for item in items if not Path(item.source).is_file()]
    if missing:
        raise ExportError(
            f"{len(missing)} source image(s) no longer exist, e.g. {missing[0]}; "
            "re-run ingest to update the workspace"
        )
    planned, folders = plan_export(items, split=proportions, seed=seed)
    splits = SPLIT_NAMES[len(proportions)] if proportions else ()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _staging(out_path) as (tmp, aside):
        warnings = _write_tree(tmp, planned, folders, splits, mode, progress)
        result = ExportResult(
            out=out_path,
            n_files=len(planned),
            folders=folders,
            counts=_counts(planned, splits),
            splits=splits,
            mode=mode,
            left_out=dict(left_out or {}),
            warnings=warnings,
        )
        _write_manifest(tmp / MANIFEST_NAME, planned)
        _write_labels_json(tmp / LABELS_NAME, result, proportions, seed, metadata or {})
        _swap_into_place(tmp, out_path, aside)
    return result


def _absolute(out: Path) -> Path:
    """Absolute, with the parent resolved but OUT itself not (a symlink there is refused)."""
    out = Path(os.path.abspath(out.expanduser()))
    if out.name in ("", ".", ".."):
        raise ExportError(f"export folder {out} is not a usable folder name")
    return out.parent.resolve() / out.name


def _check_target(out: Path, *, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"export target {out} exists and is not a folder; remove it first")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"export folder {out} already exists and is not empty; "
                "pass overwrite=True (--overwrite) to replace it"
            )
        if not _is_export(out):
            raise ExportError(
                f"export folder {out} is not empty and is not an imgcluster export "
                f"(no {LABELS_NAME}); refusing to replace it -- choose another folder"
            )


def _is_export(folder: Path) -> bool:
    try:
        document = json.loads((folder / LABELS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and str(document.get("format", "")).startswith(
        "imgcluster-export/"
    )


def _target(root: Path, planned: PlannedFile) -> Path:
    """The destination, refusing anything that would land outside ``root``."""
    parts = [p for p in (planned.split, planned.folder, planned.filename) if p]
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ExportError(f"unsafe export path component {part!r}")
    dst = root.joinpath(*parts)
    # Resolve the folder, not the file: in symlink mode the file itself points outside.
    if not dst.parent.resolve().is_relative_to(root.resolve()):
        raise ExportError(f"export path {dst} would be outside {root}")
    return dst


def _write_tree(
    root: Path,
    planned: Sequence[PlannedFile],
    folders: dict[str, str],
    splits: tuple[str, ...],
    mode: str,
    progress: Progress | None,
) -> list[str]:
    # Every label folder exists in every split, even if empty, so that loaders that infer
    # classes from folder names give the same class indices for train and val.
    labels_used = {p.item.label for p in planned}
    for split in splits or (None,):
        for label in labels_used:
            base = root / split if split else root
            (base / folders[label]).mkdir(parents=True, exist_ok=True)
    total = len(planned)
    if progress:
        progress(0, total)
    fallbacks = 0
    changed: list[str] = []
    for done, item in enumerate(planned, start=1):
        dst = _target(root, item)
        source = Path(item.item.source)
        try:
            if mode == "copy":
                if _copy(source, dst) != item.item.sha256:
                    changed.append(item.item.relpath)
            elif mode == "hardlink":
                try:
                    os.link(source, dst)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    _copy(source, dst)
                    fallbacks += 1
            else:
                os.symlink(os.path.abspath(source), dst)
        except OSError as exc:
            raise ExportError(f"cannot export {item.item.relpath}: {exc}") from exc
        if progress:
            progress(done, total)
    warnings = []
    if fallbacks:
        warnings.append(
            f"{fallbacks} file(s) copied instead of hard-linked "
            "(the export folder is on another filesystem than the images)"
        )
    if changed:
        warnings.append(
            f"{len(changed)} image(s) changed on disk since they were ingested and labeled, "
            f"e.g. {changed[0]}; re-run ingest to review them"
        )
    odd = Counter(
        Path(p.filename).suffix.lower() or "(none)"
        for p in planned
        if Path(p.filename).suffix.lower() not in KERAS_FORMATS
    )
    if odd:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(odd.items()))
        warnings.append(
            f"keras image_dataset_from_directory skips these formats: {kinds} "
            "(torchvision ImageFolder reads .webp and .tif)"
        )
    return warnings


def _copy(source: Path, dst: Path) -> str:
    """Copy ``source`` (opened read-only) to a new file ``dst``; return the content's sha256.

    Hashing while copying costs no extra read and tells whether the file still is the one
    that was labeled.
    """
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dst, "xb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    shutil.copystat(source, dst)
    return digest.hexdigest()


def _counts(planned: Sequence[PlannedFile], splits: tuple[str, ...]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for label in sorted({p.item.label for p in planned}):
        counts[label] = dict.fromkeys(splits or ("all",), 0)
    for p in planned:
        counts[p.item.label][p.split or "all"] += 1
    return counts


def _write_manifest(path: Path, planned: Sequence[PlannedFile]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for p in planned:
            writer.writerow(
                [
                    p.path,
                    p.item.relpath,
                    p.item.label,
                    p.split or "",
                    "" if p.item.cluster is None else p.item.cluster,
                    int(p.item.confirmed),
                    p.item.sha256,
                ]
            )


def _write_labels_json(
    path: Path,
    result: ExportResult,
    proportions: tuple[float, ...] | None,
    seed: int,
    metadata: dict[str, Any],
) -> None:
    document = {
        "format": "imgcluster-export/1",
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **metadata,
        "options": {
            "mode": result.mode,
            "split": list(proportions) if proportions else None,
            "seed": seed if proportions else None,
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


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[tuple[Path, Path]]:
    """A build folder beside ``out`` (``.OUT.export-XXXX``), guarded by a locked ``.lock`` file.

    Yields the build folder and the name the previous export is moved to during the swap
    (``.OUT.export-XXXX.old``). The lock is held until the export is in place; the kernel
    releases it when the process dies, which is how `_recover_abandoned` tells a build that
    was killed from one still running in another process. On an error the build folder is
    removed here.
    """
    fd, lock_name = tempfile.mkstemp(
        dir=out.parent, prefix=f".{out.name}.export-", suffix=_LOCK_SUFFIX
    )
    base = lock_name[: -len(_LOCK_SUFFIX)]
    stage, aside = Path(base), Path(base + ".old")
    with os.fdopen(fd, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: always free
        try:
            stage.mkdir()
            yield stage, aside
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # still there only if the export failed
            Path(lock_name).unlink(missing_ok=True)


def _swap_into_place(stage: Path, out: Path, aside: Path) -> None:
    """Rename the finished export to ``out``. An old export is renamed aside first and deleted
    last, so until the new one is in place the old one is complete; a crash between the two
    renames is undone by the next export (`_recover_abandoned`)."""
    if not out.exists():
        os.rename(stage, out)
        return
    os.rename(out, aside)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _recover_abandoned(out: Path) -> None:
    """Clean up after exports to ``out`` that were killed: delete their half-built folders and
    put back a previous export a crash left renamed aside."""
    if fcntl is None:  # Windows: no flock; leftovers are hidden folders the user may delete
        return
    for lock_path in out.parent.glob(f".{glob.escape(out.name)}.export-*{_LOCK_SUFFIX}"):
        base = str(lock_path)[: -len(_LOCK_SUFFIX)]
        try:
            lock = open(lock_path, "r+")  # noqa: SIM115 - closed below, after the lock test
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # another process is exporting right now
            aside = Path(base + ".old")
            if aside.is_dir():
                if not out.exists() and not out.is_symlink():
                    os.rename(aside, out)
                else:
                    shutil.rmtree(aside, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


# -- workspace --------------------------------------------------------------------------------


@dataclass
class WorkspaceExportPlan:
    """What `export_workspace` would write with the same options, without writing anything.

    ``folders`` maps each exported label to its folder; ``counts[label][split]`` (``"all"``
    without a split) and ``left_out`` (reason -> images) are the numbers the export reports.
    """

    items: list[ExportItem]
    folders: dict[str, str]
    counts: dict[str, dict[str, int]]
    splits: tuple[str, ...]
    left_out: dict[str, int]
    n_labeled: int

    @property
    def n_files(self) -> int:
        return len(self.items)


def plan_workspace_export(
    ws: Workspace,
    *,
    confirmed_only: bool = False,
    include_unsure: bool = False,
    split: str | Sequence[float] | None = None,
    seed: int = 0,
) -> WorkspaceExportPlan:
    """Dry run of `export_workspace`: the folders, per-label counts and what is left out.

    `export_workspace` exports exactly this plan's ``items``, so a preview built from it shows
    what the export will hold. Excluded images are always left out; images marked unsure are
    left out unless ``include_unsure``; with ``confirmed_only`` unconfirmed images are left
    out; usable images without a label are counted as ``unlabeled``. Reads only.

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
    from imgcluster.labels import current_labels

    rows = current_labels(ws)  # raises NoLabelSession when labeling has not started
    left_out: Counter[str] = Counter()
    items = []
    for row in rows:
        if row.state == "excluded":
            left_out["excluded"] += 1
        elif row.state == "unsure" and not include_unsure:
            left_out["unsure"] += 1
        elif confirmed_only and not row.confirmed:
            left_out["unconfirmed"] += 1
        else:
            items.append(
                ExportItem(
                    source=ws.source_path(row.relpath),
                    relpath=row.relpath,
                    label=row.label,
                    sha256=row.sha256,
                    cluster=row.cluster,
                    confirmed=row.confirmed,
                )
            )
    unlabeled = ws.image_counts()["ok"] - len(rows)
    if unlabeled > 0:
        left_out["unlabeled"] = unlabeled
    proportions = parse_split(split)
    planned, folders = plan_export(items, split=proportions, seed=seed)
    splits = SPLIT_NAMES[len(proportions)] if proportions else ()
    return WorkspaceExportPlan(
        items=items,
        folders=folders,
        counts=_counts(planned, splits),
        splits=splits,
        left_out=dict(left_out),
        n_labeled=len(rows),
    )


def export_workspace(
    ws: Workspace,
    out: str | os.PathLike[str],
    *,
    mode: str = "copy",
    split: str | Sequence[float] | None = None,
    seed: int = 0,
    confirmed_only: bool = False,
    include_unsure: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export the active labeling session's current labels to ``out``.

    What is exported is `plan_workspace_export` with the same options: excluded images are
    always left out; images marked unsure are left out unless ``include_unsure`` (a training
    set should hold what annotators stand behind); with ``confirmed_only`` only confirmed
    images are exported. What was left out, and why, is in the result and ``labels.json``.
    The workspace is only read.

    Parameters
    ----------
    ws : Workspace
    out : path
        The export folder; see `export_items` for ``mode``, ``split``, ``seed``,
        ``overwrite`` and ``progress``.
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
    from imgcluster.labels import active_session

    session = active_session(ws)
    plan = plan_workspace_export(
        ws, confirmed_only=confirmed_only, include_unsure=include_unsure, split=split, seed=seed
    )
    root = ws.collection_root
    out_path = _absolute(Path(out))
    if root is not None and out_path.is_relative_to(root.resolve()):
        raise ExportError(
            f"export folder {out_path} is inside the image collection {root}; "
            "choose a folder outside it"
        )
    if ws.path.is_relative_to(out_path):
        raise ExportError(f"export folder {out_path} would contain the workspace {ws.path}")
    if not plan.items:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(plan.left_out.items()))
        raise ExportError(
            f"nothing to export: {plan.n_labeled} labeled images, all left out "
            f"({reasons or 'none'})"
        )
    metadata: dict[str, Any] = {
        "workspace": str(ws.path),
        "collection_root": str(root) if root else None,
        "workspace_revision": ws.revision,
    }
    if session is not None:
        metadata |= {
            "session_id": session.id,
            "session_version": session.version,
            "run_id": session.run_id,
            "backbone": session.backbone,
            "k": _run_k(ws, session.run_id),
        }
    metadata["options"] = {"confirmed_only": confirmed_only, "include_unsure": include_unsure}
    return export_items(
        plan.items,
        out_path,
        mode=mode,
        split=split,
        seed=seed,
        overwrite=overwrite,
        metadata=metadata,
        left_out=plan.left_out,
        progress=progress,
    )


def _run_k(ws: Workspace, run_id: int) -> int | None:
    with ws.read() as conn:
        row = conn.execute("SELECT k FROM clusterings WHERE id = ?", (run_id,)).fetchone()
    return None if row is None else int(row[0])


# -- zip --------------------------------------------------------------------------------------


def zip_export(out: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Zip an export folder to ``dest`` (default ``OUT.zip`` beside it), file by file.

    Each file is streamed from disk into the archive, so memory stays flat however big the
    export; JPEG/PNG are stored as they are (already compressed). The archive holds one top
    folder named like OUT, keeps empty class folders, and is written to a temporary file and
    renamed, so a half-written zip never has the final name. Symbolic links are zipped as the
    images they point at.

    Returns
    -------
    Path
        The zip file (open it with ``open(path, "rb")`` for a download button).
    """
    root = Path(out).resolve()
    if not root.is_dir():
        raise ExportError(f"export folder {root} does not exist")
    target = Path(dest).resolve() if dest else root.parent / f"{root.name}.zip"
    if target.is_relative_to(root):
        raise ExportError(f"zip file {target} cannot be inside the folder it zips")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_zips(target)
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf,
        ):
            _zip_tree(zf, root)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a zip is for sharing
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _remove_abandoned_zips(target: Path) -> None:
    """Delete half-written zips of ``target`` whose writing process has died.

    Temporary zips carry their writer's pid, so a zip being written right now by another live
    process is left alone while one from a killed process is cleaned up.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid_text = stale.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        stale.unlink(missing_ok=True)


def _zip_tree(zf: zipfile.ZipFile, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        arc_dir = Path(root.name) / folder.relative_to(root)
        zf.write(folder, arc_dir.as_posix() + "/")
        for name in sorted(filenames):
            ext = Path(name).suffix.lower()
            method = zipfile.ZIP_STORED if ext in _COMPRESSED else zipfile.ZIP_DEFLATED
            zf.write(folder / name, (arc_dir / name).as_posix(), compress_type=method)


def read_manifest(out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an export's ``manifest.csv`` (for checks and tools)."""
    text = (Path(out) / MANIFEST_NAME).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))
