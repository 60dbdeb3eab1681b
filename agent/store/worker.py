"""The store's one database thread: owns the connection, group-commits writes, rides out a full disk.

The event loop submits ``Job``s and awaits their futures; nothing here ever runs on the loop.
Write jobs that arrive while a commit is in progress are committed together in one transaction
(each inside its own SAVEPOINT, so one bad job cannot spoil its neighbours). When a commit fails
because the disk or the database is full, the whole batch is kept in memory and retried with
backoff, in order, while reads and space-freeing writes (ack, mark_failed) keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.store import db as dbmod
from agent.store.config import StoreConfig
from agent.store.location import StoreLocationError
from agent.store.salvage import Salvage, SalvagedRow, WalScan, check_wal, salvage, wal_header_valid
from agent.store.seqfile import SeqFile, SeqFileError, SeqState, fsync_dir, new_epoch, seq_path
from agent.store.types import (
    AlertKind,
    Hold,
    OutboxRow,
    StoreAlert,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    StoreLockedError,
)
from drivers.types import Clock

logger = logging.getLogger(__name__)

# Primary SQLite result codes (the low byte of the extended code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_NOMEM = 5, 6, 7
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_PROTOCOL = 10, 11, 13, 15
_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 8, 14, 26
_RETRYABLE = frozenset(
    {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_NOMEM, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_PROTOCOL}
)
_FATAL = frozenset({_SQLITE_CORRUPT, _SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_NOTADB})
_IDENTITY_CHECK_S = 5.0  # how often the path is checked to still name the open database
_HEAL_BACKUP_S = 10.0  # the most a rewrite's copy may take (it runs on the store's thread)
_LOCATION_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


def sqlite_code(err: BaseException) -> int:
    """The primary SQLite result code of an exception (0 if it carries none)."""
    code = getattr(err, "sqlite_errorcode", None)
    return int(code) & 0xFF if isinstance(code, int) else 0


class Fatal(Exception):
    """An error that stops the store."""


@dataclass(eq=False, slots=True)
class Job:
    """One unit of work for the database thread."""

    fn: Callable[[dbmod.Database], Any]
    future: asyncio.Future[Any] | None
    write: bool
    # Ordered jobs keep their place behind writes held back by a full disk;
    # unordered ones (reads, acks, mark_failed) are served meanwhile.
    ordered: bool
    weight: int = 1
    nbytes: int = 0
    on_done: Callable[[BaseException | None], None] | None = None
    alerts: list[StoreAlert] = field(default_factory=list)


class OpenResult:
    """What the worker found when it opened the database."""

    def __init__(
        self, next_seq: int, alerts: list[StoreAlert], epoch: bytes, baseline_proven: bool = True
    ) -> None:
        self.next_seq = next_seq
        self.alerts = alerts
        self.epoch = epoch
        self.baseline_proven = baseline_proven


class Worker(threading.Thread):
    """The database thread. Submit jobs from the loop; results come back on the loop."""

    def __init__(
        self,
        cfg: StoreConfig,
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        alert_sink: Callable[[StoreAlert], None],
        age_clock: Callable[[], datetime | None] | None = None,
        hold_sink: Callable[[Hold | None], None] | None = None,
    ) -> None:
        super().__init__(name=f"store-db:{Path(cfg.path).name}", daemon=True)
        self.cfg = cfg
        self._loop = loop
        self.clock = clock
        # The time age-based pruning judges by (None: not trusted now, the pruning waits).
        self._age_clock = age_clock
        self._age_postponed = False
        self._alert_sink = alert_sink
        self._hold_sink = hold_sink
        # Accepted writes are held in memory (disk full, space limit, failing writes): why, since.
        self.hold: Hold | None = None
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._stopping = False
        self._stop_soon = False
        # The reserve was released to a full disk: new rows wait (acks do not) until it is back.
        self._reserve_spent = False
        self._held: deque[Job] = deque()
        self._retry_at = 0.0
        self._retry_delay = cfg.retry_initial_s
        self._disk_full = False
        self._under_load = False
        self._housekeep_at = 0.0
        self._identity_at = 0.0
        # (st_dev, st_ino) of the open database file and of its WAL, by path.
        self._identity: tuple[int, int] | None = None
        self._wal_identity: tuple[int, int] | None = None
        self.heals = 0
        # A descriptor on the database file, held as long as the connection is open: fsyncs
        # go through it. Closing *any* descriptor of the file drops every POSIX lock the
        # process holds on it, SQLite's too -- and then another process (an operator's sqlite3
        # session) that closes the database deletes our WAL by name under our feet.
        self._db_fd: int | None = None
        self._lock_fd: int | None = None
        self._outgoing: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.failed: BaseException | None = None
        # False when the database may be older or poorer than what the agent last committed
        # (recovered from damage or loss): its baseline must be re-verified before use.
        self.baseline_proven = True
        self.transactions = 0
        self.db: dbmod.Database | None = None
        self.epoch = b""
        self._seqfile = SeqFile(seq_path(Path(cfg.path)))
        self._seq_state = SeqState(bytes(8), 0, 0)
        self._seq_write_failed = False
        # The durable watermark: rows up to _durable_seq are on disk for sure; with NORMAL,
        # commits above it wait for the coalesced WAL fsync due at _sync_at.
        self._committed_seq = 0
        self._durable_seq = 0
        self._sync_at: float | None = None
        self.wal_fsyncs = 0
        self.opened: asyncio.Future[OpenResult] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()

    # -- loop side ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job (never blocks beyond a short lock)."""
        with self._cv:
            if self._stopping:
                raise StoreClosedError("the store is closed")
            if self.failed is not None:
                raise StoreFailedError(f"the store failed: {self.failed}")
            self._queue.append(job)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def begin_stop(self) -> None:
        """The agent is stopping: writes held by a full disk may use the reserve now."""
        with self._cv:
            self._stop_soon = True
            self._cv.notify()

    @property
    def disk_full(self) -> bool:
        return self._disk_full

    # -- thread side ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._open()
        except BaseException as err:  # noqa: BLE001 -- every open failure goes to the awaiting loop
            if self.db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._close_db()
            self._unlock()
            self._settle_future(self.opened, err, None)
            self._settle_future(self.finished, None, None)
            self._flush()
            return
        try:
            self._serve()
        except BaseException as err:  # a bug here must not strand the awaiting callers
            logger.exception("store worker stopped on an unexpected error")
            self._fail_everything(err)
        finally:
            if self.db is not None:
                if self.failed is None:
                    self._close_cleanly()
                try:
                    self._close_db()
                except sqlite3.Error as err:
                    logger.error("closing the store database failed: %s", err)
            self._unlock()
            self._settle_future(self.finished, None, None)
            self._flush()

    def _open(self) -> None:
        path = Path(self.cfg.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock(path)
        except OSError as err:
            if err.errno in _LOCATION_ERRNOS:
                # Where the store lives is a deployment problem, not a crash: one line, exit 78.
                raise StoreLocationError(
                    f"store.path: cannot use {path}: {err.strerror or err}"
                ) from None
            raise
        if path.is_dir():
            raise StoreLocationError(f"store.path: {path} is a directory; name a file in it")
        opening = _Opening(path)
        try:
            opening.remembered = self._seqfile.read()
        except SeqFileError as err:
            opening.sidecar_problem = str(err)
        present = path.exists()
        existed = dbmod.file_size(path) > 0
        wal = dbmod.wal_path(path)
        sound = _header_sound(path)
        if sound and wal_header_valid(wal) is False:
            # SQLite would silently ignore (and later overwrite) a WAL whose header it cannot
            # read, and with it every commit that lived there: keep it and say so.
            moved = quarantine_wal(path)
            opening.stale = True
            opening.alerts.append(
                StoreAlert(
                    AlertKind.WAL_QUARANTINED,
                    f"the database's write-ahead log is not a WAL (bad header); moved to "
                    f"{moved.name}; commits that were only in it are lost",
                )
            )
        elif sound and (scan := check_wal(wal)) is not None and scan.damaged:
            # A damaged frame in the middle: SQLite's recovery stops there and silently drops
            # every later commit (events that may have left, the counter that numbered them).
            # Keep the WAL, salvage its readable rows, let SQLite recover the valid prefix.
            found = salvage(path, wal)
            moved = quarantine_wal(path)
            kept = _put_back_prefix(moved, wal, scan.valid_bytes)
            opening.wal_damage = _WalDamage(scan, moved, found, kept)
        if not existed and (wal.exists() or path.with_name(path.name + "-shm").exists()):
            # The database file is gone or empty but its WAL is not: never let SQLite replay
            # an orphan WAL onto a new file. Move it aside and read what rows it holds.
            moved = quarantine(path)
            opening.orphan = salvage(None, moved.with_name(moved.name + "-wal"))
        try:
            self.db = dbmod.open_database(path, self.cfg)
        except (sqlite3.DatabaseError, dbmod.CorruptDatabaseError) as err:
            if not isinstance(err, dbmod.CorruptDatabaseError) and sqlite_code(err) not in (
                _SQLITE_CORRUPT,
                _SQLITE_NOTADB,
            ):
                raise
            moved = quarantine(path)
            opening.corrupt = (str(err), moved)
            opening.salvage = salvage(moved, moved.with_name(moved.name + "-wal"))
            opening.sql_counter = dbmod.salvage_next_seq(moved)
            opening.state = dbmod.salvage_state(moved)
            self.db = dbmod.open_database(path, self.cfg)
        self._db_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        opening.existed = present
        self._settle_epoch(self.db, opening)
        self._open_housekeeping(self.db, opening.alerts)
        self._maintain_space()
        self._housekeep_at = time.monotonic() + self.cfg.housekeeping_interval_s
        self._remember_identity()
        result = OpenResult(
            self.db.next_seq(), opening.alerts, self.epoch, baseline_proven=self.baseline_proven
        )
        self._settle_future(self.opened, None, result)
        self._flush()

    def _settle_epoch(self, db: dbmod.Database, o: _Opening) -> None:
        """Decide the epoch and where the sequence continues; make it durable before use."""
        block = self.cfg.seq_reserve_block
        remembered = o.remembered
        next_seq = db.next_seq()
        db_epoch = db.epoch()
        epoch = db_epoch
        jump_to = next_seq
        recovery = False
        rescued = o.salvage or o.orphan
        rows: list[SalvagedRow] = sorted(
            (rescued.rows.values() if rescued is not None else ()), key=lambda r: r.seq
        )
        # Whether the baseline (and door session) are what the agent last committed: not when
        # the database opens as of an earlier commit, was lost, or was replaced from damage.
        proven = not o.stale
        if o.wal_damage is not None:
            recovery = True
            proven = False
            found = o.wal_damage.found
            jump_to = max(next_seq, *_counters(found, None, remembered))
            # Rows the recovered prefix knew (below its counter) and lacks were acknowledged.
            rows = sorted(
                (r for r in found.rows.values() if r.seq >= next_seq), key=lambda r: r.seq
            )
            o.alerts.append(_wal_damage_alert(o.wal_damage, jump_to, rows))
        elif o.corrupt is not None:
            recovery = True
            proven = _baseline_current(o.state, o.salvage, remembered)
            jump_to = max(next_seq, *_counters(o.salvage, o.sql_counter, remembered))
            o.alerts.append(_corrupt_alert(o.corrupt, jump_to, o.salvage, o.state, proven))
        elif db.found_version == 0:
            if remembered is not None or o.sidecar_problem or o.orphan is not None:
                recovery = True
                proven = False
                jump_to = max(next_seq, *_counters(o.orphan, None, remembered))
                if remembered is None and o.sidecar_problem:
                    jump_to = max(jump_to, next_seq + block)
                o.alerts.append(_lost_alert(o.existed, jump_to, o.orphan))
        elif o.sidecar_problem:
            recovery = True
            jump_to = next_seq + block
            o.alerts.append(
                StoreAlert(
                    AlertKind.SEQ_STATE_LOST,
                    f"the sequence file is unreadable ({o.sidecar_problem}); the sequence "
                    f"continues at {jump_to}",
                )
            )
        elif remembered is None:
            if db_epoch is not None:
                logger.warning("sequence file %s was missing; recreated", self._seqfile.path)
        elif db_epoch != remembered.epoch:
            recovery = True
            proven = False
            jump_to = max(next_seq, remembered.reserved + 1)
            o.alerts.append(
                StoreAlert(
                    AlertKind.SEQ_ROLLBACK,
                    "the database is not the one the sequence file remembers (another epoch: "
                    f"a restored copy?); the sequence continues at {jump_to}",
                )
            )
        elif next_seq - 1 < remembered.sent_floor:
            recovery = True
            proven = False
            jump_to = remembered.reserved + 1
            o.alerts.append(
                StoreAlert(
                    AlertKind.SEQ_ROLLBACK,
                    f"the database's sequence counter went back to {next_seq - 1}, below "
                    f"{remembered.sent_floor} that may have been sent (a restored backup or "
                    f"lost writes); the sequence continues at {jump_to}",
                )
            )
        if recovery or epoch is None:
            epoch = new_epoch()
        state = SeqState(epoch, jump_to - 1, jump_to - 1)
        if recovery:
            # The sidecar first: if we die before the database commit below, the next start
            # sees another epoch there and moves on again, never back.
            self._seqfile.write(state)
            logger.error(
                "state store: new epoch %s, sequence continues at %d", epoch.hex(), jump_to
            )
        now_us = self._now_us()
        restore = o.state if o.corrupt is not None else None
        if epoch != db_epoch or jump_to != next_seq or rows or restore is not None:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                if restore is not None:
                    # Time floor, documents and their version floors, baseline: what the old
                    # file still tells, in the same commit as the new epoch.
                    db.restore_state(restore)
                if epoch != db_epoch:
                    db.set_epoch(epoch, now_us)
                if jump_to != next_seq:
                    db.set_next_seq(jump_to)
                if rows:
                    db.insert_salvaged(rows)
                db.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.conn.execute("ROLLBACK")
                raise
        self._make_open_durable(db)
        if not recovery and remembered is None:
            try:
                self._seqfile.write(state)
            except OSError as err:
                # Not fatal: until it can be written, delivery holds back every row above
                # ``reserved`` (deliverable() retries the write), so nothing leaves unrecorded.
                logger.error("cannot write the sequence file %s: %s", self._seqfile.path, err)
        self._seq_state = state if recovery or remembered is None else remembered
        self.epoch = epoch
        self.baseline_proven = proven
        self._committed_seq = self._durable_seq = db.next_seq() - 1

    def _make_open_durable(self, db: dbmod.Database) -> None:
        """Schema, epoch and counter reach the database file itself before first use."""
        path = Path(self.cfg.path)
        try:
            db.checkpoint("TRUNCATE")
        except sqlite3.Error as err:  # a full disk: the WAL fsync below still makes it durable
            logger.warning("start-up checkpoint failed: %s", err)
        with contextlib.suppress(FileNotFoundError):
            _fsync_file(dbmod.wal_path(path))  # SQLite holds no lock on the WAL file itself
        self._fsync_db()
        fsync_dir(path.parent)

    def _open_housekeeping(self, db: dbmod.Database, alerts: list[StoreAlert]) -> None:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            db.housekeeping(self.age_us(quiet=True))
            alerts.extend(db.alerts)
            db.alerts = []
            db.conn.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
            db.alerts = []
            # A full disk at start must not keep the agent down: the pruning waits.
            logger.warning("start-up housekeeping failed: %s", err)

    def _close_cleanly(self) -> None:
        """Last commits durable, the WAL folded in, and the sidecar's floor raised to them."""
        assert self.db is not None
        try:
            # Deleted or replaced since the last look (a stop right after an `rm`): the
            # checkpoint below would fold every commit into a file nobody can open again.
            self._check_identity()
            if self.db is None:
                return
            self._make_durable()
            with contextlib.suppress(sqlite3.Error):
                self.db.checkpoint("TRUNCATE")
            state = self._seq_state
            if self._durable_seq > state.sent_floor:
                floor = self._durable_seq
                self._seqfile.write(SeqState(state.epoch, floor, max(state.reserved, floor)))
        except (OSError, Fatal) as err:
            logger.error("state store: final sync failed: %s", err)

    def _lock(self, path: Path) -> None:
        """One agent per database: the seq protocol assumes a single writer."""
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{path} is in use by another process or store (lock {lock_path.name})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _now_us(self) -> int:
        return dbmod.to_us(self.clock.now())

    def age_us(self, *, quiet: bool = False) -> int | None:
        """The time age-based pruning judges by, or None while the age clock is not trusted
        (the change is logged once, unless ``quiet``). Runs in the database thread."""
        if self._age_clock is None:
            return self._now_us()
        at = self._age_clock()
        if quiet:
            return None if at is None else dbmod.to_us(at)
        if at is None:
            if not self._age_postponed:
                logger.info("state store: age-based pruning postponed while the clock is untrusted")
            self._age_postponed = True
            return None
        if self._age_postponed:
            logger.info("state store: age-based pruning resumed (clock trusted)")
        self._age_postponed = False
        return dbmod.to_us(at)

    def _serve(self) -> None:
        work: deque[Job] = deque()
        while True:
            self._flush()
            with self._cv:
                if not self._queue and not self._stopping:
                    self._cv.wait(self._wait_timeout())
                work.extend(self._queue)
                self._queue.clear()
                stopping = self._stopping
                stop_soon = self._stop_soon or stopping
            try:
                if stop_soon and self._held and self.db is not None and self.db.reserve.wanted:
                    self._spend_reserve_for_stop()
                self._process(work)
                if self._sync_at is not None and time.monotonic() >= self._sync_at:
                    self._make_durable()
                if self._paused() and time.monotonic() >= self._retry_at:
                    self._retry_held()
                if not self._paused() and time.monotonic() >= self._housekeep_at:
                    self._housekeep()
                if time.monotonic() >= self._identity_at:
                    self._check_identity()
            except Fatal as err:
                logger.error("state store failed: %s", err)
                # The alert goes first so anyone woken by a failed future already sees it.
                self._outgoing[:0] = [(self._alert_sink, (_failed_alert(err),))]
                exc = StoreFailedError(f"the store failed: {err}")
                for job in work:
                    self._reject(job, exc)
                work.clear()
                self._fail_everything(err, alert=False)
                return
            if stopping:
                with self._cv:
                    if self._queue:
                        continue
                if self._held:
                    self._retry_held()
                if self._held:
                    n = len(self._held)
                    logger.error("store closing with %d write(s) not durable (disk full)", n)
                    for job in self._held:
                        self._reject(
                            job, StoreClosedError("store closed before the write was durable")
                        )
                    self._held.clear()
                return

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = (
            self._retry_at
            if self._paused()
            else min(self._housekeep_at, now + self.cfg.housekeeping_interval_s)
        )
        due = min(due, self._identity_at)
        if self._sync_at is not None:
            due = min(due, self._sync_at)
        return max(0.0, due - now)

    def _process(self, work: deque[Job]) -> None:
        max_rows = self.cfg.group_commit_max_rows
        window = self.cfg.group_commit_window_ms / 1000.0
        while work:
            job = work[0]
            if self._paused():
                work.popleft()
                if job.ordered:
                    self._held.append(job)
                elif not job.write:
                    self._run_read(job)
                elif self._run_batch([job]):
                    # An ack may have freed room: try the held writes again right away.
                    self._retry_at = 0.0
                else:
                    self._held.append(job)
                continue
            if not job.write:
                work.popleft()
                self._run_read(job)
                continue
            batch = [work.popleft()]
            rows = job.weight
            deadline = time.monotonic() + window
            while True:
                while work and work[0].write and rows < max_rows:
                    rows += work[0].weight
                    batch.append(work.popleft())
                if work or rows >= max_rows or not self._under_load:
                    break
                # Under load more writers are likely on their way: give them a moment to
                # join this transaction rather than paying for an fsync of their own.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._flush()
                with self._cv:
                    if not self._queue and not self._stopping:
                        self._cv.wait(remaining)
                    work.extend(self._queue)
                    self._queue.clear()
                if not work:
                    break
            self._under_load = len(batch) > 1 or bool(work)
            if not self._run_batch(batch):
                self._held.extend(batch)

    def _run_read(self, job: Job) -> None:
        self._read(job)
        self._flush()

    def _read(self, job: Job) -> None:
        assert self.db is not None
        try:
            result = job.fn(self.db)
        except Fatal as err:
            self._reject(job, StoreFailedError(f"the store failed: {err}"))
            raise
        except sqlite3.Error as err:
            if sqlite_code(err) in _FATAL:
                self._reject(job, StoreFailedError(f"the store failed: {err}"))
                raise Fatal(str(err)) from err
            self._reject(job, StoreError(f"read failed: {err}"))
            return
        except Exception as err:  # noqa: BLE001 -- a bad request fails alone, the thread goes on
            self._reject(job, err)
            return
        self._resolve(job, result)

    def _run_batch(self, batch: list[Job]) -> bool:
        """Commit the batch as one transaction. False: a retryable failure, nothing written."""
        # No flush when Fatal propagates: the failure alert must reach the loop first.
        committed = self._commit_batch(batch)
        self._flush()
        return committed

    def _commit_batch(self, batch: list[Job]) -> bool:
        assert self.db is not None
        conn = self.db.conn
        done: list[tuple[Job, Any]] = []
        rejected: list[tuple[Job, BaseException]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                self.db.alerts = []
                over_cap = self.db.over_cap
                try:
                    result = job.fn(self.db)
                except sqlite3.Error as err:
                    if sqlite_code(err) in _RETRYABLE or sqlite_code(err) in _FATAL:
                        raise
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    self.db.over_cap = over_cap
                    rejected.append((job, StoreError(f"write rejected: {err}")))
                    continue
                except Exception as err:  # noqa: BLE001 -- a bad request fails alone, the batch goes on
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    self.db.over_cap = over_cap
                    rejected.append((job, err))
                    continue
                conn.execute("RELEASE job")
                job.alerts = self.db.alerts
                done.append((job, result))
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.db.alerts = []
            code = sqlite_code(err)
            if code in _RETRYABLE:
                self._enter_retry(err)
                return False
            failure = StoreFailedError(f"the store failed: {err}")
            for job in batch:
                self._reject(job, failure)
            raise Fatal(str(err)) from err
        self.transactions += 1
        self._committed(batch)
        for job, result in done:
            for alert in job.alerts:
                self._alert(alert)
            self._resolve(job, result)
        for job, problem in rejected:
            self._reject(job, problem)
        return True

    # -- durability -----------------------------------------------------------------------------

    def _committed(self, batch: list[Job]) -> None:
        assert self.db is not None
        if not any(job.ordered for job in batch):
            return  # acks, failure marks: no seq moved
        self._committed_seq = self.db.next_seq() - 1
        if self.cfg.synchronous == "FULL":
            self._durable_seq = self._committed_seq  # COMMIT fsynced the WAL
        elif self._committed_seq > self._durable_seq and self._sync_at is None:
            self._sync_at = time.monotonic() + self.cfg.durability_delay_ms / 1000.0

    def _make_durable(self) -> None:
        """NORMAL: fsync the WAL, which makes every commit written to it so far durable."""
        self._sync_at = None
        target = self._committed_seq
        if target <= self._durable_seq:
            return
        path = Path(self.cfg.path)
        what = self._moved()
        if what is not None:
            # Fsyncing by name would sync some other file (or none): the commits live only in
            # the open, unlinked files. The rewrite fsyncs a whole copy.
            self._heal(what)
            return
        try:
            try:
                _fsync_file(dbmod.wal_path(path))
            except FileNotFoundError:  # everything was checkpointed into the file itself
                self._fsync_db()
        except OSError as err:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing written
            # since the last good sync can be trusted. Stop; the restart re-checks everything.
            raise Fatal(f"fsync of the database failed: {err}") from err
        self.wal_fsyncs += 1
        self._durable_seq = target

    def deliverable(
        self,
        db: dbmod.Database,
        limit: int,
        exclude: Collection[int],
        after_seq: int | None,
        live_first: bool,
    ) -> list[OutboxRow]:
        """Rows the publisher may send now (runs on this thread, as a read job).

        Only rows whose commit is durable (a power cut cannot take them back), and only once
        the sidecar records them: before rows above its ``sent_floor`` are handed out, the
        floor is raised to the highest of them (one small in-place write per delivery read that
        hands out new rows), and ``reserved`` moves a block ahead when it is reached. So a
        database found behind the floor at the next start -- a lost or damaged WAL, a restored
        copy -- is always detected (docs/store.md, "Epochs and the sequence sidecar"). If the
        write fails, rows above ``reserved`` are held back until it works; below it they go
        (the floor is then only as fine as the block).
        """
        if self._committed_seq > self._durable_seq:
            self._make_durable()  # someone is waiting for rows: no reason to wait for the timer
            assert self.db is not None
            db = self.db  # a rewrite (``_heal``) may have reopened it
        rows = db.peek(limit, exclude, after_seq, live_first, max_seq=self._durable_seq)
        top = max((r.seq for r in rows), default=0)
        state = self._seq_state
        if top <= state.sent_floor:
            return rows
        reserved = state.reserved
        if top > reserved:
            reserved = top + self.cfg.seq_reserve_block
        grown = SeqState(state.epoch, top, reserved)
        try:
            self._seqfile.write(grown)
        except OSError as err:
            if not self._seq_write_failed:
                logger.error(
                    "cannot update the sequence file %s (%s): holding back rows above "
                    "seq %d until it works",
                    self._seqfile.path.name,
                    err,
                    state.reserved,
                )
            self._seq_write_failed = True
            return [r for r in rows if r.seq <= state.reserved]
        self._seq_write_failed = False
        self._seq_state = grown
        return rows

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def seq_state(self) -> SeqState:
        return self._seq_state

    # -- disk space ---------------------------------------------------------------------------

    def _paused(self) -> bool:
        """Ordered writes wait: some are held by a full disk, or the reserve must come back."""
        return bool(self._held) or self._reserve_spent

    def _maintain_space(self) -> None:
        """After start, housekeeping and a full disk: WAL back under budget, reserve in place."""
        db = self.db
        assert db is not None
        if db.wal_bytes() > db.wal_budget // 2:
            try:
                db.checkpoint("TRUNCATE")
            except sqlite3.Error as err:
                logger.warning("checkpoint to reclaim the WAL failed: %s", err)
        reserve = db.reserve
        if not reserve.wanted:
            self._reserve_spent = False
            return
        if reserve.present():
            return
        free = dbmod.free_bytes(Path(self.cfg.path).parent)
        # Room for the reserve and as much again for new rows, or new rows would only eat
        # the reserve's place again.
        room = None if free is None else free - self.cfg.min_free_disk_bytes
        if room is not None and room >= 2 * reserve.size and reserve.create():
            fsync_dir(Path(self.cfg.path).parent)
            self._reserve_spent = False
            with contextlib.suppress(sqlite3.Error):
                db.apply_page_limit()

    def _release_reserve(self, why: str) -> bool:
        db = self.db
        assert db is not None
        if not db.reserve.release():
            return False
        self._reserve_spent = db.reserve.wanted
        with contextlib.suppress(OSError):
            fsync_dir(Path(self.cfg.path).parent)
        logger.warning("disk full: released the store's %d-byte reserve (%s)", db.reserve.size, why)
        # Let the WAL be folded into the file now, so the next writes reuse its space.
        with contextlib.suppress(sqlite3.Error):
            db.checkpoint("PASSIVE")
        return True

    def _spend_reserve_for_stop(self) -> None:
        db = self.db
        assert db is not None
        db.reserve.wanted = False
        self._reserve_spent = False
        self._release_reserve("stopping with writes held")
        with contextlib.suppress(sqlite3.Error):
            db.apply_page_limit()
        self._retry_held()

    def _enter_retry(self, err: sqlite3.Error) -> None:
        full = sqlite_code(err) == _SQLITE_FULL
        free = dbmod.free_bytes(Path(self.cfg.path).parent) if full else None
        db = self.db
        fs_full = free is not None and db is not None and free < db.reserve.size
        if full and fs_full and db is not None and db.reserve.present():
            # The filesystem itself is full (not our page cap): something else filled it.
            self._release_reserve("to checkpoint and delete acknowledged rows")
        first = not self._held and not self._disk_full
        if first:
            self._retry_delay = self.cfg.retry_initial_s
            if full:
                self._disk_full = True
            reason, detail = self._full_reason(free) if full else ("writes failing", str(err))
            self._set_hold(Hold(reason, detail, self.clock.now()))
            self._alert(
                StoreAlert(
                    AlertKind.DISK_FULL if full else AlertKind.WRITE_RETRYING,
                    f"{detail}: new events are held in memory (in order, up to "
                    f"{self.cfg.max_pending_writes} writes / {self.cfg.max_pending_bytes} bytes) "
                    "and committed when it clears; a power loss before then loses them",
                )
            )
            self._schedule_retry(backoff=False)
        else:
            self._schedule_retry()
        if full and self.db is not None:
            # Free space may have changed: move the page cap with it.
            with contextlib.suppress(sqlite3.Error):
                self.db.apply_page_limit()

    def _full_reason(self, free: int | None) -> tuple[str, str]:
        """What SQLITE_FULL means here, short and in one line: the filesystem is full, or one
        of the store's own limits (the page cap that keeps min_free_disk_bytes and the WAL
        budget free, or max_db_bytes) stopped the database from growing while the disk still
        has room -- never called "full" then."""
        db = self.db
        path = Path(self.cfg.path)
        # ``free`` was measured before the reserve was given back, if it was.
        if db is None or free is None or free < db.reserve.size:
            where = path.parent
            return "disk full", f"disk full: the filesystem of {where} has no space left"
        if dbmod.file_size(path) + 64 * 1024 >= self.cfg.max_db_bytes:
            return "database size limit", (
                f"the database reached its size limit, [store] max_db_bytes = "
                f"{_mib(self.cfg.max_db_bytes)} (the disk is not full: {_mib(free)} free)"
            )
        return "store space limit", (
            f"the store's space limit is reached, the disk is not full: {_mib(free)} free, "
            f"and the store keeps [store] min_free_disk_bytes ({_mib(self.cfg.min_free_disk_bytes)}) "
            f"plus its WAL budget ({_mib(db.wal_budget)}) free"
        )

    def _set_hold(self, hold: Hold | None) -> None:
        self.hold = hold
        if self._hold_sink is not None:
            self._call_soon(self._hold_sink, hold)

    def _schedule_retry(self, *, backoff: bool = True) -> None:
        if backoff:
            self._retry_delay = min(self._retry_delay * 2, self.cfg.retry_max_s)
        # Full jitter keeps many cabinets sharing one disk problem from retrying in step.
        self._retry_at = time.monotonic() + random.uniform(self._retry_delay / 2, self._retry_delay)

    def _retry_held(self) -> None:
        max_rows = self.cfg.group_commit_max_rows
        # Acks and failure marks first, on their own: deleting delivered rows is what frees
        # space, and it must not wait behind new rows that cannot fit yet.
        loose = [job for job in self._held if job.write and not job.ordered]
        if loose:
            if not self._run_batch(loose):
                return
            done = {id(job) for job in loose}
            self._held = deque(job for job in self._held if id(job) not in done)
        if self._reserve_spent:
            self._maintain_space()
            if self._reserve_spent:
                self._schedule_retry()
                return
        while self._held:
            if not self._held[0].write:
                self._run_read(self._held.popleft())
                continue
            batch: list[Job] = []
            rows = 0
            for job in self._held:
                if not job.write or (batch and rows + job.weight > max_rows):
                    break
                batch.append(job)
                rows += job.weight
            if not self._run_batch(batch):
                return
            for _ in batch:
                self._held.popleft()
        was_full = self._disk_full
        self._disk_full = False
        self._set_hold(None)
        self._retry_delay = self.cfg.retry_initial_s
        spent = self.db is not None and not self.db.reserve.wanted
        why = " (on the disk reserve, while stopping)" if spent else " (disk space is back)"
        self._alert(
            StoreAlert(
                AlertKind.DISK_FULL_CLEARED,
                "pending writes are durable again" + (why if was_full else ""),
            )
        )
        self._maintain_space()

    def _housekeep(self) -> None:
        self._housekeep_at = time.monotonic() + self.cfg.housekeeping_interval_s
        self._check_identity()
        now_us = self.age_us()
        job = Job(fn=lambda d: d.housekeeping(now_us), future=None, write=True, ordered=True)
        if not self._run_batch([job]):
            self._held.append(job)
            return
        self._maintain_space()

    # -- the file under the open database ---------------------------------------------------

    def _remember_identity(self) -> None:
        path = Path(self.cfg.path)
        self._identity = _fd_id(self._db_fd) if self._db_fd is not None else None
        self._wal_identity = _file_id(dbmod.wal_path(path))
        self._identity_at = time.monotonic() + _IDENTITY_CHECK_S

    def _moved(self) -> str | None:
        """How ``[store] path`` stopped naming the open database (None: it still does)."""
        if self.db is None or self._identity is None:
            return None
        path = Path(self.cfg.path)
        now = _file_id(path)
        if now != self._identity:
            return "deleted" if now is None else "replaced by another file"
        if self._wal_identity is not None and _file_id(dbmod.wal_path(path)) != self._wal_identity:
            # Commits would go on into an unlinked WAL, lost at the next crash.
            return "left without its write-ahead log (deleted or replaced)"
        return None

    def _check_identity(self) -> None:
        """Deleted or replaced while we run, every row checkpointed into the old file would be
        lost at the next start (and the WAL, by name, replayed onto another file): heal now."""
        self._identity_at = time.monotonic() + _IDENTITY_CHECK_S
        what = self._moved()
        if what is not None:
            self._heal(what)

    def _heal(self, what: str) -> None:
        """Write the open database back under its name: the store's lock taken again by name
        first (if another process holds it, the files under our names are its own: touch
        none), whatever else sits under our names moved aside, a consistent copy through the
        open connection (sqlite3 backup) fsynced, the old connection closed (its -wal/-shm go
        with it, by name), the copy renamed into place, the directory fsynced, the copy
        reopened. Same epoch, same counter, nothing lost. If it cannot be done, the store fails
        (the agent exits and its restart salvages the WAL) rather than run on an unlinked file.
        """
        db = self.db
        assert db is not None
        path = Path(self.cfg.path)
        wal = dbmod.wal_path(path)
        logger.critical("the state database %s was %s while in use: rewriting it", path, what)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        tmp = path.with_name(path.name + ".heal")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._relock(path)
            # Not ours (a copy put there by hand, a leftover): keep it, out of the way, and
            # never let our connection's close delete someone else's WAL by name.
            if _file_id(path) not in (None, self._identity):
                path.rename(path.with_name(f"{path.name}.replaced-{stamp}"))
            if _file_id(wal) not in (None, self._wal_identity):
                wal.rename(wal.with_name(f"{wal.name}.replaced-{stamp}"))
            tmp.unlink(missing_ok=True)
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                # sqlite3's backup retries a busy or locked database without end: bounded here
                # (the callback runs after every step, busy ones too; raising aborts it).
                give_up = time.monotonic() + _HEAL_BACKUP_S

                def bounded(_status: int, _remaining: int, _total: int) -> None:
                    if time.monotonic() > give_up:
                        raise sqlite3.OperationalError(
                            f"the copy did not complete within {_HEAL_BACKUP_S:g} s (busy)"
                        )

                db.conn.backup(copy, pages=256, progress=bounded, sleep=0.05)
            finally:
                copy.close()
            _fsync_file(tmp)
        except (OSError, sqlite3.Error, StoreError) as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._abandon()
            raise Fatal(
                f"the state database was {what} while in use and could not be rewritten "
                f"({err}); restarting to salvage what is left"
            ) from err
        try:
            self._close_db()  # checkpoints into the old file and removes our -wal/-shm by name
            os.replace(tmp, path)
            fsync_dir(path.parent)
            self.db = dbmod.open_database(path, self.cfg)
            self._db_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, sqlite3.Error, StoreError) as err:
            if tmp.exists():
                logger.critical("a complete copy of the state database is left in %s", tmp)
            raise Fatal(f"the state database could not be reopened after a rewrite: {err}") from err
        if not self._seqfile.path.exists():
            self._seqfile.write(self._seq_state)
        # The copy was fsynced: everything committed is durable now.
        self._durable_seq = self._committed_seq
        self._sync_at = None
        self.heals += 1
        self._remember_identity()
        self._maintain_space()
        self._alert(
            StoreAlert(
                AlertKind.DATABASE_DELETED,
                f"the state database file was {what} while the agent ran; rewritten from the "
                "open database under its name (nothing lost, same epoch and sequence)",
            )
        )
        logger.warning("state database %s rewritten from the open connection", path)

    def _abandon(self) -> None:
        """The heal failed: close the connection without letting SQLite delete the -wal/-shm
        by name (ours: the restart finds the WAL beside a missing database and salvages it;
        another process's: not ours to delete). They are moved aside for the close only."""
        path = Path(self.cfg.path)
        aside: list[tuple[Path, Path]] = []
        for name in (dbmod.wal_path(path), path.with_name(path.name + "-shm")):
            kept = name.with_name(name.name + ".kept")
            with contextlib.suppress(OSError):
                name.rename(kept)
                aside.append((kept, name))
        with contextlib.suppress(sqlite3.Error, OSError):
            self._close_db()
        for kept, name in aside:
            with contextlib.suppress(OSError):
                kept.rename(name)

    def _relock(self, path: Path) -> None:
        """The lock file may have gone with the database: take the lock on its name again."""
        lock_path = path.with_name(path.name + ".lock")
        if self._lock_fd is not None and _file_id(lock_path) == _fd_id(self._lock_fd):
            return
        old = self._lock_fd
        self._lock_fd = None
        try:
            self._lock(path)  # StoreLockedError: another process has taken the store meanwhile
        except BaseException:
            self._lock_fd = old
            raise
        if old is not None:
            os.close(old)

    def _close_db(self) -> None:
        """Close the connection, then the descriptor held beside it (never the other way)."""
        db, fd = self.db, self._db_fd
        self.db = None
        self._db_fd = None
        try:
            if db is not None:
                db.conn.close()
        finally:
            if fd is not None:
                os.close(fd)

    def _fsync_db(self) -> None:
        if self._db_fd is not None:
            _fsync_file(Path(self.cfg.path), self._db_fd)

    def _fail_everything(self, err: BaseException, *, alert: bool = True) -> None:
        with self._cv:
            self.failed = err
            pending = list(self._held) + list(self._queue)
            self._queue.clear()
        self._held.clear()
        if alert:
            self._outgoing[:0] = [(self._alert_sink, (_failed_alert(err),))]
        exc = StoreFailedError(f"the store failed: {err}")
        for job in pending:
            self._reject(job, exc)

    # -- handing results back to the loop -----------------------------------------------------------

    def _resolve(self, job: Job, result: Any) -> None:
        self._call_soon(_settle, job, None, result)

    def _reject(self, job: Job, exc: BaseException) -> None:
        self._call_soon(_settle, job, exc, None)

    def _alert(self, alert: StoreAlert) -> None:
        self._call_soon(self._alert_sink, alert)

    def _settle_future(
        self, fut: asyncio.Future[Any], exc: BaseException | None, result: Any
    ) -> None:
        self._call_soon(_settle_future, fut, exc, result)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        # Buffered: one wake-up of the loop per transaction, not one per row.
        self._outgoing.append((fn, args))

    def _flush(self) -> None:
        if not self._outgoing:
            return
        batch, self._outgoing = self._outgoing, []
        try:
            self._loop.call_soon_threadsafe(_run_all, batch)
        except RuntimeError:
            # The loop is closed: nobody is left to wait for these results.
            logger.debug("event loop closed; dropping %d store callbacks", len(batch))


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _failed_alert(err: BaseException) -> StoreAlert:
    return StoreAlert(AlertKind.FAILED, f"state store stopped: {err}; restart the agent")


def _run_all(batch: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
    for fn, args in batch:
        fn(*args)


def _settle_future(fut: asyncio.Future[Any], exc: BaseException | None, result: Any) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _settle(job: Job, exc: BaseException | None, result: Any) -> None:
    if job.on_done is not None:
        job.on_done(exc)
    if job.future is not None:
        _settle_future(job.future, exc, result)


def quarantine(path: Path) -> Path:
    """Move a damaged database and its -wal/-shm aside; return the new database path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
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
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}-wal.corrupt-{stamp}")
    path.with_name(path.name + "-wal").rename(target)
    shm = path.with_name(path.name + "-shm")
    if shm.exists():
        shm.rename(path.with_name(f"{path.name}-shm.corrupt-{stamp}"))
    fsync_dir(path.parent)
    logger.error("unreadable write-ahead log moved aside to %s", target)
    return target


def _header_sound(path: Path) -> bool:
    try:
        dbmod.check_header(path)
    except dbmod.CorruptDatabaseError:
        return False  # the whole set goes to quarantine, WAL included
    return True


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fd_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fsync_file(path: Path, held: int | None = None) -> None:
    """Fsync ``path`` through ``held`` (a descriptor kept open on it), else through a new one."""
    if held is not None:
        os.fsync(held)
        return
    # On Linux fsync flushes the file's dirty pages whichever descriptor wrote them.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _WalDamage:
    """A WAL damaged in the middle, set aside at open."""

    scan: WalScan
    moved: Path  # where the damaged WAL now is
    found: Salvage  # rows read from the database file and every readable transaction
    kept: bool  # the valid prefix was put back for SQLite to recover


def _put_back_prefix(moved: Path, wal: Path, nbytes: int) -> bool:
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


@dataclass
class _Opening:
    """What open() found, for deciding the epoch."""

    path: Path
    remembered: SeqState | None = None
    sidecar_problem: str | None = None
    existed: bool = True
    corrupt: tuple[str, Path] | None = None
    salvage: Salvage | None = None
    sql_counter: int | None = None
    state: dbmod.SalvagedState | None = None  # baseline and kv read from a quarantined file
    orphan: Salvage | None = None
    wal_damage: _WalDamage | None = None
    stale: bool = False  # the database opens as of an earlier commit (its WAL was lost)
    alerts: list[StoreAlert] = field(default_factory=list)


def _counters(found: Salvage | None, sql_counter: int | None, seq: SeqState | None) -> list[int]:
    """Every lower bound known for the next seq of a database being replaced."""
    out = [1]
    if found is not None:
        out.append(found.max_seq + 1)
        if found.next_seq is not None:
            out.append(found.next_seq)
    if sql_counter is not None:
        out.append(sql_counter)
    if seq is not None:
        out.append(seq.reserved + 1)
    return out


def _wal_damage_alert(damage: _WalDamage, jump_to: int, rows: list[SalvagedRow]) -> StoreAlert:
    scan = damage.scan
    kept = (
        f"the database keeps the {scan.commits} commit(s) before the damage"
        if damage.kept
        else "the database opens as of its last checkpoint (no room to keep the commits before "
        "the damage)"
    )
    if rows:
        live = sum(1 for r in rows if not r.dead)
        saved = (
            f"salvaged {live} undelivered event(s) written after it, seqs "
            f"{rows[0].seq}..{rows[-1].seq}, which will be delivered"
        )
    else:
        saved = "no event written after it could be salvaged"
    return StoreAlert(
        AlertKind.WAL_QUARANTINED,
        f"write-ahead log damaged at frame {scan.bad_frame} of {scan.total_frames} "
        f"({scan.later_commits} later commits SQLite would drop silently): {saved}; new epoch, "
        f"sequence continues at {jump_to}; {kept}; moved to {damage.moved.name}",
        seqs=tuple(r.seq for r in rows)[:1000],
    )


def _rescued(found: Salvage | None) -> str:
    if found is None or not found.rows:
        return "no undelivered event could be salvaged"
    live = sum(1 for r in found.rows.values() if not r.dead)
    if found.freelist_known:
        text = (
            f"salvaged {live} undelivered event(s), seqs {min(found.rows)}..{found.max_seq}, "
            "which will be delivered"
        )
        missing = found.missing_within()
        if missing:
            text += f"; {missing} seq(s) in that range could not be read"
        return text
    # Page 1 unreadable: which pages were free is unknown, so rows already delivered (their
    # pages freed, not yet reused) come back with the undelivered ones, and a seq not found
    # may as well have been delivered long ago. Say so rather than count losses.
    return (
        f"salvaged {live} event(s), seqs {min(found.rows)}..{found.max_seq}, which will be "
        "(re)delivered: the free-page list was unreadable, so some may have been delivered "
        "before (the backend drops those duplicates by event id) and seqs not found in that "
        "range may be delivered ones rather than lost"
    )


def _baseline_current(
    state: dbmod.SalvagedState | None, found: Salvage | None, remembered: SeqState | None
) -> bool:
    """Is the baseline read from a quarantined file the one last committed? Each door cycle
    commits its baseline with its events: it is, when the snapshot it came from numbers every
    seq there is evidence of (rows found on its pages, the sidecar's floor of what was handed
    out) and is of the epoch the sidecar remembers."""
    if state is None or state.baseline is None or state.next_seq is None or remembered is None:
        return False
    if state.epoch != remembered.epoch:
        return False
    highest = max(remembered.sent_floor, found.max_seq if found is not None else 0)
    return state.next_seq - 1 >= highest


def _corrupt_alert(
    corrupt: tuple[str, Path],
    jump_to: int,
    found: Salvage | None,
    state: dbmod.SalvagedState | None,
    proven: bool,
) -> StoreAlert:
    reason, moved = corrupt
    if state is None or (state.baseline is None and not state.kv):
        kept = "baseline and state unreadable"
    else:
        kept = f"{len(state.kv)} state entries (documents, floors) and " + (
            "no baseline recovered"
            if state.baseline is None
            else f"the baseline ({len(state.baseline)} tags, "
            + ("current" if proven else "maybe stale")
            + ") recovered"
        )
    return StoreAlert(
        AlertKind.CORRUPT_QUARANTINED,
        f"corrupt database ({reason}) moved to {moved.name}; started a fresh one; "
        + (
            f"sequence continues at {jump_to}"
            if jump_to > 1
            else "sequence counter could not be recovered and restarts at 1"
        )
        + f"; {_rescued(found)}; {kept}",
        seqs=tuple(sorted(found.rows))[:1000] if found is not None else (),
    )


def _lost_alert(existed: bool, jump_to: int, found: Salvage | None) -> StoreAlert:
    state = "empty" if existed else "missing"
    return StoreAlert(
        AlertKind.DATABASE_LOST,
        f"the state database that existed is {state}: started a new one (allow-list, asset "
        f"registry, baseline and audit chain come back only when re-sent); the sequence "
        f"continues at {jump_to}"
        + ("" if found is None else f"; from its orphan write-ahead log: {_rescued(found)}"),
        seqs=tuple(sorted(found.rows))[:1000] if found is not None else (),
    )
