"""Event models: round trip, validation of actors/ids, priorities, UUIDv7, published JSON schema."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from agent.domain import events as ev
from agent.domain.ids import Uuid7Generator, uuid7_from, uuid7_time
from tests.conftest import ROOT

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ALICE = "p1.k1.abcdefghijklmnopqrstuvwxyz"
SID = UUID("01a22933-95c0-7341-946b-907949255679")


def _common(gen: Uuid7Generator) -> dict[str, Any]:
    return {"event_id": gen(T0), "time": T0, "site_id": "hangar-3", "cabinet_id": "crib-07"}


def _one_of_each(gen: Uuid7Generator) -> list[ev.Event]:
    c = _common
    return [
        ev.ItemCheckedOut(**c(gen), session_id=SID, actors=[ALICE], epc="e20001", drawer="top"),
        ev.ItemReturned(**c(gen), session_id=SID, actors=[ALICE], epc="e20001", drawer="top"),
        ev.SessionOpened(**c(gen), session_id=SID, actors=[ALICE], trigger="badge", door_id="door"),
        ev.SessionClosed(
            **c(gen),
            session_id=SID,
            actors=[ALICE, "unknown"],
            quality="complete",
            duration_s=12.5,
            scan_duration_ms=4000,
            reads=100,
            tags=10,
            passes=2,
            checked_out=1,
            returned=0,
        ),
        ev.AccessDenied(**c(gen), actor=ALICE, badge_reader="front", reason="role"),
        ev.AccessLockout(
            **c(gen), badge_reader="front", state="locked", denials=5, until=T0 + timedelta(1)
        ),
        ev.DoorForced(**c(gen), session_id=SID, door_id="door"),
        ev.DoorLeftOpen(
            **c(gen), session_id=SID, door_id="door", actors=["unknown"], open_s=120, alert=1
        ),
        ev.ItemUnknown(**c(gen), epc="abcd", drawer="top"),
        ev.ItemMisplaced(**c(gen), epc="abcd", asset_id="A-1", drawer="top", home_drawer="bottom"),
        ev.ItemMissing(**c(gen), epc="abcd", drawer="top"),
        ev.ItemCounterfeit(
            **c(gen),
            epc="abcd",
            asset_id="A-1",
            tid="e2801160200074cf0a6b0a12",
            drawer="top",
            session_id=SID,
            actors=[ALICE],
        ),
        ev.ItemCalibrationOverdue(
            **c(gen),
            session_id=SID,
            actors=[ALICE],
            epc="abcd",
            asset_id="A-1",
            calibration_due=date(2026, 1, 1),
        ),
        ev.ItemOverdue(
            **c(gen),
            session_id=SID,
            held_by=[ALICE],
            epc="abcd",
            asset_id="A-1",
            drawer="top",
            checked_out_at=datetime(2026, 3, 2, 8, 0, tzinfo=UTC),
            limit_s=43_200.0,
            out_s=43_200.5,
        ),
        ev.InventoryIncomplete(
            **c(gen), purpose="session", attempt=1, will_retry=True, reasons=["dock-1 offline"]
        ),
        ev.InventorySuspect(
            **c(gen), purpose="session", session_id=SID, drawer="bottom", held=3, first=True
        ),
        ev.InventorySnapshot(**c(gen), tags=1, by_drawer={"top": 1}, items={"abcd": "top"}),
        ev.ReaderOffline(**c(gen), reader_id="dock-1", detail="keepalive timeout", connection=3),
        ev.ReaderOnline(**c(gen), reader_id="dock-1", connection=4, antennas_connected=[1, 2]),
        ev.ReaderFlapping(
            **c(gen), reader_id="dock-1", state="flapping", outages=3, window_s=600, connection=7
        ),
        ev.AgentAlert(
            **c(gen),
            kind="store.overflow_dropped",
            detail="outbox over max_bytes",
            dropped={"2": 3},
            dropped_bytes=1200,
            seqs=[4, 5, 6],
        ),
        ev.AccessGraceGranted(
            **c(gen),
            actor=ALICE,
            badge_reader="front",
            roles=["supervisor"],
            allow_list_version=3,
            expired_at=T0 - timedelta(hours=1),
            grace_until=T0 + timedelta(hours=3),
        ),
        ev.AgentClockStep(
            **c(gen),
            clock="untrusted",
            step_s=-1.7e9,
            wall=datetime(1970, 1, 1, tzinfo=UTC),
            trusted=False,
            at_start=True,
        ),
        ev.AuditAnchor(
            **c(gen),
            head_seq=2,
            head_hash="b" * 64,
            links=[
                ev.AuditLink(seq=1, prev_hash="0" * 64, hash="a" * 64),
                ev.AuditLink(seq=2, prev_hash="a" * 64, hash="b" * 64),
            ],
        ),
        ev.TechnicianOpened(
            **c(gen),
            session_id=SID,
            technician="uid:1000",
            via="cli",
            reason="restock gloves",
            door_id="door",
        ),
        ev.TechnicianClosed(
            **c(gen),
            session_id=SID,
            technician=ALICE,
            via="badge",
            ended="scanned",
            quality="complete",
            duration_s=30.0,
            restocked=2,
            removed=1,
            actors=[ALICE],
        ),
        ev.ItemRestocked(
            **c(gen), session_id=SID, technician="uid:0", epc="abcd", sku="GLOVE-M", drawer="top"
        ),
        ev.ItemRemoved(**c(gen), session_id=SID, technician="uid:1000", epc="abcd", drawer="top"),
        ev.ItemConsumed(**c(gen), actors=[ALICE], epc="abcd", sku="GLOVE-M", drawer="top"),
        ev.InventoryRebaselined(
            **c(gen), technician="uid:1000", reason="recount", added=1, removed=2, tags=9
        ),
    ]


def test_every_type_round_trips_through_json() -> None:
    events = _one_of_each(Uuid7Generator(random.Random(1).randbytes))
    assert sorted(e.type for e in events) == sorted(ev.EVENT_TYPES)
    for event in events:
        data = ev.to_json(event)
        back = ev.from_json(data)
        assert back == event
        assert type(back) is type(event)
        assert back.schema_version == 1


def test_priorities() -> None:
    by_type = {e.type: ev.priority(e) for e in _one_of_each(Uuid7Generator())}
    assert {t for t, p in by_type.items() if p == 0} == {
        "item.checked_out",
        "item.returned",
        "door.forced",
        "item.counterfeit",
        "access.lockout",
        "access.grace_granted",
        "agent.alert",
        "agent.clock_step",
        "audit.anchor",
        "technician.opened",
        "item.removed",
        "inventory.rebaselined",
    }
    assert {t for t, p in by_type.items() if p == 2} == {"inventory.snapshot"}
    assert sum(1 for p in by_type.values() if p == 1) == len(ev.EVENT_TYPES) - 13


@pytest.mark.parametrize(
    "actor",
    [
        "04001234ab",
        "1234567890",
        "P1.k1.abcdefghijklmnopqrstuvwxyz",
        "p1.k1.ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "p1.k1.abcdefghijklmnopqrstuvwxy",
        "p1.k1.abcdefghijklmnopqrstuvwxyz0",
        "p1..abcdefghijklmnopqrstuvwxyz",
        "",
        "Unknown",
    ],
)
def test_raw_or_malformed_actor_is_refused(actor: str) -> None:
    with pytest.raises(ValidationError, match="actor"):
        ev.AccessDenied(**_common(Uuid7Generator()), actor=actor, badge_reader="f", reason="role")


def test_event_id_must_be_uuid7_and_time_aware() -> None:
    base = _common(Uuid7Generator())
    with pytest.raises(ValidationError, match="UUIDv7"):
        ev.DoorForced(**{**base, "event_id": uuid4()}, session_id=SID, door_id="d")
    with pytest.raises(ValidationError, match="timezone"):
        ev.DoorForced(**{**base, "time": datetime(2026, 1, 1)}, session_id=SID, door_id="d")
    local = datetime(2026, 1, 1, 10, tzinfo=timezone(timedelta(hours=2)))
    forced = ev.DoorForced(**{**base, "time": local}, session_id=SID, door_id="d")
    assert forced.time == datetime(2026, 1, 1, 8, tzinfo=UTC)
    assert forced.time.tzinfo is UTC


def test_unknown_type_and_extra_fields_are_refused() -> None:
    good = ev.to_json(_one_of_each(Uuid7Generator())[6])
    with pytest.raises(ValidationError):
        ev.from_json(good.replace(b"door.forced", b"door.exploded"))
    with pytest.raises(ValidationError):
        ev.from_json(good[:-1] + b',"badge_id":"0400123"}')


def test_with_seq() -> None:
    event = _one_of_each(Uuid7Generator())[0]
    assert event.seq == 0
    committed = ev.with_seq(event, 42)
    assert committed.seq == 42
    assert committed.event_id == event.event_id
    with pytest.raises(ValueError, match="start at 1"):
        ev.with_seq(event, 0)


def test_uuid7_layout_and_monotonicity() -> None:
    u = uuid7_from(0x0123456789AB, (1 << 74) - 1)
    assert u.version == 7
    assert u.variant == "specified in RFC 4122"
    assert u.int >> 80 == 0x0123456789AB
    gen = Uuid7Generator(random.Random(7).randbytes)
    ids = [gen(T0) for _ in range(2000)]
    # The wall clock stepping back must not break ordering either.
    ids += [gen(T0 - timedelta(seconds=5)) for _ in range(10)]
    ids += [gen(T0 + timedelta(milliseconds=1))]
    assert ids == sorted(ids, key=lambda x: x.int)
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids)
    assert uuid7_time(ids[0]) == T0
    same = Uuid7Generator(random.Random(7).randbytes)
    assert [same(T0) for _ in range(5)] == ids[:5]
    with pytest.raises(ValueError, match="aware"):
        gen(datetime(2026, 1, 1))


def test_committed_schema_equals_generated() -> None:
    committed = (ROOT / "docs" / "events.schema.json").read_text(encoding="utf-8")
    assert committed == ev.json_schema_text(), (
        "docs/events.schema.json is stale: python -m agent.domain.events > docs/events.schema.json"
    )


def test_schema_script_entry_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.domain.events"],
        capture_output=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    ).stdout.decode()
    assert out == ev.json_schema_text()
    schema = ev.json_schema()
    assert set(schema["discriminator"]["mapping"]) == set(ev.EVENT_TYPES)


def test_every_event_type_is_documented() -> None:
    text = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    for name in ev.EVENT_TYPES:
        assert f"`{name}`" in text, name


@pytest.mark.parametrize(
    "technician", ["root", "uid:", "uid:-1", "uid:12345678901", "04001234ab", "unknown"]
)
def test_a_technician_is_a_local_uid_or_a_pseudonym(technician: str) -> None:
    with pytest.raises(ValidationError):
        ev.TechnicianOpened(
            **_common(Uuid7Generator()),
            session_id=SID,
            technician=technician,
            via="cli",
            reason="x",
            door_id="door",
        )


@pytest.mark.parametrize("reason", ["", "line\nbreak", "x" * 201, "tab\there"])
def test_a_technician_reason_is_short_printable_text(reason: str) -> None:
    with pytest.raises(ValidationError):
        ev.InventoryRebaselined(
            **_common(Uuid7Generator()),
            technician="uid:1",
            reason=reason,
            added=0,
            removed=0,
            tags=0,
        )
