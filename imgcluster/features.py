"""Feature vectors: the on-disk store (and, below it, the batched extraction pipeline).

Vectors are L2-normalised float32, keyed by backbone name and image content hash, so exact
duplicates share one vector, re-running skips finished images and adding images extracts only
the new ones. They are stored in shards (one ``.npy`` per extraction batch) written to a
temporary file and renamed into place *before* the SQLite rows that point at them are
committed: a process killed at any moment loses at most the batch in flight, and an orphan
shard without rows is harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
import queue
import stat
import threading
import time
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from imgcluster.backbones import DEFAULT_BACKBONE, Backbone, get_backbone
from imgcluster.errors import FeaturesMismatch, ImgclusterError, InvalidPath
from imgcluster.images import ImageRejected, Progress, open_rgb, to_rgb
from imgcluster.workspace import Workspace, atomic_write

if TYPE_CHECKING:
    import keras

#: What `Backbone.build` accepts: "default", a weights file, or None for random weights.
Weights = str | os.PathLike[str] | None


@dataclass(frozen=True)
class FeatureMatrix:
    """Vectors of the workspace's usable images, rows aligned with ``image_ids``.

    Rows follow the images' relative-path order; images without a vector (not extracted yet)
    are absent, so always index through ``image_ids``.
    """

    backbone: str
    image_ids: np.ndarray  # int64, (n,)
    relpaths: list[str]
    sha256s: list[str]
    vectors: np.ndarray  # float32, (n, dim), L2-normalised

    def __len__(self) -> int:
        return len(self.image_ids)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows in float32 (a zero row stays zero instead of becoming NaN)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def save_vectors(
    workspace: Workspace, backbone: str, sha256s: Sequence[str], vectors: np.ndarray
) -> None:
    """Store one batch of vectors (L2-normalised here) for the given content hashes.

    Hashes that already have a vector for this backbone keep their first one.
    """
    if len(sha256s) != len(vectors):
        raise ValueError(f"{len(sha256s)} hashes for {len(vectors)} vectors")
    if not len(sha256s):
        return
    unit = l2_normalize(vectors)
    name = f"{uuid.uuid4().hex}.npy"
    path = workspace.features_dir(backbone) / name
    atomic_write(path, lambda fh: np.save(fh, unit))
    with workspace.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO feature_shards(backbone, file, n_rows, dim) VALUES (?, ?, ?, ?)",
            (backbone, f"features/{backbone}/{name}", len(unit), unit.shape[1]),
        )
        shard_id = cur.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO features(backbone, sha256, shard_id, row) VALUES (?, ?, ?, ?)",
            [(backbone, sha, shard_id, row) for row, sha in enumerate(sha256s)],
        )


def missing_hashes(workspace: Workspace, backbone: str) -> list[str]:
    """Distinct content hashes of usable images that have no vector for ``backbone`` yet."""
    with workspace.read() as conn:
        rows = conn.execute(
            """
            SELECT DISTINCT i.sha256 FROM images AS i
            WHERE i.status = 'ok' AND NOT EXISTS (
                SELECT 1 FROM features AS f WHERE f.backbone = ? AND f.sha256 = i.sha256)
            ORDER BY i.relpath
            """,
            (backbone,),
        ).fetchall()
    return [row[0] for row in rows]


def load_features(workspace: Workspace, backbone: str) -> FeatureMatrix:
    """All stored vectors of the workspace's usable images for ``backbone``."""
    with workspace.read() as conn:
        rows = conn.execute(
            """
            SELECT i.id, i.relpath, i.sha256, s.file, f.row
            FROM images AS i
            JOIN features AS f ON f.backbone = ? AND f.sha256 = i.sha256
            JOIN feature_shards AS s ON s.id = f.shard_id
            WHERE i.status = 'ok'
            ORDER BY i.relpath
            """,
            (backbone,),
        ).fetchall()
    if not rows:
        return FeatureMatrix(backbone, np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32))
    # One fancy-indexing copy per shard instead of one Python-level copy per row.
    positions = np.array([row[4] for row in rows], dtype=np.int64)
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_file.setdefault(row[3], []).append(i)
    vectors: np.ndarray | None = None
    for file, indices in by_file.items():
        shard = np.load(workspace.path / file, mmap_mode="r")
        if vectors is None:
            vectors = np.empty((len(rows), shard.shape[1]), dtype=np.float32)
        idx = np.asarray(indices, dtype=np.int64)
        vectors[idx] = shard[positions[idx]]
    assert vectors is not None
    return FeatureMatrix(
        backbone=backbone,
        image_ids=np.array([row[0] for row in rows], dtype=np.int64),
        relpaths=[row[1] for row in rows],
        sha256s=[row[2] for row in rows],
        vectors=vectors,
    )


def feature_counts(workspace: Workspace) -> dict[str, int]:
    """Number of usable images with a vector, per backbone."""
    with workspace.read() as conn:
        return {
            row[0]: row[1]
            for row in conn.execute(
                """
                SELECT f.backbone, COUNT(*) FROM images AS i
                JOIN features AS f ON f.sha256 = i.sha256
                WHERE i.status = 'ok' GROUP BY f.backbone
                """
            )
        }


def delete_features(workspace: Workspace, backbone: str) -> int:
    """Forget every stored vector of ``backbone`` (e.g. to re-extract with other weights).

    Rows go first, in one transaction; shard files are removed afterwards, so a crash in
    between leaves only orphan files, which nothing reads.

    Returns
    -------
    int
        Number of vectors deleted.
    """
    with workspace.transaction() as conn:
        files = [
            row[0]
            for row in conn.execute(
                "SELECT file FROM feature_shards WHERE backbone = ?", (backbone,)
            )
        ]
        n = conn.execute("DELETE FROM features WHERE backbone = ?", (backbone,)).rowcount
        conn.execute("DELETE FROM feature_shards WHERE backbone = ?", (backbone,))
        conn.execute("DELETE FROM meta WHERE key = ?", (_fingerprint_key(backbone),))
    for file in files:
        (workspace.path / file).unlink(missing_ok=True)
    return n


def _fingerprint_key(backbone: str) -> str:
    return f"features.{backbone}.fingerprint"


# -- extraction pipeline ----------------------------------------------------------------------
#
# Why it is shaped like this (figures in bench/README.md, "Extraction speed"):
# * `model.predict` costs ~150 ms of overhead per call, which is what made the original
#   one-image-per-call recipe slow; a `tf.function` call has none of it, and the same network
#   converted once to TFLite float32 and run by the LiteRT interpreter (XNNPACK) is faster still
#   on CPU. XLA (`jit_compile=True`) is several times *slower* on depthwise convolutions on CPU,
#   so it is never used.
# * Decoding and resizing run in a thread pool that works ahead of the network (Pillow and the
#   interpreter both release the GIL), so the CPU is never idle waiting for JPEGs.
# * Every finished batch is one shard + one transaction (`save_vectors`): a kill loses at most
#   the batch in flight, and the next run's work list (`missing_hashes`) skips everything saved.

#: Environment variable naming the folder of converted models (default ``~/.cache/imgcluster``).
CACHE_ENV = "IMGCLUSTER_CACHE"

#: Largest difference allowed between TFLite and Keras vectors before TFLite is refused.
TFLITE_TOLERANCE = 1e-4

# Bump when the conversion recipe changes, so converted models cached by older code are ignored.
_CONVERSION_RECIPE = 1

Runtime = Literal["auto", "tflite", "keras"]
RUNTIMES: tuple[str, ...] = ("auto", "tflite", "keras")

# Two threads calling `transform` on a fresh extractor must not both build the network.
_LOAD_LOCK = threading.RLock()


def cache_dir() -> Path:
    """Folder for converted models: ``$IMGCLUSTER_CACHE``, else ``$XDG_CACHE_HOME/imgcluster``
    or ``~/.cache/imgcluster``. Per user, not per workspace: a conversion serves every project."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imgcluster"


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _quiet_tensorflow() -> None:
    # Hides TensorFlow's C++ info lines ("rebuild TensorFlow with the appropriate compiler
    # flags") on stderr; a user's own setting wins. (Its oneDNN notice prints regardless.)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_file(backbone: Backbone, weights: Weights) -> Path | None:
    """The file the backbone's weights come from, if it is known without building the model.

    A file's hash identifies the weights far cheaper than building the network (which imports
    TensorFlow), so a cached TFLite model can be used without TensorFlow at all.
    """
    if weights is None:
        return None
    if weights != "default":
        return Path(weights).expanduser()
    from imgcluster.backbones import efficientnet_lite, keras_apps

    if backbone.name in efficientnet_lite.VARIANTS:
        return efficientnet_lite.weights_path(backbone.name)
    if backbone.name in keras_apps.KERAS_APPS:
        return keras_apps.cached_weights(keras_apps.KERAS_APPS[backbone.name])
    return None


def _variables_fingerprint(model: keras.Model) -> str:
    """Hash of every weight value: identifies random or otherwise file-less weights."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(variable), dtype=np.float32).tobytes())
    return "weights-values:" + digest.hexdigest()


def _backbones_code_hash() -> str:
    """Hash of the backbone definitions' source, so a fix to a network invalidates its cache."""
    import imgcluster.backbones as package

    digest = hashlib.sha256()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _probe_batch(size: int) -> np.ndarray:
    """A few deterministic, varied RGB images for checking a conversion (noise, ramps, blocks)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1)
    blocks = np.kron(rng.uniform(0, 255, (8, 8, 3)), np.ones((size // 8 + 1, size // 8 + 1, 1)))
    return np.stack(
        [
            rng.uniform(0, 255, (size, size, 3)),
            smooth,
            blocks[:size, :size],
            np.full((size, size, 3), 255.0),
        ]
    ).astype(np.float32)


class _KerasRunner:
    """The Keras model behind a `tf.function` (no `predict` overhead, no XLA)."""

    name = "keras"

    def __init__(self, model: keras.Model, size: int) -> None:
        import tensorflow as tf

        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self._call = tf.function(
            lambda x: model(x, training=False), input_signature=[spec], jit_compile=False
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(batch), dtype=np.float32)


class _Interpreter:
    """One LiteRT interpreter with its input resized to a single image."""

    def __init__(self, path: Path, size: int, num_threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._interpreter.resize_tensor_input(self._input, [1, size, size, 3])
        self._interpreter.allocate_tensors()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input, image[None])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0].copy()


class _TFLiteRunner:
    """A converted model run by LiteRT (XNNPACK): one single-threaded interpreter per core,
    each image going to whichever interpreter is free.

    Why this shape (measurements in bench/README.md, "Extraction speed"): on 2 cores, feeding
    one image per call was faster than resizing the input tensor to 32 images, and keeps
    memory flat; one interpreter with an XNNPACK thread per core splits every layer between
    the cores and waits for the slower half at each layer, which stalls whenever the decoding
    threads (or anything else on the machine) take a core, whereas independent interpreters
    never wait for each other. Interpreters are not thread-safe, so each is used by one thread at a
    time (the pool of free ones is a queue); `invoke` releases the GIL.
    """

    name = "tflite"

    def __init__(self, path: Path, size: int, *, interpreters: int, threads_each: int = 1) -> None:
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        for _ in range(interpreters):
            self._free.put(_Interpreter(path, size, threads_each))
        self._pool = (
            ThreadPoolExecutor(interpreters, thread_name_prefix="imgcluster-tflite")
            if interpreters > 1
            else None
        )

    def one(self, image: np.ndarray) -> np.ndarray:
        """The vector of one image; safe to call from several threads at once."""
        interpreter = self._free.get()
        try:
            return interpreter(image)
        finally:
            self._free.put(interpreter)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._pool is None or len(batch) == 1:
            rows = [self.one(image) for image in batch]
        else:
            rows = list(self._pool.map(self.one, batch))
        return np.stack(rows).astype(np.float32, copy=False)


class FeatureExtractor:
    """Turn images into the backbone's pooled vectors: a stateless transformer.

    Parameters
    ----------
    backbone : str, default="efficientnet-lite0"
        A name from `imgcluster.backbones.BACKBONE_NAMES`.
    weights : "default", path or None, default="default"
        As for `Backbone.build`: the pretrained weights, a local weights file, or random
        weights (only useful as a baseline).
    runtime : {"auto", "tflite", "keras"}, default="auto"
        ``"tflite"`` converts the network once to TFLite (cached in `cache_dir`) and runs it in
        the LiteRT interpreter, after checking on a probe batch that its vectors match Keras';
        ``"keras"`` calls the Keras model through ``tf.function``; ``"auto"`` tries TFLite and
        falls back to Keras with a warning if the interpreter is missing, the conversion fails
        or the check does not pass.
    nearest_resize : bool, default=False
        Resize with NEAREST like the original VGG16 recipe (to reproduce it); otherwise the
        backbone's `resize_filter` (bicubic).
    num_threads : int, optional
        TFLite inference threads, each running its own single-threaded interpreter on a share
        of every batch; default: every core available to this process. (The Keras runtime
        uses TensorFlow's own thread pool.)

    Attributes
    ----------
    backbone_ : Backbone
        The resolved backbone (with the resize filter actually used).
    runtime_ : str
        ``"tflite"`` or ``"keras"``: what `transform` runs.
    fingerprint_ : str
        Identifies the weights and resizing; a workspace refuses to mix vectors of one backbone
        computed under two fingerprints.

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
        num_threads: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.runtime = runtime
        self.nearest_resize = nearest_resize
        self.num_threads = num_threads

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> FeatureExtractor:
        """Build (or fetch from the cache) the network; idempotent; returns ``self``.

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
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r} should be one of {', '.join(RUNTIMES)}")
        backbone = get_backbone(self.backbone)
        if self.nearest_resize:
            # The original recipe: the whole image squashed to the square with NEAREST.
            backbone = dataclasses.replace(backbone, resize_filter="nearest", crop_fraction=None)
        self.backbone_ = backbone
        model = None
        weights_file = _weights_file(backbone, self.weights)
        if weights_file is None or not weights_file.is_file():
            model = self._build()
            # Building may have just downloaded the default weights into the Keras cache.
            weights_file = _weights_file(backbone, self.weights)
        if weights_file is not None and weights_file.is_file():
            weights_id = "weights-file:" + _sha256_file(weights_file)
        else:
            assert model is not None
            weights_id = _variables_fingerprint(model)
        self.fingerprint_ = f"{weights_id};resize={backbone.resize_filter}"
        if backbone.crop_fraction is not None:
            self.fingerprint_ += f";crop={backbone.crop_fraction}"

        runner: _KerasRunner | _TFLiteRunner | None = None
        if self.runtime in ("auto", "tflite"):
            runner, model = self._tflite(weights_id, model)
        if runner is None:
            runner = _KerasRunner(model or self._build(), backbone.input_size)
        self._runner = runner
        self.runtime_ = runner.name

    def _build(self) -> keras.Model:
        _quiet_tensorflow()
        return self.backbone_.build(weights=self.weights)

    def _tflite(
        self, weights_id: str, model: keras.Model | None
    ) -> tuple[_TFLiteRunner | None, keras.Model | None]:
        """The cached converted model (converting and checking it first if needed).

        Returns ``(None, model)`` to fall back to Keras under ``runtime="auto"``.
        """
        size = self.backbone_.input_size
        threads = self.num_threads or _cpu_count()
        path = self._tflite_path(weights_id)
        verdict = path.with_suffix(".json")
        try:
            if verdict.exists():
                check = json.loads(verdict.read_text())
                if not check.get("ok"):
                    raise ImgclusterError(check.get("reason", "earlier conversion failed"))
            if not path.exists():
                model = model or self._build()
                _convert(model, path, verdict, size)
            return _TFLiteRunner(path, size, interpreters=threads), model
        except (ImgclusterError, ImportError, OSError, ValueError, RuntimeError) as exc:
            message = f"TFLite runtime unavailable for {self.backbone_.name}: {exc}"
            if self.runtime == "tflite":
                raise ImgclusterError(message) from exc
            warnings.warn(f"{message}; using the slower Keras runtime", stacklevel=3)
            return None, model

    def _tflite_path(self, weights_id: str) -> Path:
        import ai_edge_litert

        # The TF/Keras versions are read from package metadata so a cache hit never
        # imports TensorFlow.
        key = json.dumps(
            {
                "backbone": self.backbone_.name,
                "input_size": self.backbone_.input_size,
                "weights": weights_id,
                "code": _backbones_code_hash(),
                "tensorflow": _dist_version("tensorflow-cpu") or _dist_version("tensorflow"),
                "keras": _dist_version("keras"),
                "litert": getattr(ai_edge_litert, "__version__", _dist_version("ai-edge-litert")),
                "recipe": _CONVERSION_RECIPE,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return cache_dir() / "tflite" / f"{self.backbone_.name}-{digest}.tflite"

    # -- transforming -----------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Fit an RGB image to the network's square input, as uint8 ``(S, S, 3)``.

        By default (``backbone.crop_fraction``) the shorter side is resized to
        ``S / crop_fraction`` and the centre square kept: the transform the ImageNet weights
        were evaluated with, which keeps proportions and trims background borders. It clusters
        the clothing photos better than squashing (bench/quality.py). The original recipe
        (``nearest_resize``) squashes the whole image to the square with NEAREST instead.
        """
        backbone = self.load().backbone_
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
        new_size = (max(side, round(width * scale)), max(side, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, backbone.resample, reducing_gap=gap)
        left, top = (new_size[0] - side) // 2, (new_size[1] - side) // 2
        return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)

    def read(self, source: str | os.PathLike[str] | bytes) -> np.ndarray:
        """Decode an image file or its bytes (JPEG draft mode, EXIF orientation, any mode) and
        `prepare` it.

        Raises
        ------
        ImageRejected
            If the file cannot be decoded.
        """
        backbone = self.load().backbone_
        # JPEG draft may shrink by DCT scaling, but never below what `prepare` resizes to.
        size = round(backbone.input_size / (backbone.crop_fraction or 1.0))
        return self.prepare(open_rgb(source, draft_size=(size, size)).image)

    def transform(
        self, images: np.ndarray | Sequence[str | os.PathLike[str] | Image.Image]
    ) -> np.ndarray:
        """Pooled vectors of a batch of images.

        Parameters
        ----------
        images : array (n, S, S, 3) or sequence of paths or PIL images
            An array holds RGB pixels in [0, 255] (uint8 or float) already resized to the input
            size ``S``; paths and PIL images (any mode) are decoded, made RGB and resized here.

        Returns
        -------
        ndarray, float32, (n, output_dim)
            Raw pooled vectors (not normalised; the store normalises them).
        """
        size = self.load().backbone_.input_size
        if not isinstance(images, np.ndarray):
            prepared = [
                self.prepare(to_rgb(im)) if isinstance(im, Image.Image) else self.read(im)
                for im in images
            ]
            images = np.stack(prepared) if prepared else np.zeros((0, size, size, 3), np.uint8)
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"images of shape {images.shape} should be (n, {size}, {size}, 3) "
                f"for {self.backbone_.name}"
            )
        if not len(images):
            return np.zeros((0, self.backbone_.output_dim), dtype=np.float32)
        return self._runner(np.ascontiguousarray(images, dtype=np.float32))


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _convert(model: keras.Model, path: Path, verdict: Path, size: int) -> None:
    """Convert ``model`` to TFLite float32 at ``path`` if it reproduces the Keras vectors.

    The verdict (ok, or why not) is cached next to it, so a model that fails the check is not
    reconverted on every start.
    """
    _quiet_tensorflow()
    import tensorflow as tf

    # The Keras 3 exporter prints a page about the SavedModel it writes on the way.
    with contextlib.redirect_stdout(io.StringIO()):
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(flatbuffer))
    probe = _probe_batch(size)
    expected = np.asarray(model(probe, training=False), dtype=np.float32)
    got = _TFLiteRunner(path, size, interpreters=1)(probe)
    diff = float(np.max(np.abs(got - expected)))
    unit_diff = float(np.max(np.abs(l2_normalize(got) - l2_normalize(expected))))
    ok = max(diff, unit_diff) <= TFLITE_TOLERANCE
    reason = (
        f"converted model differs from Keras by {diff:.2g} (normalised {unit_diff:.2g}), "
        f"more than {TFLITE_TOLERANCE:g}"
    )
    record = {"ok": ok, "max_abs_diff": diff, "max_abs_diff_normalised": unit_diff}
    if not ok:
        record["reason"] = reason
    atomic_write(verdict, lambda fh: fh.write(json.dumps(record).encode()))
    if not ok:
        path.unlink(missing_ok=True)
        raise ImgclusterError(reason)


def load_extractor(
    backbone: str = DEFAULT_BACKBONE,
    weights: Weights = "default",
    runtime: Runtime = "auto",
    *,
    nearest_resize: bool = False,
) -> FeatureExtractor:
    """A ready `FeatureExtractor` (network built or fetched from the cache).

    Build it once per process and share it (the app wraps this in ``st.cache_resource``);
    `FeatureExtractor.transform` is safe to call from several threads.
    """
    return FeatureExtractor(
        backbone, weights=weights, runtime=runtime, nearest_resize=nearest_resize
    ).load()


@dataclass
class ExtractReport:
    """What an extraction did, for the CLI summary and the app.

    Counts of *images* unless said otherwise. ``extracted`` counts distinct contents: exact
    duplicates share one vector, computed once. ``failed`` lists every file that could not be
    used; when an identical file stood in for it, its content still got a vector (counted in
    ``shared``), otherwise the content stays on the work list until a re-ingest.
    """

    backbone: str
    runtime: str = ""
    total: int = 0  # usable images in the workspace
    extracted: int = 0  # distinct contents run through the network in this run
    reused: int = 0  # images that already had a vector before this run
    shared: int = 0  # images that got a vector computed now for an identical file
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    load_seconds: float = 0.0  # building or loading the network
    seconds: float = 0.0  # decoding, resizing, inference and storing

    @property
    def without_vector(self) -> int:
        """Usable images still without a vector (their files vanished or changed)."""
        return self.total - self.reused - self.extracted - self.shared

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def failure_counts(self) -> Counter[str]:
        """Failures by kind (the part of the reason before the colon)."""
        return Counter(reason.split(":", 1)[0] for _rel, reason in self.failed)


@dataclass(frozen=True)
class _Loaded:
    sha256: str
    pixels: np.ndarray | None  # (S, S, 3) uint8, or None if no file with this content works
    failures: list[tuple[str, str]]


def extract(
    workspace: Workspace,
    backbone: str | FeatureExtractor = DEFAULT_BACKBONE,
    *,
    batch_size: int = 32,
    weights: Weights = "default",
    progress: Progress | None = None,
    runtime: Runtime = "auto",
    nearest_resize: bool = False,
    workers: int | None = None,
) -> ExtractReport:
    """Compute and store the vectors of every usable image that has none yet.

    Only content without a vector is computed: a re-run after an interruption continues where
    it stopped, new images are extracted alone, and exact duplicates are computed once. Each
    image is read again and its bytes hashed: a file that vanished or changed since ingest is
    reported and skipped (another file with the ingested content is used if there is one);
    re-ingest to pick up the change.

    Parameters
    ----------
    workspace : Workspace
    backbone : str or FeatureExtractor, default="efficientnet-lite0"
        A backbone name, or an extractor already loaded (e.g. the app's cached one), in which
        case `weights`, `runtime` and `nearest_resize` are the extractor's.
    batch_size : int, default=32
        Images per stored shard (and per Keras call). A kill loses at most one batch.
    weights, runtime, nearest_resize
        See `FeatureExtractor`.
    progress : callable(done, total), optional
        Called after each stored batch, with counts of distinct contents.
    workers : int, optional
        Decoding threads; default: the number of cores.

    Returns
    -------
    ExtractReport

    Raises
    ------
    FeaturesMismatch
        The workspace holds vectors of this backbone computed with other weights or resizing.
    UnknownBackbone, WeightsUnavailable, InvalidWeights
        From the backbone registry.

    Examples
    --------
    >>> ws = Workspace("/tmp/ws")                        # doctest: +SKIP
    >>> extract(ws).extracted                            # doctest: +SKIP
    180
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} should be >= 1")
    extractor = (
        backbone
        if isinstance(backbone, FeatureExtractor)
        else FeatureExtractor(
            backbone, weights=weights, runtime=runtime, nearest_resize=nearest_resize
        )
    )
    name = extractor.backbone
    get_backbone(name)  # an unknown name fails before any work
    images = workspace.images("ok")
    todo = missing_hashes(workspace, name)
    report = ExtractReport(backbone=name, total=len(images))
    pending = set(todo)
    report.reused = sum(1 for image in images if image.sha256 not in pending)
    if progress:
        progress(0, len(todo))
    if not todo:
        return report

    started = time.perf_counter()
    extractor.load()
    report.runtime = extractor.runtime_
    report.load_seconds = time.perf_counter() - started
    _check_fingerprint(workspace, name, extractor.fingerprint_)

    candidates: dict[str, list[str]] = {}
    for image in images:
        candidates.setdefault(image.sha256 or "", []).append(image.relpath)
    started = time.perf_counter()
    done = 0
    hashes: list[str] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        vectors = extractor.transform(np.stack(pixels))
        save_vectors(workspace, name, hashes, vectors)
        report.extracted += len(hashes)
        report.shared += sum(len(candidates[sha]) - 1 for sha in hashes)
        hashes.clear()
        pixels.clear()
        if progress:
            progress(done, len(todo))

    workers = workers or _cpu_count()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgcluster-decode") as pool:
        load = functools.partial(_load_content, workspace, extractor, candidates)
        # Work ahead by two batches: decoding never waits for the network, memory stays bounded.
        for loaded in _ordered_prefetch(pool, load, todo, window=2 * batch_size + workers):
            done += 1
            report.failed.extend(loaded.failures)
            if loaded.pixels is None:
                continue
            hashes.append(loaded.sha256)
            pixels.append(loaded.pixels)
            if len(hashes) >= batch_size:
                flush()
        if hashes:
            flush()
    if progress:
        progress(done, len(todo))
    report.seconds = time.perf_counter() - started
    return report


def _ordered_prefetch(
    pool: ThreadPoolExecutor, fn: Callable[[str], _Loaded], items: Sequence[str], window: int
) -> Iterator[_Loaded]:
    """``map(fn, items)`` in order, with at most ``window`` calls submitted ahead."""
    pending: deque[Future[_Loaded]] = deque()
    upcoming = iter(items)
    for item in itertools.islice(upcoming, window):
        pending.append(pool.submit(fn, item))
    try:
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(upcoming, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        # Interrupted (an exception in the consumer): do not decode the rest for nothing.
        for future in pending:
            future.cancel()


def _load_content(
    workspace: Workspace,
    extractor: FeatureExtractor,
    candidates: dict[str, list[str]],
    sha256: str,
) -> _Loaded:
    """Read, verify, decode and resize one file holding ``sha256``; never raises for a file."""
    failures: list[tuple[str, str]] = []
    for relpath in candidates[sha256]:
        try:
            data = _read_regular_file(workspace.source_path(relpath))
        except _Unusable as exc:
            failures.append((relpath, exc.reason))
            continue
        except InvalidPath:
            # Ingest refuses links out of the collection; one swapped in since must not be read.
            failures.append(
                (relpath, "symlink outside collection: the file is now a link out of the folder")
            )
            continue
        except FileNotFoundError:
            failures.append((relpath, "missing: the file no longer exists"))
            continue
        except RuntimeError:  # Path.resolve on a symlink loop (Python < 3.13)
            failures.append((relpath, "unreadable: symlink loop"))
            continue
        except OSError as exc:
            failures.append((relpath, f"unreadable: {exc.strerror or exc}"))
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            failures.append(
                (
                    relpath,
                    "changed: the file's content differs from when it was ingested "
                    "(run `imgcluster ingest` again)",
                )
            )
            continue
        try:
            return _Loaded(sha256, extractor.read(data), failures)
        except ImageRejected as exc:
            failures.append((relpath, exc.reason))
    return _Loaded(sha256, None, failures)


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is (still) a regular file.

    Opened non-blocking and checked on the open descriptor, so a pipe swapped in since ingest
    cannot block the run (a plain read would wait forever for a writer) and nothing can be
    swapped between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Unusable("unreadable: no longer a regular file (now a folder, pipe or device)")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def _check_fingerprint(workspace: Workspace, backbone: str, fingerprint: str) -> None:
    """Refuse to add vectors from other weights (or resizing) to a backbone's stored ones."""
    key = _fingerprint_key(backbone)
    stored = workspace.get_meta(key)
    if stored is None:
        workspace.set_meta(key, fingerprint)
    elif stored != fingerprint:
        raise FeaturesMismatch(
            f"the {backbone} vectors in {workspace.path} were computed with other weights or "
            f"resizing ({stored}) than now ({fingerprint}); extract into a new workspace, or "
            f"start this backbone over with imgcluster.features.delete_features"
        )
