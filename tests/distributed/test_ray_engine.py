"""Ingest and extraction on a real local multi-node Ray cluster, against the local engine.

Each test compares with what the local engine stores for the same files: the same image rows
and thumbnails, the same vectors (to 1e-5; in practice bit for bit), the same per-file
reasons. The fault tests remove a worker node mid-job (`Cluster.remove_node`) and SIGKILL a
driver mid-job, and check that nothing is lost or stored twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imgcluster.features import ExtractReport, extract, load_features
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import PROJECT
from tests.distributed.conftest import NODE_ARGS

BACKBONE = "efficientnet-lite0"


# -- helpers ----------------------------------------------------------------------------------


def image_rows(workspace: Workspace) -> list[tuple]:
    """Every image row as the library stores it, with ``duplicate_of`` as a path, not an id."""
    with sqlite3.connect(workspace.db_path) as conn:
        ids = dict(conn.execute("SELECT id, relpath FROM images"))
        rows = conn.execute(
            "SELECT relpath, sha256, size, mtime_ns, width, height, format, status, "
            "skip_reason, duplicate_of FROM images ORDER BY relpath"
        ).fetchall()
    return [(*row[:-1], ids.get(row[-1])) for row in rows]


def stored_twice(workspace: Workspace) -> tuple[int, int, int]:
    """(vectors, distinct contents with a vector, rows in shards): equal when nothing is
    stored twice."""
    with sqlite3.connect(workspace.db_path) as conn:
        n = conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        distinct = conn.execute("SELECT COUNT(DISTINCT sha256) FROM features").fetchone()[0]
        shard_rows = conn.execute("SELECT COALESCE(SUM(n_rows), 0) FROM feature_shards").fetchone()
    return n, distinct, shard_rows[0]


def assert_same_vectors(a: Workspace, b: Workspace) -> None:
    fa, fb = load_features(a, BACKBONE), load_features(b, BACKBONE)
    assert fa.relpaths == fb.relpaths
    assert fa.sha256s == fb.sha256s
    assert len(fa) > 0
    np.testing.assert_allclose(fb.vectors, fa.vectors, rtol=0, atol=1e-5)


def thumbnails(workspace: Workspace) -> dict[str, bytes]:
    return {
        p.relative_to(workspace.path).as_posix(): p.read_bytes()
        for p in sorted((workspace.path / "thumbs").rglob("*.jpg"))
    }


def summary(report: ExtractReport) -> tuple:
    return (report.total, report.extracted, report.reused, report.shared, report.failed)


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory: pytest.TempPathFactory, collection: Path) -> Workspace:
    """The collection ingested and extracted by the local engine: what Ray must reproduce."""
    workspace = Workspace(tmp_path_factory.mktemp("local") / "ws", create=True)
    ingest(workspace, collection)
    extract(workspace, BACKBONE)
    return workspace


# -- without --engine ray, nothing imports ray ------------------------------------------------


def test_local_engine_never_imports_ray(tmp_path: Path, collection: Path) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import imgcluster, imgcluster.cli, imgcluster.distributed\n"
        "assert 'ray' not in sys.modules, 'import'\n"
        f"r = CliRunner().invoke(imgcluster.cli.cli, ['ingest', {str(collection)!r}, "
        f"'-w', {str(tmp_path / 'ws')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'ok ' in r.output, r.output\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ingest'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT, timeout=120)


# -- equal to the local engine ----------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_ray_ingest_and_extract_store_what_local_stores(
    ray_cluster: object, collection: Path, local_reference: Workspace, tmp_path: Path
) -> None:
    from imgcluster.distributed import ray_extract, ray_ingest

    workspace = Workspace(tmp_path / "ws", create=True)
    # Blocks of 16 files: many blocks, so both worker nodes take part.
    report = ray_ingest(workspace, collection, batch_size=16)
    assert image_rows(workspace) == image_rows(local_reference)
    assert thumbnails(workspace) == thumbnails(local_reference)
    assert report.ok == len(local_reference.images("ok"))
    assert dict(report.skipped) == {"not an image": 1, "corrupt image": 1, "empty file": 1}
    assert report.duplicates == 1

    extracted = ray_extract(workspace, BACKBONE, batch_size=16)
    assert extracted.extracted == extracted.total - 1  # one exact duplicate: one vector
    assert extracted.shared == 1 and not extracted.failed
    assert_same_vectors(local_reference, workspace)
    n, distinct, shard_rows = stored_twice(workspace)
    assert n == distinct == shard_rows == extracted.extracted

    # Re-running does only what is missing: nothing.
    again = ray_ingest(workspace, collection)
    assert again.unchanged == again.found and again.new == again.changed == 0
    assert ray_extract(workspace, BACKBONE).extracted == 0


@pytest.mark.ray
@pytest.mark.slow
def test_ray_extract_reports_bad_files_like_local(
    ray_cluster: object, collection: Path, tmp_path: Path
) -> None:
    """Files that changed or vanished after ingest: the same reasons, per file, as locally;
    a content whose first file is gone is read from its identical copy."""
    from imgcluster.distributed import ray_extract

    root = tmp_path / "photos"
    root.mkdir()
    photos = sorted(p for p in collection.rglob("*.jpg") if p.parent.name != "bad")[:12]
    for photo in photos:
        shutil.copy2(photo, root / photo.name)
    shutil.copy2(photos[0], root / "zz-copy.jpg")
    local, remote = (Workspace(tmp_path / name, create=True) for name in ("local", "ray"))
    for workspace in (local, remote):
        ingest(workspace, root)
    (root / photos[0].name).unlink()  # its copy stands in
    (root / photos[1].name).write_bytes(photos[2].read_bytes())  # changed since ingest
    (root / photos[3].name).unlink()  # gone, no copy

    expected = extract(local, BACKBONE)
    got = ray_extract(remote, BACKBONE, batch_size=4)
    assert len(expected.failed) == 3
    assert summary(got) == summary(expected)
    assert_same_vectors(local, remote)


# -- faults -----------------------------------------------------------------------------------


def _feature_count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_does_only_the_rest(
    ray_cluster: object, collection: Path, local_reference: Workspace, tmp_path: Path
) -> None:
    ws_path = tmp_path / "ws"
    workspace = Workspace(ws_path, create=True)
    ingest(workspace, collection)
    total = len({image.sha256 for image in workspace.images("ok")})
    command = [
        sys.executable,
        "-m",
        "imgcluster.cli",
        "extract",
        "-w",
        str(ws_path),
        "--engine",
        "ray",
        "--address",
        ray_cluster.address,  # type: ignore[attr-defined]
        "--batch-size",
        "8",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    driver = subprocess.Popen(
        command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while _feature_count(workspace.db_path) < 16:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the driver committed nothing in 120 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    committed = _feature_count(workspace.db_path)
    assert 16 <= committed < total, "killed too late to test a resume"

    rerun = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    lines = dict(line.split(None, 1) for line in rerun.stdout.splitlines() if line.strip())
    extracted = int(lines["extracted"].split()[0])
    # Only what was missing: a block committed by the killed driver is not computed again.
    assert extracted <= total - committed + 8
    assert_same_vectors(local_reference, workspace)
    n, distinct, shard_rows = stored_twice(workspace)
    assert n == distinct == total
    assert shard_rows == n


@pytest.mark.ray
@pytest.mark.slow
def test_worker_node_removed_mid_job_loses_and_repeats_nothing(
    ray_cluster: object, collection: Path, local_reference: Workspace, tmp_path: Path
) -> None:
    from imgcluster.distributed import ray_extract, ray_ingest

    cluster = ray_cluster
    victim = next(iter(cluster.worker_nodes))  # type: ignore[attr-defined]
    removed: list[int] = []

    def remove_a_node(done: int, total: int) -> None:
        if not removed and done >= 24:
            cluster.remove_node(victim)  # type: ignore[attr-defined]
            removed.append(done)

    workspace = Workspace(tmp_path / "ws", create=True)
    try:
        ray_ingest(workspace, collection, batch_size=16)
        report = ray_extract(workspace, BACKBONE, batch_size=8, progress=remove_a_node)
    finally:
        if removed:
            cluster.add_node(**NODE_ARGS)  # type: ignore[attr-defined]
            cluster.wait_for_nodes()  # type: ignore[attr-defined]
    assert removed and removed[0] < report.extracted, "the node was not removed mid-job"
    assert image_rows(workspace) == image_rows(local_reference)
    assert_same_vectors(local_reference, workspace)
    n, distinct, shard_rows = stored_twice(workspace)
    assert n == distinct == shard_rows == report.extracted


@pytest.mark.ray
@pytest.mark.slow  # starts a Ray cluster: ~6 s
def test_block_received_but_not_committed_is_committed_by_the_next_run(
    collection: Path, local_reference: Workspace, tmp_path: Path
) -> None:
    """A driver killed between receiving a block and committing it leaves the block as a
    Parquet shard; the next run commits it instead of computing it again (here: every
    content, so the next run needs no cluster at all)."""
    pytest.importorskip("ray")
    import pyarrow.parquet as pq

    from imgcluster.distributed import ray_engine, ray_extract

    workspace = Workspace(tmp_path / "ws", create=True)
    ingest(workspace, collection)
    candidates: dict[str, list[str]] = {}
    for image in workspace.images("ok"):
        candidates.setdefault(image.sha256, []).append(image.relpath)
    embedder = ray_engine._Embedder(
        str(collection), {"backbone": BACKBONE, "flip": False}, threads=1
    )
    block = embedder(pa.table({"sha256": list(candidates), "relpaths": list(candidates.values())}))
    staging = workspace.runs_dir / "ray" / f"extract-{BACKBONE}"
    staging.mkdir(parents=True)
    pq.write_table(block, staging / "result-left-by-a-killed-driver.parquet")
    (staging / "result-cut-short.tmp").write_bytes(b"PAR1 half a file")

    report = ray_extract(workspace, BACKBONE, address="ray://nowhere:1")  # never connects
    assert report.extracted == len(candidates)
    assert not list(staging.glob("result-*"))
    assert_same_vectors(local_reference, workspace)


def test_ingest_results_carry_every_field_of_an_examined_file() -> None:
    """A field added to `ExaminedFile` must travel back from the workers too (or it would be
    silently lost on the Ray path only)."""
    pytest.importorskip("ray")
    import dataclasses

    from imgcluster.distributed.ray_engine import _EXAMINED_FIELDS
    from imgcluster.images import ExaminedFile

    assert set(_EXAMINED_FIELDS) == {f.name for f in dataclasses.fields(ExaminedFile)}


@pytest.mark.slow  # imports Ray (several seconds of CPU) to fail one connection
def test_unreachable_cluster_is_one_line_and_exit_1(tmp_path: Path, collection: Path) -> None:
    pytest.importorskip("ray")
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A fresh process: this one may already be connected to the test cluster.
    args = ["ingest", str(collection), "-w", str(tmp_path / "ws"), "--engine", "ray"]
    result = subprocess.run(
        [sys.executable, "-m", "imgcluster.cli", *args, "--address", f"127.0.0.1:{port}"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
