"""Folder and file names that are valid and harmless on Linux, macOS and Windows.

Label names are free Unicode text typed by annotators; every name goes through
`safe_folder_name`, and collisions (including names that differ only by case, since macOS and
Windows folders are case-insensitive) get distinct folders in `assign_folders`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

from imgcluster.labels.names import forbidden_character

#: Longest folder / file name, in UTF-8 bytes. Filesystems cap a name at 255 bytes; staying well
#: below leaves room for a collision suffix, and keeps full paths short for Windows tools.
MAX_FOLDER_BYTES = 120
MAX_FILE_BYTES = 150

_FORBIDDEN = frozenset('/\\<>:"|?*')
#: Bidirectional overrides can make a name display as something else ("gpj.exe" tricks).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{dev}{n}" for dev in ("com", "lpt") for n in "123456789\u00b9\u00b2\u00b3"}
)
#: Printable ASCII with nothing to replace: most file names, checked with one regex instead of
#: a per-character Unicode lookup (100k names in a preview).
_PLAIN_ASCII = re.compile(r"[ !#-)+-.0-9;=@-\[\]-{}~]*")


def _is_unsafe(ch: str) -> bool:
    # The control-character rule is the labels' own (`forbidden_character`): what a label
    # name may never hold becomes "_" here (names stored before the rule, file names).
    category = unicodedata.category(ch)
    return (
        ch in _FORBIDDEN
        or ch in _BIDI
        or forbidden_character(ch) is not None
        or (category == "Zs" and ch != " ")
    )


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
    return name or f"_label_{short_hash(label)}"


def _clean(text: str, max_bytes: int) -> str:
    if not _PLAIN_ASCII.fullmatch(text):
        text = unicodedata.normalize("NFC", text)
        # Tabs, newlines, no-break and other odd spaces all become a visible "_" (a plain
        # space stays: "red shirt" is a fine folder name).
        text = "".join("_" if _is_unsafe(ch) else ch for ch in text)
    name = _strip(text)
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


def short_hash(text: str) -> str:
    """Eight hex digits of the text's sha256: a stable, short disambiguator."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def name_key(name: str) -> str:
    """What two names must differ in to be different files everywhere: case-insensitive
    (macOS, Windows) and normalisation-insensitive (macOS)."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", name).casefold()


def with_suffix(base: str, suffix: str, max_bytes: int) -> str:
    """``base`` cut so that ``base + suffix`` fits in ``max_bytes``."""
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
    used = {name_key(name) for name in reserved}
    folders: dict[str, str] = {}
    # First pass: names that need no change claim themselves, so "a_b" keeps "a_b" even when
    # "a/b" (which also maps to "a_b") sorts first.
    for label in unique:
        base = safe_folder_name(label, max_bytes=max_bytes)
        if base == label and name_key(base) not in used:
            folders[label] = base
            used.add(name_key(base))
    for label in unique:
        if label in folders:
            continue
        base = safe_folder_name(label, max_bytes=max_bytes)
        name, n = base, 2
        while name_key(name) in used:
            name = with_suffix(base, f" ({n})", max_bytes)
            n += 1
        folders[label] = name
        used.add(name_key(name))
    return folders


def split_extension(name: str) -> tuple[str, str]:
    """``("photo", "jpg")`` for ``"photo.jpg"``; ``("photo", "")`` without a dot."""
    stem, dot, ext = name.rpartition(".")
    return (stem, ext) if dot else (name, "")


def safe_file_name(name: str, *, fallback: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A portable file name keeping ``name``'s stem and extension where possible."""
    if not name.isascii():
        name = unicodedata.normalize("NFC", name)
    stem, ext = split_extension(name)
    ext = _clean(ext, 16) if ext else ""
    suffix = f".{ext}" if ext else ""
    stem = _clean(stem, max_bytes - len(suffix.encode("utf-8")))
    return (stem or fallback) + suffix


def disambiguate(name: str, relpath: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """``stem_<hash of relpath>.ext``: stable whatever else is exported."""
    stem, ext = split_extension(name)
    suffix = f"_{short_hash(relpath)}" + (f".{ext}" if ext else "")
    return with_suffix(stem, suffix, max_bytes)
