"""Images to vectors: `FeatureExtractor`, a stateless transformer over one backbone or a fusion.

An extractor decodes each image once (JPEG draft mode, EXIF orientation, any mode), fits it to
every member network's square input from that one decode, runs the networks and returns one
vector per image: the raw pooled vector for a single backbone, the normalised concatenation of
the members' normalised vectors for a fusion (``"efficientnet-lite0+efficientnet-lite2"``).
With ``flip=True`` each member's vector is the mean of the image's and its mirror image's.

`FeatureExtractor.transform_batch` is the per-batch entry point of the extraction pipeline (and
of distributed workers): it never raises for a bad file, it reports it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgcluster.backbones import DEFAULT_BACKBONE, Backbone, get_backbone, split_feature_set
from imgcluster.errors import ImageRejected, ImgclusterError, InvalidParameter
from imgcluster.features.runtime import (
    KerasRunner,
    Runtime,
    TFLiteRunner,
    Weights,
    load_network,
)
from imgcluster.features.store import l2_normalize
from imgcluster.images import MAX_FILE_BYTES, open_rgb, read_capped, to_rgb

__all__ = ["BatchResult", "FeatureExtractor", "load_extractor", "read_source"]

#: How many ImageNet classes are kept per image (indices and probabilities).
TOP_K = 5

# Two threads calling `transform` on a fresh extractor must not both build the network.
_LOAD_LOCK = threading.RLock()


@dataclass
class _Member:
    """One loaded network of an extractor."""

    backbone: Backbone
    runner: KerasRunner | TFLiteRunner
    runtime: str
    fingerprint: str
    head: tuple[np.ndarray, np.ndarray] | None  # ImageNet classifier (kernel, bias), if known


@dataclass
class BatchResult:
    """What `FeatureExtractor.transform_batch` made of a batch of sources.

    ``vectors`` has one row per source that worked (``ok``), in order: raw pooled vectors for a
    single backbone, the fused unit vectors for a fusion. ``member_vectors`` holds each member's
    raw vectors (what the store keeps); ``top_classes`` each member's ImageNet top classes
    (``(n_ok, 2 * TOP_K)``: indices then probabilities) for members with a classifier.
    """

    vectors: np.ndarray
    ok: np.ndarray  # bool, (n_sources,)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    member_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    top_classes: dict[str, np.ndarray] = field(default_factory=dict)


class FeatureExtractor:
    """Turn images into the backbone's pooled vectors: a stateless transformer.

    Parameters
    ----------
    backbone : str, default="efficientnet-lite0"
        A name from `imgcluster.backbones.BACKBONE_NAMES`, or several joined by ``+`` for a
        fused feature set (see `imgcluster.backbones.split_feature_set`).
    weights : "default", path or None, default="default"
        As for `Backbone.build`: the pretrained weights, a local weights file, or random
        weights (only useful as a baseline). A path is only accepted for a single backbone.
    runtime : {"auto", "tflite", "keras"}, default="auto"
        ``"tflite"`` converts the network once to TFLite (cached in `cache_dir`) and runs it in
        the LiteRT interpreter, after checking on a probe batch that its vectors match Keras';
        ``"keras"`` calls the Keras model through ``tf.function``; ``"auto"`` tries TFLite and
        falls back to Keras with a warning if the interpreter is missing, the conversion fails
        or the check does not pass.
    nearest_resize : bool, default=False
        Resize with NEAREST like the original VGG16 recipe (to reproduce it); otherwise the
        backbone's `resize_filter` (bicubic).
    flip : bool, default=False
        Test-time augmentation: average each vector with its horizontally mirrored image's
        (twice the inference time; bench/README.md "Features" for its effect).
    num_threads : int, optional
        TFLite inference threads, each running its own single-threaded interpreter on a share
        of every batch; default: every core available to this process.

    Attributes
    ----------
    backbone_ : Backbone
        The (first) resolved backbone, with the resize filter actually used.
    backbones_ : tuple of Backbone
        Every member, in the name's order.
    runtime_ : str
        ``"tflite"`` or ``"keras"`` (of the first member): what `transform` runs.
    fingerprint_ : str
        Identifies the weights, resizing and flip; a workspace refuses to mix vectors of one
        backbone computed under two fingerprints. `fingerprints_` has one per member.
    output_dim_ : int
        Length of the vectors `transform` returns.

    Examples
    --------
    >>> extractor = load_extractor("efficientnet-lite0")            # doctest: +SKIP
    >>> extractor.transform(["sample_data/images/fmnist_00000.png"]).shape  # doctest: +SKIP
    (1, 1280)
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        *,
        weights: Weights = "default",
        runtime: Runtime = "auto",
        nearest_resize: bool = False,
        flip: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.runtime = runtime
        self.nearest_resize = nearest_resize
        self.flip = flip
        self.num_threads = num_threads

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> FeatureExtractor:
        """Build (or fetch from the cache) every network; idempotent; returns ``self``.

        Raises
        ------
        UnknownBackbone, WeightsUnavailable, InvalidWeights
            From the backbone registry.
        ImgclusterError
            ``runtime="tflite"`` and the converted model cannot be made or fails its check.
        """
        with _LOAD_LOCK:
            if not hasattr(self, "runtime_"):
                self._load()
        return self

    def _load(self) -> None:
        names = split_feature_set(self.backbone)
        if len(names) > 1 and self.weights not in ("default", None):
            raise ImgclusterError(
                f"a weights file fits one network; extract {self.backbone} with the default "
                "weights, or extract its members one by one"
            )
        members = [self._load_member(name) for name in names]
        self.members_ = members
        self.backbones_ = tuple(m.backbone for m in members)
        self.backbone_ = members[0].backbone
        self.runtime_ = members[0].runtime
        self.fingerprints_ = {m.backbone.name: m.fingerprint for m in members}
        self.fingerprint_ = " + ".join(m.fingerprint for m in members)
        self.output_dim_ = sum(m.backbone.output_dim for m in members)

    def _load_member(self, name: str) -> _Member:
        backbone = get_backbone(name)
        if self.nearest_resize:
            # The original recipe: the whole image squashed to the square with NEAREST.
            backbone = dataclasses.replace(backbone, resize_filter="nearest", crop_fraction=None)
        network = load_network(backbone, self.weights, self.runtime, self.num_threads)
        fingerprint = f"{network.weights_id};resize={backbone.resize_filter}"
        if backbone.crop_fraction is not None:
            fingerprint += f";crop={backbone.crop_fraction}"
        if self.flip:
            fingerprint += ";flip"
        return _Member(backbone, network.runner, network.runtime, fingerprint, _head(name, self))

    @property
    def has_classifier(self) -> bool:
        """Whether extraction also yields ImageNet class probabilities (some member's head)."""
        return any(m.head is not None for m in self.load().members_)

    # -- decoding and fitting ---------------------------------------------------------------

    def decode(self, source: str | os.PathLike[str] | bytes) -> Image.Image:
        """Decode a file or its bytes to upright RGB, JPEG draft-scaled no smaller than the
        largest member's input needs.

        Raises
        ------
        ImageRejected
            If the file cannot be decoded.
        """
        size = max(_needed_side(b) for b in self.load().backbones_)
        return open_rgb(source, draft_size=(size, size)).image

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Fit an RGB image to the (first) network's square input, as uint8 ``(S, S, 3)``."""
        return fit_to_square(image, self.load().backbone_)

    def prepare_all(self, image: Image.Image) -> list[np.ndarray]:
        """`prepare` for every member: the one decoded image fitted to each input size."""
        return [fit_to_square(image, b) for b in self.load().backbones_]

    def read(self, source: str | os.PathLike[str] | bytes) -> np.ndarray:
        """Decode a file or its bytes and `prepare` it (first member).

        Raises
        ------
        ImageRejected
            If the file cannot be decoded.
        """
        return self.prepare(self.decode(source))

    # -- transforming -----------------------------------------------------------------------

    def transform(
        self, images: np.ndarray | Sequence[str | os.PathLike[str] | bytes | Image.Image]
    ) -> np.ndarray:
        """Vectors of a batch of images.

        Parameters
        ----------
        images : array (n, S, S, 3) or sequence of paths, bytes or PIL images
            An array holds RGB pixels in [0, 255] (uint8 or float) already resized to the input
            size ``S`` (single backbone only); paths, bytes and PIL images (any mode) are
            decoded, made RGB and resized here.

        Returns
        -------
        ndarray, float32, (n, output_dim_)
            Raw pooled vectors for a single backbone (the store normalises them); for a fusion,
            the normalised concatenation of the members' normalised vectors.

        Raises
        ------
        ImageRejected
            A file cannot be decoded (`transform_batch` reports it instead).
        """
        self.load()
        if isinstance(images, np.ndarray):
            if len(self.members_) > 1:
                raise InvalidParameter(f"{self.backbone} needs images, not one prepared array")
            return self.run_member(self.members_[0], self._check_array(images))
        pixels = [self.prepare_all(self._decode_any(im)) for im in images]
        return self._fuse(self.run_members(pixels))

    def _check_array(self, images: np.ndarray) -> np.ndarray:
        size = self.backbone_.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise InvalidParameter(
                f"images of shape {images.shape} should be (n, {size}, {size}, 3) "
                f"for {self.backbone_.name}"
            )
        return images

    def _decode_any(self, image: str | os.PathLike[str] | bytes | Image.Image) -> Image.Image:
        return to_rgb(image) if isinstance(image, Image.Image) else self.decode(image)

    def run_members(self, pixels: Sequence[Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
        """Each member's raw vectors for images already fitted by `prepare_all`."""
        out = {}
        for i, member in enumerate(self.load().members_):
            side = member.backbone.input_size
            batch = np.stack([p[i] for p in pixels]) if pixels else np.zeros((0, side, side, 3))
            out[member.backbone.name] = self.run_member(member, batch)
        return out

    def run_member(self, member: _Member, batch: np.ndarray) -> np.ndarray:
        """One member's raw vectors for a prepared batch (mean with the mirror under `flip`)."""
        if not len(batch):
            return np.zeros((0, member.backbone.output_dim), dtype=np.float32)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        vectors = member.runner(x)
        if self.flip:
            mirrored = member.runner(np.ascontiguousarray(x[:, :, ::-1]))
            vectors = (vectors + mirrored) / 2
        return np.asarray(vectors, dtype=np.float32)

    def _fuse(self, member_vectors: dict[str, np.ndarray]) -> np.ndarray:
        parts = list(member_vectors.values())
        if len(parts) == 1:
            return parts[0]
        return l2_normalize(np.concatenate([l2_normalize(p) for p in parts], axis=1))

    def top_classes(self, member_vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ImageNet top classes from raw vectors, for each member with a classifier:
        ``(n, 2 * TOP_K)`` float32, the class indices then their softmax probabilities."""
        out = {}
        for member in self.load().members_:
            if member.head is None or member.backbone.name not in member_vectors:
                continue
            kernel, bias = member.head
            logits = member_vectors[member.backbone.name] @ kernel + bias
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            top = np.argsort(-probs, axis=1)[:, :TOP_K]
            top_p = np.take_along_axis(probs, top, axis=1)
            out[member.backbone.name] = np.concatenate([top, top_p], axis=1).astype(np.float32)
        return out

    def transform_batch(
        self,
        sources: Sequence[str | os.PathLike[str] | bytes],
        sha256s: Sequence[str | None] | None = None,
        *,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> BatchResult:
        """Vectors of a batch of files, reporting bad ones instead of raising.

        Parameters
        ----------
        sources : sequence of paths or bytes
            Paths are read as regular files only (a pipe or folder is refused without
            blocking), at most ``max_bytes`` each.
        sha256s : sequence of str, optional
            The content hash each source must have (as ingested); a mismatch is reported as
            ``"changed: ..."`` and the content is not used.
        max_bytes : int, default=`imgcluster.images.MAX_FILE_BYTES`
            Larger files are refused before anything is read.

        Returns
        -------
        BatchResult
        """
        self.load()
        expected = list(sha256s) if sha256s is not None else [None] * len(sources)
        pixels, ok, failures = [], np.zeros(len(sources), dtype=bool), []
        for i, (source, sha) in enumerate(zip(sources, expected, strict=True)):
            try:
                data = source if isinstance(source, bytes) else read_source(source, max_bytes)
                check_content(data, sha)
                pixels.append(self.prepare_all(self.decode(data)))
            except ImageRejected as exc:
                failures.append((i, exc.reason))
                continue
            except Exception as exc:
                failures.append((i, f"decode error: {type(exc).__name__}: {short_reason(exc)}"))
                continue
            ok[i] = True
        members = self.run_members(pixels)
        return BatchResult(
            vectors=self._fuse(members),
            ok=ok,
            failures=failures,
            member_vectors=members,
            top_classes=self.top_classes(members),
        )


def load_extractor(
    backbone: str = DEFAULT_BACKBONE,
    weights: Weights = "default",
    runtime: Runtime = "auto",
    *,
    nearest_resize: bool = False,
    flip: bool = False,
) -> FeatureExtractor:
    """A ready `FeatureExtractor` (networks built or fetched from the cache).

    Build it once per process (or per distributed worker) and share it: the app wraps this in
    ``st.cache_resource``; `FeatureExtractor.transform` is safe to call from several threads.
    """
    return FeatureExtractor(
        backbone, weights=weights, runtime=runtime, nearest_resize=nearest_resize, flip=flip
    ).load()


# -- fitting an image to the network ----------------------------------------------------------


# Largest resized intermediate, in output areas, before cropping first instead (an ordinary
# 3:4 photo needs 1.8, the 16:9 ones 2.3).
_MAX_INTERMEDIATE = 4


def _needed_side(backbone: Backbone) -> int:
    """Decoded size that `fit_to_square` never has to enlarge (JPEG draft lower bound)."""
    return round(backbone.input_size / (backbone.crop_fraction or 1.0))


def fit_to_square(image: Image.Image, backbone: Backbone) -> np.ndarray:
    """Fit an RGB image to the network's square input, as uint8 ``(S, S, 3)``.

    By default (``backbone.crop_fraction``) the shorter side is resized to
    ``S / crop_fraction`` and the centre square kept: the transform the ImageNet weights were
    evaluated with, which keeps proportions and trims background borders (bench/quality.py).
    When the resized intermediate would be large (an extreme aspect ratio), the crop is applied
    *before* resizing (``resize(box=...)``): an 89000x1 image costs a 224x224 output, not the
    22,784,000x256 intermediate (~17 GB) a resize-then-crop would allocate.
    ``crop_fraction=None`` squashes the whole image instead.
    """
    side = backbone.input_size
    # reducing_gap: a cheap integer reduction first for very large images, then the
    # proper filter; indistinguishable from the filter alone at this gap.
    gap = None if backbone.resize_filter == "nearest" else 3.0
    if backbone.crop_fraction is None:
        if image.size != (side, side):
            image = image.resize((side, side), backbone.resample, reducing_gap=gap)
        return np.asarray(image, dtype=np.uint8)
    width, height = image.size
    scale = side / backbone.crop_fraction / min(width, height)
    new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
    left, top = (new_w - side) // 2, (new_h - side) // 2
    if new_w * new_h <= _MAX_INTERMEDIATE * side * side:
        # Ordinary shapes: resize then crop, the reference transform (and the vectors stored
        # by earlier versions, which cropping first reproduces only to +-1 grey level).
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), backbone.resample, reducing_gap=gap)
        return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)
    sx, sy = new_w / width, new_h / height
    box = (left / sx, top / sy, (left + side) / sx, (top + side) / sy)
    fitted = image.resize((side, side), backbone.resample, box=box, reducing_gap=gap)
    return np.asarray(fitted, dtype=np.uint8)


# -- reading sources --------------------------------------------------------------------------


def read_source(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is (still) a regular file of at most ``max_bytes``.

    Opened non-blocking and checked on the open descriptor, so a pipe swapped in since ingest
    cannot block the run (a plain read would wait forever for a writer), nothing can be swapped
    between the check and the read, and a huge (or sparse) file swapped in is refused from its
    size, never read: the read itself is capped too, in case the file grows meanwhile.

    Raises
    ------
    ImageRejected
        ``missing``, ``unreadable`` or ``file too large``, with a reason for people.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageRejected("missing", "the file no longer exists") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageRejected("unreadable", "symlink loop") from None
        raise ImageRejected("unreadable", (exc.strerror or str(exc)).lower()) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected(
                "unreadable", "no longer a regular file (now a folder, pipe or device)"
            )
        if info.st_size > max_bytes:
            raise ImageRejected(
                "file too large",
                f"{info.st_size:,} bytes, more than the {max_bytes >> 20:,} MiB limit",
            )
        data = read_capped(fd, max_bytes)  # reserves what the file holds, not the cap
    except OSError as exc:
        raise ImageRejected("unreadable", (exc.strerror or str(exc)).lower()) from None
    finally:
        os.close(fd)
    return data


#: The reason given when a file's bytes differ from the ingested content. Ingest re-hashes a
#: file extraction reported as changed, even when its size and mtime look unchanged.
CHANGED_REASON = (
    "the file's content differs from when it was ingested "
    "(run `imgcluster ingest` again to pick up the new content)"
)


def check_content(data: bytes, sha256: str | None) -> None:
    """Refuse bytes whose hash is not the ingested one (``changed: ...``)."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ImageRejected("changed", CHANGED_REASON)


def resolve_source(workspace_root: Path | None, relpath: str) -> Path:
    """The path of an image under the collection, refusing a link swapped in that leads out.

    Raises
    ------
    ImageRejected
        The path now leaves the collection (or loops).
    """
    if workspace_root is None:
        raise ImageRejected("missing", "the workspace has no image collection")
    candidate = workspace_root / relpath
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError on Python < 3.13)
        raise ImageRejected("unreadable", "symlink loop") from None
    if not resolved.is_relative_to(workspace_root.resolve()):
        # Ingest refuses links out of the collection; one swapped in since must not be read.
        raise ImageRejected(
            "symlink outside collection", "the file is now a link out of the folder"
        )
    return candidate


def _head(name: str, extractor: FeatureExtractor) -> tuple[np.ndarray, np.ndarray] | None:
    """The member's ImageNet classifier when its weights ship one (EfficientNet-Lite)."""
    from imgcluster.backbones import efficientnet_lite

    if name not in efficientnet_lite.VARIANTS or extractor.weights is None:
        return None
    try:
        return efficientnet_lite.head_weights(name, extractor.weights)
    except ImgclusterError:
        return None


def short_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
