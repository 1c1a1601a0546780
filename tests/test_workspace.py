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
