"""Technician sessions, re-baselines and consumables through the pure engine (fake clock)."""

from __future__ import annotations

import pytest

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry, AssetRegistryError
from agent.domain.engine import Phase, Relock, StartScan, StopScan, TechnicianRefused, Unlock
from agent.domain.technician import DOOR_TEST_MAX_S, DOOR_TEST_REASON, DOOR_TEST_REQUEST_S
from tests.domain_harness import ALICE, BOB, NAMES, SUPER, Cabinet, Tag, epc

TECH = "uid:1000"


def stock(*drawers: str) -> dict[str, Tag]:
    return {epc(i): Tag(d) for i, d in enumerate(drawers)}


def brief(c: Cabinet, start: int = 0) -> list[str]:
    out = []
    for e in c.events[start:]:
        d = e.model_dump()
        who = (
            d.get("technician")
            or d.get("actor")
            or ",".join(NAMES.get(a, a) for a in d.get("actors") or [])
        )
        who = NAMES.get(who, who)
        tail = ""
        if "epc" in d:
            tail = f" {d['epc'][-3:]}"
            if d.get("sku"):
                tail += f" {d['sku']}"
        if e.type == "technician.closed":
            tail = f" {d['ended']} {d['quality']} +{d['restocked']} -{d['removed']}"
        if e.type == "inventory.rebaselined":
            tail = f" +{d['added']} -{d['removed']} ={d['tags']}"
        if e.type == "inventory.snapshot":
            tail = f" {d['tags']} {d['skus']}"
        if e.type == "session.closed":
            tail = (
                f" out={d['checked_out']} in={d['returned']} used={d['consumed']} +{d['restocked']}"
            )
        out.append(f"{e.type}{tail}{' ' + who if who else ''}".rstrip())
    return out


def consumables(*epcs: str, sku: str = "GLOVE-M") -> AssetRegistry:
    return AssetRegistry(
        [Asset(epc(i), f"T{i}") for i in range(3)]
        + [Asset(e, f"C-{e[-3:]}", consumable=True, sku=sku) for e in epcs]
    )


def test_a_technician_session_reports_restocks_and_removals_never_check_outs() -> None:
    c = Cabinet(tags=stock("top", "top", "bottom"))
    start = len(c.events)
    c._apply(c.engine.open_technician(TECH, "restock and swap drawer 2", c.now))
    assert c.commands[-1] == Unlock(120.0)  # technician_unlock_s: time to reach the door
    assert c.engine.phase is Phase.UNLOCKED
    c.advance(1.0)
    c.open()  # not forced
    c.advance(5.0)
    del c.tags[epc(1)]
    c.tags[epc(7)] = Tag("bottom")
    c.close()
    c.settle()
    assert brief(c, start) == [
        "technician.opened uid:1000",
        "item.removed 001 uid:1000",
        "item.restocked 007 uid:1000",
        "technician.closed scanned complete +1 -1 uid:1000",
    ]
    opened, closed = c.events[start], c.events[-1]
    assert isinstance(opened, ev.TechnicianOpened)
    assert opened.via == "cli"
    assert opened.reason == "restock and swap drawer 2"
    assert isinstance(closed, ev.TechnicianClosed)
    assert {getattr(e, "session_id", None) for e in c.events[start:]} == {opened.session_id}
    assert c.engine.baseline == {epc(0): "top", epc(2): "bottom", epc(7): "bottom"}
    assert c.engine.technician is None
    # The next user session is an ordinary one again.
    mark = len(c.events)
    c.cycle(ALICE, take=[epc(7)])
    assert [e.type for e in c.events[mark:]] == [
        "session.opened",
        "item.checked_out",
        "session.closed",
    ]


def test_a_technician_session_whose_door_never_opens_ends_not_opened_or_cancelled() -> None:
    c = Cabinet(tags=stock("top"))
    start = len(c.events)
    c._apply(c.engine.open_technician(TECH, "check the lock", c.now))
    c.advance(119.0)  # technician_unlock_s = 120, not relock_after_s = 10
    assert c.engine.phase is Phase.UNLOCKED
    c.advance(1.0)
    assert c.engine.phase is Phase.IDLE
    assert c.commands[-1] == Relock()
    c._apply(c.engine.open_technician(TECH, "check the lock again", c.now))
    c._apply(c.engine.close_technician(c.now))
    assert brief(c, start) == [
        "technician.opened uid:1000",
        "technician.closed not_opened none +0 -0 uid:1000",
        "technician.opened uid:1000",
        "technician.closed cancelled none +0 -0 uid:1000",
    ]
    assert c.commands[-1] == Relock()
    with pytest.raises(TechnicianRefused, match="no technician session"):
        c.engine.close_technician(c.now)


def test_technician_requests_are_refused_while_busy_or_malformed() -> None:
    c = Cabinet(tags=stock("top"))
    with pytest.raises(TechnicianRefused, match="reason"):
        c.engine.open_technician(TECH, "   ", c.now)
    with pytest.raises(TechnicianRefused, match="reason"):
        c.engine.open_technician(TECH, "bad\nreason", c.now)
    with pytest.raises(TechnicianRefused, match="technician id"):
        c.engine.open_technician("root", "x", c.now)
    # Characters that rearrange or hide text on an operator's terminal (a bidi override, a C1
    # control, a line separator, a zero-width space) are control characters too.
    for hidden in ("\u202eevil", "a\x9b2Jb", "one\u2028two", "zero\u200bwidth"):
        with pytest.raises(TechnicianRefused, match="control characters"):
            c.engine.open_technician(TECH, hidden, c.now)
    for badge_like in (
        "found card 3F7A21C90B",
        "badge 12345678 left inside",
        "found card \uff10\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",
        "badge \u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668",
    ):
        with pytest.raises(TechnicianRefused, match="long number") as info:
            c.engine.open_technician(TECH, badge_like, c.now)
        assert badge_like.split()[-1] not in str(info.value)
        assert badge_like.split()[1] not in str(info.value)
    c._apply(c.engine.open_technician(TECH, "réparer le tiroir 2 (工具)", c.now))
    c._apply(c.engine.close_technician(c.now))
    c._apply(c.engine.open_technician(TECH, "replace TW-0001, 3 packs of GLOVE-M", c.now))
    c._apply(c.engine.close_technician(c.now))
    c.badge(ALICE)
    with pytest.raises(TechnicianRefused, match="unlocked"):
        c.engine.open_technician(TECH, "restock", c.now)
    with pytest.raises(TechnicianRefused, match="unlocked"):
        c.engine.rebaseline(TECH, "recount", c.now)
    c.advance(1.0)
    c.open()
    with pytest.raises(TechnicianRefused):
        c.engine.open_technician(TECH, "restock", c.now)
    c.close()
    c.settle()
    c._apply(c.engine.open_technician(TECH, "restock", c.now))
    c.advance(1.0)
    c.open()
    with pytest.raises(TechnicianRefused, match="the door has opened"):
        c.engine.close_technician(c.now)


def test_a_supervisor_badge_opens_a_technician_session_when_asked_for() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    start = len(c.events)
    c._apply(c.engine.await_supervisor(TECH, "quarterly recount", 30.0, c.now))
    assert c.engine.awaiting_supervisor
    c.badge(SUPER)
    assert not c.engine.awaiting_supervisor
    assert c.engine.technician is not None
    assert c.engine.technician.who == SUPER
    c.advance(1.0)
    c.open()
    c.advance(2.0)
    c.badge(BOB)  # someone else badges while the technician works: refused
    del c.tags[epc(0)]
    c.close()
    c.advance(0.5)
    mark = len(c.commands)
    c.badge(SUPER)  # the technician badges again during the closing scan: the door unlocks
    assert c.commands[mark:] == [Unlock(c.engine.config.unlock_pulse_s)]
    c.settle()
    assert brief(c, start) == [
        "technician.opened super",
        "access.denied bob",
        "item.removed 000 super",
        "technician.closed scanned complete +0 -1 super",
    ]
    opened, closed = c.events[start], c.events[-1]
    assert isinstance(opened, ev.TechnicianOpened)
    assert opened.via == "badge"
    assert isinstance(closed, ev.TechnicianClosed)
    assert closed.technician == SUPER
    assert closed.actors == []  # nobody else was let in; the technician is not a holder


def test_a_user_badge_during_the_supervisor_wait_opens_a_plain_session() -> None:
    c = Cabinet(tags=stock("top"))
    c._apply(c.engine.await_supervisor(TECH, "recount", 30.0, c.now))
    start = len(c.events)
    c.cycle(ALICE, take=[epc(0)])
    assert [e.type for e in c.events[start:]] == [
        "session.opened",
        "item.checked_out",
        "session.closed",
    ]
    c.advance(30.0)
    assert not c.engine.awaiting_supervisor  # it lapsed


def test_rebaseline_makes_the_found_contents_the_baseline_without_blame() -> None:
    c = Cabinet(tags=stock("top", "top", "bottom"))
    del c.tags[epc(0)]  # gone with the door shut (a previous bad count)
    c.tags[epc(5)] = Tag("top")
    start = len(c.events)
    c._apply(c.engine.rebaseline(TECH, "recount after audit", c.now))
    assert c.engine.rebaseline_state == "running"
    assert StartScan() in c.commands
    c.settle()
    assert brief(c, start) == [
        "inventory.rebaselined +1 -1 =3 uid:1000",
        "inventory.snapshot 3 {}",
    ]
    assert c.engine.rebaseline_state == "done"
    assert c.engine.baseline == {epc(1): "top", epc(2): "bottom", epc(5): "top"}
    assert c.baselines[-1] == c.engine.baseline
    assert c.commands[-1] == StopScan()


def test_a_badge_interrupts_a_rebaseline() -> None:
    c = Cabinet(tags=stock("top"))
    c._apply(c.engine.rebaseline(TECH, "recount", c.now))
    c.advance(0.5)
    c.badge(ALICE)
    assert c.engine.rebaseline_state == "interrupted"
    assert c.engine.phase is Phase.UNLOCKED


def test_consumables_are_consumed_and_restocked_and_counted_per_sku() -> None:
    gloves = [epc(10), epc(11), epc(12)]
    c = Cabinet(
        tags={**stock("top", "top"), **{g: Tag("bottom") for g in gloves[:2]}},
        assets=consumables(*gloves),
    )
    start = len(c.events)
    c.cycle(ALICE, take=[epc(10), epc(0)])
    assert brief(c, start) == [
        "session.opened alice",
        "item.checked_out 000 alice",
        "item.consumed 00a GLOVE-M alice",
        "session.closed out=1 in=0 used=1 +0 alice",
    ]
    mark = len(c.events)
    c.cycle(BOB, put={epc(12): "bottom", epc(0): "top"})
    assert brief(c, mark) == [
        "session.opened bob",
        "item.returned 000 bob",
        "item.restocked 00c GLOVE-M bob",
        "session.closed out=0 in=1 used=0 +1 bob",
    ]
    # Taken through a gap with the door shut: used up, never missing.
    del c.tags[epc(11)]
    mark = len(c.events)
    c._apply(c.engine.rebaseline(TECH, "count", c.now))
    c.settle()
    assert brief(c, mark) == [
        "inventory.rebaselined +0 -1 =3 uid:1000",
        "inventory.snapshot 3 {'GLOVE-M': 1}",
    ]


def test_a_consumable_gone_at_a_background_inventory_is_consumed_not_missing() -> None:
    from tests.domain_harness import domain_config

    c = Cabinet(
        config=domain_config(background_period_s=60),
        tags={**stock("top"), epc(10): Tag("bottom"), epc(11): Tag("bottom")},
        assets=consumables(epc(10), epc(11)),
    )
    del c.tags[epc(10)]
    del c.tags[epc(0)]
    start = len(c.events)
    c.advance(61.0)
    c.settle()
    assert brief(c, start) == [
        "item.missing 000",
        "item.consumed 00a GLOVE-M",
        "inventory.snapshot 1 {'GLOVE-M': 1}",
    ]


def test_a_technician_session_survives_a_restart() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c._apply(c.engine.open_technician(TECH, "restock", c.now))
    c.advance(1.0)
    c.open()
    c.advance(1.0)
    c.restart(downtime_s=2.0)
    assert c.engine.technician is not None
    assert c.engine.technician.who == TECH
    start = len(c.events)
    c.tags[epc(9)] = Tag("top")
    c.close()
    c.settle()
    assert brief(c, start) == [
        "item.restocked 009 uid:1000",
        "technician.closed scanned complete +1 -0 uid:1000",
    ]
    closed = c.events[-1]
    assert isinstance(closed, ev.TechnicianClosed)
    assert closed.duration_s >= 4.0  # 1 s unlocked + 1 s open + 2 s down + the scan


def test_a_consumable_needs_its_sku() -> None:
    with pytest.raises(AssetRegistryError, match="sku"):
        AssetRegistry.from_body({"assets": [{"epc": "e280", "asset_id": "G", "consumable": True}]})
    with pytest.raises(AssetRegistryError, match="consumable"):
        AssetRegistry.from_body({"assets": [{"epc": "e280", "asset_id": "G", "consumable": "y"}]})
    reg = AssetRegistry.from_body(
        {"assets": [{"epc": "e280", "asset_id": "G", "consumable": True, "sku": "GLOVE-M"}]}
    )
    asset = reg.get("e280")
    assert asset is not None
    assert asset.consumable
    assert asset.sku == "GLOVE-M"


def test_an_incomplete_closing_scan_changes_nothing_and_is_verified_later() -> None:
    from drivers.types import ReaderState

    c = Cabinet(tags=stock("top", "side"))
    start = len(c.events)
    c._apply(c.engine.open_technician(TECH, "swap", c.now))
    c.advance(1.0)
    c.open()
    c.advance(1.0)
    del c.tags[epc(0)]
    c.set_reader("dock-2", ReaderState.OFFLINE)  # down for the whole closing scan
    c.close()
    c.settle()
    types = [e.type for e in c.events[start:]]
    assert types[0] == "technician.opened"
    assert "item.removed" not in types
    closed = c.events[-1]
    assert isinstance(closed, ev.TechnicianClosed)
    assert (closed.ended, closed.quality, closed.removed) == ("scanned", "incomplete", 0)
    assert c.engine.baseline == {epc(0): "top", epc(1): "side"}
    # Back: the verification inventory reports what left, charged to nobody.
    mark = len(c.events)
    c.set_reader("dock-2", ReaderState.INVENTORYING, reconnect=True)
    c.advance(0.1)
    c.settle()
    assert [e.type for e in c.events[mark:] if e.type.startswith("item.")] == ["item.missing"]


def test_a_supervisor_wait_and_a_rebaseline_survive_a_restart() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c._apply(c.engine.await_supervisor(TECH, "recount", 60.0, c.now))
    c.restart(downtime_s=5.0)
    assert c.engine.awaiting_supervisor
    c.advance(56.0)
    assert not c.engine.awaiting_supervisor  # 60 s from the request, downtime included

    del c.tags[epc(1)]
    c._apply(c.engine.rebaseline(TECH, "recount", c.now))
    c.advance(0.5)
    c.restart(downtime_s=1.0)
    assert c.engine.rebaseline_state == "running"
    start = len(c.events)
    c.settle()
    assert brief(c, start) == [
        "inventory.rebaselined +0 -1 =1 uid:1000",
        "inventory.snapshot 1 {}",
    ]


def test_a_held_item_restocked_by_a_technician_is_no_longer_held() -> None:
    from tests.domain_harness import domain_config

    c = Cabinet(config=domain_config(overdue_after_s=600), tags=stock("top", "bottom"))
    c.cycle(ALICE, take=[epc(0)])
    start = len(c.events)
    c._apply(c.engine.open_technician(TECH, "found it in the hangar", c.now))
    c.advance(1.0)
    c.open()
    c.tags[epc(0)] = Tag("top")
    c.close()
    c.settle()
    c.advance(700.0)  # past Alice's limit: she does not hold it any more
    assert c.engine.overdue() == []
    assert [e.type for e in c.events[start:]] == [
        "technician.opened",
        "item.restocked",
        "technician.closed",
    ]


def test_an_erased_supervisor_leaves_the_technician_session_as_erased() -> None:
    """docs/privacy.md §7: the supervisor who opened the session with their badge is erased
    while it is open; the persisted state names them nowhere, the session goes on and what
    it reports later names "erased"."""
    c = Cabinet(tags=stock("top", "bottom"))
    start = len(c.events)
    c._apply(c.engine.await_supervisor(TECH, "quarterly recount", 30.0, c.now))
    c.badge(SUPER)
    c.advance(1.0)
    c.open()
    changed, out = c.engine.on_erasure(frozenset({SUPER}), c.now)
    c._apply(out)
    assert changed == 1
    assert out.session_state is not None
    assert SUPER.encode() not in out.session_state
    c.restart()  # from the persisted state
    del c.tags[epc(0)]
    c.close()
    c.settle()
    assert brief(c, start) == [
        "technician.opened super",  # before the erasure: already on its way
        "item.removed 000 erased",
        "technician.closed scanned complete +0 -1 erased",
    ]


def test_a_door_held_open_by_a_technician_alerts_on_its_own_longer_limit() -> None:
    """Maintenance is not timed like a check-out, but a cabinet a technician walked away from
    is not left open unnoticed: door.left_open every technician_left_open_s."""
    c = Cabinet(tags=stock("top"))
    c._apply(c.engine.open_technician(TECH, "swap drawer 2", c.now))
    c.advance(1.0)
    c.open()
    mark = len(c.events)
    c.advance(c.engine.config.left_open_s * 3)  # a user's limit, thrice: still working
    assert [e.type for e in c.events[mark:]] == []
    c.advance(c.engine.config.technician_left_open_s)
    alerts = [e for e in c.events[mark:] if isinstance(e, ev.DoorLeftOpen)]
    assert [a.alert for a in alerts] == [1]
    assert alerts[0].open_s >= c.engine.config.technician_left_open_s
    assert alerts[0].night is False
    assert alerts[0].technician == TECH
    c.advance(c.engine.config.technician_left_open_s)
    assert [e.alert for e in c.events[mark:] if isinstance(e, ev.DoorLeftOpen)] == [1, 2]
    c.close()
    c.settle()
    assert c.events[-1].type == "technician.closed"


def _denials(c: Cabinet, start: int) -> list[tuple[str, str]]:
    return [
        (NAMES.get(e.actor, e.actor), e.reason)
        for e in c.events[start:]
        if isinstance(e, ev.AccessDenied)
    ]


def test_a_badge_during_a_technician_session_is_refused_and_checks_out_nothing() -> None:
    """The door is the technician's from the unlock to the closing scan: anyone else's badge
    is refused (else what they take is an ``item.removed`` of the technician, and nobody is
    charged with it). Not counted towards a lock-out: the badge is valid."""
    c = Cabinet(tags=stock("top", "bottom"))
    start = len(c.events)
    c._apply(c.engine.open_technician(TECH, "swap drawer 2", c.now))
    c.advance(2.0)
    mark = len(c.commands)
    c.badge(ALICE)  # in the technician's unlock window
    assert c.commands[mark:] == []  # no unlock of her own, the window is not shortened
    c.advance(100.0)  # relock_after_s (10 s) is long past, technician_unlock_s (120 s) is not
    assert c.engine.phase is Phase.UNLOCKED
    c.open()
    c.badge(BOB)  # while the technician works
    del c.tags[epc(0)]
    c.close()
    c.advance(0.5)
    mark = len(c.commands)
    c.badge(ALICE)  # during the closing scan: no unlock either
    assert c.commands[mark:] == []
    c.settle()
    assert brief(c, start) == [
        "technician.opened uid:1000",
        "access.denied alice",
        "access.denied bob",
        "access.denied alice",  # three denials: lockout_denials is 3, yet no lock-out
        "item.removed 000 uid:1000",
        "technician.closed scanned complete +0 -1 uid:1000",
    ]
    assert _denials(c, start) == [
        ("alice", "technician session"),
        ("bob", "technician session"),
        ("alice", "technician session"),
    ]
    closed = c.events[-1]
    assert isinstance(closed, ev.TechnicianClosed)
    assert closed.actors == []
    # Once the session is over, her badge opens an ordinary session that charges her.
    mark = len(c.events)
    c.cycle(ALICE, take=[epc(1)])
    assert brief(c, mark) == [
        "session.opened alice",
        "item.checked_out 001 alice",
        "session.closed out=1 in=0 used=0 +0 alice",
    ]


def test_a_badge_during_a_door_test_is_refused_and_the_engine_relocks_after() -> None:
    c = Cabinet(tags=stock("top"))
    start = len(c.events)
    c._apply(c.engine.begin_door_test(TECH, c.now))
    test = c.engine.door_test
    assert test is not None
    mark = len(c.commands)
    c.badge(ALICE)
    c.advance(0.5)
    c.badge(SUPER)
    c.badge(BOB)  # three: no lock-out
    assert c.commands[mark:] == []  # no Unlock: the lock is the test's
    assert c.engine.phase is Phase.IDLE
    assert test.refused == 3
    # Nothing else takes the door either.
    for refused in (
        lambda: c.engine.open_technician(TECH, "swap", c.now),
        lambda: c.engine.await_supervisor(TECH, "swap", 30.0, c.now),
        lambda: c.engine.rebaseline(TECH, "count", c.now),
        lambda: c.engine.begin_door_test(TECH, c.now),
    ):
        with pytest.raises(TechnicianRefused, match="a door test is running"):
            refused()
    c._apply(c.engine.door_test_release(c.now))
    c._apply(c.engine.end_door_test(c.now))
    assert c.engine.door_test is None
    assert c.commands[-1] == Relock()  # the engine's view of the lock: engaged, as it is
    assert _denials(c, start) == [
        ("alice", "door test"),
        ("super", "door test"),
        ("bob", "door test"),
    ]
    assert [e.type for e in c.events[start:]] == ["access.denied"] * 3
    c.badge(ALICE)  # the door is the engine's again
    assert c.commands[-1] == Unlock(c.engine.config.unlock_pulse_s)
    assert c.engine.phase is Phase.UNLOCKED


def test_a_door_opened_while_the_door_test_released_it_is_the_testers() -> None:
    """Not a forced door (nobody is paged at 2 a.m. for a test they ran): a technician session
    in the tester's name, whose closing scan books what moved to them."""
    c = Cabinet(tags=stock("top", "bottom"))
    start = len(c.events)
    c._apply(c.engine.begin_door_test(TECH, c.now))
    test = c.engine.door_test
    assert test is not None
    c._apply(c.engine.door_test_release(c.now))
    c.open()
    c.badge(ALICE)  # still the test's door
    mark = len(c.commands)
    c._apply(c.engine.end_door_test(c.now))
    assert c.commands[mark:] == []  # the door is open: the engine relocks once it is shut
    assert c.engine.phase is Phase.OPEN
    c.badge(BOB)  # now a technician session's door
    del c.tags[epc(1)]
    c.close()
    c.settle()
    assert brief(c, start) == [
        "technician.opened uid:1000",
        "access.denied alice",
        "access.denied bob",
        "item.removed 001 uid:1000",
        "technician.closed scanned complete +0 -1 uid:1000",
    ]
    assert _denials(c, start) == [("alice", "door test"), ("bob", "technician session")]
    opened = c.events[start]
    assert isinstance(opened, ev.TechnicianOpened)
    assert (opened.via, opened.reason) == ("cli", DOOR_TEST_REASON)
    assert test.session_id == opened.session_id
    assert not test.forced
    assert c.commands[-1] == Relock()


def test_a_door_opened_during_a_door_test_with_the_lock_engaged_is_forced() -> None:
    """Before the test releases the lock, an opening is what it always is: the lock did not
    hold, and the backend hears of it."""
    c = Cabinet(tags=stock("top"))
    start = len(c.events)
    c._apply(c.engine.begin_door_test(TECH, c.now))
    test = c.engine.door_test
    assert test is not None
    c.open()
    assert [e.type for e in c.events[start:]] == ["door.forced", "session.opened"]
    assert test.forced
    assert test.session_id is None
    c._apply(c.engine.end_door_test(c.now))
    c.close()
    c.settle()
    assert c.events[-1].type == "session.closed"


def test_a_door_test_whose_caller_vanished_lapses_and_relocks() -> None:
    from tests.domain_harness import domain_config

    c = Cabinet(config=domain_config(background_period_s=60), tags=stock("top"))
    c.advance(55.0)
    c._apply(c.engine.begin_door_test(TECH, c.now))
    assert c.engine.next_deadline() == pytest.approx(c.now.mono + DOOR_TEST_MAX_S)
    mark = len(c.commands)
    c.advance(DOOR_TEST_MAX_S - 0.1)
    assert c.engine.door_test is not None
    assert StartScan() not in c.commands[mark:]  # no background inventory under the test
    c.advance(0.1)
    assert c.engine.door_test is None
    assert c.commands[mark:][:2] == [Relock(), StartScan()]  # relocked; the inventory is due
    with pytest.raises(TechnicianRefused, match="no door test"):
        c.engine.door_test_release(c.now)
    c._apply(c.engine.end_door_test(c.now))  # the caller comes back late: nothing to do


def test_a_door_test_holds_the_door_for_as_long_as_its_request_may_run() -> None:
    """The control socket lets a door test run DOOR_TEST_REQUEST_S (slow lock writes, up to
    door.command_timeout_s each): until the request ends, no badge may unlock the door."""
    c = Cabinet(tags=stock("top"))
    start = len(c.events)
    c._apply(c.engine.begin_door_test(TECH, c.now))
    mark = len(c.commands)
    c.advance(DOOR_TEST_REQUEST_S - 0.5)
    assert c.engine.door_test is not None
    c.badge(ALICE)
    assert _denials(c, start) == [("alice", "door test")]
    assert not [cmd for cmd in c.commands[mark:] if isinstance(cmd, Unlock)]


def test_a_door_test_needs_an_idle_cabinet() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    with pytest.raises(
        TechnicianRefused, match="cannot test the door now: the cabinet is unlocked"
    ):
        c.engine.begin_door_test(TECH, c.now)
    c.advance(1.0)
    c.open()
    with pytest.raises(TechnicianRefused, match="with the door open"):
        c.engine.begin_door_test(TECH, c.now)
    with pytest.raises(TechnicianRefused, match="technician id"):
        Cabinet().engine.begin_door_test("root", c.now)
