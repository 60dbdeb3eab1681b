"""A drawer that goes blind (an unplugged antenna the reader cannot report) never becomes a
mass check-out (pure engine, fake clock): the pass is suspect, confirmed, alerted, and the
drawer's items are held — neither charged to anyone nor forgotten."""

from __future__ import annotations

from typing import Any

from agent.domain import events as ev
from drivers.types import ReaderState
from tests.domain_harness import ALICE, BOB, Cabinet, Tag, domain_config, epc

BOTTOM = ("dock-1", 3)  # the bottom drawer's antenna


def blind_cabinet(**cfg: Any) -> Cabinet:
    """dock-1 cannot tell which antennas are connected (a Nano, a reader without detection)."""
    drawers = ["top", "bottom", "bottom", "bottom", "side"]
    c = Cabinet(config=domain_config(**cfg), tags={epc(i): Tag(d) for i, d in enumerate(drawers)})
    c.readers["dock-1"].antennas = None
    c.set_reader("dock-1", ReaderState.INVENTORYING)
    return c


def unplug(c: Cabinet) -> None:
    c.readers["dock-1"].dead.add(BOTTOM[1])


def replug(c: Cabinet) -> None:
    c.readers["dock-1"].dead.clear()


def test_a_blind_drawer_is_suspect_not_checked_out() -> None:
    c = blind_cabinet()
    unplug(c)
    c.cycle(ALICE, take=[epc(0)])
    assert c.brief() == [
        "session.opened badge alice",
        "inventory.suspect session bottom held=3",
        "item.checked_out 000 top alice",
        "session.closed complete out=1 in=0 alice",
    ]
    suspect = c.events[1]
    assert isinstance(suspect, ev.InventorySuspect)
    assert suspect.session_id == c.events[0].session_id  # type: ignore[union-attr]
    assert suspect.first
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    assert closed.passes == 2  # confirmed by a second pass
    # The drawer's items stay in the baseline: nobody took them as far as anyone can tell.
    assert c.baselines[-1] == {
        epc(1): "bottom",
        epc(2): "bottom",
        epc(3): "bottom",
        epc(4): "side",
    }
    # Still blind at the next door cycle: alerted again (this session could not see it either).
    start = len(c.events)
    c.cycle(BOB)
    assert c.brief(start) == [
        "session.opened badge bob",
        "inventory.suspect session bottom held=3",
        "session.closed complete out=0 in=0 bob",
    ]
    assert not c.events[start + 1].first  # type: ignore[union-attr]


def test_the_confirmation_pass_runs_even_when_disabled() -> None:
    c = blind_cabinet(confirm_pass=False)
    unplug(c)
    c.cycle(ALICE)
    closed = c.events[-1]
    assert isinstance(closed, ev.SessionClosed)
    assert closed.passes == 2
    assert c.types() == ["session.opened", "inventory.suspect", "session.closed"]


def test_after_replugging_check_outs_are_normal_again() -> None:
    c = blind_cabinet()
    unplug(c)
    c.cycle(ALICE)
    replug(c)
    start = len(c.events)
    c.cycle(BOB)  # the drawer reads again: everything held is there
    c.cycle(ALICE, take=[epc(1)])
    assert c.brief(start) == [
        "session.opened badge bob",
        "session.closed complete out=0 in=0 bob",
        "session.opened badge alice",
        "item.checked_out 001 bottom alice",
        "session.closed complete out=1 in=0 alice",
    ]


def test_what_left_a_blind_drawer_is_missing_without_an_actor() -> None:
    c = blind_cabinet()
    unplug(c)
    c.cycle(ALICE, take=[epc(2)])  # taken while nobody could see the drawer
    replug(c)
    start = len(c.events)
    c.cycle(BOB)  # bob must not be charged with what left while the drawer was blind
    assert c.brief(start) == [
        "session.opened badge bob",
        "item.missing 002 bottom",
        "session.closed complete out=0 in=0 bob",
    ]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "bottom", epc(3): "bottom", epc(4): "side"}


def test_emptying_a_one_item_drawer_is_an_ordinary_check_out() -> None:
    c = blind_cabinet()
    c.cycle(ALICE, take=[epc(4)])  # side held one tag: below suspect_min_tags
    assert c.brief() == [
        "session.opened badge alice",
        "item.checked_out 004 side alice",
        "session.closed complete out=1 in=0 alice",
    ]


def test_a_blind_drawer_in_a_background_inventory_is_not_missing() -> None:
    c = blind_cabinet(background_period_s=60)
    unplug(c)
    c.advance(61)
    c.settle()
    assert c.brief() == ["inventory.suspect background bottom held=3", "inventory.snapshot 5"]
    assert c.baselines[-1] == {e: t.drawer for e, t in c.tags.items()}


def test_the_hold_survives_a_restart() -> None:
    c = blind_cabinet()
    unplug(c)
    c.cycle(ALICE, take=[epc(2)])
    c.restart()
    replug(c)
    start = len(c.events)
    c.cycle(BOB)
    assert c.brief(start) == [
        "session.opened badge bob",
        "item.missing 002 bottom",
        "session.closed complete out=0 in=0 bob",
    ]


def test_a_reader_that_reports_the_unplugged_antenna_makes_the_pass_incomplete() -> None:
    c = blind_cabinet()
    c.set_reader("dock-1", ReaderState.INVENTORYING, antennas=[1, 2])  # it can tell
    c.cycle(ALICE)
    assert c.types() == [
        "session.opened",
        "inventory.incomplete",
        "inventory.incomplete",
        "inventory.incomplete",
        "session.closed",
    ]
    assert "dock-1 antenna 3 disconnected" in c.brief()[1]
