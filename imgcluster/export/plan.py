"""Planning: which split, folder and file name every exported image gets (nothing is written).

The core is a pure function of a list of `ExportItem` (plain data), so it needs no workspace
and the same items and ``random_state`` always give the same plan.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcluster.errors import ExportError
from imgcluster.export.formats import FORMATS, output_format
from imgcluster.export.names import (
    assign_folders,
    disambiguate,
    name_key,
    safe_file_name,
    short_hash,
    split_extension,
)

#: Split folder names for 2 or 3 proportions.
SPLIT_NAMES = {2: ("train", "val"), 3: ("train", "val", "test")}

MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.json"
LEFT_OUT_NAME = "left_out.csv"
#: Plain files at OUT's root: no label folder may take these names.
ROOT_FILES = (MANIFEST_NAME, LABELS_NAME, LEFT_OUT_NAME)


@dataclass(frozen=True)
class ExportItem:
    """One image to export, as plain data (so the core needs no workspace).

    Parameters
    ----------
    source : path (str or Path)
        Absolute path of the source image (only read).
    relpath : str
        Its path relative to the collection root (for the manifest and file names).
    label : str
        The label name (the folder it goes to, after `safe_folder_name`).
    sha256 : str
        Content hash at ingest: the export refuses a file whose content no longer has it, and
        exact duplicates share it and always land in the same split.
    cluster : int, optional
        Cluster id in the clustering run the labels come from.
    confirmed : bool, default=False
        Whether an annotator confirmed this image's label.
    format : str, optional
        The image format recorded at ingest (Pillow's name: ``"JPEG"``, ``"TIFF"``...); it
        decides the exported format and extension. Guessed from the extension when unknown.
    """

    source: str | os.PathLike[str]
    relpath: str
    label: str
    sha256: str
    cluster: int | None = None
    confirmed: bool = False
    format: str | None = None


@dataclass(frozen=True)
class PlannedFile:
    """Where one item goes (``[split/]folder/filename`` under OUT) and in which format.

    ``format`` is the format the file is written in (None: the source bytes as they are).
    """

    item: ExportItem
    split: str | None
    folder: str
    filename: str
    format: str | None = None

    @property
    def path(self) -> str:
        """Path relative to OUT, with forward slashes."""
        parts = [self.split] if self.split else []
        return "/".join([*parts, self.folder, self.filename])


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
    items: Sequence[ExportItem],
    proportions: Sequence[float],
    *,
    random_state: int = 0,
) -> list[str]:
    """Stratified split: each label is split in ``proportions``, duplicates kept together.

    Images with the same content hash form one group that goes to one split as a whole (even
    across labels: otherwise an image would be trained on and validated on). A group counts
    towards the label most of its images carry. Within a label, groups are shuffled with
    ``random_state`` and each goes to the split furthest below its target, the first always
    to ``train``, so a label with one image is trained on rather than only validated on. A
    label's split depends only on its own images and ``random_state``.

    Returns
    -------
    list of str
        The split name of each item, aligned with ``items``.
    """
    names = SPLIT_NAMES[len(proportions)]
    if not items:
        return []
    labels = [it.label for it in items]
    codes = _split_codes(labels, [it.sha256 for it in items], proportions, random_state)
    return np.array(names, dtype=object)[codes].tolist()


def _split_codes(
    labels: list[str], shas: list[str], proportions: Sequence[float], random_state: int
) -> np.ndarray:
    """`split_items` as the index of each item's split (int64, aligned with the items).

    Vectorised (1M items: 5 s of CPU in per-item Python loops before, 2 s now; bench/README.md
    "### The app at 1M images in Chromium"); the result is the same as grouping, voting and
    shuffling each label's sorted hashes one by one.
    """
    n = len(labels)
    index = {sha: i for i, sha in enumerate(dict.fromkeys(shas))}
    uniq = list(index)  # group -> its content hash
    group = np.fromiter(map(index.__getitem__, shas), np.int64, n)
    label_codes = {name: i for i, name in enumerate(dict.fromkeys(labels))}
    item_label = np.fromiter(map(label_codes.__getitem__, labels), np.int64, n)
    sizes = np.bincount(group, minlength=len(uniq))
    first = np.empty(len(uniq), np.int64)
    first[group[::-1]] = np.arange(n - 1, -1, -1)  # each group's first item
    group_label = item_label[first]
    for g, label in _votes(labels, group, sizes).items():
        group_label[g] = label_codes[label]
    # Groups by label, each label's in hash order (one sort of all hashes), then shuffled.
    by_hash = np.array(sorted(range(len(uniq)), key=uniq.__getitem__), dtype=np.int64)
    order = by_hash[np.argsort(group_label[by_hash], kind="stable")]
    bounds = np.searchsorted(group_label[order], np.arange(len(label_codes) + 1))
    group_split = np.zeros(len(uniq), np.int64)
    for label in sorted(label_codes):
        code = label_codes[label]
        mine = order[bounds[code] : bounds[code + 1]]
        if not len(mine):
            continue
        # One generator per label: adding or renaming another label leaves this one's split.
        # A shuffle's swaps depend only on the length: shuffling positions = shuffling hashes.
        perm = list(range(len(mine)))
        random.Random(f"{random_state}:{label}").shuffle(perm)
        mine = mine[perm]
        group_split[mine] = _fill(sizes[mine].tolist(), proportions)
    return group_split[group]


def _votes(labels: list[str], group: np.ndarray, sizes: np.ndarray) -> dict[int, str]:
    """The label of each content group of several items: the one most of its images carry
    (ties: the first name)."""
    votes: dict[int, Counter[str]] = defaultdict(Counter)
    for i in np.flatnonzero(sizes[group] > 1).tolist():
        votes[int(group[i])][labels[i]] += 1
    out = {}
    for g, vote in votes.items():
        top = max(vote.values())
        out[g] = min(name for name, count in vote.items() if count == top)
    return out


def _fill(sizes: Sequence[int], proportions: Sequence[float]) -> list[int]:
    """The split of each group in turn: the first to split 0 (train), each next one to the
    split furthest below its target (ties: the earlier split)."""
    targets = [p * sum(sizes) for p in proportions]
    filled = [0] * len(targets)
    others = range(1, len(targets))
    chosen_list = []
    append = chosen_list.append
    for n, size in enumerate(sizes):
        chosen = 0
        if n:
            best = targets[0] - filled[0]
            for j in others:
                if targets[j] - filled[j] > best:
                    chosen, best = j, targets[j] - filled[j]
        filled[chosen] += size
        append(chosen)
    return chosen_list


def file_name(item: ExportItem, fmt: str | None) -> str:
    """The exported file name: the source's (made portable), its extension matching ``fmt``.

    A name whose extension already says the format keeps it (``.jpeg`` stays); otherwise the
    format's usual extension replaces it (``photo.tif`` -> ``photo.png``, ``scan.jpg`` holding
    PNG -> ``scan.png``).
    """
    base = item.relpath.rsplit("/", 1)[-1]
    name = safe_file_name(base, fallback="")
    if name.startswith(".") or not name:  # nothing usable left of the stem
        name = f"image_{short_hash(item.relpath)}{name}"
    if fmt is None:
        return name
    stem, ext = split_extension(name)
    spec = FORMATS[fmt]
    if f".{ext.lower()}" in spec.extensions:
        return name
    return f"{stem}{spec.extensions[0]}"


def plan_counts(
    items: Sequence[ExportItem],
    *,
    split: Sequence[float] | None = None,
    random_state: int = 0,
) -> tuple[dict[str, dict[str, int]], dict[str, str], tuple[str, ...]]:
    """What `plan_export` decides that a preview shows, without the file names (cheap).

    ``items`` need only ``label`` and ``sha256`` (an `ExportItem`, or a labels export row).

    Returns
    -------
    (counts, folders, splits)
        ``counts[label][split]`` (``"all"`` without a split), label -> folder, split names.
    """
    folders = assign_folders((item.label for item in items), reserved=ROOT_FILES)
    splits = SPLIT_NAMES[len(split)] if split else ()
    labels = [item.label for item in items]
    names = sorted(set(labels))
    counts: dict[str, dict[str, int]] = {
        label: dict.fromkeys(splits or ("all",), 0) for label in names
    }
    if not split:
        for label, n in Counter(labels).items():
            counts[label]["all"] = n
        return counts, folders, splits
    shas = [item.sha256 for item in items]
    counts.update(split_counts(labels, shas, split, random_state=random_state))
    return counts, folders, splits


def split_counts(
    labels: Sequence[str],
    shas: Sequence[str],
    proportions: Sequence[float],
    *,
    random_state: int = 0,
) -> dict[str, dict[str, int]]:
    """``counts[label][split]`` of `split_items` over images with these labels and content
    hashes (aligned lists), every split present per label: what a split preview shows, with
    no item and no split name built per image (1M images: one bincount).
    """
    splits = SPLIT_NAMES[len(proportions)]
    labels, shas = list(labels), list(shas)
    names = sorted(set(labels))
    if not labels:
        return {}
    codes = _split_codes(labels, shas, proportions, random_state)
    position = {label: i for i, label in enumerate(names)}
    cells = np.fromiter(map(position.__getitem__, labels), np.int64, len(labels))
    table = np.bincount(cells * len(splits) + codes, minlength=len(names) * len(splits))
    rows = table.reshape(len(names), len(splits)).tolist()
    return {
        label: dict(zip(splits, row, strict=True)) for label, row in zip(names, rows, strict=True)
    }


def plan_export(
    items: Sequence[ExportItem],
    *,
    split: Sequence[float] | None = None,
    random_state: int = 0,
    format: str = "auto",
) -> tuple[list[PlannedFile], dict[str, str]]:
    """Decide every exported file's split, folder, name and format (nothing is written).

    File names are the source file names (made portable, with the extension of the format
    written, see `imgcluster.export.formats.output_format`); names that clash inside one folder
    (same name from different source folders, or differing only by case) all get a short hash
    of their source path appended, so no file overwrites another and the name does not depend
    on what else is exported.

    Returns
    -------
    (list of PlannedFile, dict)
        Files in source-path order, and label -> folder.
    """
    folders = assign_folders((item.label for item in items), reserved=ROOT_FILES)
    splits: list[str | None] = (
        list(split_items(items, split, random_state=random_state)) if split else [None] * len(items)
    )
    order = sorted(range(len(items)), key=lambda i: items[i].relpath)
    formats = [output_format(item.format, item.relpath, format) for item in items]
    by_folder: dict[tuple[str | None, str], list[int]] = defaultdict(list)
    names: dict[int, str] = {}
    for i in order:
        names[i] = file_name(items[i], formats[i])
        by_folder[(splits[i], folders[items[i].label])].append(i)
    for members in by_folder.values():
        _unclash(members, names, items)
    planned = [
        PlannedFile(items[i], splits[i], folders[items[i].label], names[i], formats[i])
        for i in order
    ]
    return planned, folders


def _unclash(members: list[int], names: dict[int, str], items: Sequence[ExportItem]) -> None:
    """Give every file of one folder a distinct name (case-insensitively)."""
    clashes = Counter(name_key(names[i]) for i in members)
    if len(clashes) == len(members):
        return
    used: set[str] = set()
    for i in members:
        if clashes[name_key(names[i])] > 1:
            names[i] = disambiguate(names[i], items[i].relpath)
        name, n = names[i], 2
        while name_key(name) in used:  # a hashed name equal to another file's own name
            name = disambiguate(names[i], f"{items[i].relpath}#{n}")
            n += 1
        names[i] = name
        used.add(name_key(name))


def count_planned(
    planned: Sequence[PlannedFile], splits: tuple[str, ...]
) -> dict[str, dict[str, int]]:
    """``counts[label][split]`` (``"all"`` without a split), every split present per label."""
    counts: dict[str, dict[str, int]] = {}
    for label in sorted({p.item.label for p in planned}):
        counts[label] = dict.fromkeys(splits or ("all",), 0)
    for p in planned:
        counts[p.item.label][p.split or "all"] += 1
    return counts


def source_under(item: ExportItem, out: Path) -> bool:
    """Whether ``item``'s source lies inside ``out`` (exporting there would copy onto it)."""
    return Path(item.source).resolve().is_relative_to(out)
