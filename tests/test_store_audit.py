"""The audit log is a hash chain: edits, deletions, reordering and truncation are detected."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.privacy.pseudonym import Pseudonymizer
from agent.store import Store, StoreConfig, audit_chain, schema
from agent.store.db import open_database, to_us
from tests.store_helpers import T0, FakeClock


async def _log(path: Path, n: int, clock: FakeClock | None = None) -> None:
    clock = clock or FakeClock()
    store = await Store.open(StoreConfig(path=path), clock=clock)
    try:
        for i in range(n):
            actor = "system" if i % 3 == 0 else f"cli:uid={1000 + i}"
            await store.audit_append(actor, "allowlist.update", {"version": i, "entries": [i, "x"]})
            clock.advance(timedelta(minutes=1))
    finally:
        await store.close()


async def _verify(path: Path) -> tuple[bool, tuple[str, ...], int]:
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        report = await store.audit_verify()
    finally:
        await store.close()
    return report.ok, report.problems, report.checked


def _tamper(path: Path, *sql: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in sql:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


async def test_intact_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await _log(path, 10)
    ok, problems, checked = await _verify(path)
    assert ok, problems
    assert checked == 10


async def test_hash_follows_the_documented_canonical_form(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await _log(path, 2)
    conn = sqlite3.connect(path)
    rows = conn.execute(
        "SELECT seq, at_us, actor, action, details, prev_hash, hash, v, salt, personal "
        "FROM audit ORDER BY seq"
    ).fetchall()
    conn.close()
    prev = bytes(32)
    for seq, at_us, actor, action, details, prev_hash, digest, v, salt, personal in rows:
        assert (v, len(salt)) == (2, 16)
        assert prev_hash == prev
        assert json.loads(details) == {"version": seq - 1, "entries": [seq - 1, "x"]}
        fields = json.dumps([actor, details], separators=(",", ":"), ensure_ascii=False).encode()
        assert (
            personal == hashlib.sha256(b"cabinet-agent/audit/personal\0" + salt + fields).digest()
        )
        body = json.dumps(
            [seq, at_us, action, personal.hex(), prev_hash.hex()], separators=(",", ":")
        ).encode()
        assert digest == hashlib.sha256(b"cabinet-agent/audit/v2\0" + body).digest()
        prev = digest
    assert rows[0][1] == to_us(T0)
    assert rows[0][8] != rows[1][8]  # a fresh salt per record


@pytest.mark.parametrize(
    ("tamper", "expect"),
    [
        (
            lambda: [
                'UPDATE audit SET details = \'{"entries":[4,"x"],"version":40}\' WHERE seq = 5'
            ],
            "record 5: content does not match its hash (edited)",
        ),
        (lambda: ["UPDATE audit SET actor = 'system' WHERE seq = 2"], "record 2: content"),
        (lambda: ["DELETE FROM audit WHERE seq = 5"], "record 6: expected seq 5"),
        (
            # Swap records 3 and 4 wholesale (seq numbers travel with them).
            lambda: [
                "UPDATE audit SET seq = -3 WHERE seq = 3",
                "UPDATE audit SET seq = 3 WHERE seq = 4",
                "UPDATE audit SET seq = 4 WHERE seq = -3",
            ],
            "record 3",
        ),
        (
            # Swap the contents but keep the seq column in order.
            lambda: [
                "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE seq IN (3, 4)",
                "UPDATE audit SET (at_us, actor, action, details, prev_hash, hash) = "
                "(SELECT at_us, actor, action, details, prev_hash, hash FROM t WHERE t.seq = 7 - audit.seq) "
                "WHERE seq IN (3, 4)",
            ],
            "record 3: prev_hash does not match",
        ),
        (
            lambda: ["DELETE FROM audit WHERE seq >= 9"],
            "tail truncated: head is 10, last record is 8",
        ),
        (lambda: ["DELETE FROM audit"], "log is empty but the head says 10 records"),
        (lambda: ["DELETE FROM audit WHERE seq = 1"], "record 2: expected seq 1"),
    ],
)
async def test_tampering_is_detected(
    tmp_path: Path, tamper: Callable[[], list[str]], expect: str
) -> None:
    path = tmp_path / "s.db"
    await _log(path, 10)
    _tamper(path, *tamper())
    ok, problems, _ = await _verify(path)
    assert not ok
    assert any(expect in p for p in problems), problems


async def test_truncation_stays_visible_after_new_appends(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await _log(path, 5)
    _tamper(path, "DELETE FROM audit WHERE seq = 5")
    await _log(path, 2)  # the chain continues from the head, not from the last row
    ok, problems, _ = await _verify(path)
    assert not ok
    assert any("record 6: expected seq 5" in p for p in problems), problems


async def test_retention_prunes_a_prefix_and_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()
    store = await Store.open(StoreConfig(path=path, audit_retention_days=365), clock=clock)
    try:
        for i in range(6):
            await store.audit_append("system", "old", {"i": i})
        clock.advance(timedelta(days=200))
        for i in range(3):
            await store.audit_append("system", "newer", {"i": i})
        clock.advance(timedelta(days=200))  # the first six are now 400 days old
        result = await store.housekeeping()
        assert result.audit_pruned == 6
        report = await store.audit_verify()
        assert report.ok, report.problems
        assert (report.anchor_seq, report.first_seq, report.last_seq) == (6, 7, 9)
        assert await store.audit_append("system", "after-prune", {}) == 10
        assert (await store.audit_verify()).ok
        tail = await store.audit_tail(2)
        assert [(r.seq, r.action) for r in tail] == [(9, "newer"), (10, "after-prune")]
        # Pruning again finds nothing new to prune.
        assert (await store.housekeeping()).audit_pruned == 0
    finally:
        await store.close()
    # Deleting the first kept record is still caught (it no longer matches the anchor).
    _tamper(path, "DELETE FROM audit WHERE seq = 7")
    ok, problems, _ = await _verify(path)
    assert not ok
    assert any("record 8: expected seq 7" in p for p in problems), problems


async def test_skewed_clock_does_not_punch_holes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()
    store = await Store.open(StoreConfig(path=path, audit_retention_days=30), clock=clock)
    try:
        await store.audit_append("system", "a", {})
        clock.advance(timedelta(days=100))
        await store.audit_append("system", "b", {})  # recent
        clock.advance(timedelta(days=-99))  # the clock stepped back
        await store.audit_append("system", "c", {})  # looks old
        clock.advance(timedelta(days=99 + 10))
        # Only the contiguous old prefix goes: record 1. Record 3 stays behind record 2.
        assert (await store.housekeeping()).audit_pruned == 1
        report = await store.audit_verify()
        assert report.ok
        assert (report.first_seq, report.last_seq) == (2, 3)
    finally:
        await store.close()


async def test_details_must_be_plain_json(tmp_path: Path) -> None:
    store = await Store.open(StoreConfig(path=tmp_path / "s.db"), clock=FakeClock())
    try:
        with pytest.raises(ValueError, match="JSON"):
            await store.audit_append("system", "x", {"bad": object()})
        with pytest.raises(ValueError, match="JSON"):
            await store.audit_append("system", "x", {"nan": float("nan")})
        with pytest.raises(ValueError):
            await store.audit_append("", "x", {})
        assert (await store.audit_verify()).checked == 0
        seq, digest = await store.audit_head()
        assert (seq, digest) == (0, bytes(32))
    finally:
        await store.close()


async def test_actor_must_not_look_like_a_raw_badge_id(tmp_path: Path) -> None:
    store = await Store.open(StoreConfig(path=tmp_path / "s.db"), clock=FakeClock())
    try:
        pseudonym = Pseudonymizer("hangar-3", "s1", bytes(32)).badge("0012AB34CD")
        for actor in ("system", "backend", "system:publisher", "cli:uid=1000", pseudonym):
            await store.audit_append(actor, "x", {})
        for actor in (
            "0012AB34CD",
            "ab12cd34ef",
            "badge 0012ab34cd",
            "",
            "Alice",
            "user-4000123456",
        ):
            with pytest.raises(ValueError, match="actor") as info:
                await store.audit_append(actor, "x", {})
            assert actor not in str(info.value) or not actor
        assert (await store.audit_verify()).checked == 5
    finally:
        await store.close()


def _raw_bytes(path: Path) -> bytes:
    """The database, its WAL and its shared-memory index as an attacker who copies them sees."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            out += Path(str(path) + suffix).read_bytes()
    return out


async def test_pruned_records_are_gone_from_the_file_the_wal_and_free_pages(
    tmp_path: Path,
) -> None:
    """Retention is a promise about bytes, not rows: a pruned record's content must not
    survive in a freed page, in an old WAL frame or in the -shm index."""
    path = tmp_path / "s.db"
    clock = FakeClock()
    store = await Store.open(StoreConfig(path=path, audit_retention_days=90), clock=clock)
    pad = "x" * 300  # a few records per page: whole pages are freed, not just cells
    try:
        for i in range(120):
            await store.audit_append("system", "old", {"mark": f"OLD-MARK-{i:04d}", "pad": pad})
        clock.advance(timedelta(days=60))
        for i in range(5):
            await store.audit_append("system", "kept", {"mark": f"NEW-MARK-{i:04d}"})
        clock.advance(timedelta(days=60))  # the old ones are 120 days old, the new 60
        raw = _raw_bytes(path)
        assert b"OLD-MARK-0000" in raw
        assert b"NEW-MARK-0000" in raw
        assert (await store.housekeeping()).audit_pruned == 120
        # While the agent runs: neither the file nor the WAL holds a pruned record.
        raw = _raw_bytes(path)
        assert raw.count(b"OLD-MARK-") == 0
        assert b"NEW-MARK-0004" in raw
        assert (await store.audit_verify()).ok
    finally:
        await store.close()
    raw = _raw_bytes(path)
    assert raw.count(b"OLD-MARK-") == 0
    assert b"NEW-MARK-0004" in raw


def _pseudonym(n: int) -> str:
    return Pseudonymizer("hangar-3", "s1", bytes(32)).badge(f"00{n:08X}")


async def test_redaction_erases_a_person_and_the_chain_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    gone, kept = _pseudonym(1), _pseudonym(2)
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        await store.audit_append(gone, "access.granted", {"door_id": "d1"})
        await store.audit_append(kept, "access.granted", {"door_id": "d1"})
        await store.audit_append("backend", "note", {"who": gone, "pad": "x" * 200})
        await store.audit_append(gone, "access.denied", {"reason": "not-listed"})
        await store.audit_append("system", "door.forced", {"door_id": "d1"})
        assert gone.encode() in _raw_bytes(path)
        assert await store.audit_redact([gone]) == 3
        assert await store.audit_redact([gone]) == 0  # nothing left to erase
        report = await store.audit_verify()
        assert report.ok, report.problems
        assert (report.checked, report.redacted, report.redacted_v1) == (5, 3, 0)
        tail = await store.audit_tail(5)
        assert [(r.seq, r.redacted, r.action) for r in tail if r.redacted] == [
            (1, True, "access.granted"),
            (3, True, "note"),
            (4, True, "access.denied"),
        ]
        assert all(r.actor == "" and dict(r.details) == {} for r in tail if r.redacted)
        assert tail[1].actor == kept
        raw = _raw_bytes(path)
        assert raw.count(gone.encode()) == 0
        assert raw.count(kept.encode()) > 0
        await store.audit_append("system", "after", {})
        assert (await store.audit_verify()).ok
    finally:
        await store.close()
    # A redacted record's remaining fields are still covered by the chain.
    _tamper(path, "UPDATE audit SET action = 'access.forged' WHERE seq = 1")
    ok, problems, _ = await _verify(path)
    assert not ok
    assert "record 1: content does not match its hash (edited)" in problems
    # And un-redacting with made-up content does not verify either.
    _tamper(
        path,
        "UPDATE audit SET action = 'access.granted' WHERE seq = 1",
        f"UPDATE audit SET redacted = 0, actor = '{kept}', details = '{{}}', salt = zeroblob(16) "
        "WHERE seq = 1",
    )
    ok, problems, _ = await _verify(path)
    assert "record 1: content does not match its hash (edited)" in problems


def _schema_2_database(path: Path, actors: list[str]) -> None:
    """A database as an agent before schema 3 left it: v1 records (every field hashed)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL) "
        "STRICT"
    )
    for version, statements in schema.MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
    prev = bytes(32)
    for seq, actor in enumerate(actors, 1):
        at = to_us(T0) + seq
        digest = audit_chain.record_hash(seq, at, actor, "access.granted", "{}", prev)
        conn.execute(
            "INSERT INTO audit (seq, at_us, actor, action, details, prev_hash, hash) "
            "VALUES (?, ?, ?, 'access.granted', '{}', ?, ?)",
            (seq, at, actor, prev, digest),
        )
        prev = digest
    conn.execute(
        "INSERT INTO kv (key, value, updated_us) VALUES ('store.audit_head', ?, 0)",
        (len(actors).to_bytes(8, "big") + prev,),
    )
    conn.close()


async def test_a_v1_chain_migrates_in_place_and_can_be_redacted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    gone = _pseudonym(7)
    _schema_2_database(path, [_pseudonym(6), gone, _pseudonym(8)])
    store = await Store.open(StoreConfig(path=path), clock=FakeClock())
    try:
        report = await store.audit_verify()
        assert report.ok, report.problems
        assert report.checked == 3
        seq = await store.audit_append("system", "after-upgrade", {})
        assert seq == 4  # the v2 record chains onto the v1 head
        assert await store.audit_redact([gone]) == 1
        report = await store.audit_verify()
        assert report.ok, report.problems
        assert (report.checked, report.redacted, report.redacted_v1) == (4, 1, 1)
        assert _raw_bytes(path).count(gone.encode()) == 0
    finally:
        await store.close()


def test_an_erasure_of_many_people_is_one_pass_over_the_audit_log(tmp_path: Path) -> None:
    """An erasure names up to 1000 pseudonyms: one statement per pseudonym scanned the whole
    table each time (seconds per 20,000 records, every write of the cabinet waiting). One
    pass finds every record naming any of them, as actor, JSON value or JSON key."""
    db = open_database(tmp_path / "s.db", StoreConfig(path=tmp_path / "s.db"))
    try:
        people = [_pseudonym(n) for n in range(1000)]
        kept = _pseudonym(5000)
        rows = [
            (people[3], {"door_id": "d1"}),
            ("backend", {"who": people[999]}),
            ("backend", {"by": {people[500]: ["user"]}}),
            (kept, {"door_id": "d1"}),
            ("backend", {"note": f"{people[7]} in free text is not a JSON string"}),
        ]
        db.conn.execute("BEGIN")
        for i, (actor, details) in enumerate(rows):
            db.audit.append(actor, "test", audit_chain.canonical_details(details), to_us(T0) + i)
        db.conn.execute("COMMIT")
        statements: list[str] = []
        db.conn.set_trace_callback(statements.append)
        db.conn.execute("BEGIN")
        assert db.audit.redact(people) == 3
        db.conn.execute("COMMIT")
        db.conn.set_trace_callback(None)
        assert len([s for s in statements if s.lstrip().upper().startswith("UPDATE")]) == 1
        left = db.conn.execute("SELECT seq FROM audit WHERE redacted = 0 ORDER BY seq").fetchall()
        assert [seq for (seq,) in left] == [4, 5]
        assert db.audit.verify().ok
    finally:
        db.conn.close()
