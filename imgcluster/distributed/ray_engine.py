"""The Ray engine behind `imgcluster.distributed`: manifests, actor pools, streamed commits.

Shape of a job (both ingest and extraction):

1. The driver lists the work locally (`imgcluster.images.plan_ingest`, or the content hashes
   without a vector) into a Parquet manifest in the workspace. Listing a million files through
   Ray's own file listing is slow, and the driver needs the list anyway to commit and report.
2. The manifest goes to Ray Data as blocks of ``batch_size`` rows (held in the object store,
   so workers need no access to the workspace), and ``map_batches`` runs each block in an
   actor from an `ActorPoolStrategy` pool: an actor loads the converted network once.
3. Result blocks (Arrow tables) stream back to the driver (`iter_batches` over whole blocks),
   which commits each through the library's own writers (`commit_examined`, `save_vectors`).
   An extraction block is kept as a Parquet shard beside the manifest until it is committed:
   one left by a killed driver is finished work, committed by the next run. (Ingest keeps no
   shard: its files may have changed by the next run, which re-examines them anyway.)
4. Resume is the local rule: the next run's work list leaves out everything committed, so a
   killed driver or a lost node costs at most the blocks in flight. Ray Data retries the
   blocks of a lost node on the others (its actors restart, tasks retry); the driver ignores a
   result it has already committed, so a retried block is never stored twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgcluster.distributed import RayUnavailable
from imgcluster.errors import FeaturesMismatch, InvalidParameter
from imgcluster.features import (
    ExtractReport,
    FeatureExtractor,
    Weights,
    check_fingerprint,
    embed_contents,
    save_vectors,
)
from imgcluster.features.pipeline import extraction_run
from imgcluster.images import (
    ExaminedFile,
    IngestPlan,
    IngestReport,
    Progress,
    ScannedFile,
    commit_examined,
    examine_file,
    finish_ingest,
    plan_ingest,
)
from imgcluster.workspace import Workspace, atomic_write

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise RayUnavailable(
        "the ray engine needs Ray: pip install 'imgcluster[ray]' (or use --engine local)"
    ) from exc

_EXAMINED_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("reason", pa.string()),
        ("thumbnail", pa.binary()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("same", pa.bool_()),
    ]
)
_EXAMINED_FIELDS = tuple(_EXAMINED_SCHEMA.names)

# An extraction result block has, per content: sha256, failures (JSON [[relpath, reason]]),
# "vector:<member>" and "top:<member>" (raw float32 bytes, null when no file worked), the
# actor's fingerprints (JSON) and its time (seconds, cpu_seconds, load_seconds) spread over
# the block's rows. Built by `_Embedder`, whose members decide the vector columns.


@dataclasses.dataclass
class JobStats:
    """Where an extraction job's time went (filled in by `extract` for bench/ray_extract.py).

    ``compute_seconds`` (wall) and ``compute_cpu_seconds`` are summed over actors (decode +
    network inside `_Embedder`), so ``images / compute_cpu_seconds`` is one actor's rate on a
    free core; ``commit_seconds`` is the driver's share (Parquet shard + `save_vectors`); the
    rest of ``wall_seconds`` is Ray: scheduling, actor start-up, moving blocks, waiting.
    """

    wall_seconds: float = 0.0
    first_block_seconds: float = 0.0  # job start to the first committed block
    actor_load_seconds: float = 0.0  # summed over actors
    actors: int = 0
    compute_seconds: float = 0.0
    compute_cpu_seconds: float = 0.0  # the same in CPU time: what a free core would take
    commit_seconds: float = 0.0
    #: Whole CPU time of each actor process (start-up included), by "host:pid".
    actor_cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    blocks: int = 0
    images: int = 0


# -- connecting -------------------------------------------------------------------------------


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Ray initialised for the job; shut down afterwards only if this job started it."""
    if ray.is_initialized():
        yield
        return
    # The driver's core worker logs at ERROR that Ray Data's restartable actors take their
    # constructor arguments from the object store (ray-project/ray#53727): harmless here, as
    # the driver owns them; a user's own setting wins.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level="ERROR",
            include_dashboard=False if address is None else None,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS/local'}: {exc}"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail at once on a ``host:port`` nothing listens on (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise RayUnavailable(
            f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` "
            "or pass the head's address"
        ) from exc


def _quiet_data_context() -> None:
    # The CLI draws its own progress bar; Ray Data's bars and execution banners would mix in.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False


def _pool_size(max_actors: int | None, cpus_per_actor: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = max(1, cpus // max(1, cpus_per_actor))
    return min(size, max_actors) if max_actors else size


def _staging(workspace: Workspace, job: str) -> Path:
    folder = workspace.runs_dir / "ray" / job
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda fh: pq.write_table(table, fh))


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _stream(
    manifest: Path,
    batch_size: int,
    actor: type,
    constructor_kwargs: dict,
    *,
    pool: int,
    cpus_per_actor: int,
    in_order: bool,
) -> Iterator[pa.Table]:
    """Run ``actor`` over the manifest's blocks; yield each result block as it finishes (or in
    manifest order with ``in_order``)."""
    _quiet_data_context()
    ray.data.DataContext.get_current().execution_options.preserve_order = in_order
    table = pq.read_table(manifest)
    dataset = ray.data.from_arrow(_blocks(table, batch_size)).map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        num_cpus=cpus_per_actor,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


@contextlib.contextmanager
def _shard(block: pa.Table, staging: Path) -> Iterator[pa.Table]:
    """A result block kept as a Parquet shard until the caller has committed it.

    Written without fsync (the commit's own fsync follows within milliseconds): a shard cut
    short by a crash fails to read on the next run and is dropped, which loses only work
    that was in flight anyway. Committing uses the block in memory, not the file.
    """
    path = staging / f"result-{uuid.uuid4().hex}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(block, tmp)
    os.replace(tmp, path)
    try:
        yield block
    finally:
        path.unlink(missing_ok=True)


# -- ingest -----------------------------------------------------------------------------------


class _Examiner:
    """Actor: `examine_file` on every file of a block (validate, hash, thumbnail)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        examined = [
            examine_file(
                ScannedFile(
                    row["relpath"], self.root / row["relpath"], row["problem"], bool(row["link"])
                ),
                known_sha256=row["known_sha256"],
            )
            for row in rows
        ]
        columns = {name: [getattr(e, name) for e in examined] for name in _EXAMINED_FIELDS}
        return pa.table(columns, schema=_EXAMINED_SCHEMA)


def _ingest_manifest(workspace: Workspace, plan: IngestPlan) -> pa.Table:
    """One row per file to examine: where it is, its size and time, and the stored hash (a
    file whose content still has it is not decoded again, as locally)."""
    files = plan.todo
    known: list[str | None] = []
    for scanned in files:
        row = plan.known.get(scanned.relpath)
        sha = row["sha256"] if row is not None and row["status"] == "ok" else None
        if sha is not None and not workspace.thumbnail_path(sha).exists():
            sha = None  # re-decode to regenerate the deleted thumbnail
        known.append(sha)
    sizes: list[int | None] = []
    mtimes: list[int | None] = []
    for scanned in files:
        try:
            stat = scanned.path.stat() if scanned.problem is None else None
        except OSError:
            stat = None
        sizes.append(stat.st_size if stat else None)
        mtimes.append(stat.st_mtime_ns if stat else None)
    return pa.table(
        {
            "relpath": pa.array([f.relpath for f in files], pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "mtime_ns": pa.array(mtimes, pa.int64()),
            "link": pa.array([f.link for f in files], pa.bool_()),
            "problem": pa.array([f.problem for f in files], pa.string()),
            "known_sha256": pa.array(known, pa.string()),
        }
    )


def ingest(
    workspace: Workspace,
    root: str | os.PathLike[str],
    *,
    address: str | None,
    progress: Progress | None,
    batch_size: int,
    max_actors: int | None,
) -> IngestReport:
    """See `imgcluster.distributed.ray_ingest`."""
    if batch_size < 1:
        raise InvalidParameter(f"batch_size={batch_size} should be >= 1")
    plan = plan_ingest(workspace, root)  # takes the workspace's ingest lock
    try:
        return _ingest(workspace, plan, address, progress, batch_size, max_actors)
    finally:
        if plan.lock is not None:
            plan.lock.release()


def _ingest(
    workspace: Workspace,
    plan: IngestPlan,
    address: str | None,
    progress: Progress | None,
    batch_size: int,
    max_actors: int | None,
) -> IngestReport:
    staging = _staging(workspace, "ingest")
    total = len(plan.todo)
    if progress:
        progress(0, total)
    if plan.todo:
        manifest = staging / "manifest.parquet"
        _write_parquet(manifest, _ingest_manifest(workspace, plan))
        wanted = {f.relpath for f in plan.todo}
        done = 0
        with connected(address):
            result = _stream(
                manifest,
                batch_size,
                _Examiner,
                {"root": str(plan.root)},
                pool=_pool_size(max_actors, 1),
                cpus_per_actor=1,
                # Rows get their ids in path order, as locally: the first of two identical
                # files (the one the other is marked a duplicate of) is the same either way.
                in_order=True,
            )
            # No Parquet shard here (unlike extraction): a block a killed driver had received
            # would be re-examined anyway, so writing its thumbnails twice would buy nothing.
            for block in result:
                fresh = [
                    ExaminedFile(**row) for row in block.to_pylist() if row["relpath"] in wanted
                ]
                commit_examined(workspace, plan, fresh)
                wanted.difference_update(e.relpath for e in fresh)
                done += len(fresh)
                if progress:
                    progress(done, total)
        manifest.unlink(missing_ok=True)
    return finish_ingest(workspace, plan)


# -- extraction -------------------------------------------------------------------------------


class _Embedder:
    """Actor: loads the network(s) once, then decodes and embeds block after block."""

    def __init__(self, root: str, options: dict, threads: int) -> None:
        started = time.perf_counter()
        self.root = Path(root)
        self.extractor = FeatureExtractor(**options, num_threads=threads).load()
        self.members = [m.backbone.name for m in self.extractor.members_]
        self.load_seconds = time.perf_counter() - started

    def __call__(self, batch: pa.Table) -> pa.Table:
        started, cpu_started = time.perf_counter(), time.process_time()
        shas = batch.column("sha256").to_pylist()
        embedded = embed_contents(
            self.extractor, self.root, shas, batch.column("relpaths").to_pylist()
        )
        n = len(shas)
        rows_of = np.cumsum(embedded.ok) - 1  # content i -> its row in the vector arrays
        columns: dict[str, list] = {
            "sha256": shas,
            "failures": [json.dumps(f) for f in embedded.failures],
        }
        for member in self.members:
            vectors = embedded.member_vectors[member]
            top = embedded.top_classes.get(member)
            columns[f"vector:{member}"] = [
                _bytes(vectors[rows_of[i]]) if embedded.ok[i] else None for i in range(n)
            ]
            columns[f"top:{member}"] = [
                _bytes(top[rows_of[i]]) if embedded.ok[i] and top is not None else None
                for i in range(n)
            ]
        seconds = (time.perf_counter() - started) / max(1, n)
        cpu_seconds = (time.process_time() - cpu_started) / max(1, n)
        load, self.load_seconds = self.load_seconds / max(1, n), 0.0
        columns["cpu_seconds"] = [cpu_seconds] * n
        # The actor process's whole CPU time so far (start-up and imports included).
        columns["actor"] = [f"{platform.node()}:{os.getpid()}"] * n
        columns["actor_cpu_total"] = [time.process_time()] * n
        columns["fingerprints"] = [json.dumps(self.extractor.fingerprints_, sort_keys=True)] * n
        columns["seconds"] = [seconds] * n
        columns["load_seconds"] = [load] * n
        binary = [name for name in columns if name.startswith(("vector:", "top:"))]
        return pa.table(
            {
                name: pa.array(values, pa.binary() if name in binary else None)
                for name, values in columns.items()
            }
        )


def _bytes(row: np.ndarray) -> bytes:
    # Raw float32 bytes: the driver stores bit for bit what the actor computed.
    return np.ascontiguousarray(row, dtype=np.float32).tobytes()


def extract(
    workspace: Workspace,
    backbone: str,
    *,
    address: str | None,
    batch_size: int,
    weights: Weights,
    runtime: str,
    nearest_resize: bool,
    flip: bool = False,
    progress: Progress | None,
    max_actors: int | None,
    cpus_per_actor: int,
    stats: JobStats | None = None,
) -> ExtractReport:
    """See `imgcluster.distributed.ray_extract`; ``stats`` is filled in if given."""
    with extraction_run(workspace, backbone, batch_size, progress) as run:
        if run.plan.needs:
            options = {
                "backbone": backbone,
                "weights": weights if weights in (None, "default") else str(weights),
                "runtime": runtime,
                "nearest_resize": nearest_resize,
                "flip": flip,
            }
            plan, report = run.plan, run.report
            job = _ExtractJob(
                workspace, run.members, plan.candidates, plan.needs, report, stats or JobStats()
            )
            job.run(options, address, batch_size, progress, max_actors, cpus_per_actor)
    return run.report


class _ExtractJob:
    """The driver's side of one extraction: commit blocks as they come, skip what is done."""

    def __init__(
        self,
        workspace: Workspace,
        members: Sequence[str],
        candidates: dict[str, list[str]],
        needs: dict[str, list[bool]],
        report: ExtractReport,
        stats: JobStats,
    ) -> None:
        self.workspace = workspace
        self.members = list(members)
        self.candidates = candidates
        self.needs = needs
        self.todo = list(needs)  # relpath order, as locally
        self.pending = set(needs)
        self.report = report
        self.stats = stats
        self.fingerprints = ""
        self.failures_of: dict[str, list[tuple[str, str]]] = {}

    def run(
        self,
        options: dict,
        address: str | None,
        batch_size: int,
        progress: Progress | None,
        max_actors: int | None,
        cpus_per_actor: int,
    ) -> None:
        workspace, report, stats = self.workspace, self.report, self.stats
        # The driver loads the network too: it fixes the fingerprints every actor must match,
        # and on a shared cache it converts the model once for all of them.
        started = time.perf_counter()
        local = FeatureExtractor(**options, num_threads=1).load()
        report.runtime = local.runtime_
        report.load_seconds = time.perf_counter() - started
        for member, fingerprint in local.fingerprints_.items():
            check_fingerprint(workspace, member, fingerprint)
        self.fingerprints = json.dumps(local.fingerprints_, sort_keys=True)

        staging = _staging(workspace, f"extract-{report.backbone}")
        # Blocks a killed driver received but did not commit: finished work, keyed by content.
        for leftover in sorted(staging.glob("result-*")):
            if leftover.suffix == ".parquet":
                with contextlib.suppress(OSError, pa.ArrowException, FeaturesMismatch):
                    self.commit(pq.read_table(leftover))
            leftover.unlink(missing_ok=True)

        started = time.perf_counter()
        total = len(self.todo)
        remaining = [sha for sha in self.todo if sha in self.pending]
        if remaining:
            manifest = staging / "manifest.parquet"
            relpaths = [self.candidates[sha] for sha in remaining]
            table = pa.table(
                {
                    "sha256": pa.array(remaining, pa.string()),
                    "relpaths": pa.array(relpaths, pa.list_(pa.string())),
                }
            )
            _write_parquet(manifest, table)
            root = str(workspace.collection_root)
            with connected(address):
                result = _stream(
                    manifest,
                    batch_size,
                    _Embedder,
                    {"root": root, "options": options, "threads": cpus_per_actor},
                    pool=_pool_size(max_actors, cpus_per_actor),
                    cpus_per_actor=cpus_per_actor,
                    in_order=False,  # vectors are keyed by content: any order stores the same
                )
                for block in result:
                    committing = time.perf_counter()
                    with _shard(block, staging) as shard:
                        self.commit(shard)
                    stats.commit_seconds += time.perf_counter() - committing
                    if not stats.first_block_seconds:
                        stats.first_block_seconds = time.perf_counter() - started
                    if progress:
                        progress(total - len(self.pending), total)
            manifest.unlink(missing_ok=True)
        # Failures in the local order: by content in work-list order, files in path order.
        report.failed = [f for sha in self.todo for f in self.failures_of.get(sha, [])]
        report.seconds = stats.wall_seconds = time.perf_counter() - started

    def commit(self, table: pa.Table) -> None:
        """Store one result block: one shard per member, as `extract` stores a batch."""
        every = table.to_pylist()
        stats = self.stats
        stats.compute_seconds += sum(row["seconds"] for row in every)
        stats.compute_cpu_seconds += sum(row["cpu_seconds"] for row in every)
        for row in every:
            seen = stats.actor_cpu.get(row["actor"], 0.0)
            stats.actor_cpu[row["actor"]] = max(seen, row["actor_cpu_total"])
        loads = [row["load_seconds"] for row in every if row["load_seconds"]]
        stats.actor_load_seconds += sum(loads)
        stats.actors += bool(loads)
        stats.blocks += 1
        rows = [row for row in every if row["sha256"] in self.pending]  # a retried block
        for row in rows:
            if row["fingerprints"] != self.fingerprints:
                raise FeaturesMismatch(
                    f"a Ray worker computed {self.report.backbone} with other weights or "
                    f"resizing ({row['fingerprints']}) than the driver ({self.fingerprints}); "
                    "install the same imgcluster and weights on every node"
                )
            self.failures_of[row["sha256"]] = [tuple(f) for f in json.loads(row["failures"])]
        first = f"vector:{self.members[0]}"
        ok = [row for row in rows if row[first] is not None]
        for i, member in enumerate(self.members):
            items = [row for row in ok if self.needs[row["sha256"]][i]]
            if not items:
                continue
            vectors = np.stack([np.frombuffer(r[f"vector:{member}"], np.float32) for r in items])
            tops = [r[f"top:{member}"] for r in items]
            top = (
                np.stack([np.frombuffer(t, np.float32) for t in tops])
                if all(t is not None for t in tops)
                else None
            )
            save_vectors(
                self.workspace, member, [r["sha256"] for r in items], vectors, top_classes=top
            )
        self.report.extracted += len(ok)
        self.report.shared += sum(len(self.candidates[row["sha256"]]) - 1 for row in ok)
        stats.images += len(rows)
        self.pending.difference_update(row["sha256"] for row in rows)
