"""Extraction speed (original recipe vs this pipeline) and feature quality (NMI) on real photos.

Speed, images/second on the same JPEGs (``../shared/datasets/clothing``, 400x533), in one run,
repetitions interleaved so a busy machine slows every variant alike; medians are reported:

* ``loop``: the original recipe's loop with the same backbone (EfficientNet-Lite0, Keras):
  ``keras.utils.load_img(path, target_size=(224, 224))`` (NEAREST resize), then one
  ``model.predict`` per image. It is slow, so it runs on a fixed subset (``--loop-images``,
  every k-th file); images/s is a rate, so the subset does not bias the ratio.
* ``keras``: this pipeline (`imgcluster.features.extract`) on all images with the Keras
  runtime (``tf.function``): decode + resize in threads, inference, storing shards.
* ``tflite``: the same pipeline with the default TFLite runtime (the product's path: one
  single-threaded interpreter per core), and ``tflite1``: the same model as one interpreter
  with one XNNPACK thread per core. Pipeline rows are end to end (decode + resize +
  inference + store) with the network already loaded, as in the app; the one-time
  load/conversion is reported separately.
* ``m-*``: the TFLite model alone on ready tensors: one interpreter per core, one
  multi-threaded interpreter fed 1 image per call, or 32 per call (input tensor resized), to
  justify how the runtime batches.

Quality: plain ``KMeans(n_clusters=10, random_state=0)`` on the stored (L2-normalised) vectors,
NMI against labels.csv, for the pretrained Lite0 and for Lite0 with random weights (Keras'
initialisation under seeds 0, 1, 2).

Usage::

    python bench/extract.py [--dataset ../shared/datasets/clothing] [--repeats 3]
                            [--loop-images 60] [--skip-nmi]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcluster.features import (
    CACHE_ENV,
    FeatureExtractor,
    TFLiteRunner,
    delete_features,
    extract,
    load_extractor,
    load_features,
)
from imgcluster.images import ingest
from imgcluster.workspace import Workspace

if TYPE_CHECKING:
    import keras

BACKBONE = "efficientnet-lite0"
PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = PROJECT.parent / "shared" / "datasets" / "clothing"


def original_loop(model: keras.Model, paths: list[Path]) -> float:
    """Images/s of the original recipe: load_img (NEAREST) + one predict call per image."""
    import keras

    started = time.perf_counter()
    for path in paths:
        img = keras.utils.load_img(path, target_size=(224, 224))
        x = keras.utils.img_to_array(img)[None]
        model.predict(x, verbose=0)
    return len(paths) / (time.perf_counter() - started)


def pipeline(ws: Workspace, extractor: FeatureExtractor) -> float:
    """Images/s of `extract` over the whole workspace, from an empty store."""
    for member in extractor.backbone.split("+"):
        delete_features(ws, member)
    report = extract(ws, extractor)
    assert report.extracted == report.total and not report.failed, report
    return report.extracted / report.seconds


def tflite_file() -> Path:
    return next((Path(os.environ[CACHE_ENV]) / "tflite").glob(f"{BACKBONE}-*.tflite"))


def model_only(runner: Callable[[np.ndarray], object], batch: int, n: int = 96) -> float:
    """Images/s of a TFLite runner alone on ready tensors, ``batch`` images per call."""
    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    runner(x)  # warm-up
    calls = max(1, n // batch)
    started = time.perf_counter()
    for _ in range(calls):
        runner(x)
    return calls * batch / (time.perf_counter() - started)


def batched_interpreter(batch: int, threads: int) -> Callable[[np.ndarray], object]:
    """One interpreter whose input tensor is resized to ``batch`` images."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_file()), num_threads=threads)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [batch, 224, 224, 3])
    interpreter.allocate_tensors()

    def run(x: np.ndarray) -> None:
        interpreter.set_tensor(index, x)
        interpreter.invoke()

    return run


def nmi_of(ws: Workspace, labels: dict[str, str]) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    fm = load_features(ws, BACKBONE)
    truth = [labels[r] for r in fm.relpaths]
    predicted = KMeans(n_clusters=10, random_state=0).fit_predict(fm.vectors)
    return normalized_mutual_info_score(truth, predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-images", type=int, default=60)
    parser.add_argument("--skip-nmi", action="store_true")
    parser.add_argument(
        "--fusion",
        action="store_true",
        help="only compare Lite0, Lite2, the fusion Lite0+Lite2 and Lite0 with flip, end to end",
    )
    args = parser.parse_args()
    if args.fusion:
        fusion_times(args.dataset, args.repeats)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    os.environ[CACHE_ENV] = str(tmp / "cache")  # measure a cold conversion, keep the user's cache
    ws = Workspace(tmp / "ws", create=True)
    ingest(ws, args.dataset)
    images = ws.images("ok")
    paths = [ws.source_path(im.relpath) for im in images]
    step = max(1, len(paths) // args.loop_images)
    subset = paths[::step][: args.loop_images]
    print(f"{len(paths)} images from {args.dataset}; original loop on {len(subset)} of them")
    print(f"cores available: {len(os.sched_getaffinity(0))}")

    started = time.perf_counter()
    lite = load_extractor(BACKBONE, runtime="tflite")
    print(f"TFLite conversion + check (once, cached): {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    load_extractor(BACKBONE, runtime="tflite")
    print(f"TFLite load from cache: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    keras_runtime = load_extractor(BACKBONE, runtime="keras")
    print(f"Keras build: {time.perf_counter() - started:.1f} s")
    from imgcluster.backbones import get_backbone

    model = get_backbone(BACKBONE).build()
    model.predict(np.zeros((1, 224, 224, 3), np.float32), verbose=0)  # trace once, untimed

    cores = len(os.sched_getaffinity(0))
    # The same converted model, as one interpreter using every core for each image.
    one_multithreaded = FeatureExtractor(BACKBONE, runtime="tflite").load()
    one_multithreaded.members_[0].runner = TFLiteRunner(
        tflite_file(), 224, interpreters=1, threads_each=cores
    )
    variants: dict[str, tuple[str, Callable[[], float]]] = {
        "loop": ("original loop (load_img + predict/image)", lambda: original_loop(model, subset)),
        "tflite": (f"pipeline, tflite {cores} interp x 1 thread", lambda: pipeline(ws, lite)),
        "tflite1": (
            f"pipeline, tflite 1 interp x {cores} threads",
            lambda: pipeline(ws, one_multithreaded),
        ),
        "keras": ("pipeline, keras tf.function, batch 32", lambda: pipeline(ws, keras_runtime)),
        "m-par": (
            f"model only, {cores} interp x 1 thread",
            lambda: model_only(TFLiteRunner(tflite_file(), 224, interpreters=cores), 32),
        ),
        "m-b1": (
            f"model only, 1 interp x {cores} threads, 1/call",
            lambda: model_only(batched_interpreter(1, cores), 1),
        ),
        "m-b32": (
            f"model only, 1 interp x {cores} threads, 32/call",
            lambda: model_only(batched_interpreter(32, cores), 32),
        ),
    }
    rates: dict[str, list[float]] = {key: [] for key in variants}
    for rep in range(args.repeats):
        for key, (_label, run) in variants.items():
            rates[key].append(run())
        load = os.getloadavg()[0]
        print(
            f"  repetition {rep + 1} (load {load:.1f}): "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
        )

    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    title = f"variant (median of {args.repeats})"
    print(f"{title:44s} {'img/s':>7s} {'x loop':>7s}")
    for key, (label, _run) in variants.items():
        print(f"{label:44s} {med[key]:7.1f} {med[key] / med['loop']:7.1f}")
    print(f"ratio pipeline (tflite, default) / original loop: {med['tflite'] / med['loop']:.1f}x")

    if args.skip_nmi:
        return
    with open(args.dataset / "labels.csv") as fh:
        labels = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    print()
    print(f"NMI, KMeans k=10 seed 0, pretrained {BACKBONE}: {nmi_of(ws, labels):.3f}")
    import keras

    for seed in (0, 1, 2):
        keras.utils.set_random_seed(seed)
        random_ws = Workspace(tmp / f"random{seed}", create=True)
        ingest(random_ws, args.dataset)
        extract(random_ws, BACKBONE, weights=None, runtime="keras")
        print(
            f"NMI, KMeans k=10 seed 0, random-weights {BACKBONE} (init seed {seed}): "
            f"{nmi_of(random_ws, labels):.3f}"
        )


def fusion_times(dataset: Path, repeats: int) -> None:
    """End-to-end extraction time of the feature sets the Features page offers, relative to
    Lite0 alone, interleaved so machine load hits every variant alike."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    os.environ.setdefault(CACHE_ENV, str(tmp / "cache"))
    ws = Workspace(tmp / "ws", create=True)
    ingest(ws, dataset)
    variants = {
        "efficientnet-lite0": load_extractor("efficientnet-lite0", runtime="tflite"),
        "efficientnet-lite2": load_extractor("efficientnet-lite2", runtime="tflite"),
        "efficientnet-lite0+efficientnet-lite2": load_extractor(
            "efficientnet-lite0+efficientnet-lite2", runtime="tflite"
        ),
        "efficientnet-lite0 flip": load_extractor(
            "efficientnet-lite0", runtime="tflite", flip=True
        ),
    }
    rates: dict[str, list[float]] = {key: [] for key in variants}
    for rep in range(repeats):
        for key, extractor in variants.items():
            rates[key].append(pipeline(ws, extractor))
        print(
            f"  repetition {rep + 1} (load {os.getloadavg()[0]:.1f}): "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'feature set (median of ' + str(repeats) + ')':44s} {'img/s':>7s} {'x time':>7s}")
    for key in variants:
        print(f"{key:44s} {med[key]:7.1f} {med['efficientnet-lite0'] / med[key]:7.2f}")


if __name__ == "__main__":
    main()
