"""The backend's record: every event the consumer opened, stored once, and what they mean
(holdings, items missing, open alerts, overdue calibration, seq gaps, refused messages) as SQL
views on SQLite or PostgreSQL. See docs/backend.md."""

from __future__ import annotations

import os
from pathlib import Path

from backend.record.db import RecordDb, RecordUnavailable, open_db
from backend.record.schema import SchemaTooNew, ensure_schema

__all__ = [
    "DEFAULT_DB",
    "DSN_ENV",
    "RecordDb",
    "RecordUnavailable",
    "SchemaTooNew",
    "open_record",
    "record_location",
]

DEFAULT_DB = Path("cabinet-record.db")
DB_ENV = "CABINET_RECORD_DB"
# A DSN may hold a password: the environment (or a service file) keeps it out of `ps`.
DSN_ENV = "CABINET_RECORD_DSN"


def record_location(db: Path | None, dsn: str | None) -> tuple[Path | None, str | None]:
    """Which record the options name: ``--dsn`` (or $CABINET_RECORD_DSN unless ``--db`` was
    given) for PostgreSQL, else ``--db`` (or $CABINET_RECORD_DB, else ./cabinet-record.db)."""
    if dsn:
        return None, dsn
    if db is None and os.environ.get(DSN_ENV):
        return None, os.environ[DSN_ENV]
    if db is None:
        db = Path(os.environ.get(DB_ENV) or DEFAULT_DB)
    return db, None


def open_record(db: Path | None = None, dsn: str | None = None) -> RecordDb:
    """Open (and create or upgrade the schema of) the record the options name."""
    path, conn = record_location(db, dsn)
    handle = open_db(path=path, dsn=conn)
    try:
        ensure_schema(handle)
    except BaseException:
        handle.close()
        raise
    return handle
