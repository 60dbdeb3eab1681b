"""The state database behind one connection: opening it, its size, its small tables (kv,
baseline, door session). The outbox and the audit chain are their own modules (outbox.py,
audit_table.py). Only the store's worker thread ever calls these."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.store import schema
from agent.store.audit_table import AuditTable, secure_delete
from agent.store.config import StoreConfig
from agent.store.outbox import Outbox
from agent.store.seqfile import fsync_dir
from agent.store.types import BaselineEntry, StoreError, from_us, to_us

if TYPE_CHECKING:
    from agent.store.quarantine import SalvagedState

logger = logging.getLogger(__name__)

EPOCH_KEY = "store.epoch"
# How a quarantined file's name says when it was moved aside (UTC): quarantine.py writes it.
QUARANTINE_STAMP = "%Y%m%dT%H%M%S.%fZ"
RESERVED_KV_PREFIX = "store."
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MIN_WAL_BYTES = 128 * 1024
_BUSY_MS = 5000
_CHECKPOINT_BUSY_MS = 250
CACHE_KIB = 1024  # the connection's page cache (PRAGMA cache_size, in KiB)

# Primary SQLite result codes (the low byte of the extended code).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM = 5, 6, 7
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_PROTOCOL = 10, 11, 13, 15
SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_NOTADB = 8, 14, 26
# A write failing with these is retried (held in memory meanwhile); with FATAL the store stops.
RETRYABLE = frozenset(
    {SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM, SQLITE_IOERR, SQLITE_FULL, SQLITE_PROTOCOL}
)
FATAL = frozenset({SQLITE_CORRUPT, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_NOTADB})


def sqlite_code(err: BaseException) -> int:
    """The primary SQLite result code of an exception (0 if it carries none)."""
    code = getattr(err, "sqlite_errorcode", None)
    return int(code) & 0xFF if isinstance(code, int) else 0


class Fatal(Exception):
    """An error that stops the store."""


@dataclass(frozen=True, slots=True)
class HousekeepingResult:
    outbox_age_dropped: int
    audit_pruned: int
    max_page_count: int


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def wal_budget(path: Path, cfg: StoreConfig) -> int:
    """Bytes the WAL may occupy: max_wal_bytes, but never more than 1/8 of the filesystem."""
    try:
        st = os.statvfs(path.parent)
        disk = st.f_blocks * st.f_frsize
    except OSError:
        disk = 8 * cfg.max_wal_bytes
    return max(_MIN_WAL_BYTES, min(cfg.max_wal_bytes, disk // 8))


def connect(path: Path, cfg: StoreConfig) -> sqlite3.Connection:
    """Open the database with the store's pragmas (autocommit: transactions are explicit)."""
    if not path.exists():
        # Only the agent's user may read its state, whatever the umask says; SQLite gives
        # the -wal and -shm files the database file's permissions.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=True)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot enable WAL on {path} (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={cfg.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        # The WAL is bounded (docs/store.md, "Disk space"): a checkpoint once it holds half its
        # budget, and truncated back to half after a checkpoint; the page cap leaves room for
        # the whole budget.
        budget = wal_budget(path, cfg)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, budget // 2 // (page_size + 24))}")
        conn.execute(f"PRAGMA journal_size_limit={budget // 2}")
        conn.execute("PRAGMA secure_delete=FAST")  # deleted rows do not linger in free pages
        # Savepoint sub-journals and temporary tables stay in memory: spilled to a temp file
        # they would put the old versions of pages (pseudonyms: an allow-list being replaced,
        # audit rows being redacted) on the disk outside the database (docs/privacy.md §6).
        conn.execute("PRAGMA temp_store=MEMORY")
        # The page cache is per connection and fills up during a backlog drain (SQLite's
        # default: 2 MiB); 1 MiB keeps every interior page of a large outbox (docs/store.md).
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """Problems reported by PRAGMA quick_check (empty when the file is sound)."""
    rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)").fetchall()]
    return [] if rows == ["ok"] else rows


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Reserve:
    """Preallocated disk blocks (``<db>.reserve``) the store gives back when the disk is full.

    The page cap keeps the store itself from filling the disk; this covers something else
    filling it. Released, its blocks let a checkpoint finish and acknowledged rows be deleted
    (and the last writes commit at shutdown); recreated once the space is back.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.wanted = True  # False while stopping: its room may then be used for writes

    def present(self) -> bool:
        return self.path.exists()

    def create(self) -> bool:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            logger.warning("cannot reserve %d bytes of disk for the store: %s", self.size, err)
            return False
        os.close(fd)
        os.replace(tmp, self.path)
        return True

    def release(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


class Database:
    """The state database behind one connection. Not thread-safe: one thread owns it."""

    def __init__(self, conn: sqlite3.Connection, cfg: StoreConfig, found_version: int) -> None:
        self.conn = conn
        self.cfg = cfg
        self.found_version = found_version  # schema version before migrating (0: empty file)
        self.max_page_count = 0
        # Personal data was deleted (retention, erasure): its old versions still sit in WAL
        # frames until a TRUNCATE checkpoint succeeds (Space.maintain retries it).
        self.scrub_pending = False
        self.scrub_why: list[str] = []  # what was deleted, for the log line once it is gone
        path = Path(cfg.path)
        self.wal_budget = wal_budget(path, cfg)
        self.reserve = Reserve(path.with_name(path.name + ".reserve"), self.wal_budget // 2)
        self.outbox = Outbox(conn, cfg)
        self.audit = AuditTable(conn, cfg, self)

    # -- sizing -----------------------------------------------------------------------------

    def apply_page_limit(self) -> int:
        """Cap the file so that it *and its WAL budget* fit below free disk space minus
        min_free_disk_bytes, and below max_db_bytes: the store hits SQLITE_FULL (and keeps
        room to delete acknowledged rows and to checkpoint) before the filesystem hits ENOSPC."""
        path = Path(self.cfg.path)
        page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        pages_now = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = free_bytes(path.parent)
        if free is None:
            free = self.cfg.max_db_bytes
        # What the files occupy now plus what is free, minus the WAL's whole budget (pages that
        # live only in the WAL still need their place in the database file at the checkpoint)
        # and minus the reserve if it has to be made again.
        room = file_size(path) + file_size(wal_path(path)) + free
        room -= self.cfg.min_free_disk_bytes + self.wal_budget
        if self.reserve.wanted and not self.reserve.present():
            room -= self.reserve.size
        limit = min(self.cfg.max_db_bytes, max(0, room))
        pages = max(limit // page_size, pages_now)
        self.max_page_count = int(
            self.conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]
        )
        return self.max_page_count

    def checkpoint(self, mode: str = "PASSIVE") -> bool:
        """Copy the WAL into the database file; True if every frame was (TRUNCATE: and the WAL
        file was cut to zero bytes, giving its blocks back)."""
        if mode == "PASSIVE":
            busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(busy) == 0
        # The other modes wait for readers (another process reading the file): briefly only,
        # this runs on the store's one thread and in the stop budget.
        self.conn.execute(f"PRAGMA busy_timeout={_CHECKPOINT_BUSY_MS}")
        try:
            busy, _log, _done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return int(busy) == 0

    def forget_quarantined(self, why: str, before_us: int | None = None) -> int:
        """Delete the quarantined copies of damaged database files (moved aside before
        ``before_us``; None: all). They hold what the database held — the audit chain, the
        allow-list, the engine state — so they are kept for forensics only as long as the
        audit log itself, and an erasure takes them (docs/privacy.md §6, §7)."""
        gone = 0
        for path, at in quarantined_files(Path(self.cfg.path)):
            if before_us is not None and (at is None or at >= before_us):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                logger.warning("quarantined file %s could not be deleted: %s", path.name, err)
                continue
            gone += 1
        if gone:
            fsync_dir(Path(self.cfg.path).parent)
            logger.info("state store: %d quarantined file(s) deleted (%s)", gone, why)
        return gone

    def deleted_personal_data(self, why: str) -> None:
        """Personal data was deleted (retention, erasure): cut the WAL after this commit."""
        self.scrub_pending = True
        self.scrub_why.append(why)

    def scrub(self) -> None:
        """Deleted personal data out of the WAL: a TRUNCATE checkpoint copies the zeroed pages
        into the file and cuts the WAL (its old frames held the deleted rows) to nothing. With a
        reader in the way it stays pending and is retried after the next write or housekeeping."""
        try:
            if self.checkpoint("TRUNCATE"):
                self.scrub_pending = False
                if self.scrub_why:
                    logger.info(
                        "state store: %s: gone from the file, its free pages and the WAL",
                        "; ".join(self.scrub_why),
                    )
                self.scrub_why = []
        except sqlite3.Error as err:
            logger.warning("checkpoint to scrub deleted records from the WAL failed: %s", err)

    def wal_bytes(self) -> int:
        return file_size(wal_path(Path(self.cfg.path)))

    # -- epoch and recovered state ----------------------------------------------------------

    def restore_state(self, state: SalvagedState) -> None:
        """Put a quarantined file's baseline and kv state into this (fresh) database."""
        if state.baseline is not None:
            self.conn.execute("DELETE FROM baseline")
            self.conn.executemany(
                "INSERT INTO baseline (epc, location, last_seen_us) VALUES (?, ?, ?)",
                state.baseline,
            )
        for key, value, at in state.kv:
            self.kv_put(key, value, at)

    def epoch(self) -> bytes | None:
        raw = self.kv_get(EPOCH_KEY)
        return raw if raw is not None and len(raw) == 8 else None

    def set_epoch(self, epoch: bytes, now_us: int) -> None:
        self.kv_put(EPOCH_KEY, epoch, now_us)

    # -- baseline and session -----------------------------------------------------------------

    def replace_baseline(self, baseline: Mapping[str, BaselineEntry]) -> None:
        self.conn.execute("DELETE FROM baseline")
        self.conn.executemany(
            "INSERT INTO baseline (epc, location, last_seen_us) VALUES (?, ?, ?)",
            [(epc, e.location, to_us(e.last_seen)) for epc, e in baseline.items()],
        )

    def load_baseline(self) -> dict[str, BaselineEntry]:
        # One string per drawer name, not one per row: the engine keeps them for as long as
        # the baseline stands (5,000 tags in 8 drawers: 8 strings instead of 5,000).
        drawers: dict[str, str] = {}
        out: dict[str, BaselineEntry] = {}
        for epc, loc, seen in self.conn.execute("SELECT epc, location, last_seen_us FROM baseline"):
            name = str(loc)
            out[str(epc)] = BaselineEntry(drawers.setdefault(name, name), from_us(int(seen)))
        return out

    def save_session(self, blob: bytes | None, now_us: int) -> None:
        # The engine state names people (pseudonyms): its replaced versions are zeroed, the
        # pages they free included (docs/privacy.md §6), not left in the free list.
        with secure_delete(self.conn):
            self._save_session(blob, now_us)

    def _save_session(self, blob: bytes | None, now_us: int) -> None:
        if blob is None:
            self.conn.execute("DELETE FROM session")
        else:
            self.conn.execute(
                "INSERT INTO session (id, blob, updated_us) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET blob = excluded.blob, updated_us = excluded.updated_us",
                (blob, now_us),
            )

    def load_session(self) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM session WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    # -- kv ---------------------------------------------------------------------------------

    def kv_get(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def kv_put(self, key: str, value: bytes | None, now_us: int) -> None:
        # Documents (an allow-list names people) live here: a replaced version is zeroed,
        # the pages it frees included, not left in the free list.
        with secure_delete(self.conn):
            self._kv_put(key, value, now_us)

    def _kv_put(self, key: str, value: bytes | None, now_us: int) -> None:
        if value is None:
            self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            return
        self.conn.execute(
            "INSERT INTO kv (key, value, updated_us) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_us = excluded.updated_us",
            (key, value, now_us),
        )

    # -- diagnostics ------------------------------------------------------------------------

    def diagnostics(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for pragma in (
            "journal_mode",
            "synchronous",
            "foreign_keys",
            "temp_store",
            "cache_size",
            "page_size",
            "page_count",
            "freelist_count",
            "max_page_count",
        ):
            value = self.conn.execute(f"PRAGMA {pragma}").fetchone()[0]
            out[pragma] = value if isinstance(value, int) else str(value)
        out["schema_version"] = schema.current_version(self.conn)
        for suffix in ("", "-wal", "-shm"):
            try:
                out[f"file_bytes{suffix}"] = os.stat(str(self.cfg.path) + suffix).st_size
            except OSError:
                out[f"file_bytes{suffix}"] = 0
        return out

    # -- housekeeping -------------------------------------------------------------------------

    def housekeeping(self, now_us: int | None) -> HousekeepingResult:
        """Age-prune the outbox, the audit log and quarantined files (not when ``now_us`` is
        None: the clock is not trusted), re-fit the page cap."""
        aged = 0 if now_us is None else self.outbox.prune_age(now_us)
        pruned = 0 if now_us is None else self.audit.prune(now_us)
        if pruned:
            self.deleted_personal_data(
                f"{pruned} audit record(s) older than {self.cfg.audit_retention_days:g} days pruned"
            )
        if now_us is not None:
            cutoff = now_us - int(self.cfg.audit_retention_days * 86_400 * 1_000_000)
            self.forget_quarantined(f"older than {self.cfg.audit_retention_days:g} days", cutoff)
        pages = self.apply_page_limit()
        return HousekeepingResult(aged, pruned, pages)


def quarantined_files(path: Path) -> list[tuple[Path, int | None]]:
    """The files quarantine.py moved aside next to database ``path``, each with the time (µs)
    its name says it was moved aside (None: the name says no time this code reads)."""
    found: list[tuple[Path, int | None]] = []
    for prefix in (f"{path.name}.corrupt-", f"{path.name}-wal.corrupt-"):
        for candidate in path.parent.glob(prefix + "*"):
            stamp = candidate.name[len(prefix) :]
            for tail in ("-wal", "-shm"):
                stamp = stamp.removesuffix(tail)
            try:
                at = datetime.strptime(stamp, QUARANTINE_STAMP).replace(tzinfo=UTC)
            except ValueError:
                found.append((candidate, None))
                continue
            found.append((candidate, to_us(at)))
    return sorted(found)


def check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite opens it (and maybe deletes its -wal)."""
    try:
        with path.open("rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    if head and (len(head) < 100 or not head.startswith(_SQLITE_MAGIC)):
        raise CorruptDatabaseError("file is not an SQLite database (bad header)")


def open_database(path: Path, cfg: StoreConfig) -> Database:
    """Connect, check integrity and migrate; corruption surfaces as sqlite3.DatabaseError."""
    check_header(path)
    conn = connect(path, cfg)
    try:
        problems = quick_check(conn)
        if problems:
            raise CorruptDatabaseError("; ".join(problems[:5]))
        found = schema.current_version(conn)
        schema.migrate(conn)
        db = Database(conn, cfg, found)
        db.apply_page_limit()
    except BaseException:
        conn.close()
        raise
    return db


class CorruptDatabaseError(StoreError):
    """PRAGMA quick_check found damage."""
