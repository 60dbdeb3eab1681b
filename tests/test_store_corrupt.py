"""A damaged database at start is moved aside (with its -wal/-shm), alerted, and replaced."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agent.store import (
    AlertKind,
    SchemaTooNewError,
    Store,
    StoreAlert,
    StoreConfig,
    StoreFailedError,
)
from tests.store_helpers import FakeClock, next_rows

PAGE = 4096


async def _populated(path: Path, batches: int = 10) -> None:
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        for _ in range(batches):
            await store.append_events(next_rows(store, 50, size=300))
        await store.audit_append("system", "agent.start", {"version": "0.1.0"})
    finally:
        await store.close()


def _quarantined(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ".corrupt-" in p.name)


async def _open_expecting_quarantine(path: Path) -> tuple[Store, StoreAlert]:
    seen: list[StoreAlert] = []
    store = await Store.open(StoreConfig(path=path), on_alert=seen.append, clock=FakeClock())
    (alert,) = store.open_alerts
    assert alert.kind is AlertKind.CORRUPT_QUARANTINED
    assert seen == [alert]  # returned from open AND raised
    return store, alert


async def test_garbage_file_is_quarantined_with_wal_and_shm(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    (tmp_path / "state.db-wal").write_bytes(b"not a wal either")
    (tmp_path / "state.db-shm").write_bytes(bytes(32768))
    store, alert = await _open_expecting_quarantine(path)
    try:
        assert "restarts at 1" in alert.detail
        assert await store.next_seq() == 1
        await store.append_events(next_rows(store, 2))  # the fresh database works
        assert (await store.stats()).depth == 2
    finally:
        await store.close()
    moved = _quarantined(tmp_path)
    names = [p.name for p in moved]
    assert len(moved) == 3, names
    base = next(p for p in moved if not p.name.endswith(("-wal", "-shm")))
    assert base.name.startswith("state.db.corrupt-")
    assert base.name.endswith("Z")
    assert base.read_bytes() == garbage  # kept intact for forensics and manual recovery
    assert (tmp_path / (base.name + "-wal")).read_bytes() == b"not a wal either"
    assert base.name in alert.detail


async def test_truncated_database_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _populated(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    store, _ = await _open_expecting_quarantine(path)
    try:
        assert (await store.stats()).depth == 0
        assert (await store.audit_verify()).ok
    finally:
        await store.close()
    assert len(_quarantined(tmp_path)) >= 1


async def test_damaged_pages_are_detected_and_the_sequence_survives(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _populated(path)  # seqs 1..500
    data = bytearray(path.read_bytes())
    pages = len(data) // PAGE
    # Flip the b-tree page headers of the last 20 pages (where outbox rows live).
    for page in range(pages - 20, pages):
        for i in range(page * PAGE, page * PAGE + 12):
            data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    store, alert = await _open_expecting_quarantine(path)
    try:
        # The counter was still readable in the damaged file: no seq is ever reused.
        assert "continues at 501" in alert.detail
        assert await store.next_seq() == 501
        await store.append_events(next_rows(store, 1))
        assert [r.seq for r in await store.peek(5)] == [501]
    finally:
        await store.close()


async def test_sound_database_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _populated(path, batches=1)
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        assert store.open_alerts == ()
        assert (await store.stats()).depth == 50
    finally:
        await store.close()
    assert _quarantined(tmp_path) == []


async def test_newer_schema_is_refused_not_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _populated(path, batches=1)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version (version, applied_us) VALUES (99, 0)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNewError, match="99"):
        await Store.open(StoreConfig(path=path), clock=FakeClock())
    assert _quarantined(tmp_path) == []
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 50
    finally:
        conn.close()


async def test_corruption_while_running_stops_the_store_loudly(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        for _ in range(14):
            await store.append_events(next_rows(store, 100, size=3000))
    finally:
        await store.close()
    seen: list[StoreAlert] = []
    store = await Store.open(StoreConfig(path=path), on_alert=seen.append, clock=FakeClock())
    try:
        # Damage pages the connection no longer caches (the file is larger than the cache).
        _scribble(path, range(10, 300))
        with pytest.raises(StoreFailedError, match="malformed"):
            await store.peek(2000)
        assert [a.kind for a in seen] == [AlertKind.FAILED]
        with pytest.raises(StoreFailedError):
            await store.append_events(next_rows(store, 1))
    finally:
        await store.close()
    # The restart that follows quarantines the file and starts afresh.
    store, _ = await _open_expecting_quarantine(path)
    await store.close()


def _scribble(path: Path, pages: range) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for page in pages:
            os.pwrite(fd, os.urandom(PAGE), page * PAGE)
    finally:
        os.close(fd)
