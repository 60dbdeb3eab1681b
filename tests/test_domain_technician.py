"""Technician sessions, re-baselines and consumables through the pure engine (fake clock)."""

from __future__ import annotations

import pytest

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry, AssetRegistryError
from agent.domain.engine import Phase, Relock, StartScan, StopScan, TechnicianRefused, Unlock
from tests.domain_harness import ALICE, BOB, NAMES, SUPER, Cabinet, Tag, epc

TECH = "uid:1000"


def stock(*drawers: str) -> dict[str, Tag]:
    return {epc(i): Tag(d) for i, d in enumerate(drawers)}


def brief(c: Cabinet, start: int = 0) -> list[str]:
    out = []
    for e in c.events[start:]:
        d = e.model_dump()
        who = d.get("technician") or ",".join(NAMES.get(a, a) for a in d.get("actors") or [])
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
    c.badge(BOB)  # someone else badges while the technician works: listed, not charged
    del c.tags[epc(0)]
    c.close()
    c.settle()
    assert brief(c, start) == [
        "technician.opened super",
        "item.removed 000 super",
        "technician.closed scanned complete +0 -1 super",
    ]
    opened, closed = c.events[start], c.events[-1]
    assert isinstance(opened, ev.TechnicianOpened)
    assert opened.via == "badge"
    assert isinstance(closed, ev.TechnicianClosed)
    assert closed.technician == SUPER
    assert closed.actors == [BOB]


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
