"""The store's one database thread: owns the connection, group-commits writes, rides out a full disk.

The event loop submits ``Job``s and awaits their futures; nothing here ever runs on the loop.
Write jobs that arrive while a commit is in progress are committed together in one transaction
(each inside its own SAVEPOINT, so one bad job cannot spoil its neighbours). When a commit fails
because the disk or the database is full, the whole batch is kept in memory and retried with
backoff, in order, while reads and space-freeing writes (ack, mark_failed) keep being served.

Its parts: opening.py (what is found at open, the epoch), dbfile.py (the file under the
connection, its rewrite), watermark.py (durability before delivery), space.py (the reserve and
the hold), handoff.py (jobs in, results out to the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path

from agent.store import db as dbmod
from agent.store import opening
from agent.store.config import StoreConfig
from agent.store.db import Fatal
from agent.store.dbfile import DatabaseFile
from agent.store.handoff import Job, Mailbox, Request, Settle, reject, resolve
from agent.store.seqfile import SeqFile, seq_path
from agent.store.space import Space
from agent.store.types import (
    AlertKind,
    Hold,
    OutboxRow,
    StoreAlert,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    to_us,
)
from agent.store.watermark import Watermark
from drivers.types import Clock

logger = logging.getLogger(__name__)

_IDENTITY_CHECK_S = 5.0  # how often the path is checked to still name the open database


class OpenResult:
    """What the worker found when it opened the database."""

    def __init__(
        self, next_seq: int, alerts: list[StoreAlert], epoch: bytes, baseline_proven: bool = True
    ) -> None:
        self.next_seq = next_seq
        self.alerts = alerts
        self.epoch = epoch
        # False when the database may be older or poorer than what the agent last committed
        # (recovered from damage or loss): its baseline must be re-verified before use.
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
        self.clock = clock
        # The time age-based pruning judges by (None: not trusted now, the pruning waits).
        self._age_clock = age_clock
        self._age_postponed = False
        self._alert_sink = alert_sink
        self._mailbox = Mailbox(loop)
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._stopping = False
        self._stop_soon = False
        self._held: deque[Job] = deque()
        self._under_load = False
        self._housekeep_at = 0.0
        self._identity_at = 0.0
        self.heals = 0
        self.failed: BaseException | None = None
        self.transactions = 0
        # Called on the loop after each committed write transaction (the outbox may differ).
        self.on_commit: Callable[[], None] | None = None
        self.file = DatabaseFile(cfg)
        self._seqfile = SeqFile(seq_path(Path(cfg.path)))
        self.mark = Watermark(cfg, self._seqfile)
        self.space = Space(cfg, clock, self._mailbox, alert_sink, hold_sink)
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
        return self.space.disk_full

    @property
    def durable_seq(self) -> int:
        return self.mark.durable

    @property
    def held_reads(self) -> int:
        return self.mark.held_reads

    @property
    def db(self) -> dbmod.Database | None:
        """The open database (None before the open and after the close)."""
        return self.file.db

    # -- thread side ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._open()
        except BaseException as err:  # noqa: BLE001 -- every open failure goes to the awaiting loop
            if self.db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self.file.close()
            self.file.unlock()
            self._mailbox.post(functools.partial(reject, self.opened, err))
            self._mailbox.post(functools.partial(resolve, self.finished, None))
            self._mailbox.flush()
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
                    self.file.close()
                except sqlite3.Error as err:
                    logger.error("closing the store database failed: %s", err)
            self.file.unlock()
            self._mailbox.post(functools.partial(resolve, self.finished, None))
            self._mailbox.flush()

    def _open(self) -> None:
        found = opening.open_files(self.file, self._seqfile)
        db = self.file.db
        assert db is not None
        settled = opening.settle_epoch(
            self.file, found, self._seqfile, self.cfg.seq_reserve_block, self._now_us()
        )
        self.mark.start(settled.seq_state, db.outbox.next_seq() - 1)
        self._open_housekeeping(db, found.alerts)
        self.space.maintain(db)
        self._housekeep_at = time.monotonic() + self.cfg.housekeeping_interval_s
        self._remember_identity()
        result = OpenResult(
            db.outbox.next_seq(), found.alerts, settled.epoch, settled.baseline_proven
        )
        self._mailbox.post(functools.partial(resolve, self.opened, result))
        self._mailbox.flush()

    def _open_housekeeping(self, db: dbmod.Database, alerts: list[StoreAlert]) -> None:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            db.housekeeping(self.age_us(quiet=True))
            alerts.extend(db.outbox.alerts)
            db.outbox.alerts = []
            db.conn.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
            db.outbox.alerts = []
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
            self.mark.raise_floor()
        except (OSError, Fatal) as err:
            logger.error("state store: final sync failed: %s", err)

    def _now_us(self) -> int:
        return to_us(self.clock.now())

    def age_us(self, *, quiet: bool = False) -> int | None:
        """The time age-based pruning judges by, or None while the age clock is not trusted
        (the change is logged once, unless ``quiet``). Runs in the database thread."""
        if self._age_clock is None:
            return self._now_us()
        at = self._age_clock()
        if quiet:
            return None if at is None else to_us(at)
        if at is None:
            if not self._age_postponed:
                logger.info("state store: age-based pruning postponed while the clock is untrusted")
            self._age_postponed = True
            return None
        if self._age_postponed:
            logger.info("state store: age-based pruning resumed (clock trusted)")
        self._age_postponed = False
        return to_us(at)

    # -- serving --------------------------------------------------------------------------------

    def _serve(self) -> None:
        work: deque[Job] = deque()
        while True:
            self._mailbox.flush()
            with self._cv:
                if not self._queue and not self._stopping:
                    self._cv.wait(self._wait_timeout())
                work.extend(self._queue)
                self._queue.clear()
                stopping = self._stopping
                stop_soon = self._stop_soon or stopping
            try:
                if stop_soon and self._held and self.db is not None and self.db.reserve.wanted:
                    self.space.spend_reserve_for_stop(self.db)
                    self._retry_held()
                self._process(work)
                if self.mark.sync_at is not None and time.monotonic() >= self.mark.sync_at:
                    self._make_durable()
                if self._paused() and time.monotonic() >= self.space.retry_at:
                    self._retry_held()
                if not self._paused() and time.monotonic() >= self._housekeep_at:
                    self._housekeep()
                if time.monotonic() >= self._identity_at:
                    self._check_identity()
            except Fatal as err:
                logger.error("state store failed: %s", err)
                # The alert goes first so anyone woken by a failed future already sees it.
                self._mailbox.post_first(functools.partial(self._alert_sink, _failed_alert(err)))
                exc = StoreFailedError(f"the store failed: {err}")
                for job in work:
                    self._mailbox.post(job.fail(exc))
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
                        self._mailbox.post(
                            job.fail(StoreClosedError("store closed before the write was durable"))
                        )
                    self._held.clear()
                return

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = (
            self.space.retry_at
            if self._paused()
            else min(self._housekeep_at, now + self.cfg.housekeeping_interval_s)
        )
        due = min(due, self._identity_at)
        if self.mark.sync_at is not None:
            due = min(due, self.mark.sync_at)
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
                    self.space.retry_at = 0.0
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
                self._mailbox.flush()
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
        self._mailbox.flush()

    def _read(self, job: Job) -> None:
        assert self.db is not None
        try:
            settle = job.run(self.db)
        except Fatal as err:
            self._mailbox.post(job.fail(StoreFailedError(f"the store failed: {err}")))
            raise
        except sqlite3.Error as err:
            if dbmod.sqlite_code(err) in dbmod.FATAL:
                self._mailbox.post(job.fail(StoreFailedError(f"the store failed: {err}")))
                raise Fatal(str(err)) from err
            self._mailbox.post(job.fail(StoreError(f"read failed: {err}")))
            return
        except Exception as err:  # noqa: BLE001 -- a bad request fails alone, the thread goes on
            self._mailbox.post(job.fail(err))
            return
        self._mailbox.post(settle)

    def _run_batch(self, batch: list[Job]) -> bool:
        """Commit the batch as one transaction. False: a retryable failure, nothing written."""
        # No flush when Fatal propagates: the failure alert must reach the loop first.
        committed = self._commit_batch(batch)
        self._mailbox.flush()
        return committed

    def _commit_batch(self, batch: list[Job]) -> bool:
        assert self.db is not None
        conn = self.db.conn
        outbox = self.db.outbox
        done: list[tuple[Job, Settle]] = []
        rejected: list[tuple[Job, BaseException]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                outbox.alerts = []
                over_cap = outbox.over_cap
                try:
                    settle = job.run(self.db)
                except sqlite3.Error as err:
                    code = dbmod.sqlite_code(err)
                    if code in dbmod.RETRYABLE or code in dbmod.FATAL:
                        raise
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outbox.over_cap = over_cap
                    rejected.append((job, StoreError(f"write rejected: {err}")))
                    continue
                except Exception as err:  # noqa: BLE001 -- a bad request fails alone, the batch goes on
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outbox.over_cap = over_cap
                    rejected.append((job, err))
                    continue
                conn.execute("RELEASE job")
                job.alerts = outbox.alerts
                done.append((job, settle))
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            outbox.alerts = []
            if dbmod.sqlite_code(err) in dbmod.RETRYABLE:
                self.space.failing(self.db, err, holding=bool(self._held))
                return False
            failure = StoreFailedError(f"the store failed: {err}")
            for job in batch:
                self._mailbox.post(job.fail(failure))
            raise Fatal(str(err)) from err
        self.transactions += 1
        if self.on_commit is not None:
            self._mailbox.post(self.on_commit)  # in this transaction's one wake-up of the loop
        if self.db.scrub_pending:
            # Before anyone hears "done": the deleted personal data leaves the WAL too.
            self.db.scrub()
        if any(job.ordered for job in batch):  # acks, failure marks: no seq moved
            self.mark.advance(self.db.outbox.next_seq() - 1)
        for job, settle in done:
            for alert in job.alerts:
                self._alert(alert)
            self._mailbox.post(settle)
        for job, problem in rejected:
            self._mailbox.post(job.fail(problem))
        return True

    # -- durability -----------------------------------------------------------------------------

    def _make_durable(self) -> None:
        """NORMAL: fsync the WAL, which makes every commit written to it so far durable."""
        mark = self.mark
        mark.sync_at = None
        target = mark.committed
        if target <= mark.durable:
            return
        what = self.file.moved()
        if what is not None:
            # Fsyncing by name would sync some other file (or none): the commits live only in
            # the open, unlinked files. The rewrite fsyncs a whole copy.
            self._heal(what)
            return
        try:
            try:
                self.file.sync_wal()
            except FileNotFoundError:  # everything was checkpointed into the file itself
                self.file.sync_file()
        except OSError as err:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing written
            # since the last good sync can be trusted. Stop; the restart re-checks everything.
            raise Fatal(f"fsync of the database failed: {err}") from err
        mark.wal_fsyncs += 1
        mark.durable = target

    def deliverable(
        self,
        db: dbmod.Database,
        limit: int,
        exclude: Collection[int],
        after_seq: int | None,
        live_first: bool,
    ) -> list[OutboxRow]:
        """Rows the publisher may send now (runs on this thread, as a read job): only rows
        whose commit is durable (a power cut cannot take them back), and only once the sequence
        sidecar records them (``Watermark.hand_out``; docs/store.md, "Epochs and the sequence
        sidecar")."""
        if self.mark.behind:
            self._make_durable()  # someone is waiting for rows: no reason to wait for the timer
            assert self.db is not None
            db = self.db  # a rewrite (``_heal``) may have reopened it
        rows = db.outbox.peek(limit, exclude, after_seq, live_first, max_seq=self.mark.durable)
        return self.mark.hand_out(rows)

    # -- held writes ----------------------------------------------------------------------------

    def _paused(self) -> bool:
        """Ordered writes wait: some are held by a full disk, or the reserve must come back."""
        return bool(self._held) or self.space.reserve_spent

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
        if self.space.reserve_spent:
            assert self.db is not None
            self.space.maintain(self.db)
            if self.space.reserve_spent:
                self.space.schedule_retry()
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
        assert self.db is not None
        self.space.cleared(self.db)

    def _housekeep(self) -> None:
        self._housekeep_at = time.monotonic() + self.cfg.housekeeping_interval_s
        self._check_identity()
        now_us = self.age_us()
        job = Request(fn=lambda d: d.housekeeping(now_us), future=None, write=True, ordered=True)
        if not self._run_batch([job]):
            self._held.append(job)
            return
        assert self.db is not None
        self.space.maintain(self.db)

    # -- the file under the open database ---------------------------------------------------

    def _remember_identity(self) -> None:
        self.file.remember_identity()
        self._identity_at = time.monotonic() + _IDENTITY_CHECK_S

    def _check_identity(self) -> None:
        """Deleted or replaced while we run, every row checkpointed into the old file would be
        lost at the next start (and the WAL, by name, replayed onto another file): heal now."""
        self._identity_at = time.monotonic() + _IDENTITY_CHECK_S
        what = self.file.moved()
        if what is not None:
            self._heal(what)

    def _heal(self, what: str) -> None:
        """Write the open database back under its name (``DatabaseFile.rewrite``): same epoch,
        same counter, nothing lost; or the store fails (Fatal) rather than run on an unlinked
        file."""
        self.file.rewrite(what)
        self.mark.keep_sidecar()
        # The copy was fsynced: everything committed is durable now.
        self.mark.all_durable()
        self.heals += 1
        self._remember_identity()
        assert self.db is not None
        self.space.maintain(self.db)
        self._alert(
            StoreAlert(
                AlertKind.DATABASE_DELETED,
                f"the state database file was {what} while the agent ran; rewritten from the "
                "open database under its name (nothing lost, same epoch and sequence)",
            )
        )
        logger.warning("state database %s rewritten from the open connection", self.file.path)

    def _fail_everything(self, err: BaseException, *, alert: bool = True) -> None:
        with self._cv:
            self.failed = err
            pending = list(self._held) + list(self._queue)
            self._queue.clear()
        self._held.clear()
        if alert:
            self._mailbox.post_first(functools.partial(self._alert_sink, _failed_alert(err)))
        exc = StoreFailedError(f"the store failed: {err}")
        for job in pending:
            self._mailbox.post(job.fail(exc))

    def _alert(self, alert: StoreAlert) -> None:
        self._mailbox.post(functools.partial(self._alert_sink, alert))


def _failed_alert(err: BaseException) -> StoreAlert:
    return StoreAlert(AlertKind.FAILED, f"state store stopped: {err}; restart the agent")
