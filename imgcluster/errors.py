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


class FeaturesDamaged(ImgclusterError):
    """A stored feature shard is missing, truncated or of the wrong shape; `extract` verifies
    the shards and recomputes what they held."""


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


class WorkspaceCorrupt(ImgclusterError):
    """An existing workspace database that is empty, damaged, truncated or not ours.

    Never answered by creating a new database over it: that would lose the labels.
    """


class WorkspaceReadOnly(ImgclusterError):
    """A write was asked of a workspace opened read-only (a read-only mount or folder)."""


class StorageFull(ImgclusterError, OSError):
    """The disk (or quota) filled while writing; nothing half-written was kept."""


class Busy(ImgclusterError):
    """Another process holds the lock for this job (see `imgcluster._process.job_lock`)."""


class UnknownLabel(ImgclusterError, ValueError):
    """A label id or name that does not exist in the labeling session.

    A label error of its own, not an `UnknownCluster`: labels outlive the clustering run
    they started from (renamed, merged, split), so "no such cluster" would name the wrong
    thing."""


class ImageRejected(ImgclusterError):
    """A file that cannot be used; ``reason`` is ``"<kind>: <detail>"`` for people.

    Raised per file and recorded by ingest/extract as that file's skip reason; it never
    aborts a batch. (Importable from `imgcluster.images` too.)
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.reason = f"{kind}: {detail}" if detail else kind
        super().__init__(self.reason)


class UploadRejected(ImgclusterError, ValueError):
    """An uploaded file or archive that is refused as a whole (also `imgcluster.uploads`)."""


class InvalidWeights(ImgclusterError, ValueError):
    """A weights file that cannot be read, or does not fit the network it is meant for
    (also importable from `imgcluster.backbones`)."""


class NotEnoughImages(ImgclusterError, ValueError):
    """Fewer images with features than the clustering asks for (also `imgcluster.clustering`)."""


class InvalidParameter(ImgclusterError, ValueError):
    """A parameter value a function cannot work with (a batch size of 0, an unknown runtime,
    an array of the wrong shape); the message names the value and what is allowed."""
