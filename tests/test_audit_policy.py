"""AuditTrail: committed domain events become hash-chained audit records (pseudonyms only)."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

from agent.audit_policy import AuditTrail
from agent.domain import events as ev
from agent.domain.ids import uuid7_from
from agent.privacy.pseudonym import Pseudonymizer
from agent.store import Store, StoreConfig
from tests.store_helpers import T0, FakeClock

RAW_BADGE = "0012345678"


def _base(n: int) -> dict[str, object]:
    return {
        "event_id": uuid7_from(1_700_000_000_000 + n, n),
        "time": T0,
        "site_id": "hangar-3",
        "cabinet_id": "crib-07",
    }


async def test_badge_lockout_and_forced_events_are_audited_in_order(tmp_path: Path) -> None:
    who = Pseudonymizer("hangar-3", "k1", bytes(32)).badge(RAW_BADGE)
    session = uuid4()
    store = await Store.open(StoreConfig(path=tmp_path / "s.db"), clock=FakeClock())
    try:
        trail = AuditTrail(lambda: store)
        trail.on_events(
            [
                ev.AccessDenied(**_base(1), actor="unknown", badge_reader="front", reason="role"),
                ev.AccessDenied(
                    **_base(2), actor=who, badge_reader="front", reason="unknown badge"
                ),
                ev.AccessLockout(**_base(3), badge_reader="front", state="locked", denials=2),
                ev.SessionOpened(
                    **_base(4), session_id=session, actors=[who], trigger="badge", door_id="door"
                ),
                ev.ReaderOffline(**_base(5), reader_id="dock-1", connection=1),
                ev.DoorForced(**_base(6), session_id=session, door_id="door"),
            ]
        )
        trail.record("system", "config.reload", {"ok": True})
        await trail.flush()
        records = await store.audit_tail(20)
        report = await store.audit_verify()
    finally:
        await store.close()
    assert [(r.actor, r.action) for r in records] == [
        ("unknown", "access.denied"),
        (who, "access.denied"),
        ("system", "access.lockout.locked"),
        (who, "access.granted"),
        ("system", "door.forced"),
        ("system", "config.reload"),
    ]
    assert records[1].details == {"badge_reader": "front", "reason": "unknown badge"}
    assert records[2].details == {"badge_reader": "front", "denials": 2}
    assert records[3].details == {"door_id": "door", "session_id": str(session)}
    assert report.ok
    assert report.checked == 6
    # Only the pseudonym: the raw badge id is nowhere in what was written.
    assert RAW_BADGE not in json.dumps([dict(r.details) for r in records])
    assert trail.failed == 0
    assert trail.dropped == 0
