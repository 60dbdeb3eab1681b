"""The page-level salvage reader on hostile bytes: it never fails, and never invents a row."""

from __future__ import annotations

import functools
import sqlite3
import tempfile
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.privacy.envelope import EnvelopeError, EnvelopeHeader, Opener, Sealer, parse_header
from agent.store import schema
from agent.store.salvage import salvage, wal_header_valid

_BACKEND = X25519PrivateKey.generate()
SEALER = Sealer(_BACKEND.public_key(), "hpke1")
OPENER = Opener({"hpke1": _BACKEND})
EPOCH = bytes.fromhex("0011223344556677")
ROWS = 120


def _build(path: Path) -> dict[int, bytes]:
    """A real database (the store's schema) with sealed rows, some too big for one page."""
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn)
    envelopes: dict[int, bytes] = {}
    conn.execute("BEGIN")
    for seq in range(1, ROWS + 1):
        eid = uuid.uuid4()
        body = b"x" * (6000 if seq % 17 == 0 else 150)  # every 17th spills to overflow pages
        env = SEALER.seal(EnvelopeHeader("hpke1", "crib-07", seq, eid, 2, EPOCH), body)
        envelopes[seq] = env
        conn.execute(
            "INSERT INTO outbox (seq, event_id, priority, kind, created_us, size, envelope) "
            "VALUES (?, ?, 0, 'item.returned', 0, ?, ?)",
            (seq, eid.bytes, len(env), env),
        )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (ROWS + 1,))
    conn.execute("COMMIT")
    conn.execute("DELETE FROM outbox WHERE seq <= 30")  # delivered: their pages go free
    conn.close()
    return envelopes


@functools.cache
def base() -> tuple[bytes, dict[int, bytes]]:
    """The database's bytes and every envelope sealed into it (built once per session)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.db"
        envelopes = _build(path)
        return path.read_bytes(), envelopes


def test_an_intact_file_gives_back_exactly_its_rows(tmp_path: Path) -> None:
    data, envelopes = base()
    path = tmp_path / "copy.db"
    path.write_bytes(data)
    found = salvage(path, None)
    assert found.freelist_known
    assert sorted(found.rows) == list(range(31, ROWS + 1))  # deleted rows stay deleted
    assert all(found.rows[s].envelope == envelopes[s] for s in found.rows)
    assert found.next_seq == ROWS + 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=600)),
        min_size=1,
        max_size=12,
    ),
    cut=st.none() | st.floats(min_value=0.0, max_value=1.0),
)
@example(edits=[(82926796, b"\x01")], cut=None)  # an envelope's epoch byte (found in CI)
def test_damaged_files_never_break_salvage_nor_invent_rows(
    edits: list[tuple[int, bytes]], cut: float | None
) -> None:
    data, envelopes = base()
    damaged = bytearray(data)
    for offset, garbage in edits:
        at = offset % len(damaged)
        damaged[at : at + len(garbage)] = garbage[: len(damaged) - at]
    if cut is not None:
        damaged = damaged[: int(len(damaged) * cut)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.db"
        path.write_bytes(bytes(damaged))
        found = salvage(path, None)
    for seq, row in found.rows.items():
        # Whatever comes back is a row that was sealed, under its own seq and event id...
        header = parse_header(row.envelope)
        assert (header.seq, header.event_id) == (seq, row.event_id)
        assert header.event_id == parse_header(envelopes[seq]).event_id
        # ...and either exactly what was sealed, or damaged in a way only the backend's key can
        # tell (the header is bound into the seal): the backend refuses it, never misreads it.
        if row.envelope != envelopes[seq]:
            with pytest.raises(EnvelopeError):
                OPENER.open(row.envelope)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=20_000), st.binary(max_size=5_000))
def test_random_bytes_as_database_and_wal(db: bytes, wal: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db_path, wal_path = Path(tmp) / "x.db", Path(tmp) / "x.db-wal"
        db_path.write_bytes(db)
        wal_path.write_bytes(wal)
        found = salvage(db_path, wal_path)
        assert found.rows == {}
        assert wal_header_valid(wal_path) in (None, False)
