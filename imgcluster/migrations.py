"""The workspace schema: numbered steps that build and upgrade the SQLite database.

Kept apart from `imgcluster.workspace` (which opens workspaces, runs these steps once and holds
the ``meta`` and ``images`` readers) because the schema is one concern with its own rule: steps
are only ever appended. This is the one module whose SQL names every table (DDL only); each
table's owner is said beside its step and in ARCHITECTURE.md, and only that owner reads or
writes the table at run time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from imgcluster.errors import WorkspaceCorrupt

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "apply_migrations", "split_sql"]


#: Schema steps, applied in order, each once. The schema version is the number applied (stored in
#: ``PRAGMA user_version``). Append new steps; never edit a released one, so old workspaces migrate.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "images",
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        INSERT INTO meta(key, value) VALUES ('revision', '0');
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            relpath TEXT NOT NULL UNIQUE,
            sha256 TEXT,
            size INTEGER,
            mtime_ns INTEGER,
            width INTEGER,
            height INTEGER,
            format TEXT,
            status TEXT NOT NULL CHECK (status IN ('ok', 'skipped', 'missing')),
            skip_reason TEXT,
            duplicate_of INTEGER REFERENCES images(id) ON DELETE SET NULL,
            added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE INDEX images_sha256 ON images(sha256);
        CREATE INDEX images_status ON images(status);
        """,
    ),
    (
        "features",
        """
        CREATE TABLE feature_shards (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            file TEXT NOT NULL UNIQUE,
            n_rows INTEGER NOT NULL,
            dim INTEGER NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE features (
            backbone TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            shard_id INTEGER NOT NULL REFERENCES feature_shards(id) ON DELETE CASCADE,
            row INTEGER NOT NULL,
            PRIMARY KEY (backbone, sha256)
        ) WITHOUT ROWID;
        CREATE INDEX features_shard ON features(shard_id);
        """,
    ),
    (
        "clusterings",
        """
        CREATE TABLE clusterings (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            k INTEGER NOT NULL,
            algorithm TEXT NOT NULL,
            seed INTEGER NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            centroids_file TEXT,
            n_images INTEGER NOT NULL,
            seconds REAL NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE assignments (
            run_id INTEGER NOT NULL REFERENCES clusterings(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            cluster INTEGER NOT NULL,
            distance REAL NOT NULL,
            silhouette REAL,
            margin REAL,
            PRIMARY KEY (run_id, image_id)
        ) WITHOUT ROWID;
        CREATE INDEX assignments_cluster ON assignments(run_id, cluster, distance);
        CREATE TABLE projections (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            method TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            file TEXT NOT NULL,
            seconds REAL NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            UNIQUE (backbone, method, fingerprint)
        );
        """,
    ),
    (
        "labels",
        # Owned by imgcluster/labels.py. Labels are soft-deleted (deleted_at) so undo and redo
        # bring back the same id, and ids are never reused (AUTOINCREMENT), so a view holding
        # an id never meets another label under it; the audit log stores row-level
        # before/after for every change.
        """
        CREATE TABLE label_sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES clusterings(id),
            backbone TEXT NOT NULL,
            active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
            version INTEGER NOT NULL DEFAULT 0,
            geometry_version INTEGER NOT NULL DEFAULT -1,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE UNIQUE INDEX label_sessions_one_active ON label_sessions(active) WHERE active = 1;
        CREATE TABLE labels (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            name_key TEXT NOT NULL,
            cluster INTEGER,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            deleted_at TEXT
        );
        CREATE INDEX labels_session ON labels(session_id);
        CREATE UNIQUE INDEX labels_live_name ON labels(session_id, name_key)
            WHERE deleted_at IS NULL;
        CREATE TABLE image_labels (
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            label_id INTEGER NOT NULL REFERENCES labels(id),
            confirmed INTEGER NOT NULL DEFAULT 0 CHECK (confirmed IN (0, 1)),
            state TEXT NOT NULL DEFAULT 'normal'
                CHECK (state IN ('normal', 'excluded', 'unsure')),
            confidence REAL,
            distance REAL,
            margin REAL,
            silhouette REAL,
            poor_fit INTEGER NOT NULL DEFAULT 0,
            alt_label_id INTEGER,
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            PRIMARY KEY (session_id, image_id)
        ) WITHOUT ROWID;
        CREATE INDEX image_labels_label ON image_labels(session_id, label_id, distance);
        CREATE INDEX image_labels_fit ON image_labels(session_id, label_id, silhouette);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            actor TEXT NOT NULL,
            at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            op TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('do', 'undo', 'redo')),
            target_id INTEGER REFERENCES audit_log(id),
            status TEXT CHECK (status IN ('done', 'undone', 'dropped')),
            undo_seq INTEGER,
            summary TEXT NOT NULL,
            args TEXT NOT NULL DEFAULT '{}',
            changes TEXT NOT NULL
        );
        CREATE INDEX audit_log_stack ON audit_log(session_id, actor, status, id);
        """,
    ),
    (
        "label_geometry",
        # Owned by imgcluster/labels/geometry.py: derived typicality/misfit numbers leave
        # image_labels for their own table, written only by operations that move images;
        # by_hand marks images a person moved (issue 12 §4: a move does not confirm).
        """
        ALTER TABLE image_labels ADD COLUMN by_hand INTEGER NOT NULL DEFAULT 0
            CHECK (by_hand IN (0, 1));
        CREATE TABLE label_geometry (
            session_id INTEGER NOT NULL REFERENCES label_sessions(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL,
            label_id INTEGER NOT NULL,
            distance REAL,
            margin REAL,
            silhouette REAL,
            poor_fit INTEGER NOT NULL DEFAULT 0,
            alt_label_id INTEGER,
            PRIMARY KEY (session_id, image_id)
        ) WITHOUT ROWID;
        INSERT INTO label_geometry(session_id, image_id, label_id, distance, margin, silhouette,
                                   poor_fit, alt_label_id)
            SELECT session_id, image_id, label_id, distance, margin, silhouette, poor_fit,
                   alt_label_id
            FROM image_labels WHERE distance IS NOT NULL;
        CREATE INDEX label_geometry_typical ON label_geometry(session_id, label_id, distance);
        CREATE INDEX label_geometry_fit ON label_geometry(session_id, label_id, silhouette);
        DROP INDEX image_labels_label;
        DROP INDEX image_labels_fit;
        CREATE INDEX image_labels_by_label
            ON image_labels(session_id, label_id, state, confirmed, by_hand);
        CREATE INDEX label_geometry_misfits ON label_geometry(session_id, label_id)
            WHERE poor_fit = 1;
        ALTER TABLE image_labels DROP COLUMN distance;
        ALTER TABLE image_labels DROP COLUMN margin;
        ALTER TABLE image_labels DROP COLUMN silhouette;
        ALTER TABLE image_labels DROP COLUMN poor_fit;
        ALTER TABLE image_labels DROP COLUMN alt_label_id;
        ALTER TABLE label_sessions ADD COLUMN geometry_token TEXT;
        ALTER TABLE label_sessions ADD COLUMN images_version INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        "images_identity",
        # Owned by imgcluster/images.py. A same-size replacement with its mtime set back keeps
        # (size, mtime) but never its change time (nor, mostly, its inode): ingest compares
        # all four before trusting a stored row.
        """
        ALTER TABLE images ADD COLUMN ctime_ns INTEGER;
        ALTER TABLE images ADD COLUMN inode INTEGER;
        """,
    ),
    (
        "image_catalog",
        # Published by imgcluster/workspace.py: the read-only face of ``images`` that other
        # modules join (features, clustering, labels, check), so none of them names the table
        # itself. A plain projection, so SQLite flattens it into the caller's query and the
        # ``images`` indexes still serve the join (no cost on the labels paging query).
        """
        CREATE VIEW image_catalog AS
            SELECT id, relpath, sha256, status, width, height, format, duplicate_of, updated_at
            FROM images;
        """,
    ),
    (
        "drop_label_geometry",
        # Geometry is derived in-process now (imgcluster/labels/geometry.py): upserting its
        # rows inside every move cost 3-4 s at 100k images, so the table goes.
        "DROP TABLE label_geometry;",
    ),
    (
        "implicit_start_rows",
        # Owned by imgcluster/labels: a session started from a run keeps its start rows
        # implicit (each run image in its cluster's label, unconfirmed, normal) and
        # ``image_labels`` holds only the images that differ from them; ``base`` (JSON: the
        # run, cluster -> label, the run's images left out) says what they are. NULL: every
        # row is in ``image_labels`` (sessions started before). The label index serves the
        # foreign-key check when labels are deleted with an untouched session (the app
        # restarts one on every k change): without it, a scan of every session's rows per
        # label (2.6 s at 1M).
        """
        ALTER TABLE label_sessions ADD COLUMN base TEXT;
        CREATE INDEX image_labels_label_id ON image_labels(label_id);
        """,
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def _apply_migrations(conn: sqlite3.Connection, version: int, db_path: Path) -> None:
    """Run the schema steps after ``version``; a step whose tables already exist means the
    recorded version is wrong (lowered by hand, or lost in a ``.dump`` restore)."""
    existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    if (version == 0 and "meta" in existing) or (version > 0 and "images" not in existing):
        raise WorkspaceCorrupt(
            f"workspace database {db_path} says schema version {version} but holds other "
            "tables (a lowered user_version or a `.dump` restore?); run "
            f"`imgcluster check --workspace {db_path.parent}` for what to do"
        )
    for name, sql in MIGRATIONS[version:]:
        try:
            for statement in _split_sql(sql):
                conn.execute(statement)
        except sqlite3.OperationalError as exc:
            if "already exists" in str(exc) or "duplicate column" in str(exc):
                raise WorkspaceCorrupt(
                    f"workspace database {db_path} says schema version {version} but already "
                    f"has step {name!r} ({exc}); run `imgcluster check --workspace "
                    f"{db_path.parent}` for what to do"
                ) from None
            raise


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (none of ours contain a literal ';')."""
    return [part.strip() for part in script.split(";") if part.strip()]


# Public names (workspace and check use these).
apply_migrations = _apply_migrations
split_sql = _split_sql
