"""Schema and forward-only migrations of the state database."""

from __future__ import annotations

import sqlite3
import time

from agent.store.types import SchemaTooNewError

# Each migration runs once, in order, inside the transaction that records it.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE meta (
                key TEXT PRIMARY KEY,
                value INTEGER NOT NULL
            ) STRICT""",
            """CREATE TABLE outbox (
                seq INTEGER PRIMARY KEY,
                event_id BLOB NOT NULL UNIQUE CHECK (length(event_id) = 16),
                priority INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 9),
                kind TEXT NOT NULL,
                created_us INTEGER NOT NULL,
                size INTEGER NOT NULL,
                envelope BLOB NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                dead INTEGER NOT NULL DEFAULT 0 CHECK (dead IN (0, 1))
            ) STRICT""",
            "CREATE INDEX outbox_evict ON outbox (priority, seq)",
            "CREATE INDEX outbox_age ON outbox (created_us)",
            """CREATE TABLE baseline (
                epc TEXT PRIMARY KEY,
                location TEXT NOT NULL,
                last_seen_us INTEGER NOT NULL
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE kv (
                key TEXT PRIMARY KEY,
                value BLOB NOT NULL,
                updated_us INTEGER NOT NULL
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE audit (
                seq INTEGER PRIMARY KEY,
                at_us INTEGER NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                details TEXT NOT NULL,
                prev_hash BLOB NOT NULL,
                hash BLOB NOT NULL
            ) STRICT""",
            "CREATE INDEX audit_at ON audit (at_us)",
            # One-row tables that must travel with the data they describe.
            """CREATE TABLE audit_anchor (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                seq INTEGER NOT NULL,
                hash BLOB NOT NULL
            ) STRICT""",
            """CREATE TABLE session (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                blob BLOB NOT NULL,
                updated_us INTEGER NOT NULL
            ) STRICT""",
            "INSERT INTO meta (key, value) VALUES ('next_seq', 1)",
        ),
    ),
    (
        2,
        (
            # A running total instead of sum(size) on every write (which grew with the backlog).
            """INSERT INTO meta (key, value)
               SELECT 'outbox_bytes', coalesce(sum(size), 0) FROM outbox""",
            """CREATE TRIGGER outbox_bytes_insert AFTER INSERT ON outbox BEGIN
                   UPDATE meta SET value = value + NEW.size WHERE key = 'outbox_bytes';
               END""",
            """CREATE TRIGGER outbox_bytes_delete AFTER DELETE ON outbox BEGIN
                   UPDATE meta SET value = value - OLD.size WHERE key = 'outbox_bytes';
               END""",
            """CREATE TRIGGER outbox_bytes_update AFTER UPDATE OF size ON outbox BEGIN
                   UPDATE meta SET value = value - OLD.size + NEW.size WHERE key = 'outbox_bytes';
               END""",
        ),
    ),
    (
        3,
        (
            # Audit records v2 (docs/store.md, "Audit log"): the personal fields enter the hash
            # through a salted digest, so erasure can delete them without breaking the chain.
            # Records written before stay v1 and verify as before.
            "ALTER TABLE audit ADD COLUMN v INTEGER NOT NULL DEFAULT 1 CHECK (v IN (1, 2))",
            "ALTER TABLE audit ADD COLUMN salt BLOB",
            "ALTER TABLE audit ADD COLUMN personal BLOB",
            "ALTER TABLE audit ADD COLUMN redacted INTEGER NOT NULL DEFAULT 0 "
            "CHECK (redacted IN (0, 1))",
        ),
    ),
    (
        4,
        (
            # The insert trigger ran an UPDATE of the running total for every row; the outbox's
            # two inserts (Outbox.insert_rows, insert_salvaged) now add what they inserted once
            # per statement. A quarter of the store thread's CPU per 100-row commit, which on a
            # two-core board is taken from the thread sealing the next events
            # (docs/performance.md, "A small board"). Deletes and size updates keep theirs.
            "DROP TRIGGER IF EXISTS outbox_bytes_insert",
        ),
    ),
)

LATEST = MIGRATIONS[-1][0]


def current_version(conn: sqlite3.Connection) -> int:
    """The highest applied migration (0 for an empty database)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to LATEST; refuse a database from a newer agent."""
    version = current_version(conn)
    if version > LATEST:
        raise SchemaTooNewError(
            f"database schema version {version} is newer than this agent's {LATEST}"
        )
    for target, statements in MIGRATIONS:
        if target <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL) STRICT"
            )
            for sql in statements:
                conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_version (version, applied_us) VALUES (?, ?)",
                (target, time.time_ns() // 1000),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version = target
    return version
