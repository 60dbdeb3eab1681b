"""State store basics on real SQLite files: sequence, outbox, baseline, session, kv, loop health."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.privacy.envelope import EnvelopeHeader, Sealer
from agent.privacy.pseudonym import Pseudonymizer
from agent.store import (
    KEEP,
    AlertKind,
    BaselineEntry,
    OutboxRow,
    SeqConflictError,
    Store,
    StoreAlert,
    StoreClosedError,
    StoreConfig,
    StoreLockedError,
    schema,
)
from agent.store.outbox import Outbox
from agent.store.salvage import SalvagedRow
from agent.store.schema import LATEST, MIGRATIONS
from agent.store.worker import Worker
from tests.pii import assert_no_raw_ids, find_raw_ids
from tests.store_helpers import T0, FakeClock, db_files, next_rows, rows_from


def cfg(tmp_path: Path, **kw: object) -> StoreConfig:
    return StoreConfig(path=tmp_path / "state.db", **kw)  # type: ignore[arg-type]


async def test_fresh_store_starts_at_seq_1_with_wal_and_schema(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        assert await store.next_seq() == 1
        stats = await store.stats()
        assert (stats.depth, stats.bytes, stats.dead, stats.next_seq) == (0, 0, 0, 1)
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == LATEST
    finally:
        conn.close()
    assert (tmp_path / "state.db").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("NORMAL", 1)])
async def test_connection_pragmas(tmp_path: Path, synchronous: str, level: int) -> None:
    store = await Store.open(cfg(tmp_path, synchronous=synchronous))
    try:
        diag = await store.diagnostics()
    finally:
        await store.close()
    assert diag["journal_mode"] == "wal"
    assert diag["synchronous"] == level
    assert diag["foreign_keys"] == 1
    assert diag["temp_store"] == 2  # memory: no page of the database in a temp file
    assert diag["schema_version"] == LATEST
    assert isinstance(diag["max_page_count"], int)
    assert isinstance(diag["page_size"], int)
    assert diag["max_page_count"] * diag["page_size"] <= StoreConfig().max_db_bytes
    assert diag["file_bytes"] > 0


async def test_commit_cycle_is_visible_after_reopen(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    rows = next_rows(store, 3)
    baseline = {
        "e200001": BaselineEntry("drawer-1", T0),
        "e200002": BaselineEntry("drawer-2", T0 + timedelta(seconds=1)),
    }
    await store.commit_cycle(rows, baseline, b'{"holders":["p1.s1.abc"]}')
    await store.close()

    store = await Store.open(cfg(tmp_path))
    try:
        assert await store.next_seq() == 4
        assert await store.load_baseline() == baseline
        assert await store.load_session() == b'{"holders":["p1.s1.abc"]}'
        got = await store.peek(10)
        assert got == rows
        # baseline None keeps it, session None clears it, KEEP keeps it.
        await store.commit_cycle(next_rows(store, 1), None, KEEP)
        assert await store.load_session() == b'{"holders":["p1.s1.abc"]}'
        await store.commit_cycle([], None, None)
        assert await store.load_session() is None
        assert await store.load_baseline() == baseline
        await store.commit_cycle([], {}, None)
        assert await store.load_baseline() == {}
        await store.save_session(b"door-open")
        assert await store.load_session() == b"door-open"
    finally:
        await store.close()


async def test_rows_must_continue_the_sequence(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        await store.append_events(next_rows(store, 2))
        with pytest.raises(SeqConflictError) as info:
            await store.append_events(rows_from(2, 1))
        assert (info.value.expected, info.value.got) == (3, 2)
        with pytest.raises(SeqConflictError):
            await store.commit_cycle(rows_from(3, 1) + rows_from(5, 1), None)  # hole
        row = rows_from(3, 1)[0]
        with pytest.raises(ValueError, match="repeat"):
            await store.append_events([row, OutboxRow(4, row.event_id, 0, "x", T0, b"e")])
        # Nothing above consumed a seq.
        assert await store.next_seq() == 3
        await store.append_events(next_rows(store, 1))
        assert [r.seq for r in await store.peek(10)] == [1, 2, 3]
    finally:
        await store.close()


async def test_a_failed_write_resyncs_the_sequence(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        first = next_rows(store, 1)
        await store.append_events(first)
        # Same event id as a committed row: the database refuses it inside the transaction.
        dup = OutboxRow(2, first[0].event_id, 0, "item.returned", T0, b"sealed")
        with pytest.raises(Exception, match="UNIQUE"):
            await store.append_events([dup])
        with pytest.raises(SeqConflictError):
            store.next_seq_nowait()
        assert await store.next_seq() == 2  # resynced from the database
        await store.append_events(next_rows(store, 1))
        assert [r.seq for r in await store.peek(10)] == [1, 2]
    finally:
        await store.close()


async def test_peek_ack_semantics(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        await store.append_events(next_rows(store, 10))
        assert [r.seq for r in await store.peek(3)] == [1, 2, 3]
        assert [r.seq for r in await store.peek(3, exclude={1, 2, 3})] == [4, 5, 6]
        assert [r.seq for r in await store.peek(3, after_seq=7)] == [8, 9, 10]
        assert [r.seq for r in await store.peek(2, live_first=True)] == [10, 9]
        assert await store.ack([2, 4, 4, 99]) == 2  # only rows that exist are counted
        assert [r.seq for r in await store.peek(4)] == [1, 3, 5, 6]
        assert await store.ack([]) == 0
        stats = await store.stats()
        assert stats.depth == 8
        assert stats.bytes == 8 * 64
        with pytest.raises(ValueError):
            await store.peek(0)
    finally:
        await store.close()


async def test_a_large_append_keeps_every_row_intact_across_insert_chunks(
    tmp_path: Path,
) -> None:
    """Rows go to SQLite in multi-row INSERTs of a bounded size: 300 rows in one append (three
    statements) come back in order, each with its own id, kind, priority, time and bytes."""
    store = await Store.open(cfg(tmp_path))
    try:
        rows = [
            OutboxRow(
                seq=r.seq,
                event_id=r.event_id,
                priority=r.seq % 3,
                kind=f"kind.{r.seq}",
                created_at=T0 + timedelta(microseconds=r.seq),
                envelope=r.envelope + r.seq.to_bytes(4, "big"),
            )
            for r in next_rows(store, 300, size=40)
        ]
        await store.append_events(rows)
        got = await store.peek(400)
        assert [g.seq for g in got] == list(range(1, 301))
        for want, g in zip(rows, got, strict=True):
            assert (g.event_id, g.priority, g.kind, g.envelope) == (
                want.event_id,
                want.priority,
                want.kind,
                want.envelope,
            )
            assert g.created_at == want.created_at
        stats = await store.stats()
        assert (stats.depth, stats.bytes) == (300, sum(len(r.envelope) for r in rows))
        assert store.next_seq_nowait() == 301
    finally:
        await store.close()


async def test_dead_lettering_after_n_failures(tmp_path: Path) -> None:
    alerts: list[StoreAlert] = []
    store = await Store.open(cfg(tmp_path, dead_letter_after=3), on_alert=alerts.append)
    try:
        await store.append_events(next_rows(store, 2))
        assert await store.mark_failed(1, "broker refused: payload too large") is False
        assert await store.mark_failed(1, "again") is False
        assert (await store.peek(1))[0].attempts == 2
        assert await store.mark_failed(1, "third time") is True
        assert await store.mark_failed(1, "already dead") is False
        assert await store.mark_failed(77, "no such row") is False
        assert [r.seq for r in await store.peek(10)] == [2]  # kept, but not delivered
        stats = await store.stats()
        assert (stats.depth, stats.dead) == (1, 1)
        dead = [a for a in alerts if a.kind is AlertKind.DEAD_LETTERED]
        assert len(dead) == 1
        assert dead[0].seqs == (1,)
        assert await store.revive_dead() == 1
        assert [r.seq for r in await store.peek(10)] == [1, 2]
    finally:
        await store.close()


async def test_kv_roundtrip_and_reserved_keys(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        assert await store.kv_get("allow-list") is None
        await store.kv_put("allow-list", b'{"version":7}')
        await store.kv_put("allow-list.version", b"7")
        assert await store.kv_get("allow-list") == b'{"version":7}'
        await store.kv_put("allow-list", None)
        assert await store.kv_get("allow-list") is None
        with pytest.raises(ValueError, match="reserved"):
            await store.kv_put("store.audit_head", b"x")
        with pytest.raises(ValueError):
            await store.kv_get("")
    finally:
        await store.close()
    store = await Store.open(cfg(tmp_path))
    try:
        assert await store.kv_get("allow-list.version") == b"7"
    finally:
        await store.close()


async def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    n = 300
    store = await Store.open(cfg(tmp_path))
    try:
        # Single writer per call, but all submitted before any commit finishes.
        futs = []
        for _ in range(n):
            futs.append(store.submit_events(next_rows(store, 1)))
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        batched = (await store.stats()).transactions
        assert [r.seq for r in await store.peek(n)] == list(range(1, n + 1))
    finally:
        await store.close()
    assert 1 <= batched <= n // 3 + 1, batched

    # The same load with group commit disabled costs one transaction per row.
    single = await Store.open(cfg(tmp_path / "single", group_commit_max_rows=1))
    try:
        futs = [single.submit_events(next_rows(single, 1)) for _ in range(n)]
        await asyncio.wait_for(asyncio.gather(*futs), 120)
        assert (await single.stats()).transactions == n
    finally:
        await single.close()


async def test_concurrent_tasks_appending_group_commit(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:

        async def writer() -> None:
            for _ in range(10):
                # next_seq_nowait + submit happen without an await in between: one writer
                # at a time from the loop's point of view.
                await store.append_events(next_rows(store, 1, priority=1))

        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(writer(), name=f"writer-{i}")
        stats = await store.stats()
        assert stats.depth == 200
        assert stats.transactions < 200
        seqs = [r.seq for r in await store.peek(500)]
        assert seqs == list(range(1, 201))
    finally:
        await store.close()


async def test_loop_keeps_running_during_a_big_commit(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    try:
        rows = next_rows(store, 5000, size=512)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ticker(), name="ticker")
            await asyncio.sleep(0)
            before = ticks
            await asyncio.wait_for(store.commit_cycle(rows, {"e1": BaselineEntry("d", T0)}), 120)
            during = ticks - before
            stop.set()
        assert (await store.stats()).depth == 5000
    finally:
        await store.close()
    # A commit on the loop would leave no room for the ticker at all.
    assert during >= 10, during


async def test_cancelled_waiter_does_not_cancel_the_write(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        task = asyncio.create_task(store.append_events(next_rows(store, 1)), name="append")
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.next_seq() == 2
        rows = await store.peek(5)  # queued behind the write: it is committed by now
        assert [r.seq for r in rows] == [1]
    finally:
        await store.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        await store.append_events(rows_from(1, 1))
    with pytest.raises(StoreClosedError):
        await store.kv_get("x")


async def test_close_flushes_accepted_writes(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    futs = [store.submit_events(next_rows(store, 1)) for _ in range(50)]
    await store.close()
    assert all(f.done() and f.exception() is None for f in futs)
    store = await Store.open(cfg(tmp_path))
    try:
        assert await store.next_seq() == 51
    finally:
        await store.close()


async def test_worker_thread_is_the_only_sqlite_user(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        worker = store._worker
        assert isinstance(worker, Worker)
        assert worker.is_alive()
        assert worker.name.startswith("store-db:")
    finally:
        await store.close()
    assert not worker.is_alive()


async def test_no_raw_badge_ids_on_disk(tmp_path: Path) -> None:
    raw_ids = ["0012AB34CD", "4000123456", "7A0B1C2D3E"]
    pseudo = Pseudonymizer("hangar-3", "s1", bytes(range(32)))
    backend = X25519PrivateKey.generate()
    sealer = Sealer(backend.public_key(), "k1")
    clock = FakeClock()
    store = await Store.open(cfg(tmp_path), clock=clock)
    try:
        for raw in raw_ids:
            holder = pseudo.badge(raw)
            first = store.next_seq_nowait()
            rows = []
            for i in range(3):
                event_id = uuid.uuid4()
                header = EnvelopeHeader("k1", "crib-07", first + i, event_id)
                body = json.dumps({"by": holder, "epc": f"e2000{i}", "at": T0.isoformat()})
                rows.append(
                    OutboxRow(
                        first + i,
                        event_id,
                        0,
                        "item.checked_out",
                        datetime.now(UTC),
                        sealer.seal(header, body.encode()),
                    )
                )
            session = json.dumps({"holders": [holder], "opened": T0.isoformat()}).encode()
            await store.commit_cycle(rows, {"e20001": BaselineEntry("d1", T0)}, session)
            await store.audit_append(holder, "door.unlock", {"door": "main"})
            await store.audit_append("cli:uid=1000", "allowlist.show", {"entries": 3})
        files = db_files(tmp_path)
        assert any(p.name == "state.db-wal" for p in files)
        assert_no_raw_ids(files, raw_ids)
    finally:
        await store.close()
    assert_no_raw_ids(db_files(tmp_path), raw_ids)


async def test_pii_helper_finds_what_it_must(tmp_path: Path) -> None:
    """The scanner itself works: a raw id written in clear, as UTF-16 or as binary is found."""
    store = await Store.open(cfg(tmp_path))
    try:
        await store.kv_put("careless-1", b"badge=0012ab34cd")
        await store.kv_put("careless-2", "7A0B1C2D3E".encode("utf-16-le"))
        await store.kv_put("careless-3", bytes.fromhex("DEADBEEF01"))
    finally:
        await store.close()
    files = db_files(tmp_path)
    hits = find_raw_ids(files, ["0012AB34CD", "7A0B1C2D3E", "DEADBEEF01", "99999999999"])
    assert any("raw id #0 as utf-8 lower" in h for h in hits)
    assert any("raw id #1 as utf-16-le" in h for h in hits)
    assert any("raw id #2 as binary of hex id" in h for h in hits)
    assert not any("raw id #3" in h for h in hits)
    with pytest.raises(AssertionError, match="raw badge ids found"):
        assert_no_raw_ids(files, ["0012AB34CD"])


async def test_migrates_an_older_schema_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL) STRICT"
    )
    for sql in MIGRATIONS[0][1]:
        conn.execute(sql)
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute(
        "INSERT INTO outbox (seq, event_id, priority, kind, created_us, size, envelope) "
        "VALUES (1, ?, 0, 'item.returned', 0, 5, x'0102030405')",
        (uuid.uuid4().bytes,),
    )
    conn.execute("UPDATE meta SET value = 2 WHERE key = 'next_seq'")
    conn.close()
    store = await Store.open(cfg(tmp_path), clock=FakeClock())
    try:
        assert await store.next_seq() == 2
        assert (await store.stats()).bytes == 5  # the running total starts from the old rows
        await store.append_events(next_rows(store, 3, size=10))
        await store.ack([1, 3])
        assert (await store.stats()).bytes == 20
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        assert versions == list(range(1, LATEST + 1))
        assert conn.execute("SELECT sum(size) FROM outbox").fetchone()[0] == 20
    finally:
        conn.close()


def test_the_byte_total_counts_salvaged_rows_once(tmp_path: Path) -> None:
    """Salvaged rows go in with INSERT OR IGNORE: the running total (no per-row trigger since
    schema 4) counts those that went in, not those already there."""
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        schema.migrate(conn)
        outbox = Outbox(conn, cfg(tmp_path))
        conn.execute("BEGIN IMMEDIATE")
        outbox.insert_rows(rows_from(1, 3, size=100))
        salvaged = [
            SalvagedRow(r.seq, r.event_id, 0, r.kind, 0, r.envelope, 1, False)
            for r in rows_from(2, 4, size=40)  # seqs 2 and 3 are there already
        ]
        outbox.insert_salvaged(salvaged)
        conn.execute("COMMIT")
        (held,) = conn.execute("SELECT sum(size) FROM outbox").fetchone()
        assert held == 3 * 100 + 2 * 40
        assert outbox.total_bytes() == held
    finally:
        conn.close()


async def test_one_store_per_database(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        with pytest.raises(StoreLockedError, match="in use"):
            await Store.open(cfg(tmp_path))
        assert await store.next_seq() == 1  # the holder is unaffected
    finally:
        await store.close()
    again = await Store.open(cfg(tmp_path))  # released on close
    await again.close()


async def test_sequencer_lets_writers_seal_in_threads(tmp_path: Path) -> None:
    backend = X25519PrivateKey.generate()
    sealer = Sealer(backend.public_key(), "k1")
    store = await Store.open(cfg(tmp_path))

    def seal(first: int, n: int) -> list[OutboxRow]:
        out = []
        for i in range(n):
            event_id = uuid.uuid4()
            header = EnvelopeHeader("k1", "crib-07", first + i, event_id)
            out.append(
                OutboxRow(first + i, event_id, 0, "item.returned", T0, sealer.seal(header, b"{}"))
            )
        return out

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(2, thread_name_prefix="sealer")

    async def writer(n: int) -> None:
        for _ in range(5):
            async with store.sequencer() as seq:
                # The loop runs other writers while this one seals in a thread.
                rows = await loop.run_in_executor(pool, seal, seq.next, n)
                done = store.submit_events(rows)
            await done

    try:
        async with asyncio.TaskGroup() as tg:
            for n in (1, 2, 3, 4):
                tg.create_task(writer(n), name=f"sealing-writer-{n}")
        pool.shutdown(wait=True)  # idle by now: returns at once
        rows = await store.peek(100)
        assert [r.seq for r in rows] == list(range(1, 51))
        assert await store.next_seq() == 51
    finally:
        pool.shutdown(wait=False)
        await store.close()


async def test_sequencer_refuses_writers_that_bypass_it(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        entered = asyncio.Event()
        leave = asyncio.Event()

        async def holder() -> None:
            async with store.sequencer() as seq:
                assert seq.next == 1
                entered.set()
                await leave.wait()
                await store.append_events(rows_from(seq.next, 1))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(holder(), name="sequencer-holder")
            await entered.wait()
            with pytest.raises(SeqConflictError, match="sequencer"):
                store.submit_events(next_rows(store, 1))
            leave.set()
        await store.append_events(next_rows(store, 1))  # free again
        assert [r.seq for r in await store.peek(10)] == [1, 2]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq": 0}, "seq"),
        ({"priority": 10}, "priority"),
        ({"kind": ""}, "kind"),
        ({"kind": "x" * 65}, "kind"),
        ({"created_at": datetime(2026, 1, 1)}, "timezone"),
        ({"event_id": "not-a-uuid"}, "uuid"),
        ({"envelope": "text"}, "bytes"),
    ],
)
def test_bad_rows_are_refused_with_a_clear_error(kwargs: dict[str, object], match: str) -> None:
    good: dict[str, object] = {
        "seq": 1,
        "event_id": uuid.uuid4(),
        "priority": 0,
        "kind": "item.returned",
        "created_at": T0,
        "envelope": b"sealed",
    }
    with pytest.raises((ValueError, TypeError), match=match):
        OutboxRow(**{**good, **kwargs})  # type: ignore[arg-type]


async def test_oversized_values_are_refused(tmp_path: Path) -> None:
    store = await Store.open(cfg(tmp_path))
    try:
        big = OutboxRow(1, uuid.uuid4(), 0, "x", T0, bytes(1024 * 1024 + 1))
        with pytest.raises(ValueError, match="exceeds"):
            await store.append_events([big])
        with pytest.raises(ValueError, match="too large"):
            await store.kv_put("doc", bytes(8 * 1024 * 1024 + 1))
        with pytest.raises(TypeError):
            await store.save_session("not bytes")  # type: ignore[arg-type]
        assert await store.next_seq() == 1
    finally:
        await store.close()


async def test_stats_read_the_outbox_again_only_after_a_write_committed(tmp_path: Path) -> None:
    """Status and metrics ask for the outbox every few seconds: with nothing committed since
    the last look the answer comes without a database read, and after any change (commit, ack,
    dead-lettering, revival, the database thread's own age pruning) it is the true one."""
    clock = FakeClock()
    dropped = asyncio.Event()

    def on_alert(alert: StoreAlert) -> None:
        if alert.kind is AlertKind.AGE_DROPPED:
            dropped.set()

    store = await Store.open(
        cfg(tmp_path, dead_letter_after=1, max_age_days=30, housekeeping_interval_s=1),
        on_alert=on_alert,
        clock=clock,
    )
    reads: list[bool] = []
    submit = store._worker.submit

    def counting(job: Any) -> None:
        if not job.write:
            reads.append(True)
        submit(job)

    store._worker.submit = counting  # type: ignore[method-assign]

    async def stats() -> tuple[int, int, int]:
        """(depth, bytes, dead), and a second look reads nothing."""
        st = await store.stats()
        before = len(reads)
        again = await store.stats()
        assert len(reads) == before, "nothing changed, yet the outbox was read again"
        assert (again.depth, again.bytes, again.dead) == (st.depth, st.bytes, st.dead)
        return st.depth, st.bytes, st.dead

    try:
        assert await stats() == (0, 0, 0)
        await store.append_events(next_rows(store, 3, priority=2, created_at=T0))
        assert await stats() == (3, 3 * 64, 0)
        assert await store.ack([1]) == 1
        assert await stats() == (2, 2 * 64, 0)
        assert await store.mark_failed(2, "refused") is True
        assert await stats() == (1, 2 * 64, 1)
        assert await store.revive_dead() == 1
        assert await stats() == (2, 2 * 64, 0)
        # The database thread prunes by age on its own timer; the alert says it has.
        clock.advance(timedelta(days=31))
        async with asyncio.timeout(30):
            await dropped.wait()
        assert await stats() == (0, 0, 0)
    finally:
        await store.close()
