"""A cabinet's seq never repeats: epochs, the sequence sidecar, salvage of a quarantined file.

Each test builds a database with real sealed rows, breaks it the way the field does (deleted,
emptied, restored from an old copy, corrupted, a garbage WAL), reopens it and checks the alert,
the epoch, where the sequence continues and which undelivered rows come back.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer, parse_header
from agent.store import AlertKind, OutboxRow, Store, StoreAlert, StoreConfig
from agent.store.seqfile import SeqFile, SeqState, seq_path
from tests.store_helpers import FakeClock

PAGE = 4096
PRIVATE = X25519PrivateKey.generate()
SEALER = Sealer(PRIVATE.public_key(), "hpke1")
OPENER = Opener({"hpke1": PRIVATE})
BLOCK = 50


def cfg(path: Path, **kw: Any) -> StoreConfig:
    return StoreConfig(path=path, seq_reserve_block=BLOCK, **kw)


def sealed(store: Store, n: int, size: int = 200) -> list[OutboxRow]:
    """n rows continuing the sequence, sealed like the agent seals (version 2, the epoch)."""
    first = store.next_seq_nowait()
    rows = []
    for seq in range(first, first + n):
        eid = uuid.uuid4()
        header = EnvelopeHeader("hpke1", "crib-07", seq, eid, 2, store.epoch)
        body = b'{"seq":%d,"pad":"%s"}' % (seq, b"x" * size)
        rows.append(
            OutboxRow(seq, eid, 0, "item.checked_out", datetime.now(UTC), SEALER.seal(header, body))
        )
    return rows


class Opened:
    """A store opened with alerts collected."""

    def __init__(self) -> None:
        self.alerts: list[StoreAlert] = []

    async def open(self, path: Path, **kw: Any) -> Store:
        return await Store.open(cfg(path, **kw), on_alert=self.alerts.append, clock=FakeClock())

    def kinds(self) -> list[AlertKind]:
        return [a.kind for a in self.alerts]


async def history(path: Path, total: int, sent: int) -> tuple[bytes, list[OutboxRow]]:
    """``total`` rows committed, the first ``sent`` handed out for delivery and acked."""
    store = await Store.open(cfg(path), clock=FakeClock())
    try:
        rows: list[OutboxRow] = []
        while len(rows) < total:
            batch = sealed(store, min(50, total - len(rows)))
            await store.append_events(batch)
            rows += batch
        handed = await store.peek(sent) if sent else []
        assert [r.seq for r in handed] == list(range(1, sent + 1))
        await store.ack([r.seq for r in handed])
        return store.epoch, rows
    finally:
        await store.close()


def quarantined(directory: Path) -> list[Path]:
    """The quarantined database files (their -wal/-shm companions left out)."""
    return sorted(
        p
        for p in directory.iterdir()
        if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))
    )


async def test_reopening_keeps_the_epoch_and_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    epoch, _ = await history(path, 30, 10)
    o = Opened()
    store = await o.open(path)
    try:
        assert o.alerts == []
        assert store.epoch == epoch
        assert await store.next_seq() == 31
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["deleted", "zero bytes", "empty database"])
async def test_a_database_that_existed_and_is_gone_is_alerted_and_never_reuses_a_seq(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "state.db"
    epoch, _ = await history(path, 30, 10)
    if how == "deleted":
        path.unlink()
    elif how == "zero bytes":
        path.write_bytes(b"")
    else:  # what a power cut left on a lying disk: one valid header page, no schema
        path.unlink()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.DATABASE_LOST]
        (alert,) = o.alerts
        assert ("missing" if how == "deleted" else "empty") in alert.detail
        assert store.epoch != epoch
        # Seq 10 handed out reserved through 10 + BLOCK: the sequence continues above that.
        assert await store.next_seq() == 10 + BLOCK + 1
        assert f"continues at {await store.next_seq()}" in alert.detail
    finally:
        await store.close()


async def test_a_restored_old_copy_is_behind_what_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    epoch, _ = await history(path, 20, 0)
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(path, backup / "state.db")  # closed cleanly: the file is the whole database
    store = await Store.open(cfg(path), clock=FakeClock())
    try:
        await store.append_events(sealed(store, 40))
        handed = await store.peek(60)
        assert handed[-1].seq == 60
    finally:
        await store.close()
    shutil.copy(backup / "state.db", path)  # someone restores yesterday's copy
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.SEQ_ROLLBACK]
        assert "went back to 20" in o.alerts[0].detail
        assert store.epoch != epoch
        # Reserved through 60 + BLOCK when seq 60 was handed out: never below that.
        assert await store.next_seq() == 60 + BLOCK + 1
        # The old copy's undelivered rows are still there, under their own (old) epoch.
        assert [parse_header(r.envelope).epoch for r in await store.peek(100)] == [epoch] * 20
    finally:
        await store.close()


async def test_a_database_of_another_epoch_is_treated_as_a_rollback(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await history(path, 10, 5)
    other = tmp_path / "other"
    other.mkdir()
    await history(other / "state.db", 3, 0)
    shutil.copy(other / "state.db", path)
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.SEQ_ROLLBACK]
        assert "another epoch" in o.alerts[0].detail
        assert await store.next_seq() == 5 + BLOCK + 1
    finally:
        await store.close()


async def test_an_unreadable_sidecar_moves_the_sequence_a_block_ahead(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    epoch, _ = await history(path, 10, 5)
    seq_path(path).write_bytes(os.urandom(1024))
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.SEQ_STATE_LOST]
        assert store.epoch != epoch
        assert await store.next_seq() == 11 + BLOCK
    finally:
        await store.close()
    assert SeqFile(seq_path(path)).read() == SeqState(store.epoch, 10 + BLOCK, 10 + BLOCK)


async def test_a_missing_sidecar_is_recreated_from_a_sound_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    epoch, _ = await history(path, 10, 5)
    seq_path(path).unlink()
    o = Opened()
    store = await o.open(path)
    try:
        assert o.alerts == []
        assert store.epoch == epoch
        assert await store.next_seq() == 11
    finally:
        await store.close()
    assert SeqFile(seq_path(path)).read() == SeqState(epoch, 10, 10)


async def test_a_database_from_before_epochs_gets_one_without_alarm(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await history(path, 10, 0)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM kv WHERE key = 'store.epoch'")
    conn.commit()
    conn.close()
    seq_path(path).unlink()
    o = Opened()
    store = await o.open(path)
    try:
        assert o.alerts == []
        assert len(store.epoch) == 8
        assert await store.next_seq() == 11
    finally:
        await store.close()


# -- corruption: quarantine and salvage ------------------------------------------------------


def _zero_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = bytes(100)
    path.write_bytes(bytes(data))


def _random_first_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:PAGE] = os.urandom(PAGE)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10 // PAGE * PAGE])


def _random_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    pages = len(data) // PAGE
    for page in range(pages // 2, pages // 2 + 4):
        data[page * PAGE : (page + 1) * PAGE] = os.urandom(PAGE)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [_zero_header, _random_first_page, _truncate, _random_middle],
    ids=lambda f: f.__name__,
)
async def test_a_corrupt_database_is_quarantined_and_its_undelivered_rows_salvaged(
    tmp_path: Path, damage: Any
) -> None:
    path = tmp_path / "state.db"
    epoch, rows = await history(path, 300, 100)
    undelivered = {r.seq: r for r in rows[100:]}
    damage(path)
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.CORRUPT_QUARANTINED]
        assert len(quarantined(tmp_path)) == 1
        assert store.epoch != epoch
        # Never below what the old database had numbered or reserved.
        assert await store.next_seq() > 300
        back = await store.peek(1000)
        got = {r.seq: r for r in back}
        # Salvaged rows are byte for byte what was sealed; some may be lost with the damage,
        # and with the first page gone old delivered rows may come back (same ids: duplicates).
        for seq, row in got.items():
            assert row.envelope == (undelivered.get(seq) or rows[seq - 1]).envelope
            header, _ = OPENER.open(row.envelope)
            assert (header.seq, header.event_id, header.epoch) == (seq, row.event_id, epoch)
        assert set(undelivered) & set(got), "nothing was salvaged"
        if damage in (_zero_header, _random_first_page):
            assert set(undelivered) <= set(got)  # only page 1 was hit: every row is back
        detail = o.alerts[0].detail
        if damage in (_zero_header, _random_first_page):
            # The free-page list is gone with page 1: the alert says the salvaged rows may
            # include delivered ones and missing seqs may be delivered, never a false "lost".
            assert f"salvaged {len(got)} event(s)" in detail
            assert "may have been delivered before" in detail
            assert "could not be read" not in detail
        else:
            assert f"salvaged {len(got)} undelivered event(s)" in detail
    finally:
        await store.close()


async def test_rows_only_in_the_wal_of_a_corrupt_database_are_salvaged(tmp_path: Path) -> None:
    """kill -9 leaves the newest commits in the WAL; the database file is then damaged."""
    path = tmp_path / "state.db"
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    store = await Store.open(cfg(path), clock=FakeClock())
    try:
        rows = sealed(store, 40)
        await store.append_events(rows)
        # A crash now: copy the files as they are (database file and WAL), without closing.
        for name in ("state.db", "state.db-wal", "state.db.seq"):
            shutil.copy(tmp_path / name, snapshot / name)
    finally:
        await store.close()
    path = snapshot / "state.db"
    _random_first_page(path)
    o = Opened()
    store = await o.open(path)
    try:
        assert o.kinds() == [AlertKind.CORRUPT_QUARANTINED]
        assert [r.seq for r in await store.peek(100)] == list(range(1, 41))
        assert await store.next_seq() == 41
    finally:
        await store.close()


async def test_a_garbage_wal_is_moved_aside_before_sqlite_discards_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    store = await Store.open(cfg(path), clock=FakeClock())
    try:
        await store.append_events(sealed(store, 10))
        await store.close()  # rows 1..10 in the file itself
        store = await Store.open(cfg(path), clock=FakeClock())
        await store.append_events(sealed(store, 10))
        handed = await store.peek(100)
        assert handed[-1].seq == 20  # reserved through 20 + BLOCK
        for name in ("state.db", "state.db-wal", "state.db.seq"):
            shutil.copy(tmp_path / name, snapshot / name)
    finally:
        await store.close()
    garbage = os.urandom(64 * 1024)
    (snapshot / "state.db-wal").write_bytes(garbage)
    o = Opened()
    store = await o.open(snapshot / "state.db")
    try:
        # The WAL held rows 11..20 (already handed out): the counter went back to 10.
        assert o.kinds() == [AlertKind.WAL_QUARANTINED, AlertKind.SEQ_ROLLBACK]
        assert await store.next_seq() == 20 + BLOCK + 1
        assert [r.seq for r in await store.peek(100)] == list(range(1, 11))
    finally:
        await store.close()
    (moved,) = [p for p in snapshot.iterdir() if p.name.startswith("state.db-wal.corrupt-")]
    assert moved.read_bytes() == garbage


async def test_an_orphan_wal_beside_a_deleted_database_is_not_replayed_but_salvaged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    store = await Store.open(cfg(path), clock=FakeClock())
    try:
        rows = sealed(store, 12)
        await store.append_events(rows)
        for name in ("state.db-wal", "state.db.seq"):
            shutil.copy(tmp_path / name, snapshot / name)
    finally:
        await store.close()
    o = Opened()
    store = await o.open(snapshot / "state.db")  # the database file itself is gone
    try:
        assert o.kinds() == [AlertKind.DATABASE_LOST]
        assert "orphan write-ahead log" in o.alerts[0].detail
        assert [r.seq for r in await store.peek(100)] == list(range(1, 13))
        assert await store.next_seq() == 13
    finally:
        await store.close()
