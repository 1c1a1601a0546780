"""Feature vectors: the on-disk store, the extractor, the extraction pipeline, suggested names.

One concern per module, every public name importable from here:

- `store`: shards of L2-normalised vectors keyed by content hash; feature sets (one backbone or
  a fusion ``"a+b"``, composed when loaded); verification of damaged shards; cheap identities.
- `runtime`: running a network fast on CPU (TFLite conversion cached and checked, LiteRT
  interpreters, the Keras fallback).
- `extractor`: `FeatureExtractor` (decode once, fit to each network, run, fuse, flip) and
  `FeatureExtractor.transform_batch`, the per-batch entry point that never raises for a file.
- `pipeline`: `extract`, resumable and locked per backbone.
- `names`: `suggest_names` from the ImageNet classifier head.
"""

from imgcluster.features.extractor import (
    CHANGED_REASON,
    TOP_K,
    BatchResult,
    FeatureExtractor,
    check_content,
    fit_to_square,
    load_extractor,
    read_source,
)
from imgcluster.features.names import (
    NAME_SEPARATOR,
    class_scores,
    feature_top_classes,
    suggest_names,
)
from imgcluster.features.pipeline import (
    EmbeddedContents,
    ExtractReport,
    LoadedContent,
    embed_contents,
    extract,
    load_content,
)
from imgcluster.features.runtime import (
    CACHE_ENV,
    RUNTIMES,
    TFLITE_TOLERANCE,
    KerasRunner,
    Runtime,
    TFLiteRunner,
    Weights,
    cache_dir,
)
from imgcluster.features.store import (
    FeatureMatrix,
    FeatureRows,
    ShardCheck,
    check_fingerprint,
    delete_features,
    feature_count,
    feature_counts,
    feature_rows,
    feature_set_id,
    features_version,
    l2_normalize,
    load_features,
    load_top_classes,
    missing_hashes,
    save_vectors,
    shards_version,
    stored_fingerprint,
    verify_shards,
)

__all__ = [
    "CACHE_ENV",
    "CHANGED_REASON",
    "NAME_SEPARATOR",
    "RUNTIMES",
    "TFLITE_TOLERANCE",
    "TOP_K",
    "BatchResult",
    "EmbeddedContents",
    "ExtractReport",
    "FeatureExtractor",
    "FeatureMatrix",
    "FeatureRows",
    "KerasRunner",
    "LoadedContent",
    "Runtime",
    "ShardCheck",
    "TFLiteRunner",
    "Weights",
    "cache_dir",
    "check_content",
    "check_fingerprint",
    "class_scores",
    "delete_features",
    "embed_contents",
    "extract",
    "feature_count",
    "feature_counts",
    "feature_rows",
    "feature_set_id",
    "feature_top_classes",
    "features_version",
    "fit_to_square",
    "l2_normalize",
    "load_content",
    "load_extractor",
    "load_features",
    "load_top_classes",
    "missing_hashes",
    "read_source",
    "save_vectors",
    "shards_version",
    "stored_fingerprint",
    "suggest_names",
    "verify_shards",
]
