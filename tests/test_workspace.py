"""The workspace database: creation, migrations, two openers, paths that must not escape."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from imgcluster.errors import InvalidPath, WorkspaceNotFound, WorkspaceVersionError
from imgcluster.workspace import MIGRATIONS, SCHEMA_VERSION, Workspace


def test_open_missing_workspace_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotFound, match="not an imgcluster workspace"):
        Workspace(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_new_workspace_is_wal_with_foreign_keys_and_current_schema(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    assert ws.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    with ws.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # Opening again (as a second process would) neither fails nor re-applies a migration.
    again = Workspace(tmp_path / "ws")
    assert again.schema_version == SCHEMA_VERSION


def test_old_workspace_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "ws"
    path.mkdir()
    conn = sqlite3.connect(path / "imgcluster.sqlite")
    conn.executescript(MIGRATIONS[0][1])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO images(relpath, status) VALUES ('a.jpg', 'ok')")
    conn.commit()
    conn.close()
    ws = Workspace(path)
    assert ws.schema_version == SCHEMA_VERSION
    assert [r.relpath for r in ws.images()] == ["a.jpg"]


def test_newer_workspace_is_refused(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    with ws.read() as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(WorkspaceVersionError, match="newer"):
        Workspace(tmp_path / "ws")


def test_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", create=True)
    revision = ws.revision
    with pytest.raises(RuntimeError), ws.transaction() as conn:
        conn.execute("INSERT INTO images(relpath, status) VALUES ('a.jpg', 'ok')")
        raise RuntimeError("boom")
    assert ws.images(status=None) == []
    assert ws.revision == revision
    with ws.transaction() as conn:
        conn.execute("INSERT INTO images(relpath, status) VALUES ('a.jpg', 'ok')")
    assert ws.revision == revision + 1


def test_collection_root_is_fixed_and_paths_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    ws = Workspace(tmp_path / "ws", create=True)
    ws.set_collection_root(root)
    with pytest.raises(InvalidPath, match="already labels"):
        ws.set_collection_root(tmp_path)
    assert ws.source_path("a/b.jpg") == root / "a" / "b.jpg"
    for hostile in ("../secret.jpg", "/etc/passwd", "a/../../x.jpg"):
        with pytest.raises(InvalidPath, match="outside the image collection"):
            ws.source_path(hostile)


def _open_at_barrier(path: str, barrier) -> None:
    barrier.wait()
    Workspace(path, create=True)


@pytest.mark.slow  # 160 forked processes: 2.5 s idle, 25 s on a loaded 2-core machine
def test_processes_creating_one_workspace_at_the_same_moment(tmp_path: Path) -> None:
    """Switching a new database to WAL is refused at once while another opener holds it;
    every opener must still succeed (this failed in CI as "database is locked")."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(40):
        barrier = ctx.Barrier(4)
        path = str(tmp_path / f"ws{round_}")
        procs = [ctx.Process(target=_open_at_barrier, args=(path, barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"round {round_}"
        assert Workspace(path).schema_version == SCHEMA_VERSION


# -- the one lock scheme, settings and paths ----------------------------------------------------


def test_job_lock_is_exclusive_and_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from imgcluster._process import acquire, holder, is_locked
    from imgcluster.errors import Busy

    lock_path = tmp_path / "job.lock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from imgcluster._process import acquire\n"
            f"lock = acquire({str(lock_path)!r}, what='test job')\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        assert is_locked(lock_path)
        assert holder(lock_path) == f"pid {child.pid} test job"
        with pytest.raises(Busy, match=f"test job is already running \\(pid {child.pid} test job"):
            acquire(lock_path, wait=0.1, what="test job")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not is_locked(lock_path)  # the kernel dropped it: no stale pid to trust
    with acquire(lock_path, wait=0) as lock:
        assert lock.held and is_locked(lock_path)
    assert not is_locked(lock_path)


def test_job_lock_can_be_handed_to_a_child_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    from imgcluster._process import acquire, is_locked

    lock = acquire(tmp_path / "worker.lock", what="worker")
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1.0)"], pass_fds=(lock.fileno(),)
    )
    lock.handover()
    assert is_locked(tmp_path / "worker.lock")  # held by the child alone now
    child.wait()
    assert not is_locked(tmp_path / "worker.lock")


def test_settings_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from imgcluster import settings

    monkeypatch.setenv(settings.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(settings.UMAP_ENV, "0")
    monkeypatch.setenv(settings.OFFLINE_ENV, "1")
    assert settings.cache_dir() == tmp_path / "cache"
    assert settings.numba_cache_dir() == tmp_path / "cache" / "numba"
    assert not settings.umap_enabled() and settings.offline()
    monkeypatch.setenv(settings.UMAP_ENV, "1")
    monkeypatch.setenv(settings.OFFLINE_ENV, "0")
    assert settings.umap_enabled() and not settings.offline()


def test_paths_refuse_escapes_and_honour_allowed_roots(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from imgcluster import paths
    from imgcluster.errors import InvalidPath

    inside = tmp_path / "root" / "photos"
    inside.mkdir(parents=True)
    sibling = tmp_path / "root-sibling"
    sibling.mkdir()
    (inside / "out").symlink_to(sibling)
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", str(tmp_path / "root"))
    roots = paths.allowed_roots(default=[tmp_path])
    assert roots == [(tmp_path / "root").resolve()]
    assert paths.resolve_under("photos", roots) == inside.resolve()
    for bad in ("../root-sibling", str(sibling), "photos/out", "", "photos\x00"):
        with pytest.raises(InvalidPath):
            paths.resolve_under(bad, roots)
    with pytest.raises(InvalidPath, match="use 1-64 letters"):
        paths.new_workspace_dir("../x", home=tmp_path)


def test_uploads_and_exports_folders_live_in_the_workspace(tmp_path: Path) -> None:
    from imgcluster.errors import InvalidPath

    ws = Workspace(tmp_path / "ws", create=True)
    assert ws.uploads_dir == ws.path / "uploads"
    assert ws.export_dir("shirts-v1") == ws.path / "exports" / "shirts-v1"
    with pytest.raises(InvalidPath):
        ws.export_dir("../../etc")
    assert not ws.takes_uploads
    ws.uploads_dir.mkdir()
    ws.set_collection_root(ws.uploads_dir)  # its own uploads: the one allowed inside
    assert ws.takes_uploads
