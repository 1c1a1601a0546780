"""Backbones from ``keras.applications``, whose ImageNet weights Keras downloads on first use.

Keras caches each weights file under ``$KERAS_HOME/models`` (default ``~/.keras/models``) with
a fixed name, so a machine without internet can still use these backbones once someone copies
the file there. What must never happen is a hang: Keras' downloader has no timeout, so before
asking Keras to download we check in a few seconds that the download host answers at all, and
otherwise fail with the file name, its URL and where to put it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcluster import settings
from imgcluster.backbones.torch_legacy import InvalidWeights
from imgcluster.errors import WeightsUnavailable

if TYPE_CHECKING:
    import keras

__all__ = [
    "KERAS_APPS",
    "KerasApp",
    "build_keras_app",
    "cached_weights",
    "caffe_preprocess",
    "identity_preprocess",
    "keras_cache_dir",
]

OFFLINE_ENV = settings.OFFLINE_ENV
_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0
_TMP_KERAS = Path("/tmp/.keras")
_DOWNLOAD_SOCKET_TIMEOUT_S = 60.0
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def caffe_preprocess(batch: np.ndarray) -> np.ndarray:
    """RGB -> BGR minus the ImageNet channel means, as VGG16's and ResNet50's ``preprocess_input``.

    The models from `build_keras_app` apply this themselves; the numpy version documents it.
    """
    return np.asarray(batch, dtype=np.float32)[..., ::-1] - _CAFFE_MEAN_BGR


def identity_preprocess(batch: np.ndarray) -> np.ndarray:
    """Pixels pass through: the Keras EfficientNets rescale inside their own graph."""
    return np.asarray(batch, dtype=np.float32)


@dataclass(frozen=True)
class KerasApp:
    """How to build one ``keras.applications`` model and which weights file it needs."""

    name: str
    constructor: str  # attribute of keras.applications
    module: str  # submodule holding its preprocess_input
    input_size: int
    output_dim: int
    pooling: str
    weights_file: str
    weights_url: str
    preprocess: Callable[[np.ndarray], np.ndarray]


_GCS = "https://storage.googleapis.com/"
KERAS_APPS: dict[str, KerasApp] = {
    app.name: app
    for app in (
        # The original recipe: max pooling, Keras' default preprocessing, 512-d.
        KerasApp(
            name="vgg16",
            constructor="VGG16",
            module="vgg16",
            input_size=224,
            output_dim=512,
            pooling="max",
            weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_GCS + "tensorflow/keras-applications/vgg16/",
            preprocess=caffe_preprocess,
        ),
        KerasApp(
            name="resnet50",
            constructor="ResNet50",
            module="resnet50",
            input_size=224,
            output_dim=2048,
            pooling="avg",
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_GCS + "tensorflow/keras-applications/resnet/",
            preprocess=caffe_preprocess,
        ),
        KerasApp(
            name="efficientnetb0",
            constructor="EfficientNetB0",
            module="efficientnet",
            input_size=224,
            output_dim=1280,
            pooling="avg",
            weights_file="efficientnetb0_notop.h5",
            weights_url=_GCS + "keras-applications/",
            preprocess=identity_preprocess,
        ),
        KerasApp(
            name="efficientnetv2-b0",
            constructor="EfficientNetV2B0",
            module="efficientnet_v2",
            input_size=224,
            output_dim=1280,
            pooling="avg",
            weights_file="efficientnetv2-b0_notop.h5",
            weights_url=_GCS + "tensorflow/keras-applications/efficientnet_v2/",
            preprocess=identity_preprocess,
        ),
    )
}


def keras_cache_dir() -> Path:
    """Folder where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``.

    Mirrors ``keras.utils.get_file``, read from the environment at call time (Keras reads
    ``KERAS_HOME`` once, at import), including its fallback to ``/tmp/.keras`` when the
    chosen folder is read-only.
    """
    home = settings.keras_home()
    if home is not None:
        base = home
    elif os.access(Path.home(), os.W_OK):
        base = Path.home() / ".keras"
    else:
        base = _TMP_KERAS
    if base.exists() and not os.access(base, os.W_OK):
        base = _TMP_KERAS
    return base / "models"


def cached_weights(app: KerasApp) -> Path | None:
    """The app's ImageNet weights file in the Keras cache, or None if not downloaded yet."""
    path = keras_cache_dir() / app.weights_file
    return path if path.is_file() else None


def _host_reachable(host: tuple[str, int], timeout: float) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds, DNS included.

    ``create_connection``'s timeout does not cover name resolution, which can stall for much
    longer on a machine without network, so the attempt runs in a daemon thread we stop waiting
    for.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True, name="imgcluster-net-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _offline_message(app: KerasApp, reason: str) -> str:
    return (
        f"ImageNet weights for {app.name} are not on this machine and cannot be downloaded "
        f"({reason}). Download {app.weights_url}{app.weights_file} elsewhere and copy it to "
        f"{keras_cache_dir()}/{app.weights_file}, or pass its path with --weights PATH, or use "
        "the offline default backbone efficientnet-lite0."
    )


def _resolve_weights(app: KerasApp, weights: str | Path | None) -> str | None:
    """Turn the user's choice into what ``keras.applications`` takes, failing fast offline."""
    if weights is None:
        return None
    if weights in ("default", "imagenet"):
        cached = cached_weights(app)
        if cached is not None:
            return str(cached)  # a path makes Keras skip its downloader entirely
        if settings.offline():
            raise WeightsUnavailable(_offline_message(app, f"{OFFLINE_ENV} is set"))
        if not _host_reachable(_DOWNLOAD_HOST, _PROBE_TIMEOUT_S):
            raise WeightsUnavailable(_offline_message(app, f"{_DOWNLOAD_HOST[0]} is unreachable"))
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} for {app.name} does not exist")
    return str(path)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # Keras' urlretrieve has no timeout of its own; without this a stalled download hangs.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def build_keras_app(name: str, *, weights: str | Path | None = "default") -> keras.Model:
    """Build a ``keras.applications`` backbone that takes raw RGB pixels.

    Parameters
    ----------
    name : str
        A key of `KERAS_APPS`: ``"vgg16"``, ``"resnet50"``, ``"efficientnetb0"`` or
        ``"efficientnetv2-b0"``.
    weights : str, Path or None, default="default"
        ``"default"`` (or ``"imagenet"``) uses the file in the Keras cache, downloading it first
        if the download host answers; a path loads that ``.h5`` file; ``None`` keeps random
        weights (for tests and shape checks).

    Returns
    -------
    keras.Model
        Input ``(N, 224, 224, 3)`` float32 RGB in [0, 255]; the model applies the app's own
        ``preprocess_input`` first. Output: one pooled vector of `KerasApp.output_dim` per image.

    Raises
    ------
    WeightsUnavailable
        If ImageNet weights are neither cached nor downloadable (within a few seconds), or the
        given path does not exist.
    InvalidWeights
        If the given file does not fit the model.
    """
    import keras

    app = KERAS_APPS[name]
    resolved = _resolve_weights(app, weights)
    constructor = getattr(keras.applications, app.constructor)
    size = app.input_size
    try:
        with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT_S):
            base = constructor(
                include_top=False,
                weights=resolved,
                input_shape=(size, size, 3),
                pooling=app.pooling,
            )
    except Exception as exc:
        if resolved == "imagenet":
            # Keras reports a failed download as a bare Exception.
            raise WeightsUnavailable(_offline_message(app, f"download failed: {exc}")) from exc
        if resolved is not None and isinstance(exc, (OSError, ValueError)):
            raise InvalidWeights(f"cannot load {resolved} into {app.name}: {exc}") from exc
        raise

    inputs = keras.Input((size, size, 3), name="rgb")
    preprocess_input = getattr(keras.applications, app.module).preprocess_input
    outputs = base(preprocess_input(inputs))
    return keras.Model(inputs, outputs, name=app.name.replace("-", "_"))
