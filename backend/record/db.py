"""The record's database connection: SQLite (embedded, one file) or PostgreSQL (psycopg 3).

Both speak one SQL text with ``?`` placeholders (rewritten to ``%s`` for psycopg); what differs
between them (column types, row locks, view syntax) is a ``Dialect``. One ``RecordDb`` is one
connection, used by one thread; every write runs in ``transaction()``, which retries what the
database itself calls transient (SQLite busy, PostgreSQL deadlock or serialization failure).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "RecordDb",
    "RecordUnavailable",
    "Tx",
    "open_db",
]

T = TypeVar("T")
# Contention (PostgreSQL deadlock or serialization failure) is retried this often within one
# transaction() call; beyond it, and at once for a database that is away, the caller sees
# RecordUnavailable (the consumer then does not acknowledge the message and tries again later).
TRANSIENT_ATTEMPTS = 20
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_BUSY_ATTEMPTS = 3  # each one already waits up to the busy timeout for the write lock


class RecordUnavailable(RuntimeError):
    """The database cannot take the write now (down, locked beyond the timeout, full disk)."""


@dataclass(frozen=True)
class Dialect:
    """What differs between the two databases, as SQL fragments."""

    name: str
    timestamp: str  # column type of instants
    date: str
    json: str
    blob: str
    bigint: str
    lock_row: str  # appended to a SELECT that must lock the row until commit
    create_view: str  # how a view is (re)defined
    json_text: Callable[[str], str]  # a JSON column as text (LIKE searches)


SQLITE = Dialect(
    name="sqlite",
    timestamp="TEXT",
    date="TEXT",
    json="TEXT",
    blob="BLOB",
    bigint="INTEGER",
    lock_row="",  # BEGIN IMMEDIATE already holds the database's one write lock
    create_view="CREATE VIEW IF NOT EXISTS",
    json_text=lambda col: col,
)
POSTGRES = Dialect(
    name="postgresql",
    timestamp="TIMESTAMPTZ",
    date="DATE",
    json="JSONB",
    blob="BYTEA",
    bigint="BIGINT",
    lock_row=" FOR UPDATE",
    create_view="CREATE OR REPLACE VIEW",
    json_text=lambda col: f"{col}::text",
)


class Tx(Protocol):
    """One open transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""


class RecordDb(Protocol):
    """One connection to the record (not shared between threads)."""

    dialect: Dialect
    where: str  # for messages: a path or a DSN without its password

    def transaction(self, body: Callable[[Tx], T], *, stop: threading.Event | None = None) -> T:
        """Run ``body`` in one transaction, retrying transient failures (``body`` may run more
        than once: it must only touch the database)."""

    def query(
        self, sql: str, params: Sequence[Any] = ()
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of a read-only query."""

    def close(self) -> None: ...


def open_db(*, path: Path | None = None, dsn: str | None = None) -> RecordDb:
    """The record in a SQLite file (``path``) or a PostgreSQL database (``dsn``)."""
    if (path is None) == (dsn is None):
        raise ValueError("give exactly one of a SQLite path or a PostgreSQL DSN")
    if dsn is not None:
        return _PostgresDb(dsn)
    assert path is not None
    return _SqliteDb(path)


# ---------------------------------------------------------------------- SQLite


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class _SqliteDb:
    """WAL mode, so readers never wait and several consumer processes can share the file;
    ``BEGIN IMMEDIATE`` takes the write lock up front (no lock upgrade to deadlock on)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            self._conn = sqlite3.connect(
                path,
                isolation_level=None,
                timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                # Opened on the main thread, then used only by the consumer's network thread.
                check_same_thread=False,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # The commit is the acknowledgement to the broker: it must survive a power cut.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as err:
            raise RecordUnavailable(f"cannot open the record {path}: {err}") from err

    def transaction(self, body: Callable[[Tx], T], *, stop: threading.Event | None = None) -> T:
        for attempt in range(SQLITE_BUSY_ATTEMPTS):
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body(_SqliteTx(self._conn))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.OperationalError as err:
                if not _sqlite_transient(err):
                    # Disk full, I/O error, read-only file...: the caller retries later.
                    raise RecordUnavailable(f"{self.where}: {err}") from err
                _pause(attempt, stop, err)
                continue
            return result
        raise RecordUnavailable(f"{self.where}: still locked after {SQLITE_BUSY_ATTEMPTS} attempts")

    def query(
        self, sql: str, params: Sequence[Any] = ()
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        cur = self._conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description or ()]
        return names, list(cur.fetchall())

    def close(self) -> None:
        self._conn.close()

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")


def _sqlite_transient(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


# ---------------------------------------------------------------------- PostgreSQL


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self._conn.execute(_pg(sql), tuple(params))
        return int(cur.rowcount)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(_pg(sql), tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(_pg(sql), tuple(params)).fetchall())


_PG_SQL: dict[str, str] = {}


def _pg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (our SQL has no other ``?`` nor ``%``)."""
    out = _PG_SQL.get(sql)
    if out is None:
        out = _PG_SQL[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


class _PostgresDb:
    """psycopg 3, autocommit outside ``transaction()``; a lost connection is reopened."""

    dialect = POSTGRES

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as err:
            raise RecordUnavailable(
                "a PostgreSQL record needs psycopg: pip install 'cabinet-agent[postgres]'"
            ) from err
        self._psycopg = psycopg
        self._dsn = dsn
        self.where = _redact_dsn(dsn)
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            raise RecordUnavailable(f"cannot connect to {self.where}: {_pg_reason(err)}") from err

    def transaction(self, body: Callable[[Tx], T], *, stop: threading.Event | None = None) -> T:
        errors = self._psycopg.errors
        transient = (errors.DeadlockDetected, errors.SerializationFailure)
        for attempt in range(TRANSIENT_ATTEMPTS):
            if self._conn is None or self._conn.closed:
                self._connect()  # RecordUnavailable while the server is away
            try:
                with self._conn.transaction():
                    return body(_PgTx(self._conn))
            except transient as err:
                _pause(attempt, stop, err)
            except self._psycopg.OperationalError as err:
                # The server went away (restart, network): the caller tries again later and
                # this connection is reopened then. A commit whose answer was lost may have
                # landed: the retry finds a duplicate, which changes nothing.
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
                raise RecordUnavailable(f"{self.where}: {_pg_reason(err)}") from err
        raise RecordUnavailable(
            f"{self.where}: still contended after {TRANSIENT_ATTEMPTS} attempts"
        )

    def query(
        self, sql: str, params: Sequence[Any] = ()
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if self._conn is None or self._conn.closed:
            self._connect()
        cur = self._conn.execute(_pg(sql), tuple(params))
        names = [d.name for d in cur.description or ()]
        return names, list(cur.fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _redact_dsn(dsn: str) -> str:
    """A DSN fit for a log line: no password, in either DSN syntax."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 (an unparsable DSN is reported by connect itself)
        return "the PostgreSQL record"
    parts.pop("password", None)
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


def _pg_reason(err: Exception) -> str:
    """The server's message without a DSN that may hold a password."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------- retries


def _pause(attempt: int, stop: threading.Event | None, err: Exception) -> None:
    """Sleep before the next attempt (short, growing); stop early when asked to."""
    delay = min(0.01 * (2**attempt), 1.0)
    logger.info("record contended (%s); retrying in %.2f s", _pg_reason(err), delay)
    if stop is not None:
        if stop.wait(delay):
            raise RecordUnavailable("stopping") from err
    else:
        time.sleep(delay)


def iter_rows(db: RecordDb, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
    """A query's rows as dicts."""
    names, rows = db.query(sql, params)
    for row in rows:
        yield dict(zip(names, row, strict=True))
