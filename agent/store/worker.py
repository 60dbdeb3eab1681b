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
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.store import db as dbmod
from agent.store.config import StoreConfig
from agent.store.types import (
    AlertKind,
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
_HOUSEKEEPING_S = 300.0


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

    def __init__(self, next_seq: int, alerts: list[StoreAlert]) -> None:
        self.next_seq = next_seq
        self.alerts = alerts


class Worker(threading.Thread):
    """The database thread. Submit jobs from the loop; results come back on the loop."""

    def __init__(
        self,
        cfg: StoreConfig,
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        alert_sink: Callable[[StoreAlert], None],
    ) -> None:
        super().__init__(name=f"store-db:{Path(cfg.path).name}", daemon=True)
        self.cfg = cfg
        self._loop = loop
        self.clock = clock
        self._alert_sink = alert_sink
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._stopping = False
        self._held: deque[Job] = deque()
        self._retry_at = 0.0
        self._retry_delay = cfg.retry_initial_s
        self._disk_full = False
        self._under_load = False
        self._housekeep_at = 0.0
        self._lock_fd: int | None = None
        self._outgoing: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.failed: BaseException | None = None
        self.transactions = 0
        self.db: dbmod.Database | None = None
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
                    self.db.conn.close()
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
                try:
                    self.db.conn.close()
                except sqlite3.Error as err:
                    logger.error("closing the store database failed: %s", err)
            self._unlock()
            self._settle_future(self.finished, None, None)
            self._flush()

    def _open(self) -> None:
        path = Path(self.cfg.path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock(path)
        alerts: list[StoreAlert] = []
        try:
            self.db = dbmod.open_database(path, self.cfg)
        except (sqlite3.DatabaseError, dbmod.CorruptDatabaseError) as err:
            if not isinstance(err, dbmod.CorruptDatabaseError) and sqlite_code(err) not in (
                _SQLITE_CORRUPT,
                _SQLITE_NOTADB,
            ):
                raise
            moved = quarantine(path)
            salvaged = dbmod.salvage_next_seq(moved)
            self.db = dbmod.open_database(path, self.cfg)
            if salvaged is not None and salvaged > 1:
                self.db.conn.execute("BEGIN IMMEDIATE")
                self.db.set_next_seq(salvaged)
                self.db.conn.execute("COMMIT")
            alerts.append(
                StoreAlert(
                    AlertKind.CORRUPT_QUARANTINED,
                    f"corrupt database ({err}) moved to {moved.name}; started a fresh one; "
                    + (
                        f"sequence continues at {salvaged}"
                        if salvaged
                        else "sequence counter could not be recovered and restarts at 1"
                    )
                    + "; undelivered events stay in the quarantined file",
                )
            )
        assert self.db is not None
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            self.db.housekeeping(self._now_us())
            alerts.extend(self.db.alerts)
            self.db.alerts = []
            self.db.conn.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                self.db.conn.execute("ROLLBACK")
            # A full disk at start must not keep the agent down: the pruning waits.
            logger.warning("start-up housekeeping failed: %s", err)
        self._housekeep_at = time.monotonic() + _HOUSEKEEPING_S
        result = OpenResult(self.db.next_seq(), alerts)
        self._settle_future(self.opened, None, result)
        self._flush()

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
            try:
                self._process(work)
                if self._held and time.monotonic() >= self._retry_at:
                    self._retry_held()
                if not self._held and time.monotonic() >= self._housekeep_at:
                    self._housekeep()
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
        if self._held:
            return max(0.0, self._retry_at - now)
        return max(0.0, min(self._housekeep_at - now, _HOUSEKEEPING_S))

    def _process(self, work: deque[Job]) -> None:
        max_rows = self.cfg.group_commit_max_rows
        window = self.cfg.group_commit_window_ms / 1000.0
        while work:
            job = work[0]
            if self._held:
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
        for job, result in done:
            for alert in job.alerts:
                self._alert(alert)
            self._resolve(job, result)
        for job, problem in rejected:
            self._reject(job, problem)
        return True

    def _enter_retry(self, err: sqlite3.Error) -> None:
        full = sqlite_code(err) == _SQLITE_FULL
        first = not self._held
        if first:
            self._retry_delay = self.cfg.retry_initial_s
            if full:
                self._disk_full = True
            self._alert(
                StoreAlert(
                    AlertKind.DISK_FULL if full else AlertKind.WRITE_RETRYING,
                    f"write failed ({err}); keeping pending writes in memory and retrying",
                )
            )
        else:
            self._retry_delay = min(self._retry_delay * 2, self.cfg.retry_max_s)
        # Full jitter keeps many cabinets sharing one disk problem from retrying in step.
        self._retry_at = time.monotonic() + random.uniform(self._retry_delay / 2, self._retry_delay)
        if full and self.db is not None:
            # Free space may have changed: move the page cap with it.
            with contextlib.suppress(sqlite3.Error):
                self.db.apply_page_limit()

    def _retry_held(self) -> None:
        max_rows = self.cfg.group_commit_max_rows
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
        self._alert(
            StoreAlert(
                AlertKind.DISK_FULL_CLEARED,
                "pending writes are durable again" + (" (disk space is back)" if was_full else ""),
            )
        )

    def _housekeep(self) -> None:
        self._housekeep_at = time.monotonic() + _HOUSEKEEPING_S
        now_us = self._now_us()
        job = Job(fn=lambda d: d.housekeeping(now_us), future=None, write=True, ordered=True)
        if not self._run_batch([job]):
            self._held.append(job)

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
    logger.error("corrupt state database moved aside to %s", target)
    return target
