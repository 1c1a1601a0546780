"""Path policy: which folders may be opened, containment checks, workspace and export folders.

The app lets a browser name folders on the server, so every path typed there goes through
`resolve_under`, which resolves symlinks and ``..`` *before* checking containment. The same
module says what an imgcluster folder is (a workspace: it holds the database; an export: it
holds `EXPORT_MARKER`), so ingest never scans one as photos.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from imgcluster import settings
from imgcluster.errors import InvalidPath, WorkspaceNotFound

#: The workspace database file name (also defined in `imgcluster.workspace`, which imports it).
DB_NAME = "imgcluster.sqlite"

#: Marker file written at the top of every export folder (by `imgcluster.export`).
EXPORT_MARKER = ".imgcluster-export"

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def allowed_roots(default: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Folders whose sub-folders may be opened from the browser.

    ``IMGCLUSTER_ALLOWED_ROOTS`` (``os.pathsep``-separated) overrides ``default`` (the app
    passes the current directory and its bundled ``sample_data/``). Missing folders are
    dropped; each root is resolved once.
    """
    raw = settings.allowed_roots_raw()
    items = raw if raw is not None else [str(p) for p in default]
    roots: list[Path] = []
    for item in items:
        path = Path(item).expanduser().resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def workspaces_home() -> Path:
    """Where new workspaces are created (``IMGCLUSTER_WORKSPACES``, default ``./workspaces``)."""
    return settings.workspaces_home()


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``root`` or below it, after resolving both (symlinks, ``..``)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):
        return False


def resolve_under(text: str, roots: Sequence[Path], *, what: str = "folder") -> Path:
    """Resolve a path typed in the browser and refuse it unless it lies inside one of ``roots``.

    A relative path is looked up in each root in turn (the first that has it wins).
    Resolution follows symlinks and collapses ``..`` *before* the check, so neither ``../..``,
    an absolute path nor a symlink pointing out of the root gets through.

    Raises
    ------
    InvalidPath
        Empty, missing, or outside every allowed root.
    """
    text = text.strip()
    if not text or "\x00" in text:
        raise InvalidPath(f"enter a {what} path")
    if not roots:
        raise InvalidPath(f"no folder is allowed on this server ({settings.ALLOWED_ROOTS_ENV})")
    typed = Path(text)
    candidates = [typed] if typed.is_absolute() else [root / typed for root in roots]
    resolved = None
    for candidate in candidates:
        try:
            resolved = candidate.resolve(strict=True)
            break
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            continue
    if resolved is None:
        raise InvalidPath(f"{what} {text!r} does not exist")
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InvalidPath(
            f"{what} {text!r} is outside the folders this server may read "
            f"({', '.join(str(r) for r in roots)})"
        )
    return resolved


def is_plain_name(name: str) -> bool:
    """A folder name typed in the browser that cannot be a path: letters, digits, ``._-``."""
    return bool(_PLAIN_NAME.match(name))


def plain_name(name: str, *, what: str = "name") -> str:
    """``name`` stripped, or `InvalidPath` saying which characters a folder name may use."""
    name = name.strip()
    if not is_plain_name(name):
        raise InvalidPath(
            f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no folders)"
        )
    return name


def new_workspace_dir(name: str, home: Path | None = None) -> Path:
    """The folder for a new workspace called ``name`` under ``home`` (`workspaces_home`)."""
    name = plain_name(name, what="workspace name")
    path = (home or workspaces_home()) / name
    if (path / DB_NAME).exists():
        raise InvalidPath(f"a workspace called {name!r} already exists; open it instead")
    return path


def known_workspaces(home: Path | None = None) -> list[Path]:
    """Workspaces under ``home`` (`workspaces_home`), by name; symlinked ones are left out."""
    home = home or workspaces_home()
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if (p / DB_NAME).is_file() and not p.is_symlink())


def open_workspace_path(text: str, roots: Sequence[Path]) -> Path:
    """Validate a workspace path from the browser (URL or text box): under the workspaces home
    or one of ``roots``, and really a workspace."""
    home = workspaces_home()
    home.mkdir(parents=True, exist_ok=True)
    path = resolve_under(text, [home, *roots], what="workspace")
    if not (path / DB_NAME).is_file():
        raise WorkspaceNotFound(f"{text!r} is not an imgcluster workspace")
    return path


def imgcluster_folder_kind(folder: str | os.PathLike[str]) -> str | None:
    """``"workspace"`` or ``"export"`` when ``folder`` is one of ours, else None.

    Ingest never scans such a folder: its thumbnails or exported copies would come back as new
    images on every scan.
    """
    folder = Path(folder)
    try:
        if (folder / DB_NAME).exists():
            return "workspace"
        if (folder / EXPORT_MARKER).exists():
            return "export"
        labels = folder / "labels.json"  # exports written before the marker existed
        if labels.is_file():
            with open(labels, "rb") as fh:
                if b'"imgcluster-export/' in fh.read(4096):
                    return "export"
    except OSError:
        return None
    return None


def check_collection(root: Path, workspace: Path) -> None:
    """Refuse a collection that is, or lies inside, a workspace or an export folder.

    The one exception is a workspace's own ``uploads/`` folder, the collection of a workspace
    made from uploads. A collection that *contains* the workspace is allowed: the scan skips
    the workspace folder (and any export folder) and says so.
    """
    root, workspace = Path(root).resolve(), Path(workspace).resolve()
    if is_inside(root, workspace / "uploads"):
        return
    for folder in (root, *root.parents):
        kind = imgcluster_folder_kind(folder) or ("workspace" if folder == workspace else None)
        if kind is None:
            continue
        what = f"is an imgcluster {kind}" if folder == root else f"is inside the {kind} {folder}"
        raise InvalidPath(f"image folder {root} {what}; choose the folder that holds your photos")
