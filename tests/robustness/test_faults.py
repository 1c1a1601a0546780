"""Fault injection: SIGKILL the real CLI/library in a subprocess at random moments, then check
that nothing finished was lost, nothing was half-written and nothing finished is redone.

* extraction (``imgcluster extract``, real efficientnet-lite0, 120 clothing photos): killed 10
  times at random points after its first stored batch, then run to the end;
* export (``imgcluster export --overwrite --zip``, labels changed before each run): killed 10
  times while it copies, swaps or zips; the previous export stays complete at its path, or the
  new one is there complete, and the next export cleans up after the killed one;
* labeling (streams of moves, state changes, renames, merges, confirms, undos and redos by two
  annotators, in two processes at once): both killed at 10 random points; every operation is
  applied completely or not at all, and the state equals a replay of the audit log.

Kill points are drawn from a seeded generator, as delays after the process reported progress
(the first stored batch, the export's build folder, "ready"), so model loading and interpreter
start-up are not what gets killed.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imgcluster.features import delete_features, load_extractor, load_features, save_vectors
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.conftest import PROJECT, SAMPLE_DATA, synthetic_workspace
from tests.robustness.invariants import audit_mismatches, problems

pytestmark = pytest.mark.slow

BACKBONE = "efficientnet-lite0"
KILLS = 10
SEED = 20240611


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgcluster.cli", *args]


def _popen(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll ``ready`` until it holds (True) or the process ends first (False).

    The timeout is generous: on a fresh machine the first extraction converts the network to
    TFLite (and caches it) before its first batch.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return ready()
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"{proc.args} made no progress in {timeout} s")


def _kill(proc: subprocess.Popen) -> tuple[bool, str]:
    """SIGKILL; whether the process was still running (a real kill), and its stdout."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    out, _err = proc.communicate(timeout=60)
    return alive and proc.returncode == -signal.SIGKILL, out


@pytest.fixture(scope="module")
def clothing_120(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 120 shipped CC0 product photos (10 clothing classes x 12), copied (the originals
    stay read-only); always present, so these tests never skip."""
    root = tmp_path_factory.mktemp("clothing") / "photos"
    shutil.copytree(SAMPLE_DATA / "images", root)
    return root


# -- extraction -------------------------------------------------------------------------------


def _stored(ws: Workspace) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """``{sha256: (shard_id, row)}`` and ``{shard_id: n_rows}`` for the backbone."""
    with ws.read() as conn:
        rows = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT sha256, shard_id, row FROM features WHERE backbone = ?", (BACKBONE,)
            )
        }
        shards = dict(
            conn.execute(
                "SELECT id, n_rows FROM feature_shards WHERE backbone = ?", (BACKBONE,)
            ).fetchall()
        )
    return rows, shards


def _unused_shard_rows(ws: Workspace) -> dict[int, int]:
    """Shards holding rows no feature points at: work computed twice (or thrown away)."""
    rows, shards = _stored(ws)
    used: dict[int, int] = defaultdict(int)
    for shard_id, _row in rows.values():
        used[shard_id] += 1
    return {sid: n - used[sid] for sid, n in shards.items() if n != used[sid]}


def _orphan_shards(ws: Workspace) -> list[Path]:
    """Shard files on disk without a database row (a batch killed between file and commit)."""
    with ws.read() as conn:
        known = {r[0] for r in conn.execute("SELECT file FROM feature_shards")}
    folder = ws.features_dir(BACKBONE)
    # One batch is a vector shard plus companions named after it (``<id>.top5.npy``).
    batches = {p.name.split(".", 1)[0] for p in folder.glob("*.npy")}
    return [
        folder / f"{stem}.npy"
        for stem in sorted(batches)
        if (folder / f"{stem}.npy").relative_to(ws.path).as_posix() not in known
    ]


def test_extraction_killed_at_10_points_resumes_without_loss_or_redone_work(
    clothing_120: Path, tmp_path: Path
) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, clothing_120)
    n_images = len(ws.images())
    rng = random.Random(SEED)
    kills = runs = rounds = 0
    while kills < KILLS:
        assert runs <= 3 * KILLS, f"only {kills} kills hit a running extraction"
        before, shards_before = _stored(ws)
        if len(before) == n_images:  # all extracted between kills: start a new round
            delete_features(ws, BACKBONE)
            rounds += 1
            continue
        runs += 1
        proc = _popen(_cli("extract", "--workspace", str(ws.path), "--batch-size", "4"))
        _wait_until(lambda: len(_stored(ws)[1]) > len(shards_before), proc)  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.4))
        kills += _kill(proc)[0]
        after, _shards = _stored(ws)
        assert problems(ws) == []
        # Nothing finished was lost or recomputed: earlier vectors keep their shard and row...
        assert {sha: after[sha] for sha in before} == before
        # ...and no stored shard holds a vector that another shard already had.
        assert _unused_shard_rows(ws) == {}

    before, _shards = _stored(ws)
    final = subprocess.run(
        _cli("extract", "--workspace", str(ws.path), "--batch-size", "4"),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stderr
    assert f"reused     {len(before)}" in final.stdout
    assert f"extracted  {n_images - len(before)} " in final.stdout
    assert problems(ws, complete_features=BACKBONE) == []
    after, _shards = _stored(ws)
    assert {sha: after[sha] for sha in before} == before
    assert _unused_shard_rows(ws) == {}
    # At most the batch in flight per kill was thrown away.
    orphans = _orphan_shards(ws)
    assert len(orphans) <= KILLS
    print(
        f"\nextract: {kills} kills in {runs} runs ({rounds + 1} rounds of {n_images} images); "
        f"{len(orphans)} batch file(s) written but not committed when killed"
    )

    # The stored vectors are the right ones, wherever the kills fell.
    features = load_features(ws, BACKBONE)
    extractor = load_extractor(BACKBONE)
    picks = np.random.default_rng(SEED).choice(len(features), size=6, replace=False)
    fresh = extractor.transform([clothing_120 / features.relpaths[i] for i in picks])
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    assert np.allclose(features.vectors[picks], fresh, atol=1e-5)


# -- export -----------------------------------------------------------------------------------


def _synthetic_vectors(ws: Workspace, backbone: str, n_classes: int = 10) -> None:
    """Deterministic blob vectors keyed by content hash (export and labels need no CNN)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_classes, 64))
    shas = sorted({r.sha256 for r in ws.images()})
    vectors = np.stack(
        [
            centres[int(sha[:8], 16) % n_classes]
            + 0.3 * np.random.default_rng(int(sha[:8], 16)).normal(size=64)
            for sha in shas
        ]
    )
    save_vectors(ws, backbone, shas, vectors)


def _tree(out: Path) -> dict[str, str]:
    """Every file of an export except labels.json (which holds a timestamp), with its hash."""
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "labels.json"
    }


def _building(folder: Path, stale: frozenset[Path] = frozenset()) -> Path | None:
    """The export's build folder beside OUT while there is one (not one left by a kill)."""
    return next(
        (
            p
            for p in folder.glob(".dataset.export-*")
            if p.is_dir() and not p.name.endswith(".old") and p not in stale
        ),
        None,
    )


def _count(folder: Path | None) -> int:
    """Entries in the build folder; "a lot" once it is gone (renamed into place)."""
    try:
        return sum(1 for _ in folder.rglob("*")) if folder else 1 << 30
    except OSError:  # renamed into place while we counted
        return 1 << 30


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except zipfile.BadZipFile:
        return False


@pytest.fixture(scope="module")
def labeled_ws(clothing_120: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from imgcluster.clustering import cluster
    from imgcluster.labels import start_session

    ws = Workspace(tmp_path_factory.mktemp("labeled") / "ws", create=True)
    ingest(ws, clothing_120)
    _synthetic_vectors(ws, "synthetic")
    run = cluster(ws, "synthetic", 10)
    start_session(ws, run.id)
    return ws


def test_export_killed_at_10_points_leaves_a_complete_export(
    labeled_ws: Workspace, tmp_path: Path
) -> None:
    from imgcluster.export import export_workspace, zip_export
    from imgcluster.labels import list_labels, rename

    out = tmp_path / "dataset"
    zipped = tmp_path / "dataset.zip"
    export_workspace(labeled_ws, out)
    zip_export(out)
    current = _tree(out)
    renamed = list_labels(labeled_ws)[0].id
    rng = random.Random(SEED + 1)
    kills = i = 0
    outcomes: dict[str, int] = defaultdict(int)
    while kills < KILLS:
        i += 1
        assert i <= 3 * KILLS, f"only {kills} kills hit a running export ({dict(outcomes)})"
        # Every export differs from the one in place, so "previous" and "new" are told apart.
        rename(labeled_ws, renamed, f"renamed {i}")
        shutil.rmtree(tmp_path / "expected", ignore_errors=True)
        expected = _tree(export_workspace(labeled_ws, tmp_path / "expected").out)
        assert expected != current
        zip_before = zipped.read_bytes()
        stale = frozenset(tmp_path.glob(".dataset.export-*"))  # left by the previous kill
        proc = _popen(
            _cli("export", str(out), "--workspace", str(labeled_ws.path), "--overwrite", "--zip")
        )
        _wait_until(lambda: _building(tmp_path, stale) is not None, proc)  # noqa: B023
        if i % 3 == 1:  # while it copies: once the build holds a random number of entries
            wanted = rng.randint(0, 140)
            _wait_until(lambda: _count(_building(tmp_path, stale)) >= wanted, proc)  # noqa: B023
        elif i % 3 == 2:  # while it writes the zip
            _wait_until(lambda: any(tmp_path.glob(".dataset.zip.*.tmp")), proc)
        else:  # at a random moment after the build started (copy, swap, zip)
            time.sleep(rng.uniform(0.0, 0.4))
        kills += _kill(proc)[0]
        if out.is_dir():
            tree = _tree(out)
            assert tree in (current, expected), "export folder holds a mix or a partial export"
            outcomes["new export complete" if tree == expected else "previous export intact"] += 1
            current = tree
        else:  # killed between the two renames of the swap: the previous one waits aside
            aside = [p for p in tmp_path.glob(".dataset.export-*.old") if p.is_dir()]
            assert len(aside) == 1 and _tree(aside[0]) == current
            outcomes["previous export aside (restored by the next export)"] += 1
        assert zipped.read_bytes() == zip_before or _zip_ok(zipped), "half-written zip"
        assert problems(labeled_ws) == []  # export only reads the workspace
    new = expected

    final = subprocess.run(
        _cli("export", str(out), "--workspace", str(labeled_ws.path), "--overwrite", "--zip"),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stderr
    assert _tree(out) == new
    assert _zip_ok(tmp_path / "dataset.zip")
    print(f"\nexport: {kills} kills in {i} runs; afterwards {dict(outcomes)}")
    # Killed builds, locks and half-written zips are cleaned up by the next export.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".dataset")]
    assert leftovers == []


# -- labeling ---------------------------------------------------------------------------------

_LABEL_WORKER = textwrap.dedent(
    """
    import random, sys
    from imgcluster import labels as L
    from imgcluster.errors import ImgclusterError
    from imgcluster.workspace import Workspace

    ws = Workspace(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    ids = [r.id for r in ws.images()]

    def live_names():
        with ws.read() as conn:
            return [r[0] for r in conn.execute(
                "SELECT name FROM labels WHERE deleted_at IS NULL AND session_id = "
                "(SELECT id FROM label_sessions WHERE active = 1) ORDER BY id")]

    print("ready", file=sys.stderr, flush=True)  # stdout is only for operations done
    n = 0
    while True:
        n += 1
        actor = rng.choice(["alice", "bob"])
        names = live_names()
        some = rng.sample(ids, rng.choice([1, 50, len(ids) // 10, len(ids) // 2]))
        op = rng.choice(["move", "move", "state", "rename", "confirm", "merge", "undo", "undo",
                         "redo"])
        try:
            if op == "move":
                result = L.move(ws, some, rng.choice(names + [f"new {n}"]), actor=actor)
            elif op == "state":
                state = rng.choice(["excluded", "unsure", "normal"])
                result = L.set_state(ws, some, state, actor=actor)
            elif op == "rename":
                result = L.rename(ws, rng.choice(names), f"label {n} «{actor}»", actor=actor)
            elif op == "confirm":
                result = L.confirm(ws, rng.choice(names), actor=actor)
            elif op == "merge" and len(names) > 4:
                result = L.merge(ws, rng.sample(names, 2), actor=actor)
            elif op == "undo":
                result = L.undo(ws, actor=actor)
            elif op == "redo":
                result = L.redo(ws, actor=actor)
            else:
                continue
        except ImgclusterError:
            continue  # nothing to undo, stale undo...: refused, nothing changed
        if result.entry_id is not None:  # None: nothing to change, no audit row
            print("done", op, flush=True)
    """
)


def _audit_rows(ws: Workspace) -> int:
    with ws.read() as conn:
        return conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]


def _synthetic_labeled(path: Path, n: int) -> Workspace:
    """``n`` real tiny images ingested through the library, with blob vectors, clustered into
    10 and labeling started: big enough that one move of half the images takes a while."""
    from imgcluster.clustering import cluster
    from imgcluster.labels import start_session

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    vectors = centres[np.arange(n) % 10] + 0.3 * rng.normal(size=(n, 64))
    ws = synthetic_workspace(path, vectors)
    start_session(ws, cluster(ws, "synthetic", 10).id)
    return ws


def test_label_operations_killed_at_10_points_are_all_or_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from imgcluster.labels import list_labels, move, undo

    labeled_ws = _synthetic_labeled(tmp_path_factory.mktemp("labels"), 8_000)

    rng = random.Random(SEED + 2)
    kills = applied = 0
    for i in range(KILLS):
        # Two annotators' processes at once, each killed at its own random moment.
        before = _audit_rows(labeled_ws)
        procs = [
            _popen([sys.executable, "-c", _LABEL_WORKER, str(labeled_ws.path), str(seed)])
            for seed in (2 * i, 2 * i + 1)
        ]
        for proc in procs:
            # stderr: a buffered read of stdout here could swallow "done" lines that follow.
            lines = iter(proc.stderr.readline, "")
            assert any(line.strip() == "ready" for line in lines), proc.communicate()
        done = 0
        for proc in procs:
            time.sleep(rng.uniform(0.05, 0.5))
            killed, out = _kill(proc)
            kills += killed
            done += out.count("done ")
        added = _audit_rows(labeled_ws) - before
        applied += added
        # Each reported operation wrote its audit row; at most one more per process committed
        # without being reported.
        assert done <= added <= done + len(procs), (done, added)
        assert problems(labeled_ws, thumbnails=False) == []
        assert audit_mismatches(labeled_ws) == []
    assert kills == 2 * KILLS

    # The labels still work after all that: a new step and its undo, consistent.
    summary = list_labels(labeled_ws)
    some = [r.id for r in labeled_ws.images()[:100]]
    move(labeled_ws, some, "carol's new label", actor="carol")  # always a change
    undo(labeled_ws, actor="carol")
    assert list_labels(labeled_ws) == summary
    assert audit_mismatches(labeled_ws) == []
    print(f"\nlabels: {kills} kills; {applied} operations committed, every one audited")
