"""Ray engine vs local engine on the clothing photos, in the same run, on a local 3-node cluster.

Runs the local ingest + extraction, then starts a `ray.cluster_utils.Cluster` (a head with no
CPUs, where the driver runs, and ``--workers`` worker nodes of ``--cpus`` logical CPUs) and
runs the Ray ingest + extraction of the same photos into a second workspace. Prints the rates,
the Ray/local overhead ratio, where the Ray job's time went, checks the vectors are the local
ones, and projects 1M images on N workers from the per-actor rate.

    .venv/bin/python bench/ray_extract.py                # 600 photos, 2 workers x 1 CPU
    .venv/bin/python bench/ray_extract.py --limit 200    # quicker

On one 2-core machine Ray cannot be faster than the local path (same cores, plus Ray's
processes); the figures say by how much and where the time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from imgcluster.features import extract, load_features  # noqa: E402
from imgcluster.images import ingest  # noqa: E402
from imgcluster.workspace import Workspace  # noqa: E402

CLOTHING = PROJECT.parent / "shared" / "datasets" / "clothing"
BACKBONE = "efficientnet-lite0"


def _collection(limit: int | None, tmp: Path) -> Path:
    if limit is None:
        return CLOTHING
    root = tmp / "photos"
    photos = sorted(CLOTHING.rglob("*.jpg"))[:limit]
    for photo in photos:
        target = root / photo.relative_to(CLOTHING)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, target)
    return root


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def _tree_cpu() -> dict[str, float]:
    """CPU seconds of this process's descendants (the Ray nodes' daemons) by name, from /proc.

    Own utime + stime of every live descendant except the job's actors, which report their
    own whole CPU time (they are gone when the job ends). The machine may be shared, so wall
    times lie; CPU time does not (much).
    """
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        stats[int(entry.name)] = (name, sum(int(f) for f in fields[11:13]) / tick)
    me, out = os.getpid(), {}
    for pid, (name, cpu) in stats.items():
        up = parents.get(pid)
        while up and up != me:
            up = parents.get(up)
        if up == me and not name.startswith("ray::Map"):
            key = "idle Ray workers" if name.startswith(("ray::", "python")) else name
            out[key] = out.get(key, 0.0) + cpu
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="Only the first N photos.")
    parser.add_argument("--workers", type=int, default=2, help="Worker nodes.")
    parser.add_argument("--cpus", type=int, default=1, help="Logical CPUs per worker node.")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from imgcluster.distributed import ray_extract, ray_ingest
    from imgcluster.distributed.ray_engine import JobStats

    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        root = _collection(args.limit, tmp)
        local = Workspace(tmp / "local", create=True)
        local_ingest, local_ingest_s = _timed(ingest, local, root)
        cpu = time.process_time()
        local_report, local_extract_s = _timed(extract, local, BACKBONE)
        local_cpu = time.process_time() - cpu
        n = local_report.extracted

        cluster, start_s = _timed(
            Cluster,
            initialize_head=True,
            head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20},
        )
        started = time.perf_counter()
        for _ in range(args.workers):
            cluster.add_node(num_cpus=args.cpus, object_store_memory=100 << 20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        start_s += time.perf_counter() - started
        try:
            remote = Workspace(tmp / "ray", create=True)
            ray_ingest_report, ray_ingest_s = _timed(ray_ingest, remote, root)
            stats = JobStats()
            tree, cpu = _tree_cpu(), time.process_time()
            ray_report, ray_extract_s = _timed(
                ray_extract,
                remote,
                BACKBONE,
                batch_size=args.batch_size,
                cpus_per_actor=args.cpus,
                stats=stats,
            )
            driver_cpu = time.process_time() - cpu
            nodes_cpu = _cpu_delta(tree, _tree_cpu())
        finally:
            ray.shutdown()
            cluster.shutdown()
        a, b = load_features(local, BACKBONE), load_features(remote, BACKBONE)
        assert a.relpaths == b.relpaths and ray_report.extracted == n
        diff = float(np.max(np.abs(a.vectors - b.vectors)))
        assert ray_ingest_report.ok == local_ingest.ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    actors = max(1, stats.actors)
    # One actor on one free core: its CPU time per image (the machine may be shared).
    per_actor = n / stats.compute_cpu_seconds
    commit_rate = n / stats.commit_seconds if stats.commit_seconds else float("inf")
    steady = stats.wall_seconds - stats.first_block_seconds
    ray_rate, local_rate = n / ray_extract_s, n / local_extract_s
    print(f"## Ray engine vs local ({n} photos, {args.workers} workers x {args.cpus} CPU)\n")
    print("| step | local | Ray | Ray / local time |")
    print("|---|---|---|---|")
    print(
        f"| ingest | {local_ingest_s:.1f} s ({local_ingest.ok / local_ingest_s:.0f} img/s) "
        f"| {ray_ingest_s:.1f} s ({ray_ingest_report.ok / ray_ingest_s:.0f} img/s) "
        f"| {ray_ingest_s / local_ingest_s:.1f}x |"
    )
    print(
        f"| extract | {local_extract_s:.1f} s ({local_rate:.0f} img/s) "
        f"| {ray_extract_s:.1f} s ({ray_rate:.0f} img/s) "
        f"| {ray_extract_s / local_extract_s:.1f}x |"
    )
    print(f"\ncluster start (3 nodes): {start_s:.1f} s (once per cluster, not per job)")
    actors_cpu = sum(stats.actor_cpu.values())
    ray_cpu = driver_cpu + actors_cpu + sum(nodes_cpu.values())
    print(
        f"CPU time of the extraction: local {local_cpu:.1f} CPU-s, Ray {ray_cpu:.1f} CPU-s "
        f"({ray_cpu / local_cpu:.2f}x) = actors {actors_cpu:.1f} (of which decode + network "
        f"{stats.compute_cpu_seconds:.1f}) + driver {driver_cpu:.1f} + "
        + " + ".join(f"{k} {v:.1f}" for k, v in sorted(nodes_cpu.items(), key=lambda kv: -kv[1]))
    )
    print(f"vectors: max |ray - local| = {diff:.1e}\n")
    print("Where the Ray extraction's time went:\n")
    print(f"- job start to first committed block: {stats.first_block_seconds:.1f} s")
    print(
        f"- actors: {actors}; model load {stats.actor_load_seconds:.2f} s in all "
        f"({stats.actor_load_seconds / actors:.2f} s each)"
    )
    print(
        f"- decode + network inside actors: {stats.compute_seconds:.1f} s wall, "
        f"{stats.compute_cpu_seconds:.1f} CPU-s = {per_actor:.0f} img/s per actor-CPU "
        f"(local: {n / local_cpu:.0f} img/s per CPU-s)"
    )
    print(
        f"- driver commits (Parquet shard + save_vectors): {stats.commit_seconds:.2f} s "
        f"({commit_rate:.0f} img/s ceiling), {stats.blocks} blocks"
    )
    print(
        f"- steady state after the first block: {steady:.1f} s for the rest "
        f"({(n - args.batch_size) / max(steady, 1e-9):.0f} img/s on {actors} actors)"
    )
    print("\nProjection for 1,000,000 images (per-actor rate above, 1 actor per CPU):\n")
    print("| workers x cores | network rate | driver commit ceiling | time |")
    print("|---|---|---|---|")
    for workers, cores in ((1, 8), (4, 8), (16, 8), (64, 8)):
        rate = workers * cores * per_actor
        effective = min(rate, commit_rate)
        hours = (1e6 / effective + stats.first_block_seconds) / 3600
        print(
            f"| {workers} x {cores} | {rate:,.0f} img/s | {commit_rate:,.0f} img/s "
            f"| {hours * 60:.0f} min |"
        )


if __name__ == "__main__":
    main()
