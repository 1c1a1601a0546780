"""Running a backbone fast on CPU: the TFLite conversion (cached, checked against Keras), the
LiteRT interpreters, the Keras fallback, and the identities (weights fingerprints, cache keys).

Why it is shaped like this (figures in bench/README.md, "Extraction speed"):

* `model.predict` costs ~150 ms of overhead per call, which is what made the original
  one-image-per-call recipe slow; a `tf.function` call has none of it, and the same network
  converted once to TFLite float32 and run by the LiteRT interpreter (XNNPACK) is faster still
  on CPU. XLA (`jit_compile=True`) is several times *slower* on depthwise convolutions on CPU,
  so it is never used.
* One single-threaded interpreter per core, each image going to whichever is free (see
  `TFLiteRunner`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from imgcluster import settings
from imgcluster.backbones import Backbone
from imgcluster.errors import ImgclusterError, InvalidParameter
from imgcluster.features.store import l2_normalize
from imgcluster.workspace import atomic_write

if TYPE_CHECKING:
    import keras

__all__ = [
    "CACHE_ENV",
    "RUNTIMES",
    "TFLITE_TOLERANCE",
    "KerasRunner",
    "Network",
    "Runtime",
    "TFLiteRunner",
    "Weights",
    "cache_dir",
    "load_network",
]

#: What `Backbone.build` accepts: "default", a weights file, or None for random weights.
Weights = str | os.PathLike[str] | None

#: Environment variable naming the folder of converted models (default ``~/.cache/imgcluster``).
CACHE_ENV = settings.CACHE_ENV

#: Largest difference allowed between TFLite and Keras vectors before TFLite is refused.
TFLITE_TOLERANCE = 1e-4

# Bump when the conversion recipe changes, so converted models cached by older code are ignored.
_CONVERSION_RECIPE = 1

Runtime = Literal["auto", "tflite", "keras"]
RUNTIMES: tuple[str, ...] = ("auto", "tflite", "keras")


def cache_dir() -> Path:
    """Folder for converted models (`imgcluster.settings.cache_dir`): ``$IMGCLUSTER_CACHE``,
    else ``$XDG_CACHE_HOME/imgcluster`` or ``~/.cache/imgcluster``. Per user, not per
    workspace: a conversion serves every project."""
    return settings.cache_dir()


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def quiet_tensorflow() -> None:
    # Hides TensorFlow's C++ info lines ("rebuild TensorFlow with the appropriate compiler
    # flags") on stderr; a user's own setting wins. (Its oneDNN notice prints regardless.)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(backbone: Backbone, weights: Weights) -> Path | None:
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


def variables_fingerprint(model: keras.Model) -> str:
    """Hash of every weight value: identifies random or otherwise file-less weights."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(variable), dtype=np.float32).tobytes())
    return "weights-values:" + digest.hexdigest()


def backbones_code_hash() -> str:
    """Hash of the network definitions' source, so a fix to a network invalidates its cache.

    The registry (``__init__.py``: descriptions, feature sets) and the class names are left
    out: editing them must not force every user to reconvert.
    """
    import imgcluster.backbones as package

    digest = hashlib.sha256()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        if path.name not in ("__init__.py", "imagenet.py"):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def probe_batch(size: int) -> np.ndarray:
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


class KerasRunner:
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


class TFLiteRunner:
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


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def convert(model: keras.Model, path: Path, verdict: Path, size: int) -> None:
    """Convert ``model`` to TFLite float32 at ``path`` if it reproduces the Keras vectors.

    The verdict (ok, or why not) is cached next to it, so a model that fails the check is not
    reconverted on every start.
    """
    quiet_tensorflow()
    import tensorflow as tf

    # The Keras 3 exporter prints a page about the SavedModel it writes on the way.
    with contextlib.redirect_stdout(io.StringIO()):
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(flatbuffer))
    probe = probe_batch(size)
    expected = np.asarray(model(probe, training=False), dtype=np.float32)
    got = TFLiteRunner(path, size, interpreters=1)(probe)
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


@dataclass(frozen=True)
class Network:
    """A backbone ready to run: what `load_network` returns."""

    runner: KerasRunner | TFLiteRunner
    runtime: str  # "tflite" or "keras"
    weights_id: str  # identifies the weights (a file hash, or a hash of every weight value)


def load_network(
    backbone: Backbone, weights: Weights, runtime: Runtime, num_threads: int | None
) -> Network:
    """Build (or fetch the converted model from the cache) and wrap it in a runner.

    Raises
    ------
    UnknownBackbone, WeightsUnavailable, InvalidWeights
        From the backbone registry.
    ImgclusterError
        ``runtime="tflite"`` and the converted model cannot be made or fails its check.
    """
    if runtime not in RUNTIMES:
        raise InvalidParameter(f"runtime={runtime!r} should be one of {', '.join(RUNTIMES)}")
    model = None
    file = weights_file(backbone, weights)
    if file is None or not file.is_file():
        model = build(backbone, weights)
        # Building may have just downloaded the default weights into the Keras cache.
        file = weights_file(backbone, weights)
    if file is not None and file.is_file():
        weights_id = "weights-file:" + sha256_file(file)
    else:
        assert model is not None
        weights_id = variables_fingerprint(model)
    runner: KerasRunner | TFLiteRunner | None = None
    if runtime in ("auto", "tflite"):
        runner, model = _tflite(backbone, weights, runtime, weights_id, model, num_threads)
    if runner is None:
        runner = KerasRunner(model or build(backbone, weights), backbone.input_size)
    return Network(runner, runner.name, weights_id)


def build(backbone: Backbone, weights: Weights) -> keras.Model:
    quiet_tensorflow()
    return backbone.build(weights=weights)


def _tflite(
    backbone: Backbone,
    weights: Weights,
    runtime: Runtime,
    weights_id: str,
    model: keras.Model | None,
    num_threads: int | None,
) -> tuple[TFLiteRunner | None, keras.Model | None]:
    """The cached converted model (converting and checking it first if needed).

    Returns ``(None, model)`` to fall back to Keras under ``runtime="auto"``.
    """
    size = backbone.input_size
    threads = num_threads or cpu_count()
    try:
        path = tflite_path(backbone, weights_id)
        verdict = path.with_suffix(".json")
        if verdict.exists():
            check = json.loads(verdict.read_text())
            if not check.get("ok"):
                raise ImgclusterError(check.get("reason", "earlier conversion failed"))
        if not path.exists():
            model = model or build(backbone, weights)
            convert(model, path, verdict, size)
        return TFLiteRunner(path, size, interpreters=threads), model
    except (ImgclusterError, ImportError, OSError, ValueError, RuntimeError) as exc:
        message = f"TFLite runtime unavailable for {backbone.name}: {exc}"
        if runtime == "tflite":
            raise ImgclusterError(message) from exc
        warnings.warn(f"{message}; using the slower Keras runtime", stacklevel=4)
        return None, model


def tflite_path(backbone: Backbone, weights_id: str) -> Path:
    """Where the converted model of ``backbone`` with these weights is cached."""
    import ai_edge_litert

    # The TF/Keras versions are read from package metadata so a cache hit never
    # imports TensorFlow.
    key = json.dumps(
        {
            "backbone": backbone.name,
            "input_size": backbone.input_size,
            "weights": weights_id,
            "code": backbones_code_hash(),
            "tensorflow": dist_version("tensorflow-cpu") or dist_version("tensorflow"),
            "keras": dist_version("keras"),
            "litert": getattr(ai_edge_litert, "__version__", dist_version("ai-edge-litert")),
            "recipe": _CONVERSION_RECIPE,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "tflite" / f"{backbone.name}-{digest}.tflite"
