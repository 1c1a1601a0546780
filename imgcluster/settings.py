"""Every environment variable imgcluster reads, in one place.

Each setting is a function read at call time (tests and the app change the environment after
import), so nothing here is cached. No other module of the library reads ``os.environ`` for
its own settings: they call these functions. The names are public constants so messages and
docs can quote them.

=============================  ==============================================================
``IMGCLUSTER_ALLOWED_ROOTS``   folders the app may open (``os.pathsep``-separated)
``IMGCLUSTER_WORKSPACES``      where the app creates workspaces (default ``./workspaces``)
``IMGCLUSTER_CACHE``           per-user cache (converted models, numba cache, ...)
``IMGCLUSTER_UMAP``            ``0`` keeps the quick PCA map, never starts the UMAP worker
``IMGCLUSTER_OFFLINE``         set: never try to download weights
``KERAS_HOME``                 Keras' own weights cache (read by `keras_home`)
``XDG_CACHE_HOME``             base of the default cache folder
``USER``                       default actor name in the CLI and the audit log
=============================  ==============================================================
"""

from __future__ import annotations

import os
from pathlib import Path

ALLOWED_ROOTS_ENV = "IMGCLUSTER_ALLOWED_ROOTS"
WORKSPACES_ENV = "IMGCLUSTER_WORKSPACES"
CACHE_ENV = "IMGCLUSTER_CACHE"
UMAP_ENV = "IMGCLUSTER_UMAP"
OFFLINE_ENV = "IMGCLUSTER_OFFLINE"
KERAS_HOME_ENV = "KERAS_HOME"

_FALSE = ("0", "false", "no", "off")


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def allowed_roots_raw() -> list[str] | None:
    """The folders listed in ``IMGCLUSTER_ALLOWED_ROOTS``, or None when it is unset or empty
    (the caller then uses its default; see `imgcluster.paths.allowed_roots`)."""
    value = _get(ALLOWED_ROOTS_ENV)
    if not value:
        return None
    return [part for part in value.split(os.pathsep) if part.strip()]


def workspaces_home() -> Path:
    """Where new workspaces are created: ``IMGCLUSTER_WORKSPACES``, default ``./workspaces``."""
    return Path(_get(WORKSPACES_ENV) or Path.cwd() / "workspaces").expanduser().resolve()


def cache_dir() -> Path:
    """Per-user cache: ``$IMGCLUSTER_CACHE``, else ``$XDG_CACHE_HOME/imgcluster`` or
    ``~/.cache/imgcluster``. Per user, not per workspace: a converted model serves every
    project. Sub-folders: ``tflite/`` (models), ``numba/`` (UMAP's compiled code)."""
    explicit = _get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = _get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imgcluster"


def numba_cache_dir() -> Path:
    """Where numba keeps compiled UMAP code (``NUMBA_CACHE_DIR`` is set to this)."""
    return cache_dir() / "numba"


def umap_enabled() -> bool:
    """``IMGCLUSTER_UMAP=0`` keeps the quick PCA map and never starts the UMAP worker (a
    minute of CPU per feature set; for small servers and for tests that do not look at it)."""
    return _get(UMAP_ENV).lower() not in _FALSE


def offline() -> bool:
    """``IMGCLUSTER_OFFLINE`` set to anything but ``0``/``false``: never try the network."""
    value = _get(OFFLINE_ENV).lower()
    return bool(value) and value not in _FALSE


def keras_home() -> Path | None:
    """``KERAS_HOME`` if set (Keras reads it once at import; we read it at call time)."""
    value = _get(KERAS_HOME_ENV)
    return Path(value).expanduser() if value else None


def default_actor(fallback: str = "unknown") -> str:
    """The login name for audit entries when no name is given (``$USER``)."""
    return _get("USER") or fallback
