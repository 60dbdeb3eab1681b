"""Outbox bounds: overflow policy by priority, age bound, full database, full filesystem, backlog."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.store import (
    AlertKind,
    CommitResult,
    OutboxRow,
    OverflowPolicy,
    Store,
    StoreAlert,
    StoreBackloggedError,
    StoreClosedError,
    StoreConfig,
)
from agent.store.db import CACHE_KIB, open_database
from agent.store.types import BaselineEntry
from simulators.tmpfs import tmpfs
from tests.store_helpers import T0, FakeClock, next_rows, rows_from

KiB = 1024
MiB = 1024 * KiB


class Alerts:
    """Collects alerts and lets a test await a given kind (bounded)."""

    def __init__(self) -> None:
        self.seen: list[StoreAlert] = []
        self._changed = asyncio.Event()

    def __call__(self, alert: StoreAlert) -> None:
        self.seen.append(alert)
        self._changed.set()

    def of(self, kind: AlertKind) -> list[StoreAlert]:
        return [a for a in self.seen if a.kind is kind]

    async def wait_for(self, kind: AlertKind) -> StoreAlert:
        async with asyncio.timeout(30):
            while not self.of(kind):
                self._changed.clear()
                await self._changed.wait()
        return self.of(kind)[0]


def cfg(path: Path, **kw: Any) -> StoreConfig:
    return StoreConfig(path=path, **kw)


async def test_overflow_drops_lowest_priority_oldest_first_with_alert(tmp_path: Path) -> None:
    alerts = Alerts()
    store = await Store.open(cfg(tmp_path / "s.db", max_bytes=64 * KiB), on_alert=alerts)
    try:
        await store.append_events(next_rows(store, 30, priority=2, size=KiB))  # seqs 1..30
        await store.append_events(next_rows(store, 20, priority=1, size=KiB))  # 31..50
        result = await store.append_events(next_rows(store, 20, priority=0, size=KiB))  # 51..70
        # 70 KiB into a 64 KiB outbox: the six oldest routine rows go, nothing else.
        assert isinstance(result, CommitResult)
        (alert,) = result.alerts
        assert alert.kind is AlertKind.OVERFLOW_DROPPED
        assert alert.dropped == {2: 6}
        assert alert.seqs == (1, 2, 3, 4, 5, 6)
        assert alert.dropped_bytes == 6 * KiB
        assert alerts.of(AlertKind.OVERFLOW_DROPPED) == [alert]
        seqs = [r.seq for r in await store.peek(100)]
        assert seqs == list(range(7, 71))
        stats = await store.stats()
        assert stats.bytes <= 64 * KiB
        assert stats.dropped == {2: 6}

        # Critical rows push out every routine row first, then normal ones, oldest first.
        result = await store.append_events(next_rows(store, 30, priority=0, size=KiB))  # 71..100
        (alert,) = result.alerts
        assert alert.dropped == {2: 24, 1: 6}
        remaining = await store.peek(200)
        assert {r.priority for r in remaining} == {0, 1}
        assert [r.seq for r in remaining if r.priority == 1] == list(range(37, 51))
        assert sum(1 for r in remaining if r.priority == 0) == 50
    finally:
        await store.close()
    # (rows are dated T0: a fake clock keeps the age bound out of this test)
    store = await Store.open(cfg(tmp_path / "s.db", max_bytes=64 * KiB), clock=FakeClock())
    try:
        assert (await store.stats()).dropped == {2: 30, 1: 6}  # counters survive restarts
    finally:
        await store.close()


async def test_critical_rows_are_never_dropped_unless_configured(tmp_path: Path) -> None:
    alerts = Alerts()
    store = await Store.open(cfg(tmp_path / "s.db", max_bytes=64 * KiB), on_alert=alerts)
    try:
        await store.append_events(next_rows(store, 10, priority=1, size=KiB))
        result = await store.append_events(next_rows(store, 70, priority=0, size=KiB))
        kinds = [a.kind for a in result.alerts]
        assert kinds == [AlertKind.OVERFLOW_DROPPED, AlertKind.OVER_CAP]
        assert result.alerts[0].dropped == {1: 10}
        stats = await store.stats()
        assert stats.depth == 70  # above the cap, but nothing critical lost
        assert stats.bytes == 70 * KiB
        # Over-cap is alerted once per episode, not on every append.
        again = await store.append_events(next_rows(store, 1, priority=0, size=KiB))
        assert again.alerts == ()
    finally:
        await store.close()

    policy = OverflowPolicy(droppable_priorities=[2, 1, 0])
    store = await Store.open(cfg(tmp_path / "t.db", max_bytes=64 * KiB, overflow=policy))
    try:
        result = await store.append_events(next_rows(store, 70, priority=0, size=KiB))
        assert result.alerts[0].dropped == {0: 6}
        assert [r.seq for r in await store.peek(3)] == [7, 8, 9]
    finally:
        await store.close()


async def test_new_routine_rows_go_when_nothing_older_can(tmp_path: Path) -> None:
    policy = OverflowPolicy(droppable_priorities=[2])
    store = await Store.open(cfg(tmp_path / "s.db", max_bytes=64 * KiB, overflow=policy))
    try:
        await store.append_events(next_rows(store, 64, priority=0, size=KiB))
        result = await store.append_events(next_rows(store, 2, priority=2, size=KiB))
        assert result.alerts[0].dropped == {2: 2}
        assert result.alerts[0].seqs == (65, 66)
        # The seqs are spent (and reported in the alert), so the sequence shows the gap.
        assert await store.next_seq() == 67
        assert (await store.stats()).depth == 64
    finally:
        await store.close()


async def test_age_bound_drops_old_droppable_rows_only(tmp_path: Path) -> None:
    clock = FakeClock()
    alerts = Alerts()
    store = await Store.open(cfg(tmp_path / "s.db", max_age_days=30), on_alert=alerts, clock=clock)
    try:
        old = T0 - timedelta(days=31)
        await store.append_events(next_rows(store, 2, priority=0, created_at=old))  # 1, 2
        await store.append_events(next_rows(store, 2, priority=1, created_at=old))  # 3, 4
        await store.append_events(next_rows(store, 2, priority=2, created_at=old))  # 5, 6
        await store.append_events(next_rows(store, 2, priority=2, created_at=T0))  # 7, 8
        result = await store.housekeeping()
        assert result.outbox_age_dropped == 4
        (alert,) = alerts.of(AlertKind.AGE_DROPPED)
        assert alert.dropped == {1: 2, 2: 2}
        assert alert.seqs == (3, 4, 5, 6)
        assert [r.seq for r in await store.peek(10)] == [1, 2, 7, 8]
        stats = await store.stats()
        assert stats.oldest_age_s == pytest.approx(31 * 86400)

        # A board without RTC boots in 1970: an insane clock must not prune anything.
        clock.at = datetime(1970, 1, 2, tzinfo=UTC)
        assert (await store.housekeeping()).outbox_age_dropped == 0
        clock.at = T0 + timedelta(days=60)
        assert (await store.housekeeping()).outbox_age_dropped == 2
    finally:
        await store.close()


async def test_age_pruning_waits_while_the_age_clock_is_untrusted(tmp_path: Path) -> None:
    """A stepped wall clock (2028) must neither age-drop fresh rows nor prune the audit log."""
    clock = FakeClock()
    trusted: list[datetime | None] = [None]  # the agent's age clock: None while untrusted
    alerts = Alerts()
    store = await Store.open(
        cfg(tmp_path / "s.db", max_age_days=30, audit_retention_days=365),
        on_alert=alerts,
        clock=clock,
        age_clock=lambda: trusted[0],
    )
    try:
        await store.append_events(next_rows(store, 2, priority=2, created_at=T0))
        await store.audit_append("system", "test.first", {})
        clock.at = datetime(2028, 1, 10, tzinfo=UTC)  # what the (untrusted) wall clock says
        result = await store.housekeeping()
        assert (result.outbox_age_dropped, result.audit_pruned) == (0, 0)
        assert (await store.stats()).depth == 2
        # Trusted again, at a time that makes them old: now they go.
        trusted[0] = T0 + timedelta(days=400)
        result = await store.housekeeping()
        assert (result.outbox_age_dropped, result.audit_pruned) == (2, 1)
        assert alerts.of(AlertKind.AGE_DROPPED)
    finally:
        await store.close()


async def _fill_until_blocked(
    store: Store, alerts: Alerts, size: int
) -> tuple[list[OutboxRow], asyncio.Future[CommitResult]]:
    """Append critical rows until a write is held back by a full disk; return all rows."""
    submitted: list[OutboxRow] = []
    for _ in range(10_000):
        rows = next_rows(store, 4, priority=0, size=size)
        submitted += rows
        fut = store.submit_events(rows)
        full = asyncio.ensure_future(alerts.wait_for(AlertKind.DISK_FULL))
        done, _ = await asyncio.wait({fut, full}, timeout=30, return_when="FIRST_COMPLETED")
        assert done, "neither committed nor blocked within 30 s"
        if full in done:
            assert not fut.done()
            return submitted, fut
        full.cancel()
        await asyncio.gather(full, return_exceptions=True)
        fut.result()
    raise AssertionError("the disk never filled")


async def test_full_database_holds_writes_alerts_and_resumes(tmp_path: Path) -> None:
    alerts = Alerts()
    store = await Store.open(
        cfg(
            tmp_path / "s.db",
            max_bytes=64 * KiB,
            max_db_bytes=MiB,  # PRAGMA max_page_count: the file cannot grow past this
            overflow=OverflowPolicy(droppable_priorities=[]),
            max_pending_writes=10,
            retry_initial_s=0.05,
            retry_max_s=0.5,
        ),
        on_alert=alerts,
    )
    try:
        submitted, held = await _fill_until_blocked(store, alerts, 8 * KiB)
        stats = await store.stats()
        assert stats.disk_full
        assert stats.pending_writes >= 1
        # Reads keep working while writes wait (they see the last durable state).
        assert (await store.peek(1))[0].seq == 1
        assert await store.kv_get("allow-list") is None
        assert await store.load_baseline() == {}
        assert (await store.audit_verify()).ok
        # More writes are accepted up to the memory bound, then refused (nothing consumed).
        extra: list[asyncio.Future[CommitResult]] = []
        refused = None
        for _ in range(20):
            rows = next_rows(store, 1, priority=0, size=KiB)
            try:
                extra.append(store.submit_events(rows))
            except StoreBackloggedError as err:
                refused = err
                break
            submitted += rows
        assert refused is not None
        assert 1 <= len(extra) < 20
        assert not any(f.done() for f in extra)

        # The publisher delivers and acks: space comes back, held writes commit in order.
        delivered = [r.seq for r in await store.peek(60)]
        await store.ack(delivered)
        await alerts.wait_for(AlertKind.DISK_FULL_CLEARED)
        await asyncio.wait_for(asyncio.gather(held, *extra), 30)
        stats = await store.stats()
        assert not stats.disk_full
        assert stats.pending_writes == 0
        left = [r.seq for r in await store.peek(10_000)]
        expected = [r.seq for r in submitted if r.seq not in set(delivered)]
        assert left == expected
        assert await store.next_seq() == submitted[-1].seq + 1
    finally:
        await store.close()


async def test_close_fails_writes_still_held_by_a_full_disk(tmp_path: Path) -> None:
    alerts = Alerts()
    store = await Store.open(
        cfg(
            tmp_path / "s.db",
            max_bytes=64 * KiB,
            max_db_bytes=MiB,
            overflow=OverflowPolicy(droppable_priorities=[]),
            retry_initial_s=0.05,
            retry_max_s=0.2,
        ),
        on_alert=alerts,
    )
    try:
        submitted, held = await _fill_until_blocked(store, alerts, 8 * KiB)
    finally:
        await store.close()
    # Never silent: the waiter learns its write did not become durable.
    with pytest.raises(StoreClosedError):
        held.result()
    store = await Store.open(cfg(tmp_path / "s.db"))
    try:
        assert await store.next_seq() == submitted[-4].seq  # the held rows never landed
    finally:
        await store.close()


def fill_disk(path: Path) -> None:
    """Write zeros until the filesystem refuses (ENOSPC)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def _can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: the filesystem itself runs out of space (ENOSPC)."""
    if not _can_mount_tmpfs():
        pytest.skip("needs root and mount(8) to create a 1 MiB tmpfs")
    with tmpfs(tmp_path / "tiny", 1024 * 1024) as mnt:
        yield mnt


async def test_full_filesystem_holds_writes_alerts_and_resumes(tiny_fs: Path) -> None:
    alerts = Alerts()
    store = await Store.open(
        cfg(
            tiny_fs / "s.db",
            max_bytes=64 * MiB,
            max_db_bytes=64 * MiB,
            min_free_disk_bytes=0,
            retry_initial_s=0.05,
            retry_max_s=0.2,
        ),
        on_alert=alerts,
    )
    filler = tiny_fs / "filler"
    try:
        await store.append_events(next_rows(store, 4, priority=0, size=KiB))
        cap_at_open = (await store.diagnostics())["max_page_count"]
        # Something else eats the disk after the store sized its page cap.
        fill_disk(filler)
        submitted, held = await _fill_until_blocked(store, alerts, 8 * KiB)
        assert (await store.stats()).disk_full
        diag = await store.diagnostics()
        # The filesystem refused (ENOSPC): the file was far below the page cap set at open.
        assert isinstance(diag["page_count"], int)
        assert isinstance(cap_at_open, int)
        assert diag["page_count"] < cap_at_open // 4
        filler.unlink()  # space comes back; the retry timer notices on its own
        await alerts.wait_for(AlertKind.DISK_FULL_CLEARED)
        await asyncio.wait_for(held, 30)
        seqs = [r.seq for r in await store.peek(1000)]
        assert seqs == list(range(1, submitted[-1].seq + 1))
    finally:
        await store.close()


# -- what the connection keeps in memory ------------------------------------------------------


def test_acks_prepare_few_statements_and_delete_a_batch_in_one(tmp_path: Path) -> None:
    """The connection caches every distinct statement it prepared (up to 128): a statement
    per batch length piled up ~4 MiB during a backlog drain. And each statement in a job's
    savepoint journals the pages it touches again: one per row cost ~5 MiB for 256 rows."""
    db = open_database(tmp_path / "s.db", cfg(tmp_path / "s.db"))
    try:
        db.outbox.insert_rows(rows_from(1, 4000))
        traced: list[str] = []
        # Traced with the values bound: a statement's shape is its text without them.
        db.conn.set_trace_callback(traced.append)
        seq, deleted = 1, 0
        shapes: set[str] = set()
        for size in (*range(1, 41), 100, 256, 511, 512, 513, 1000):
            traced.clear()
            deleted += db.outbox.ack(list(range(seq, seq + size)))
            assert len(set(traced)) == -(-size // 512)  # one DELETE per 512 rows
            shapes |= {re.sub(r"\d+", "N", sql) for sql in traced}
            seq += size
        db.conn.set_trace_callback(None)
        assert deleted == seq - 1  # every row acknowledged was deleted
        assert db.outbox.ack([]) == 0
        assert db.outbox.ack([1, 2, 10_000]) == 0  # gone already, or never there
        assert db.outbox.ack([seq, seq, seq + 1]) == 2
        assert len(shapes) == 10  # IN lists of 1, 2, 4, … 512
    finally:
        db.conn.close()


async def test_the_page_cache_is_bounded(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path / "s.db"))
    try:
        assert (await store.diagnostics())["cache_size"] == -CACHE_KIB
    finally:
        await store.close()


async def test_a_loaded_baseline_shares_one_string_per_drawer(tmp_path: Path) -> None:
    """The engine keeps the loaded baseline's drawer names as long as it stands."""
    store = await Store.open(cfg(tmp_path / "s.db"))
    try:
        drawers = ("top", "drawer-2")
        baseline = {f"e2{i:022x}": BaselineEntry("".join(drawers[i % 2]), T0) for i in range(200)}
        await store.commit_cycle([], baseline, None)
        loaded = await store.load_baseline()
        assert loaded == baseline
        assert len({id(e.location) for e in loaded.values()}) == len(drawers)
    finally:
        await store.close()


def test_appends_of_any_size_prepare_few_statements(tmp_path: Path) -> None:
    """A group commit's rows go in as multi-row INSERTs: one statement per row count would
    leave up to 128 prepared statements (~9 MiB) in the connection's cache."""
    db = open_database(tmp_path / "s.db", cfg(tmp_path / "s.db"))
    try:
        shapes: set[str] = set()
        traced: list[str] = []
        db.conn.set_trace_callback(traced.append)
        seq = 1
        for size in (*range(1, 130), 300):
            traced.clear()
            db.outbox.insert_rows(rows_from(seq, size))
            # Traced again for each trigger run: the distinct texts are the statements.
            inserts = {sql for sql in traced if sql.startswith("INSERT INTO outbox")}
            assert 1 <= len(inserts) <= max(8, size // 128 + 7)
            shapes |= {sql.count("(") for sql in inserts}  # rows per statement (+ 1)
            seq += size
        db.conn.set_trace_callback(None)
        assert db.outbox.next_seq() == seq
        assert int(db.conn.execute("SELECT count(*) FROM outbox").fetchone()[0]) == seq - 1
        assert shapes == {1 + (1 << k) for k in range(8)}  # 1, 2, 4, … 128 rows
    finally:
        db.conn.close()
