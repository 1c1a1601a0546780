"""Extraction runtimes for the default backbone: this project vs ONNX Runtime, and int8 TFLite.

Issue 15 §5. On the 600 clothing photos, end to end with the network already loaded, in one
run with the variants interleaved (medians of ``--repeats``):

* ``project``: `imgcluster.features.extract` (read + hash check + decode + resize + centre crop
  in a thread pool, TFLite float32, one single-threaded XNNPACK interpreter per core, shards).
* ``ort``: ONNX Runtime on the same network (EfficientNet-Lite0 built here as an ONNX graph
  from the very Keras weights, batch-norm folded into the convolutions), fed by the same
  decoding and resizing (`FeatureExtractor.read` in a 2-thread pool working ahead), batches of
  32, ``intra_op_num_threads=2``. Its vectors are checked against the project's.
* ``int8``: the project's pipeline with a dynamic-range int8 TFLite conversion of the same
  network (XNNPACK), and its clustering quality: NMI of ``KMeans(k=10)`` for 10 seeds against
  the float32 vectors' on the same photos.

``onnxruntime`` and ``onnx`` are bench-only: ``.venv/bin/pip install onnxruntime onnx``.

Usage::

    python bench/extract_runtimes.py [--dataset ../shared/datasets/clothing] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgcluster.features import (
    CACHE_ENV,
    FeatureExtractor,
    TFLiteRunner,
    delete_features,
    extract,
    l2_normalize,
    load_extractor,
    load_features,
    read_source,
)
from imgcluster.images import ingest
from imgcluster.workspace import Workspace

BACKBONE = "efficientnet-lite0"
PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = PROJECT.parent / "shared" / "datasets" / "clothing"


# -- the same network as an ONNX graph --------------------------------------------------------


def onnx_model(model) -> bytes:
    """EfficientNet-Lite (Keras, `imgcluster.backbones.efficientnet_lite`) as ONNX, NHWC in."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    names: dict[str, str] = {}

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    x = "nchw"
    nodes.append(helper.make_node("Transpose", ["rgb"], [x], perm=[0, 3, 1, 2]))
    pending_conv: tuple[object, str] | None = None  # conv waiting for its batch norm
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            names[layer.output.name] = x
            continue
        src = names[layer.input.name] if kind != "Add" else None
        out = layer.name
        if kind == "Rescaling":
            scale = const(f"{out}_s", np.array(layer.scale))
            offset = const(f"{out}_o", np.array(layer.offset))
            nodes.append(helper.make_node("Mul", [src, scale], [f"{out}_m"]))
            nodes.append(helper.make_node("Add", [f"{out}_m", offset], [out]))
        elif kind in ("Conv2D", "DepthwiseConv2D"):
            pending_conv = (layer, src)
            names[layer.output.name] = f"{out}__pending"
            continue
        elif kind == "BatchNormalization":
            conv, conv_src = pending_conv
            gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
            scale = gamma / np.sqrt(var + layer.epsilon)
            kernel = np.asarray(conv.get_weights()[0])
            if type(conv).__name__ == "DepthwiseConv2D":
                weight, group = kernel.transpose(2, 3, 0, 1), kernel.shape[2]
            else:
                weight, group = kernel.transpose(3, 2, 0, 1), 1
            weight = weight * scale[:, None, None, None]
            bias = beta - mean * scale
            nodes.append(
                helper.make_node(
                    "Conv",
                    [conv_src, const(f"{out}_w", weight), const(f"{out}_b", bias)],
                    [out],
                    auto_pad="SAME_UPPER",
                    strides=list(conv.strides),
                    group=int(group),
                    kernel_shape=list(kernel.shape[:2]),
                )
            )
            pending_conv = None
        elif kind == "ReLU":
            nodes.append(
                helper.make_node(
                    "Clip", [src, const(f"{out}_lo", 0.0), const(f"{out}_hi", 6.0)], [out]
                )
            )
        elif kind == "Add":
            a, b = (names[t.name] for t in layer.input)
            nodes.append(helper.make_node("Add", [a, b], [out]))
        elif kind == "GlobalAveragePooling2D":
            nodes.append(helper.make_node("GlobalAveragePool", [src], [f"{out}_p"]))
            nodes.append(helper.make_node("Flatten", [f"{out}_p"], [out]))
        else:
            raise NotImplementedError(kind)
        names[layer.output.name] = out
    graph = helper.make_graph(
        nodes,
        "efficientnet_lite",
        [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, [None, 224, 224, 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, 1280])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def ort_rate(session, extractor: FeatureExtractor, paths: list[Path], batch: int = 32):
    """Images/s of ORT end to end: the project's read + decode + resize in 2 threads ahead,
    then one ``session.run`` per batch of 32."""

    def prepare(path: Path) -> np.ndarray:
        return extractor.read(read_source(path))

    started = time.perf_counter()
    out = []
    with ThreadPoolExecutor(2) as pool:
        pixels = pool.map(prepare, paths)
        chunk: list[np.ndarray] = []
        for image in pixels:
            chunk.append(image)
            if len(chunk) == batch:
                out.append(session.run(None, {"rgb": np.stack(chunk).astype(np.float32)})[0])
                chunk = []
        if chunk:
            out.append(session.run(None, {"rgb": np.stack(chunk).astype(np.float32)})[0])
    return len(paths) / (time.perf_counter() - started), np.concatenate(out)


# -- int8 -------------------------------------------------------------------------------------


def int8_tflite(model, path: Path) -> Path:
    """Dynamic-range int8 weights (activations stay float): `tf.lite.Optimize.DEFAULT`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with contextlib.redirect_stdout(io.StringIO()):
        path.write_bytes(converter.convert())
    return path


def pipeline(ws: Workspace, extractor: FeatureExtractor) -> float:
    delete_features(ws, BACKBONE)
    report = extract(ws, extractor)
    assert report.extracted == report.total and not report.failed, report
    return report.extracted / report.seconds


def nmi(vectors: np.ndarray, truth: list[str], seeds: int = 10) -> list[float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    return [
        normalized_mutual_info_score(
            truth, KMeans(n_clusters=10, random_state=s, n_init=1).fit_predict(vectors)
        )
        for s in range(seeds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    os.environ.setdefault(CACHE_ENV, str(tmp / "cache"))
    ws = Workspace(tmp / "ws", create=True)
    ingest(ws, args.dataset)
    paths = [ws.collection_root / im.relpath for im in ws.images("ok")]
    with open(args.dataset / "labels.csv") as fh:
        labels = {row["path"]: row["label"] for row in csv.DictReader(fh)}

    project = load_extractor(BACKBONE, runtime="tflite")
    from imgcluster.backbones import get_backbone

    model = get_backbone(BACKBONE).build()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_model(model), options, providers=["CPUExecutionProvider"])
    int8 = FeatureExtractor(BACKBONE, runtime="tflite").load()
    int8_path = int8_tflite(model, tmp / "lite0-int8.tflite")
    int8.members_[0].runner = TFLiteRunner(
        int8_path, 224, interpreters=len(os.sched_getaffinity(0))
    )
    int8.members_[0].fingerprint += ";int8"
    int8.fingerprints_ = {BACKBONE: int8.members_[0].fingerprint}

    rates: dict[str, list[float]] = {"project": [], "ort": [], "int8": []}
    ort_vectors = None
    for rep in range(args.repeats):
        rates["project"].append(pipeline(ws, project))
        rate, ort_vectors = ort_rate(session, project, paths)
        rates["ort"].append(rate)
        rates["int8"].append(pipeline(ws, int8))
        print(
            f"  repetition {rep + 1} (load {os.getloadavg()[0]:.1f}): "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
        )
    int8_fm = load_features(ws, BACKBONE)
    pipeline(ws, project)
    float_fm = load_features(ws, BACKBONE)
    diff = np.abs(l2_normalize(ort_vectors) - float_fm.vectors).max()
    print(f"ORT vs project vectors (normalised): max abs difference {diff:.2e}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'variant (median of ' + str(args.repeats) + ')':36s} {'img/s':>7s}")
    for key, value in med.items():
        print(f"{key:36s} {value:7.1f}")
    print(f"project / ORT: {med['project'] / med['ort']:.2f}x (target >= 1.5x)")
    print(f"int8 / project: {med['int8'] / med['project']:.2f}x")
    truth = [labels[r] for r in float_fm.relpaths]
    a, b = nmi(float_fm.vectors, truth), nmi(int8_fm.vectors, truth)
    print(
        f"NMI k=10, 10 seeds: float32 {statistics.mean(a):.4f} ± {statistics.stdev(a):.4f}, "
        f"int8 {statistics.mean(b):.4f} ± {statistics.stdev(b):.4f}, "
        f"difference {statistics.mean(b) - statistics.mean(a):+.4f} (keep int8 if |d| < 0.005); "
        f"int8 vs float32 vectors: mean cosine "
        f"{float(np.mean(np.sum(int8_fm.vectors * float_fm.vectors, axis=1))):.4f}"
    )


if __name__ == "__main__":
    main()
