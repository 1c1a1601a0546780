"""The extraction pipeline: compute and store the vectors every usable image is missing.

Why it is shaped like this (figures in bench/README.md, "Extraction speed"):

* Decoding and resizing run in a thread pool that works ahead of the network (Pillow and the
  interpreter both release the GIL), so the CPU is never idle waiting for JPEGs.
* Every finished batch is one shard (+ one per extra member of a fusion) and one transaction
  (`save_vectors`): a kill loses at most the batch in flight, and the next run's work list
  skips everything saved.
* One run per backbone at a time (a job lock per member): a second concurrent run waits, then
  finds the first one's work committed instead of doing all of it again.
* Before working out what is missing, every shard is verified (`verify_shards`): a deleted,
  truncated or wrong-shape shard is forgotten and its vectors recomputed.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcluster import _process
from imgcluster.backbones import DEFAULT_BACKBONE, split_feature_set
from imgcluster.errors import ImageRejected, InvalidParameter
from imgcluster.features.extractor import (
    FeatureExtractor,
    check_content,
    read_source,
    resolve_source,
    short_reason,
)
from imgcluster.features.runtime import Runtime, Weights, cpu_count
from imgcluster.features.store import check_fingerprint, save_vectors, verify_shards
from imgcluster.images import MAX_FILE_BYTES, Progress
from imgcluster.workspace import ImageRecord, Workspace

__all__ = [
    "EmbeddedContents",
    "ExtractReport",
    "LoadedContent",
    "embed_contents",
    "extract",
    "load_content",
]


@dataclass
class ExtractReport:
    """What an extraction did, for the CLI summary and the app.

    Counts of *images* unless said otherwise. ``extracted`` counts distinct contents: exact
    duplicates share one vector, computed once. ``failed`` lists every file that could not be
    used; when an identical file stood in for it, its content still got a vector (counted in
    ``shared``), otherwise the content stays on the work list until a re-ingest. ``repaired``
    lists damaged shards that were forgotten and recomputed (file, problem).
    """

    backbone: str
    runtime: str = ""
    total: int = 0  # usable images in the workspace
    extracted: int = 0  # distinct contents run through the network in this run
    reused: int = 0  # images that already had a vector before this run
    shared: int = 0  # images that got a vector computed now for an identical file
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    repaired: list[tuple[str, str]] = field(default_factory=list)  # (shard file, problem)
    load_seconds: float = 0.0  # building or loading the network
    seconds: float = 0.0  # decoding, resizing, inference and storing
    waited_seconds: float = 0.0  # waiting for another extraction of the same backbone

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
class LoadedContent:
    """One content read, verified, decoded once and fitted to every member network."""

    sha256: str
    pixels: list[np.ndarray] | None  # one (S, S, 3) uint8 per member; None: no file works
    failures: list[tuple[str, str]]  # (relpath, reason) of every file that did not work


_Loaded = LoadedContent


@dataclass
class _Plan:
    """What to compute: distinct contents in relpath order, and which members each needs."""

    todo: list[str]
    needs: dict[str, list[bool]]  # sha256 -> per member: vector missing
    candidates: dict[str, list[str]]  # sha256 -> relpaths holding it


def extract(
    workspace: Workspace,
    backbone: str | FeatureExtractor = DEFAULT_BACKBONE,
    *,
    batch_size: int = 32,
    weights: Weights = "default",
    progress: Progress | None = None,
    runtime: Runtime = "auto",
    nearest_resize: bool = False,
    flip: bool = False,
    workers: int | None = None,
) -> ExtractReport:
    """Compute and store the vectors of every usable image that has none yet.

    Only content without a vector is computed: a re-run after an interruption continues where
    it stopped, new images are extracted alone, exact duplicates are computed once, and
    damaged shards are recomputed. Each image is read again (capped at the ingest size limit)
    and its bytes hashed: a file that vanished or changed since ingest is reported and skipped
    (another file with the ingested content is used if there is one); re-ingest to pick up the
    change. For a fusion (``"a+b"``) each image is decoded once and every member network that
    lacks its vector runs on it; each member's vectors are stored under its own name.

    Parameters
    ----------
    workspace : Workspace
    backbone : str or FeatureExtractor, default="efficientnet-lite0"
        A backbone or fusion name, or an extractor already loaded (e.g. the app's cached one),
        in which case `weights`, `runtime`, `nearest_resize` and `flip` are the extractor's.
    batch_size : int, default=32
        Images per stored shard (and per Keras call). A kill loses at most one batch.
    weights, runtime, nearest_resize, flip
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
    extractor = _extractor(backbone, weights, runtime, nearest_resize, flip)
    with extraction_run(workspace, extractor.backbone, batch_size, progress) as run:
        if run.plan.todo:
            _run(workspace, extractor, run.plan, run.report, batch_size, progress, workers)
    return run.report


def _extractor(
    backbone: str | FeatureExtractor,
    weights: Weights,
    runtime: Runtime,
    nearest_resize: bool,
    flip: bool,
) -> FeatureExtractor:
    if isinstance(backbone, FeatureExtractor):
        return backbone
    return FeatureExtractor(
        backbone, weights=weights, runtime=runtime, nearest_resize=nearest_resize, flip=flip
    )


@contextlib.contextmanager
def _member_locks(workspace: Workspace, members: Sequence[str]) -> Iterator[None]:
    """Hold every member's extraction lock (sorted, so two fusions never deadlock)."""
    with contextlib.ExitStack() as stack:
        for member in sorted(members):
            path = workspace.path / "features" / f".extract-{member}.lock"
            stack.enter_context(_process.job_lock(path, wait=None, what=f"extract {member}"))
        yield


def _plan(workspace: Workspace, members: Sequence[str], images: list[ImageRecord]) -> _Plan:
    """The distinct contents that lack a vector of some member, in relpath order."""
    from imgcluster.features.store import missing_hashes

    missing = [set(missing_hashes(workspace, member)) for member in members]
    candidates: dict[str, list[str]] = {}
    for image in images:
        candidates.setdefault(image.sha256 or "", []).append(image.relpath)
    needs: dict[str, list[bool]] = {}
    for sha in candidates:
        flags = [sha in m for m in missing]
        if any(flags):
            needs[sha] = flags
    return _Plan(todo=list(needs), needs=needs, candidates=candidates)


def _run(
    workspace: Workspace,
    extractor: FeatureExtractor,
    plan: _Plan,
    report: ExtractReport,
    batch_size: int,
    progress: Progress | None,
    workers: int | None,
) -> None:
    """Load the network, then decode ahead in threads and store batch after batch."""
    started = time.perf_counter()
    extractor.load()
    report.runtime = extractor.runtime_
    report.load_seconds = time.perf_counter() - started
    for member, fingerprint in extractor.fingerprints_.items():
        check_fingerprint(workspace, member, fingerprint)

    started = time.perf_counter()
    batch: list[_Loaded] = []
    done = 0
    root = workspace.collection_root
    workers = workers or cpu_count()

    def load(sha: str) -> _Loaded:
        return load_content(root, extractor, plan.candidates[sha], sha)

    def flush() -> None:
        _store_batch(workspace, extractor, plan, batch)
        report.extracted += len(batch)
        report.shared += sum(len(plan.candidates[item.sha256]) - 1 for item in batch)
        batch.clear()
        if progress:
            progress(done, len(plan.todo))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgcluster-decode") as pool:
        # Work ahead by two batches: decoding never waits for the network, memory stays bounded.
        for loaded in _ordered_prefetch(pool, load, plan.todo, window=2 * batch_size + workers):
            done += 1
            report.failed.extend(loaded.failures)
            if loaded.pixels is not None:
                batch.append(loaded)
                if len(batch) >= batch_size:
                    flush()
        if batch:
            flush()
    if progress:
        progress(done, len(plan.todo))
    report.seconds = time.perf_counter() - started


def _store_batch(
    workspace: Workspace, extractor: FeatureExtractor, plan: _Plan, batch: list[_Loaded]
) -> None:
    """Run each member on the contents that lack its vector and store one shard per member."""
    for i, member in enumerate(extractor.members_):
        items = [item for item in batch if plan.needs[item.sha256][i]]
        if not items:
            continue
        pixels = np.stack([item.pixels[i] for item in items])
        vectors = extractor.run_member(member, pixels)
        name = member.backbone.name
        top = extractor.top_classes({name: vectors}).get(name) if member.head else None
        save_vectors(workspace, name, [item.sha256 for item in items], vectors, top_classes=top)


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


def load_content(
    root: Path | None, extractor: FeatureExtractor, relpaths: Sequence[str], sha256: str
) -> LoadedContent:
    """Read, verify, decode and fit one content; never raises for a file.

    Tries each file holding ``sha256`` (``relpaths``, under the collection ``root``) in turn,
    so duplicates stand in for each other: each file is read as a regular file only, capped at
    the ingest size limit, refused if it now leads out of the collection, and its hash checked.
    """
    failures: list[tuple[str, str]] = []
    for relpath in relpaths:
        try:
            data = read_source(resolve_source(root, relpath), MAX_FILE_BYTES)
            check_content(data, sha256)
            return LoadedContent(sha256, extractor.prepare_all(extractor.decode(data)), failures)
        except ImageRejected as exc:
            failures.append((relpath, exc.reason))
        except Exception as exc:
            failures.append((relpath, f"decode error: {type(exc).__name__}: {short_reason(exc)}"))
    return LoadedContent(sha256, None, failures)


@dataclass
class EmbeddedContents:
    """Vectors of a block of contents (`embed_contents`), for a driver to commit.

    ``ok[i]`` says whether content ``i`` got vectors; row ``j`` of every array belongs to the
    ``j``-th content with ``ok``. Commit with ``save_vectors(workspace, member,
    [sha for sha, good in zip(shas, ok) if good], member_vectors[member],
    top_classes=top_classes.get(member))``.
    """

    ok: np.ndarray  # bool, (n,)
    member_vectors: dict[str, np.ndarray]  # member backbone -> raw vectors (n_ok, dim)
    top_classes: dict[str, np.ndarray]  # member backbone -> (n_ok, 2 * TOP_K)
    failures: list[list[tuple[str, str]]]  # per content: (relpath, reason)


def embed_contents(
    extractor: FeatureExtractor,
    root: Path | None,
    sha256s: Sequence[str],
    candidates: Sequence[Sequence[str]],
) -> EmbeddedContents:
    """Vectors of a block of distinct contents, each read from the first of its files that
    works: exactly what local `extract` does per batch (for distributed workers: load the
    extractor once per worker with `load_extractor`, call this per block)."""
    loaded = [
        load_content(root, extractor, relpaths, sha)
        for sha, relpaths in zip(sha256s, candidates, strict=True)
    ]
    good = [item for item in loaded if item.pixels is not None]
    members = extractor.run_members([item.pixels for item in good])  # type: ignore[misc]
    return EmbeddedContents(
        ok=np.array([item.pixels is not None for item in loaded], dtype=bool),
        member_vectors=members,
        top_classes=extractor.top_classes(members),
        failures=[item.failures for item in loaded],
    )


@dataclass
class ExtractionRun:
    """An extraction under way: its report so far and what is left to compute."""

    members: list[str]
    report: ExtractReport
    plan: _Plan


@contextlib.contextmanager
def extraction_run(
    workspace: Workspace, name: str, batch_size: int, progress: Progress | None
) -> Iterator[ExtractionRun]:
    """Start an extraction of feature set ``name`` the way every engine starts one: check the
    parameters, hold each member's extraction lock (another engine, e.g. Ray, takes the same
    ones, so two extractions of one backbone never run at once), repair damaged shards, and
    plan the distinct contents that lack a vector, filling the report's counts."""
    if batch_size < 1:
        raise InvalidParameter(f"batch_size={batch_size} should be >= 1")
    members = split_feature_set(name)  # an unknown name fails before any work
    report = ExtractReport(backbone=name)
    started = time.perf_counter()
    with _member_locks(workspace, members):
        report.waited_seconds = time.perf_counter() - started
        for member in members:
            report.repaired.extend(verify_shards(workspace, member).damaged)
        images = workspace.images("ok")
        plan = _plan(workspace, members, images)
        report.total = len(images)
        report.reused = sum(1 for image in images if image.sha256 not in plan.needs)
        if progress:
            progress(0, len(plan.todo))
        yield ExtractionRun(list(members), report, plan)
