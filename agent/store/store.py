"""The state store's asyncio face: every call becomes a job for the database thread.

Sequence numbers: the caller seals events with the seqs ``next_seq()`` hands out and submits
them in that order; the store checks that every submission continues the sequence exactly
(on the loop at submit time, and again inside the transaction against the committed counter),
so a crash can neither lose nor duplicate a seq. Writes are never withdrawn once accepted:
cancelling the awaiting task does not cancel the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from agent.privacy.pseudonym import is_pseudonym
from agent.store import audit_chain
from agent.store import db as dbmod
from agent.store.config import StoreConfig
from agent.store.db import HousekeepingResult
from agent.store.handoff import Request
from agent.store.types import (
    AlertKind,
    AuditRecord,
    AuditReport,
    BaselineEntry,
    CommitResult,
    Hold,
    OutboxRow,
    OutboxStats,
    SeqConflictError,
    StoreAlert,
    StoreBackloggedError,
    StoreClosedError,
    StoreError,
    from_us,
    to_us,
)
from agent.store.worker import OpenResult, Worker
from drivers.types import Clock, SystemClock

logger = logging.getLogger(__name__)

T = TypeVar("T")

OPEN_TIMEOUT_S = 120.0  # quick_check of a large file on slow flash takes a while
CLOSE_TIMEOUT_S = 30.0
MAX_KV_BYTES = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES = 1024 * 1024


class Keep(enum.Enum):
    KEEP = "keep"


KEEP: Final = Keep.KEEP
"""Pass as ``session`` to commit_cycle to leave the persisted door session as it is."""

_ALERT_LEVELS = {
    "store.disk_full_cleared": logging.WARNING,
    "store.dead_lettered": logging.WARNING,
}


class Store:
    """Outbox, baseline, sequence counter, door session, kv state and audit chain in one file."""

    def __init__(
        self,
        cfg: StoreConfig,
        worker: Worker,
        opened: OpenResult,
        on_alert: Callable[[StoreAlert], None] | None,
    ) -> None:
        self.cfg = cfg
        self._worker = worker
        self._on_alert = on_alert
        self._next_seq = opened.next_seq
        self._seq_dirty = False
        self._seq_lock = asyncio.Lock()
        self._seq_owner: asyncio.Task[Any] | None = None
        self._closed = False
        self._pending_writes = 0
        self._pending_bytes = 0
        self._hold: Hold | None = None
        self._backlogged = False  # a write was refused: the in-memory hold is full
        # Woken when the store starts holding writes, and when pending writes settle.
        self._hold_waiters: set[asyncio.Future[None]] = set()
        self._room_waiters: set[asyncio.Future[None]] = set()
        self.epoch: bytes = opened.epoch
        """This database incarnation's random id: sealed into every envelope header (v2)."""
        self.open_alerts: tuple[StoreAlert, ...] = tuple(opened.alerts)
        self.baseline_proven: bool = opened.baseline_proven
        """False when the database was recovered from damage or loss: its baseline (and door
        session) may be older or partial, and must be re-verified by an inventory before use."""
        self.recent_alerts: deque[StoreAlert] = deque(maxlen=100)
        self._summary: _Summary | None = None  # the outbox as last read, see stats()
        # Called on the loop after a write transaction committed and when the hold changes:
        # what stats() and hold say may differ now (the STATUS= line listens).
        self.on_change: list[Callable[[], None]] = []
        worker.on_commit = self._changed

    @classmethod
    async def open(
        cls,
        cfg: StoreConfig,
        *,
        on_alert: Callable[[StoreAlert], None] | None = None,
        clock: Clock | None = None,
        age_clock: Callable[[], datetime | None] | None = None,
    ) -> Store:
        """Open (creating, migrating or quarantining as needed) and start the database thread.

        ``clock`` stamps records; ``age_clock`` (default: ``clock``) is the time age-based
        pruning judges by, None while it is not to be trusted (the pruning then waits).
        """
        loop = asyncio.get_running_loop()
        holder: list[Store] = []
        early: list[StoreAlert] = []

        def sink(alert: StoreAlert) -> None:
            if holder:
                holder[0]._dispatch_alert(alert)
            else:
                early.append(alert)

        def hold_sink(hold: Hold | None) -> None:
            if holder:
                holder[0]._on_hold(hold)

        worker = Worker(cfg, loop, clock or SystemClock(), sink, age_clock, hold_sink)
        worker.start()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                opened = await asyncio.shield(worker.opened)
        except BaseException:
            worker.stop()
            await asyncio.wait({worker.finished}, timeout=CLOSE_TIMEOUT_S)
            worker.join(timeout=1.0)
            raise
        store = cls(cfg, worker, opened, on_alert)
        holder.append(store)
        for alert in [*opened.alerts, *early]:
            store._dispatch_alert(alert)
        return store

    def begin_stop(self) -> None:
        """The agent is stopping: writes held by a full disk may spend the disk reserve now,
        so that what is queued can still commit (call before draining the writers)."""
        self._worker.begin_stop()

    async def close(self) -> None:
        """Flush every accepted write (bounded wait) and stop the database thread."""
        if self._closed:
            return
        self._closed = True
        self._worker.stop()
        done, _ = await asyncio.wait({self._worker.finished}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            logger.error("store thread did not stop within %.0f s", CLOSE_TIMEOUT_S)
            return
        self._worker.join(timeout=5.0)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sequence ---------------------------------------------------------------------------------

    async def next_seq(self) -> int:
        """The seq the next submitted row must carry."""
        if self._seq_dirty:
            # A seq-bearing write failed: ask the database, behind every queued write.
            self._next_seq = await self._submit(
                lambda d: d.outbox.next_seq(), write=False, ordered=True
            )
            self._seq_dirty = False
        return self._next_seq

    def next_seq_nowait(self) -> int:
        """Like next_seq() without a round trip; raises if a failed write needs a resync."""
        if self._seq_dirty:
            raise SeqConflictError(self._next_seq, self._next_seq)
        return self._next_seq

    @contextlib.asynccontextmanager
    async def sequencer(self, wait_s: float = 30.0) -> AsyncIterator[Sequencer]:
        """Exclusive use of the sequence while sealing may await (e.g. in a thread).

        Seal with ``seq.next`` onwards and submit (``submit_cycle``/``submit_events``) inside
        the block; await durability after it, so other writers' rows share the commit.
        """
        async with asyncio.timeout(wait_s):
            await self._seq_lock.acquire()
        try:
            if self._seq_dirty:
                await self.next_seq()
            self._seq_owner = asyncio.current_task()
            yield Sequencer(self)
        finally:
            self._seq_owner = None
            self._seq_lock.release()

    # -- outbox -------------------------------------------------------------------------------------

    async def append_events(self, rows: Sequence[OutboxRow]) -> CommitResult:
        """Durably append sealed events (outside a door cycle); group-committed with others."""
        return await self.submit_events(rows)

    def submit_events(self, rows: Sequence[OutboxRow]) -> asyncio.Future[CommitResult]:
        """Accept rows now (seq checked and consumed); the future resolves once durable."""
        rows = tuple(rows)
        self._check_rows(rows)

        def job(d: dbmod.Database) -> CommitResult:
            d.outbox.insert_rows(rows)
            return CommitResult(tuple(d.outbox.alerts))

        return self._submit_seq(job, rows)

    async def commit_cycle(
        self,
        rows: Sequence[OutboxRow],
        baseline: Mapping[str, BaselineEntry] | None,
        session: bytes | Keep | None = None,
    ) -> CommitResult:
        """One transaction: the cycle's events, the new baseline (None: unchanged), the seq
        counter and the door session (None: no open session; KEEP: unchanged)."""
        return await self.submit_cycle(rows, baseline, session)

    def submit_cycle(
        self,
        rows: Sequence[OutboxRow],
        baseline: Mapping[str, BaselineEntry] | None,
        session: bytes | Keep | None = None,
    ) -> asyncio.Future[CommitResult]:
        """commit_cycle without awaiting: accepted now, the future resolves once durable."""
        rows = tuple(rows)
        self._check_rows(rows)
        snapshot = None if baseline is None else dict(baseline)
        if snapshot is not None:
            for epc, entry in snapshot.items():
                if not isinstance(epc, str) or not isinstance(entry, BaselineEntry):
                    raise TypeError("baseline maps EPC strings to BaselineEntry")
        if session is not None and not isinstance(session, bytes | Keep):
            raise TypeError("session must be bytes, None or KEEP")

        def job(d: dbmod.Database) -> CommitResult:
            now_us = to_us(self._worker_clock_now())
            d.outbox.insert_rows(rows)
            if snapshot is not None:
                d.replace_baseline(snapshot)
            if not isinstance(session, Keep):
                d.save_session(session, now_us)
            return CommitResult(tuple(d.outbox.alerts))

        extra = sum(len(k) + len(v.location) + 16 for k, v in (snapshot or {}).items())
        extra += len(session) if isinstance(session, bytes) else 0
        return self._submit_seq(job, rows, extra_bytes=extra)

    async def peek(
        self,
        limit: int,
        *,
        exclude: Collection[int] = (),
        after_seq: int | None = None,
        live_first: bool = False,
    ) -> list[OutboxRow]:
        """Deliverable rows in seq order (newest first with live_first), skipping ``exclude``.

        This is the delivery read: it returns only rows whose commit is durable (with
        ``synchronous=NORMAL`` it makes pending commits durable first), and it reserves their
        seqs in the sequence sidecar before returning them (docs/store.md); rows it cannot
        reserve are left out, and the read counts in ``held_reads``.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        excl = frozenset(exclude)
        worker = self._worker
        return await self._submit(
            lambda d: worker.deliverable(d, limit, excl, after_seq, live_first),
            write=False,
            ordered=False,
        )

    @property
    def durable_seq(self) -> int:
        """The durable watermark: every committed seq up to this survives a power cut."""
        return self._worker.durable_seq

    @property
    def held_reads(self) -> int:
        """Delivery reads (``peek``) that held rows back because the sequence sidecar could not
        be written, since open. Nothing announces when it works again: while this grows, the
        reader must read again (the next ``peek`` retries the write)."""
        return self._worker.held_reads

    async def ack(self, seqs: Sequence[int]) -> int:
        """Delete delivered rows; returns how many were still there."""
        chosen = sorted({int(s) for s in seqs})
        if not chosen:
            return 0
        return await self._submit(lambda d: d.outbox.ack(chosen), write=True, ordered=False)

    async def mark_failed(self, seq: int, reason: str) -> bool:
        """Count a failed delivery; True if the row was dead-lettered by this call."""
        return await self._submit(
            lambda d: d.outbox.mark_failed(seq, reason), write=True, ordered=False
        )

    async def revive_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Make dead-lettered rows deliverable again (all when seqs is None)."""
        chosen = None if seqs is None else sorted(set(seqs))
        return await self._submit(lambda d: d.outbox.revive_dead(chosen), write=True, ordered=False)

    @property
    def disk_full(self) -> bool:
        """True while writes are held because the disk (or the database cap) is full."""
        return bool(self._worker.disk_full)

    @property
    def pending_writes(self) -> int:
        """Writes accepted and not yet durable (all of them held while ``hold`` is set)."""
        return self._pending_writes

    @property
    def hold(self) -> Hold | None:
        """Why and since when accepted writes are held in memory (None: they are not)."""
        return self._hold

    async def settle(self, fut: asyncio.Future[T], timeout_s: float) -> bool:
        """Wait for a submitted write to be durable, but at most ``timeout_s`` and not while
        the store holds writes in memory (a full disk): True once durable (a failed write
        raises its error here), False if it is accepted and still pending -- it will be
        committed in order, and its future says when."""
        if not fut.done() and self._hold is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_: object) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            self._hold_waiters.add(waiter)
            fut.add_done_callback(wake)
            try:
                async with asyncio.timeout(timeout_s):
                    await waiter
            except TimeoutError:
                pass
            finally:
                self._hold_waiters.discard(waiter)
                fut.remove_done_callback(wake)
        if not fut.done():
            return False
        fut.result()
        return True

    async def wait_for_room(self, timeout_s: float) -> None:
        """After StoreBackloggedError: wait (at most ``timeout_s``) until a pending write
        settles, so a new one may fit."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._room_waiters.discard(waiter)

    async def stats(self) -> OutboxStats:
        """The outbox now. Its rows change only by a committed write transaction (events,
        acks, failure marks, revivals, housekeeping's drops), which the database thread
        counts: the rows are read again only when one has committed since the last read, so
        status and metrics of an idle agent cost the database nothing."""
        worker = self._worker
        summary = self._summary
        if (
            summary is None
            or summary.transactions != worker.transactions
            or self._closed
            or worker.failed is not None
        ):

            def job(d: dbmod.Database) -> _Summary:
                # On the database thread, between transactions: the count matches the rows.
                return _Summary(
                    worker.transactions,
                    d.outbox.summary(),
                    d.outbox.dropped_counts(),
                    d.outbox.next_seq(),
                )

            summary = await self._submit(job, write=False, ordered=False)
            self._summary = summary
        depth, nbytes, oldest_us, dead = summary.summary
        dropped, next_seq = dict(summary.dropped), summary.next_seq
        now = self._worker_clock_now()
        oldest = None if oldest_us is None else from_us(oldest_us)
        return OutboxStats(
            depth=depth,
            bytes=nbytes,
            oldest_created_at=oldest,
            oldest_age_s=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
            dead=dead,
            next_seq=next_seq,
            dropped=dropped,
            pending_writes=self._pending_writes,
            pending_bytes=self._pending_bytes,
            disk_full=self._worker.disk_full,
            transactions=self._worker.transactions,
            held_since=None if self._hold is None else self._hold.since,
            held_reason="" if self._hold is None else self._hold.reason,
        )

    # -- baseline, session, kv -------------------------------------------------------------------

    async def load_baseline(self) -> dict[str, BaselineEntry]:
        return await self._submit(lambda d: d.load_baseline(), write=False, ordered=False)

    async def load_session(self) -> bytes | None:
        return await self._submit(lambda d: d.load_session(), write=False, ordered=False)

    async def save_session(self, session: bytes | None) -> None:
        """Persist the open door session on its own (None: no session open)."""
        if session is not None and not isinstance(session, bytes):
            raise TypeError("session must be bytes or None")

        def job(d: dbmod.Database) -> None:
            d.save_session(session, to_us(self._worker_clock_now()))

        await self._submit(job, write=True, ordered=True, nbytes=len(session or b""))

    async def kv_get(self, key: str) -> bytes | None:
        _check_key(key)
        return await self._submit(lambda d: d.kv_get(key), write=False, ordered=False)

    async def kv_put(self, key: str, value: bytes | None) -> None:
        """Store a small named blob (None deletes it)."""
        _check_key(key)
        if value is not None:
            if not isinstance(value, bytes):
                raise TypeError("kv values are bytes")
            if len(value) > MAX_KV_BYTES:
                raise ValueError(f"kv value too large: {len(value)} > {MAX_KV_BYTES} bytes")

        def job(d: dbmod.Database) -> None:
            d.kv_put(key, value, to_us(self._worker_clock_now()))

        await self._submit(job, write=True, ordered=True, nbytes=len(value or b""))

    # -- audit --------------------------------------------------------------------------------------

    async def audit_append(self, actor: str, action: str, details: Mapping[str, Any]) -> int:
        """Append a hash-chained record; returns its seq. Details must be JSON values."""
        _check_actor(actor)
        if not action or len(action) > 128:
            raise ValueError("action is 1..128 characters")
        try:
            text = audit_chain.canonical_details(details)
        except (TypeError, ValueError) as err:
            raise ValueError(f"audit details must be plain JSON values: {err}") from None

        def job(d: dbmod.Database) -> int:
            return d.audit.append(actor, action, text, to_us(self._worker_clock_now()))

        return await self._submit(job, write=True, ordered=True, nbytes=len(text))

    async def audit_verify(self) -> AuditReport:
        """Walk the whole chain: edits, deletions, reordering and a truncated tail show up."""
        return await self._submit(lambda d: d.audit.verify(), write=False, ordered=False)

    async def audit_tail(self, limit: int = 50) -> list[AuditRecord]:
        """The newest records, oldest first."""
        rows = await self._submit(lambda d: d.audit.records(limit), write=False, ordered=False)
        return [
            AuditRecord(
                r.seq,
                from_us(r.at_us),
                r.actor or "",
                r.action,
                {} if r.details is None else json.loads(r.details),
                r.prev_hash,
                r.hash,
                r.redacted,
            )
            for r in rows
        ]

    async def audit_links(self, from_seq: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        """(seq, prev_hash, hash) of the audit records from ``from_seq`` on: an anchor's links."""
        return await self._submit(
            lambda d: d.audit.links(from_seq, limit), write=False, ordered=False
        )

    async def audit_redact(self, pseudonyms: Collection[str]) -> int:
        """Erase the personal fields of every audit record naming one of ``pseudonyms``; the
        bytes leave the file and the WAL before this returns (docs/privacy.md §6, §7). The
        WAL is cut even if no record named them: it still holds the old versions of what
        the writes before this one replaced (the engine state, the allow-list)."""

        def job(d: dbmod.Database) -> int:
            n = d.audit.redact(pseudonyms)
            d.deleted_personal_data(f"erasure: {n} audit record(s) redacted")
            # Copies of damaged files may name them too, and cannot be edited: they go.
            d.forget_quarantined("erasure")
            return n

        return await self._submit(job, write=True, ordered=True)

    async def audit_head(self) -> tuple[int, bytes]:
        """(seq, hash) of the chain's tip: publish it to make truncation detectable off-box."""
        return await self._submit(lambda d: d.audit.head(), write=False, ordered=False)

    async def diagnostics(self) -> dict[str, int | str]:
        """Pragmas, schema version and file sizes, for cabinetctl and support bundles."""
        return await self._submit(lambda d: d.diagnostics(), write=False, ordered=False)

    # -- maintenance ------------------------------------------------------------------------------

    async def housekeeping(self) -> HousekeepingResult:
        """Age-prune the outbox, prune the audit log, re-fit the page cap (also runs periodically)."""

        def job(d: dbmod.Database) -> HousekeepingResult:
            return d.housekeeping(self._worker.age_us())

        return await self._submit(job, write=True, ordered=True)

    # -- internals ----------------------------------------------------------------------------------

    def _worker_clock_now(self) -> datetime:
        return self._worker.clock.now()

    def _check_rows(self, rows: tuple[OutboxRow, ...]) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")
        if not rows:
            return
        expected = self._next_seq
        if self._seq_dirty:
            raise SeqConflictError(expected, rows[0].seq)
        if self._seq_owner is not None and self._seq_owner is not asyncio.current_task():
            raise SeqConflictError(
                expected, rows[0].seq, "another writer holds store.sequencer(); use it too"
            )
        for i, row in enumerate(rows):
            if not isinstance(row, OutboxRow):
                raise TypeError("rows must be OutboxRow")
            if row.seq != expected + i:
                raise SeqConflictError(expected + i, row.seq)
            if len(row.envelope) > MAX_ENVELOPE_BYTES:
                raise ValueError(f"envelope of seq {row.seq} exceeds {MAX_ENVELOPE_BYTES} bytes")
        if len({r.event_id for r in rows}) != len(rows):
            raise ValueError("event ids repeat within the rows")

    def _submit_seq(
        self,
        fn: Callable[[dbmod.Database], CommitResult],
        rows: tuple[OutboxRow, ...],
        extra_bytes: int = 0,
    ) -> asyncio.Future[CommitResult]:
        nbytes = sum(len(r.envelope) + 64 for r in rows) + extra_bytes
        fut = self._submit(
            fn,
            write=True,
            ordered=True,
            weight=max(1, len(rows)),
            nbytes=nbytes,
            seq_bearing=bool(rows),
        )
        if rows:
            self._next_seq = rows[-1].seq + 1
        return fut

    def _submit(
        self,
        fn: Callable[[dbmod.Database], T],
        *,
        write: bool,
        ordered: bool,
        weight: int = 1,
        nbytes: int = 0,
        seq_bearing: bool = False,
    ) -> asyncio.Future[T]:
        """Hand ``fn`` to the database thread; the future resolves with what it returns."""
        if self._closed:
            raise StoreClosedError("the store is closed")
        # Acks and failure marks are tiny and free space, so they are never refused for a
        # backlog (the publisher's in-flight window bounds them); data writes are.
        limit = self.cfg.max_pending_writes * (1 if ordered else 10)
        if write and (
            self._pending_writes + 1 > limit
            or (ordered and self._pending_bytes + nbytes > self.cfg.max_pending_bytes)
        ):
            if ordered and self._hold is not None and not self._backlogged:
                self._backlogged = True
                why = "" if self._hold is None else f" ({self._hold.reason})"
                self._dispatch_alert(
                    StoreAlert(
                        AlertKind.HOLD_FULL,
                        f"{self._pending_writes} writes ({self._pending_bytes} bytes) are held "
                        f"in memory waiting for the database{why}: the limit "
                        "([store] max_pending_writes / max_pending_bytes) is reached, new "
                        "events wait until the held ones are durable",
                    )
                )
            raise StoreBackloggedError(
                f"{self._pending_writes} writes ({self._pending_bytes} bytes) are waiting for "
                "the database; not accepting more until they are durable"
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def on_done(exc: BaseException | None) -> None:
            if write:
                self._pending_writes -= 1
                self._pending_bytes -= nbytes
                self._wake(self._room_waiters)
                if self._backlogged and self._pending_writes <= self.cfg.max_pending_writes // 2:
                    self._backlogged = False
            if exc is not None and seq_bearing:
                # The counter moved on at submit; the database did not. Resync before reuse.
                self._seq_dirty = True

        job = Request(
            fn=fn,
            future=fut,
            write=write,
            ordered=ordered,
            weight=weight,
            nbytes=nbytes,
            on_done=on_done,
        )
        self._worker.submit(job)
        if write:
            self._pending_writes += 1
            self._pending_bytes += nbytes
        return fut

    def _on_hold(self, hold: Hold | None) -> None:
        self._hold = hold
        if hold is not None:
            self._wake(self._hold_waiters)
        self._changed()

    def _changed(self) -> None:
        for listener in self.on_change:
            try:
                listener()
            except Exception:  # a faulty listener must not break the store
                logger.exception("store change listener failed")

    @staticmethod
    def _wake(waiters: set[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _dispatch_alert(self, alert: StoreAlert) -> None:
        self.recent_alerts.append(alert)
        level = _ALERT_LEVELS.get(alert.kind.value, logging.ERROR)
        logger.log(level, "store alert %s: %s", alert.kind.value, alert.detail)
        if self._on_alert is not None:
            try:
                self._on_alert(alert)
            except Exception:  # a faulty alert consumer must not break the store
                logger.exception("store alert callback failed")


@dataclass(frozen=True, slots=True)
class _Summary:
    """What ``Store.stats`` read of the outbox, and after which write transaction."""

    transactions: int
    summary: tuple[int, int, int | None, int]
    dropped: Mapping[int, int]
    next_seq: int


class Sequencer:
    """Handed out by Store.sequencer(): the seqs to seal with, while the block lasts."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def next(self) -> int:
        """The seq the next submitted row must carry (moves on with each submission)."""
        return self._store._next_seq


_CLI_ACTOR = re.compile(r"cli:uid=[0-9]{1,10}")
_ROLE_ACTOR = re.compile(r"[a-z][a-z0-9_.:-]{0,31}")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{6,}")


def _check_actor(actor: str) -> None:
    """Actors are pseudonyms, ``cli:uid=N`` or role words: never something like a card number."""
    if not isinstance(actor, str):
        raise TypeError("actor must be a string")
    if is_pseudonym(actor) or _CLI_ACTOR.fullmatch(actor):
        return
    if _ROLE_ACTOR.fullmatch(actor) and not _HEX_RUN.search(actor):
        return
    # The message leaves the value out on purpose: it may be a raw badge id.
    raise ValueError(
        "audit actor must be a badge pseudonym, 'cli:uid=N' or a role word such as 'system'"
    )


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not 1 <= len(key) <= 128:
        raise ValueError("kv keys are 1..128 characters")
    if key.startswith(dbmod.RESERVED_KV_PREFIX):
        raise ValueError(f"kv keys starting with {dbmod.RESERVED_KV_PREFIX!r} are reserved")


__all__ = ["KEEP", "Keep", "Sequencer", "Store", "StoreError"]
