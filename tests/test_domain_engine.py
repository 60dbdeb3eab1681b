"""Whole door cycles through the pure cabinet engine with a fake clock; exact event lists."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry
from agent.domain.engine import (
    CabinetEngine,
    EngineStateError,
    Phase,
    Relock,
    StartScan,
    StopScan,
    Unlock,
)
from agent.domain.now import Now
from drivers.types import BadgeRead, ReaderState
from tests.domain_harness import (
    ALICE,
    AUDITOR,
    BOB,
    MALLORY,
    SUPER,
    T0,
    Cabinet,
    Tag,
    allow_list,
    domain_config,
    epc,
)


def stock(*drawers: str) -> dict[str, Tag]:
    return {epc(i): Tag(d) for i, d in enumerate(drawers)}


def test_plain_check_out() -> None:
    c = Cabinet(tags=stock("top", "top", "bottom"))
    assert c.commands == [Relock()]
    c.cycle(ALICE, take=[epc(1)])
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 001 top alice",
        "session.closed complete out=1 in=0 alice",
    ]
    assert c.commands == [Relock(), Unlock(5.0), Relock(), StartScan(), StopScan(), Relock()]
    assert c.baselines[-1] == {epc(0): "top", epc(2): "bottom"}
    assert c.engine.baseline == c.baselines[-1]
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    assert closed.passes == 2  # settle + confirmation
    assert closed.tags == 2
    assert closed.reads > 0
    assert closed.duration_s == pytest.approx(5.0 + 4.0, abs=0.3)
    # Every event of the session shares its id and is a valid, serializable event.
    sids = {e.session_id for e in c.events if isinstance(e, ev.SessionOpened | ev.ItemCheckedOut)}
    assert len(sids) == 1
    for e in c.events:
        assert ev.from_json(ev.to_json(e)) == e
        assert e.seq == 0


def test_return() -> None:
    c = Cabinet(tags=stock("top"))
    c.cycle(BOB, put={epc(7): "bottom"})
    assert c.brief() == [
        "session.opened badge bob",
        "item.returned 007 bottom bob",
        "session.closed complete out=0 in=1 bob",
    ]
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    # A tag new to the cabinet joins only once a confirmation pass saw it steady too.
    assert closed.passes == 2
    assert c.baselines[-1] == {epc(0): "top", epc(7): "bottom"}


def test_nothing_changed_still_closes_the_session() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.cycle(ALICE)
    assert c.brief() == ["session.opened badge alice", "session.closed complete out=0 in=0 alice"]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "side"}


def test_several_items_over_several_drawers_and_a_move() -> None:
    c = Cabinet(tags=stock("top", "top", "bottom", "bottom", "side", "side"))
    c.tags[epc(1)] = Tag("side")  # moved from top to side: neither out nor in
    c.cycle(ALICE, take=[epc(0), epc(3), epc(5)], put={epc(9): "top", epc(8): "side"})
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 000 top alice",
        "item.checked_out 003 bottom alice",
        "item.checked_out 005 side alice",
        "item.returned 008 side alice",
        "item.returned 009 top alice",
        "session.closed complete out=3 in=2 alice",
    ]
    assert c.baselines[-1] == {
        epc(1): "side",
        epc(2): "bottom",
        epc(4): "side",
        epc(8): "side",
        epc(9): "top",
    }


def test_antennas_of_one_drawer_share_a_location() -> None:
    c = Cabinet(tags=stock("top"))
    # Physically seen by antenna 2 now: same drawer alias, so not a move.
    c.cycle(ALICE)
    assert c.baselines[-1] == {epc(0): "top"}


def test_two_holders() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.badge(ALICE)
    c.advance(1)
    c.badge(BOB)  # second badge before the door opens: both hold the session
    c.open()
    c.advance(2)
    c.badge(ALICE)  # already a holder: recorded once
    c.badge(SUPER)  # badging while open adds a holder, no unlock needed
    del c.tags[epc(0)]
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice,bob",
        "item.checked_out 000 top alice,bob,super",
        "session.closed complete out=1 in=0 alice,bob,super",
    ]
    assert c.commands.count(Unlock(5.0)) == 2


def test_forced_door() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.open()
    c.advance(3)
    del c.tags[epc(1)]
    c.close()
    c.settle()
    assert c.brief() == [
        "door.forced",
        "session.opened forced unknown",
        "item.checked_out 001 side unknown",
        "session.closed complete out=1 in=0 unknown",
    ]
    assert not any(isinstance(cmd, Unlock) for cmd in c.commands)


def test_badge_while_forced_open_adds_a_holder() -> None:
    c = Cabinet(tags=stock("top"))
    c.open()
    c.badge(BOB)
    c.close()
    c.settle()
    assert c.brief() == [
        "door.forced",
        "session.opened forced unknown",
        "session.closed complete out=0 in=0 unknown,bob",
    ]


def test_door_left_open_repeats_every_period() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    c.open()
    c.advance(59.9)
    assert c.types() == ["session.opened"]
    c.advance(0.2)
    c.advance(60)
    c.advance(60)
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "door.left_open #1 alice",
        "door.left_open #2 alice",
        "door.left_open #3 alice",
        "session.closed complete out=0 in=0 alice",
    ]
    alerts = [e for e in c.events if isinstance(e, ev.DoorLeftOpen)]
    assert [round(a.open_s) for a in alerts] == [60, 120, 180]


def test_unlock_without_opening_relocks() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    assert c.engine.phase is Phase.UNLOCKED
    c.advance(9.9)
    assert c.commands[-1] == Unlock(5.0)
    c.advance(0.2)
    assert c.commands[-1] == Relock()
    assert c.engine.phase is Phase.IDLE
    c.open()  # the holder's unlock has lapsed: this is forced
    assert c.brief() == ["door.forced", "session.opened forced unknown"]


def test_denials_lockout_and_supervisor_clear() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(MALLORY)
    c.advance(10)
    c.badge(AUDITOR)
    c.advance(10)
    c.badge(MALLORY)  # third denial within 60 s → locked out
    c.badge(ALICE)  # valid, but the reader is locked out
    c.badge(SUPER)  # a supervisor clears the lock-out and may open
    assert c.brief() == [
        "access.denied unknown badge mallory",
        "access.denied role auditor",
        "access.denied unknown badge mallory",
        "access.lockout locked",
        "access.denied locked out alice",
        "access.lockout cleared super",
    ]
    assert c.engine.phase is Phase.UNLOCKED
    locked = c.events[3]
    assert isinstance(locked, ev.AccessLockout)
    assert locked.denials == 3
    assert locked.until == c.now.wall - timedelta(seconds=0) + timedelta(seconds=120)
    assert c.commands[-1] == Unlock(5.0)


def test_lockout_expires_and_is_per_badge_reader() -> None:
    c = Cabinet(tags=stock("top"))
    for _ in range(3):
        c.badge(MALLORY, reader="front")
    c.badge(ALICE, reader="side-door")  # another badge reader is not locked out
    assert c.engine.phase is Phase.UNLOCKED
    c.advance(120)
    c.badge(ALICE, reader="front")
    assert c.brief() == [
        "access.denied unknown badge mallory",
        "access.denied unknown badge mallory",
        "access.denied unknown badge mallory",
        "access.lockout locked",
        "access.lockout expired",
    ]
    assert c.commands[-1] == Unlock(5.0)


def test_denials_outside_the_window_do_not_lock_out() -> None:
    c = Cabinet(tags=stock("top"))
    for _ in range(5):
        c.badge(MALLORY)
        c.advance(31)
    assert c.types() == ["access.denied"] * 5


def test_expired_allow_list_denies_everyone() -> None:
    c = Cabinet(tags=stock("top"), al=allow_list(expires_at=T0 + timedelta(minutes=1)))
    c.badge(ALICE)
    c.advance(11)  # let the unlock lapse
    c.advance(50)
    c.badge(ALICE)
    c.badge(SUPER)
    assert c.brief() == [
        "access.denied allow-list expired alice",
        "access.denied allow-list expired super",
    ]
    c.engine.set_allow_list(allow_list(version=2))
    c.badge(ALICE)
    assert c.engine.phase is Phase.UNLOCKED


def test_no_allow_list_denies() -> None:
    c = Cabinet(tags=stock("top"), al=None)
    c.badge(ALICE)
    assert c.brief() == ["access.denied no allow-list alice"]


def _registry() -> AssetRegistry:
    return AssetRegistry(
        [
            Asset(epc(0), "TQ-100", "torque wrench", "top", date(2026, 1, 31)),
            Asset(epc(1), "CAL-7", "caliper", "top", date(2026, 12, 31)),
            Asset(epc(2), "MM-3", "multimeter", "bottom"),
            Asset(epc(5), "GA-1", "gauge", "side", date(2026, 3, 2)),
        ]
    )


def test_unknown_item() -> None:
    c = Cabinet(tags=stock("top", "top"), assets=_registry())
    c.cycle(ALICE, put={epc(9): "side"})
    # With a registry, an unregistered tag is never inventory: not returned, not in the
    # baseline; a steady one inside the cabinet is still reported, once.
    assert c.brief() == [
        "session.opened badge alice",
        "item.unknown 009 side",
        "session.closed complete out=0 in=0 alice",
    ]
    assert epc(9) not in c.baselines[-1]
    start = len(c.events)
    c.cycle(BOB, take=[epc(9)])
    assert c.brief(start) == ["session.opened badge bob", "session.closed complete out=0 in=0 bob"]


def test_misplaced_item_on_return_and_on_move() -> None:
    c = Cabinet(tags=stock("top", "top"), assets=_registry())
    c.tags[epc(1)] = Tag("side")  # caliper moved out of its home drawer
    c.cycle(ALICE, put={epc(2): "top"})  # multimeter returned to the wrong drawer
    assert c.brief() == [
        "session.opened badge alice",
        "item.returned 002 top alice",
        "item.misplaced 001 side≠top",
        "item.misplaced 002 top≠bottom",
        "session.closed complete out=0 in=1 alice",
    ]
    returned = c.events[1]
    assert isinstance(returned, ev.ItemReturned)
    assert returned.asset_id == "MM-3"
    # Misplaced items stay misplaced, but are reported when they arrive, not every session.
    start = len(c.events)
    c.cycle(BOB)
    assert c.brief(start) == ["session.opened badge bob", "session.closed complete out=0 in=0 bob"]


def test_calibration_overdue_on_checkout() -> None:
    c = Cabinet(tags=stock("top", "top", "bottom", "bottom", "bottom", "side"), assets=_registry())
    c.cycle(ALICE, take=[epc(0), epc(1), epc(5)])
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 000 top alice",
        "item.calibration_overdue 000 2026-01-31 alice",
        "item.checked_out 001 top alice",
        # epc 5 is due today (2026-03-02): not overdue yet.
        "item.checked_out 005 side alice",
        "session.closed complete out=3 in=0 alice",
    ]
    out = c.events[1]
    assert isinstance(out, ev.ItemCheckedOut)
    assert out.asset_id == "TQ-100"


def test_weak_tags_make_no_false_checkouts() -> None:
    drawers = ["top", "bottom", "side"]
    for seed in range(5):
        c = Cabinet(tags={epc(i): Tag(drawers[i % 3]) for i in range(60)}, read_p=0.7, seed=seed)
        c.cycle(ALICE, take=[epc(4)])
        assert c.brief() == [
            "session.opened badge alice",
            "item.checked_out 004 bottom alice",
            "session.closed complete out=1 in=0 alice",
        ], f"seed {seed}"
        assert len(c.baselines[-1]) == 59


def test_weak_tags_below_the_floor_are_not_present() -> None:
    c = Cabinet(tags=stock("top"))
    c.tags[epc(0)].rssi = -75.0  # under the -70 dBm floor: the reader sees it, we do not trust it
    c.cycle(ALICE)
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 000 top alice",
        "session.closed complete out=1 in=0 alice",
    ]


def test_reader_dying_during_the_settle_scan_never_checks_out() -> None:
    c = Cabinet(tags=stock("top", "bottom", "side", "side"))
    c.badge(ALICE)
    c.open()
    c.close()
    c.advance(0.5)
    c.set_reader("dock-2", ReaderState.OFFLINE)  # the side drawer now looks empty
    c.advance(2.5)  # the pass ends incomplete; the rescan waits for dock-2
    assert c.scan_steps == 30
    c.advance(5)
    c.set_reader("dock-2", ReaderState.INVENTORYING, reconnect=True)
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "reader.offline dock-2",
        "inventory.incomplete session #1 retry dock-2 offline",
        "reader.online dock-2",
        "session.closed complete out=0 in=0 alice",
    ]
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    assert closed.passes == 2
    # The rescan counted only from dock-2's return: 2 s minimum after 8 s, not from 2 s.
    assert closed.duration_s == pytest.approx(10.0, abs=0.15)
    assert c.baselines[-1] == {epc(0): "top", epc(1): "bottom", epc(2): "side", epc(3): "side"}


def test_reader_down_for_the_whole_scan_gives_up_then_verifies_when_back() -> None:
    c = Cabinet(tags=stock("top", "side", "top"))
    c.badge(ALICE)
    c.open()
    del c.tags[epc(2)]
    c.set_reader("dock-2", ReaderState.OFFLINE)
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "reader.offline dock-2",
        "inventory.incomplete session #1 retry dock-2 offline",
        "inventory.incomplete session #2 retry dock-2 offline",
        "inventory.incomplete session #3 give-up dock-2 offline",
        "session.closed incomplete out=0 in=0 alice",
    ]
    assert c.baselines == []  # the baseline is unchanged
    assert c.engine.baseline == {epc(0): "top", epc(1): "side", epc(2): "top"}
    assert c.commands[-2:] == [StopScan(), Relock()]
    # Background inventory is off in this config, yet the unverified baseline is checked as
    # soon as dock-2 is back: the item that left during the failed session is reported.
    start = len(c.events)
    c.advance(30)
    assert c.events[start:] == []
    c.set_reader("dock-2", ReaderState.INVENTORYING, reconnect=True)
    c.advance(0.1)
    c.settle()
    assert c.brief(start) == [
        "reader.online dock-2",
        "item.missing 002 top",
        "inventory.snapshot 2",
    ]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "side"}


def test_reconnect_during_scan_is_incomplete_then_rescans() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.badge(ALICE)
    c.open()
    del c.tags[epc(0)]
    c.close()
    c.advance(1.0)
    # A reconnect without an OFFLINE report in between: only the session counter tells.
    c.set_reader("dock-1", ReaderState.INVENTORYING, reconnect=True)
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "inventory.incomplete session #1 retry dock-1 reconnected",
        "item.checked_out 000 top alice",
        "session.closed complete out=1 in=0 alice",
    ]
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    assert closed.passes == 3


def test_antenna_disconnected_is_incomplete() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.set_reader("dock-1", ReaderState.INVENTORYING, antennas=[1, 2])  # antenna 3 (bottom) lost
    c.cycle(ALICE)
    assert c.brief() == [
        "session.opened badge alice",
        "inventory.incomplete session #1 retry dock-1 antenna 3 disconnected",
        "inventory.incomplete session #2 retry dock-1 antenna 3 disconnected",
        "inventory.incomplete session #3 give-up dock-1 antenna 3 disconnected",
        "session.closed incomplete out=0 in=0 alice",
    ]


def test_confirmation_pass_failure_redoes_only_that_pass() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.badge(ALICE)
    c.open()
    del c.tags[epc(0)]
    c.close()
    c.advance(2.5)  # first pass done and complete; confirmation running
    assert c.engine.phase is Phase.CONFIRMING
    c.set_reader("dock-2", ReaderState.OFFLINE)
    c.set_reader("dock-2", ReaderState.INVENTORYING, reconnect=True)
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "reader.offline dock-2",
        "reader.online dock-2",
        "inventory.incomplete session #1 retry dock-2 offline;dock-2 reconnected",
        "item.checked_out 000 top alice",
        "session.closed complete out=1 in=0 alice",
    ]


def test_reopening_during_the_scan_continues_the_session() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.badge(ALICE)
    c.open()
    c.close()
    c.advance(1)
    c.badge(BOB)  # wants the door again while the scan runs
    assert c.commands[-1] == Unlock(5.0)
    c.open()
    assert c.commands[-1] == StopScan()
    del c.tags[epc(1)]
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 001 side alice,bob",
        "session.closed complete out=1 in=0 alice,bob",
    ]


def test_denied_badge_while_open_is_recorded_not_added() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    c.open()
    c.badge(MALLORY)
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "access.denied unknown badge mallory",
        "session.closed complete out=0 in=0 alice",
    ]


def test_background_inventory_reports_missing_items_after_confirmation() -> None:
    cfg = domain_config(background_period_s=600)
    c = Cabinet(config=cfg, tags=stock("top", "bottom", "side"))
    c.advance(599)
    assert c.events == []
    del c.tags[epc(1)]  # vanished without a door session
    c.tags[epc(4)] = Tag("side")  # was never in the baseline: joins it silently
    c.advance(1)
    assert c.scanning
    c.settle()
    assert c.brief() == ["item.missing 001 bottom", "inventory.snapshot 3"]
    snap = c.events[-1]
    assert isinstance(snap, ev.InventorySnapshot)
    assert snap.items == {epc(0): "top", epc(2): "side", epc(4): "side"}
    assert snap.by_drawer == {"side": 2, "top": 1}
    assert c.baselines[-1] == snap.items
    # Next period: nothing changed, only the snapshot.
    start = len(c.events)
    c.advance(600)
    c.settle()
    assert c.brief(start) == ["inventory.snapshot 3"]


def test_background_inventory_with_a_reader_down_reports_nothing_missing() -> None:
    cfg = domain_config(background_period_s=600, max_rescans=1)
    c = Cabinet(config=cfg, tags=stock("top", "side"))
    c.set_reader("dock-2", ReaderState.OFFLINE)
    c.advance(600)
    c.settle()
    assert c.brief() == [
        "reader.offline dock-2",
        "inventory.incomplete background #1 retry dock-2 offline",
        "inventory.incomplete background #2 give-up dock-2 offline",
    ]
    assert c.baselines == []


def test_badge_interrupts_a_background_inventory() -> None:
    cfg = domain_config(background_period_s=600)
    c = Cabinet(config=cfg, tags=stock("top"))
    c.advance(600.5)
    assert c.engine.phase is Phase.BACKGROUND
    c.badge(ALICE)
    assert c.commands[-2:] == [StopScan(), Unlock(5.0)]
    c.open()
    c.close()
    c.settle()
    assert c.brief() == ["session.opened badge alice", "session.closed complete out=0 in=0 alice"]


def test_reader_offline_online_events() -> None:
    c = Cabinet(tags=stock("top"))
    c.set_reader("dock-1", ReaderState.OFFLINE)
    c.set_reader("dock-1", ReaderState.OFFLINE)  # no repeat
    c.set_reader("dock-1", ReaderState.CONNECTING, reconnect=True)
    c.set_reader("dock-1", ReaderState.ONLINE)
    c.set_reader("dock-1", ReaderState.INVENTORYING)  # no repeat
    assert c.brief() == ["reader.offline dock-1", "reader.online dock-1"]
    online = c.events[-1]
    assert isinstance(online, ev.ReaderOnline)
    assert online.connection == 2
    assert online.antennas_connected == [1, 2, 3]


def test_determinism_same_inputs_identical_outputs() -> None:
    def run() -> tuple[list[bytes], list[object], list[bytes]]:
        c = Cabinet(tags={epc(i): Tag("top") for i in range(30)}, read_p=0.8, seed=3)
        c.cycle(ALICE, take=[epc(3), epc(4)], put={epc(50): "side"})
        c.open()
        c.advance(130)
        c.close()
        c.settle()
        return [ev.to_json(e) for e in c.events], list(c.commands), c.states

    assert run() == run()


def test_state_holds_pseudonyms_only_and_bad_state_is_refused() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    c.open()
    state = c.engine.to_bytes()
    assert ALICE.encode() in state
    cfg = domain_config()
    now = Now(T0, 5.0)
    for bad in (
        b"",
        b"[]",
        b'{"v": 99}',
        state.replace(b'"open"', b'"floating"'),
        state.replace(ALICE.encode(), b"04001234ab"),
        state.replace(b'"phase":"open"', b'"phase":"scanning"').replace(b'"session":{', b'"x":{'),
    ):
        with pytest.raises(EngineStateError):
            CabinetEngine.from_bytes(bad, cfg, site_id="s", cabinet_id="c", now=now)


def test_a_badge_that_is_not_a_pseudonym_never_reaches_an_event() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge("0004123456")  # a driver bug handing over a raw card number
    assert c.brief() == ["access.denied unknown badge unknown"]
    assert b"0004123456" not in ev.to_json(c.events[0])
    assert all(b"0004123456" not in s for s in c.states)
    assert c.engine.phase is Phase.IDLE


def test_reopening_during_the_scan_without_a_badge_is_forced() -> None:
    c = Cabinet(config=domain_config(reopen_grace_s=0.5), tags=stock("top", "side"))
    c.badge(ALICE)
    c.open()
    c.close()
    c.advance(0.3)
    c.open()  # within the grace period: a bounce or the latch not yet engaged
    c.close()
    c.advance(1.5)
    assert c.engine.phase is Phase.SCANNING
    c.open()  # locked since the close and nobody badged: forced
    del c.tags[epc(0)]
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "door.forced",
        "item.checked_out 000 top alice,unknown",
        "session.closed complete out=1 in=0 alice,unknown",
    ]
    assert len({e.session_id for e in c.events}) == 1  # type: ignore[union-attr]


# ---- expired allow-list grace policy (issue 9, item 11) -----------------------------------------


def test_expired_allow_list_grace_is_off_by_default() -> None:
    assert domain_config().expired_allow_list_grace_h == 0
    c = Cabinet(tags=stock("top"), al=allow_list(expires_at=T0 + timedelta(minutes=1)))
    c.advance(61)
    c.badge(SUPER)
    assert c.brief() == ["access.denied allow-list expired super"]


def test_expired_allow_list_grace_admits_only_its_roles_and_only_for_its_hours() -> None:
    expired_at = T0 + timedelta(minutes=1)
    c = Cabinet(
        config=domain_config(expired_allow_list_grace_h=2),
        tags=stock("top"),
        al=allow_list(expires_at=expired_at, version=7),
    )
    c.advance(61)
    c.badge(ALICE)  # a user: the default policy is supervisors only
    c.badge(AUDITOR)  # may never open
    c.badge(MALLORY, reader="back")  # not on the list at all
    c.badge(SUPER)
    assert c.brief() == [
        "access.denied allow-list expired alice",
        "access.denied allow-list expired auditor",
        "access.denied allow-list expired mallory",
        "access.grace_granted super",
    ]
    grant = c.events[-1]
    assert isinstance(grant, ev.AccessGraceGranted)
    assert grant.roles == ["supervisor"]
    assert grant.allow_list_version == 7
    assert grant.expired_at == expired_at
    assert grant.grace_until == expired_at + timedelta(hours=2)
    assert ev.priority(grant) == ev.PRIORITY_CRITICAL
    assert c.engine.phase is Phase.UNLOCKED
    assert any(isinstance(cmd, Unlock) for cmd in c.commands)
    c.open()
    c.advance(2)
    c.close()
    c.settle()
    assert [t for t in c.types() if t.startswith("session.")] == [
        "session.opened",
        "session.closed",
    ]
    # The grace period ends: deny by default again.
    start = len(c.events)
    c.advance(2 * 3600)
    c.badge(SUPER)
    assert c.brief(start) == ["access.denied allow-list expired super"]


def test_expired_allow_list_grace_for_users_too_when_configured_and_on_reload() -> None:
    c = Cabinet(tags=stock("top"), al=allow_list(expires_at=T0 + timedelta(minutes=1)))
    c.advance(61)
    c.badge(ALICE)
    # SIGHUP assigns engine.config: the grace policy is read at each decision.
    c.engine.config = domain_config(
        expired_allow_list_grace_h=1, expired_allow_list_grace_roles=["user", "supervisor"]
    )
    c.badge(ALICE)
    assert c.brief() == ["access.denied allow-list expired alice", "access.grace_granted alice"]
    grant = c.events[-1]
    assert isinstance(grant, ev.AccessGraceGranted)
    assert grant.roles == ["user"]


def test_grace_roles_are_validated() -> None:
    with pytest.raises(ValueError, match="expired_allow_list_grace_roles"):
        domain_config(expired_allow_list_grace_roles=["auditor"])
    with pytest.raises(ValueError, match="expired_allow_list_grace_h"):
        domain_config(expired_allow_list_grace_h=-1)


# ---- trusted time (issue 9, item 2) --------------------------------------------------------------


def test_events_say_when_the_clock_is_not_trusted() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(MALLORY)
    untrusted = Now(c.now.wall + timedelta(seconds=1), c.now.mono + 1, trusted=False)
    c._apply(c.engine.on_badge(BadgeRead("front", MALLORY, untrusted.wall), untrusted))
    assert [e.clock for e in c.events] == ["trusted", "untrusted"]


def test_an_erasure_replaces_the_person_in_the_open_session_and_its_later_events() -> None:
    c = Cabinet(tags=stock("top", "side"))
    c.badge(ALICE)
    c.open()
    c.badge(BOB)
    changed, out = c.engine.on_erasure(frozenset({ALICE, MALLORY}), c.now)
    c._apply(out)
    assert changed == 1
    assert ALICE.encode() not in c.states[-1]  # the state to persist no longer names her
    c.restart()  # from that persisted state
    del c.tags[epc(1)]
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",  # before the erasure: already on its way
        "item.checked_out 001 side erased,bob",
        "session.closed complete out=1 in=0 erased,bob",
    ]
    assert ALICE.encode() not in c.states[-1]


def test_an_erasure_in_the_unlock_window_opens_the_session_as_erased() -> None:
    c = Cabinet(tags=stock("top"))
    c.badge(ALICE)
    c.badge(BOB)
    changed, out = c.engine.on_erasure(frozenset({ALICE, BOB}), c.now)
    c._apply(out)
    assert changed == 2
    nothing, out = c.engine.on_erasure(frozenset({ALICE}), c.now)
    assert (nothing, out.session_state) == (0, None)  # nothing left to change, nothing written
    c.open()
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge erased",
        "session.closed complete out=0 in=0 erased",
    ]
