"""What is moved aside when a database file cannot be trusted, and what is read back from it.

The rows of a quarantined file (and of its WAL) are read page by page by salvage.py; here: the
moves themselves, and what SQL can still tell of the baseline, the kv state and the counter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.store.db import EPOCH_KEY, QUARANTINE_STAMP
from agent.store.seqfile import fsync_dir

logger = logging.getLogger(__name__)


def quarantine(path: Path) -> Path:
    """Move a damaged database and its -wal/-shm aside; return the new database path."""
    stamp = datetime.now(UTC).strftime(QUARANTINE_STAMP)
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("-wal", "-shm", ""):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    fsync_dir(path.parent)
    logger.error("corrupt state database moved aside to %s", target)
    return target


def quarantine_wal(path: Path) -> Path:
    """Move an unreadable -wal (and the -shm indexing it) aside; return the WAL's new path."""
    stamp = datetime.now(UTC).strftime(QUARANTINE_STAMP)
    target = path.with_name(f"{path.name}-wal.corrupt-{stamp}")
    path.with_name(path.name + "-wal").rename(target)
    shm = path.with_name(path.name + "-shm")
    if shm.exists():
        shm.rename(path.with_name(f"{path.name}-shm.corrupt-{stamp}"))
    fsync_dir(path.parent)
    logger.error("unreadable write-ahead log moved aside to %s", target)
    return target


def put_back_prefix(moved: Path, wal: Path, nbytes: int) -> bool:
    """Copy the valid prefix of a damaged WAL (header and whole transactions) back under the
    WAL's name, durably, so SQLite recovers exactly what it would have; False if it cannot
    (no room): the database then opens as of its last checkpoint."""
    if nbytes <= 32:
        return False
    tmp = wal.with_name(wal.name + ".prefix")
    try:
        with moved.open("rb") as src:
            data = src.read(nbytes)
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, wal)
        fsync_dir(wal.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        logger.error("cannot put back the valid part of the damaged WAL: %s", err)
        return False
    return True


@dataclass(frozen=True, slots=True)
class SalvagedState:
    """What a quarantined file still tells by SQL, read in one snapshot."""

    next_seq: int | None
    epoch: bytes | None
    # None: the table could not be read (whole) -- never half a baseline.
    baseline: list[tuple[str, str, int]] | None
    kv: list[tuple[str, bytes, int]]  # the agent's state (``store.*`` keys left out)


def salvage_state(path: Path) -> SalvagedState | None:
    """Best effort: the baseline and kv state of a quarantined file (and its WAL), if readable.

    The store's own keys (epoch, audit head) stay behind: the new database has its own epoch
    and audit chain. Rows that fail their type checks are skipped; a baseline that cannot be
    read whole is not returned at all."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        conn.execute("BEGIN")  # one snapshot: baseline, kv and counter of the same commit
        next_seq: int | None = None
        with contextlib.suppress(sqlite3.Error):
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            if row is not None and isinstance(row[0], int) and 1 <= row[0] < 2**62:
                next_seq = row[0]
        kv: list[tuple[str, bytes, int]] = []
        epoch: bytes | None = None
        with contextlib.suppress(sqlite3.Error):
            for key, value, at in conn.execute("SELECT key, value, updated_us FROM kv"):
                if not (isinstance(key, str) and isinstance(value, bytes) and isinstance(at, int)):
                    continue
                if key == EPOCH_KEY:
                    epoch = value if len(value) == 8 else None
                elif not key.startswith("store."):
                    kv.append((key, value, at))
        baseline: list[tuple[str, str, int]] | None = None
        with contextlib.suppress(sqlite3.Error):
            rows = conn.execute("SELECT epc, location, last_seen_us FROM baseline").fetchall()
            if all(
                isinstance(e, str) and isinstance(loc, str) and isinstance(at, int)
                for e, loc, at in rows
            ):
                baseline = [(str(e), str(loc), int(at)) for e, loc, at in rows]
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return SalvagedState(next_seq, epoch, baseline, kv)


def salvage_next_seq(path: Path) -> int | None:
    """Best effort: the committed sequence counter of a quarantined file, if still readable."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    found: list[int] = []
    try:
        for sql in (
            "SELECT value FROM meta WHERE key = 'next_seq'",
            "SELECT max(seq) + 1 FROM outbox",
        ):
            try:
                row = conn.execute(sql).fetchone()
            except sqlite3.Error:
                continue
            value: Any = row[0] if row else None
            if isinstance(value, int) and 1 <= value < 2**62:
                found.append(value)
    finally:
        conn.close()
    return max(found) if found else None
