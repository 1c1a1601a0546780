"""Errors raised by imgcluster.

Every error a user can cause (a bad path, a bad name, a missing model file) is an
`ImgclusterError`; the CLI turns it into a one-line message and exit code 1, and the app
shows it with `st.error`. Any other exception is a bug and is allowed to surface.
"""

from __future__ import annotations


class ImgclusterError(Exception):
    """Base class of every error a user can cause and fix."""


class WorkspaceNotFound(ImgclusterError):
    """The folder given as a workspace does not hold an imgcluster database."""


class WorkspaceVersionError(ImgclusterError):
    """The workspace was written by a newer imgcluster than this one."""


class NoImagesFound(ImgclusterError):
    """A folder (or workspace) holds no usable image."""


class InvalidPath(ImgclusterError, ValueError):
    """A path is missing, of the wrong kind, or escapes the folder it must stay inside."""


class UnknownBackbone(ImgclusterError, ValueError):
    """A backbone name that is not in the registry."""


class WeightsUnavailable(ImgclusterError):
    """Pretrained weights are not on this machine and cannot be downloaded."""


class FeaturesMismatch(ImgclusterError):
    """Stored vectors of a backbone came from other weights or resizing than requested now."""


class UnknownCluster(ImgclusterError, ValueError):
    """A clustering run, cluster or label that does not exist."""


class InvalidLabelName(ImgclusterError, ValueError):
    """A label name that is empty, too long, or clashes with another label."""


class StaleState(ImgclusterError):
    """An operation was based on a view that another annotator has changed since."""


class UnknownImage(ImgclusterError, ValueError):
    """An image path or id that the workspace (or its labeling session) does not hold."""


class NoLabelSession(ImgclusterError):
    """Labeling has not been started in this workspace (no active labeling session)."""


class NothingToUndo(ImgclusterError):
    """Undo or redo was asked for but the actor's history has no such step."""


class ExportError(ImgclusterError):
    """An export cannot be written (target exists, unsafe names, ...)."""
