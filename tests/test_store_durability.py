"""Durability before delivery: the durable watermark, the sequence sidecar, a durable new schema.

A power cut keeps what was fsynced and nothing else. These tests record, at each fsync the
store asks for, what the files held (``PowerCut``), rebuild the database a power cut at that
moment would leave, and check it against what the store had handed out for delivery.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

import pytest

from agent.store import Store, StoreConfig, dbfile
from agent.store.seqfile import SeqFile, SeqState, seq_path
from tests.store_helpers import FakeClock, next_rows


def cfg(path: Path, synchronous: Literal["FULL", "NORMAL"], **kw: Any) -> StoreConfig:
    return StoreConfig(path=path, synchronous=synchronous, **kw)


class PowerCut:
    """What the database files would hold after a power cut: their content at the last fsync
    the store made (SQLite's own fsyncs at checkpoints are not seen, so tests stay small)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced: dict[str, bytes] = {}
        self.calls = 0
        self._lock = threading.Lock()
        real = dbfile.fsync_file

        def recording(path: Path, held: int | None = None) -> None:
            real(path, held)
            with self._lock:
                self.calls += 1
                self.synced[path.name] = path.read_bytes()

        monkeypatch.setattr(dbfile, "fsync_file", recording)

    def rebuild(self, directory: Path, name: str = "state.db") -> Path:
        """The database as the synced bytes describe it, in ``directory``."""
        directory.mkdir()
        for suffix in ("", "-wal"):
            data = self.synced.get(name + suffix)
            if data is not None:
                (directory / (name + suffix)).write_bytes(data)
        return directory / name


def outbox_seqs(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [int(r[0]) for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        conn.close()


async def test_normal_mode_hands_out_only_rows_whose_commit_survives_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = PowerCut(monkeypatch)
    # A long delay: only the publisher asking for rows can make them durable in this test.
    store = await Store.open(
        cfg(tmp_path / "state.db", "NORMAL", durability_delay_ms=10_000), clock=FakeClock()
    )
    try:
        await store.append_events(next_rows(store, 5))
        await store.append_events(next_rows(store, 5))
        assert store.durable_seq == 0, "NORMAL: the commits are not fsynced yet"
        rows = await store.peek(100)
        assert [r.seq for r in rows] == list(range(1, 11))
        assert store.durable_seq == 10
        # The power cut right now: every row handed out is in the database that remains.
        after = cut.rebuild(tmp_path / "cut-1")
        assert outbox_seqs(after) == list(range(1, 11))
        # Commits meanwhile do not move the watermark; the next delivery read does.
        await store.append_events(next_rows(store, 3))
        assert store.durable_seq == 10
        assert [r.seq for r in await store.peek(100, after_seq=10)] == [11, 12, 13]
        assert outbox_seqs(cut.rebuild(tmp_path / "cut-2")) == list(range(1, 14))
    finally:
        await store.close()


async def test_normal_mode_makes_commits_durable_within_the_delay_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = PowerCut(monkeypatch)
    store = await Store.open(
        cfg(tmp_path / "state.db", "NORMAL", durability_delay_ms=20), clock=FakeClock()
    )
    try:
        calls = cut.calls
        for _ in range(20):
            await store.append_events(next_rows(store, 1))
        while store.durable_seq < 20:  # bounded by the test timeout; no peek involved
            await _tick()
        assert outbox_seqs(cut.rebuild(tmp_path / "cut")) == list(range(1, 21))
        # Coalesced: far fewer WAL fsyncs than commits.
        assert cut.calls - calls < 20
    finally:
        await store.close()


async def test_full_mode_watermark_follows_commits_without_extra_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = PowerCut(monkeypatch)
    store = await Store.open(cfg(tmp_path / "state.db", "FULL"), clock=FakeClock())
    try:
        calls = cut.calls
        await store.append_events(next_rows(store, 4))
        assert store.durable_seq == 4
        assert [r.seq for r in await store.peek(10)] == [1, 2, 3, 4]
        assert cut.calls == calls, "FULL: COMMIT already fsynced the WAL"
    finally:
        await store.close()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_a_new_database_is_on_disk_before_first_use(
    tmp_path: Path, synchronous: Literal["FULL", "NORMAL"]
) -> None:
    """Schema, epoch and counter are in the database file itself, not only in its WAL."""
    store = await Store.open(cfg(tmp_path / "state.db", synchronous), clock=FakeClock())
    try:
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(tmp_path / "state.db", copy / "state.db")  # the file alone, no -wal
        conn = sqlite3.connect(copy / "state.db")
        try:
            assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] >= 2
            (value,) = conn.execute("SELECT value FROM kv WHERE key = 'store.epoch'").fetchone()
            assert bytes(value) == store.epoch
            next_seq = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            assert next_seq == (1,)
        finally:
            conn.close()
        assert SeqFile(seq_path(tmp_path / "state.db")).read() == SeqState(store.epoch, 0, 0)
    finally:
        await store.close()


async def test_sidecar_reserves_a_block_before_a_row_beyond_it_is_handed_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    sidecar = SeqFile(seq_path(path))
    store = await Store.open(cfg(path, "FULL", seq_reserve_block=10), clock=FakeClock())
    try:
        await store.append_events(next_rows(store, 25))
        assert sidecar.read() == SeqState(store.epoch, 0, 0)  # committed, none handed out
        assert [r.seq for r in await store.peek(4)] == [1, 2, 3, 4]
        assert sidecar.read() == SeqState(store.epoch, 4, 14)
        # Within the reserved block the floor still follows every read that hands out new
        # rows (a database found behind it at the next start is a rollback), the block stays.
        await store.peek(10, after_seq=4)
        assert sidecar.read() == SeqState(store.epoch, 14, 14)
        await store.peek(2, after_seq=2)  # nothing new handed out: no write
        assert sidecar.read() == SeqState(store.epoch, 14, 14)
        await store.peek(1, after_seq=14)
        assert sidecar.read() == SeqState(store.epoch, 15, 25)
        # newest first reads reserve up to their highest seq too
        assert [r.seq for r in await store.peek(1, live_first=True)] == [25]
        assert sidecar.read() == SeqState(store.epoch, 25, 25)
    finally:
        await store.close()
    # A clean close raises the floor to everything durable.
    assert sidecar.read() == SeqState(store.epoch, 25, 25)


async def test_rows_beyond_the_reservation_wait_while_the_sidecar_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    store = await Store.open(cfg(path, "FULL", seq_reserve_block=5), clock=FakeClock())
    try:
        await store.append_events(next_rows(store, 3))
        assert [r.seq for r in await store.peek(10)] == [1, 2, 3]  # reserved up to 8
        await store.append_events(next_rows(store, 7))

        def broken(self: SeqFile, state: SeqState) -> None:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as m:
            m.setattr(SeqFile, "write", broken)
            assert [r.seq for r in await store.peek(10, after_seq=3)] == [4, 5, 6, 7, 8]
            assert store.held_reads == 1  # the reader must look again: nothing announces it
            await store.peek(5, after_seq=3)  # the write fails, but nothing is held back
            assert store.held_reads == 1
        assert [r.seq for r in await store.peek(10, after_seq=3)] == list(range(4, 11))
        assert store.held_reads == 1
        assert SeqFile(seq_path(path)).read() == SeqState(store.epoch, 10, 15)
    finally:
        await store.close()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)
