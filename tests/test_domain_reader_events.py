"""Reader outages through the pure engine (fake clock): debounced, counted, flapping alerts.

The events are debounced, never the inventory: a pass that an outage touched stays incomplete.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.domain import events as ev
from drivers.types import ReaderState
from tests.domain_harness import ALICE, Cabinet, Tag, domain_config, epc

DEBOUNCE_S = 10.0
WINDOW_S = 60.0


def cabinet(**overrides: Any) -> Cabinet:
    cfg = domain_config(
        reader_offline_debounce_s=DEBOUNCE_S,
        reader_flap_count=3,
        reader_flap_window_s=WINDOW_S,
        **overrides,
    )
    return Cabinet(config=cfg, tags={epc(0): Tag("top"), epc(1): Tag("side")})


def blip(c: Cabinet, rid: str = "dock-1", down_s: float = 1.0) -> None:
    """The reader drops, the driver reconnects after ``down_s``."""
    c.set_reader(rid, ReaderState.OFFLINE)
    c.advance(down_s / 2)  # whole 100 ms steps: keep down_s a multiple of 0.2
    c.set_reader(rid, ReaderState.CONNECTING, reconnect=True)
    c.advance(down_s / 2)
    c.set_reader(rid, ReaderState.ONLINE)


def test_a_short_outage_is_counted_not_published() -> None:
    c = cabinet()
    blip(c, down_s=3.0)
    c.advance(30)
    assert c.events == []
    # The next outage that outlasts the debounce is reported, with the count of short ones.
    c.set_reader("dock-1", ReaderState.OFFLINE)
    c.advance(DEBOUNCE_S - 0.5)
    assert c.events == []
    c.advance(1.0)
    c.set_reader("dock-1", ReaderState.CONNECTING, reconnect=True)
    c.advance(4.0)
    c.set_reader("dock-1", ReaderState.ONLINE)
    assert c.brief() == ["reader.offline dock-1", "reader.online dock-1"]
    offline, online = c.events
    assert isinstance(offline, ev.ReaderOffline)
    assert isinstance(online, ev.ReaderOnline)
    assert offline.short_outages == 1
    assert offline.down_s == pytest.approx(DEBOUNCE_S)
    assert online.short_outages == 0
    assert online.down_s == pytest.approx(DEBOUNCE_S + 4.5)
    assert online.connection == 3


def test_a_debounced_outage_still_makes_the_pass_incomplete() -> None:
    c = cabinet()
    c.badge(ALICE)
    c.open()
    del c.tags[epc(1)]
    c.close()
    c.advance(0.5)
    blip(c, "dock-2", down_s=1.0)  # the side drawer's reader, mid-pass
    c.settle()
    assert c.brief() == [
        "session.opened badge alice",
        "inventory.incomplete session #1 retry dock-2 offline;dock-2 reconnected;dock-2 connecting",
        "item.checked_out 001 side alice",
        "session.closed complete out=1 in=0 alice",
    ]


def test_a_flapping_reader_gives_one_alert_with_counts_then_a_recovery() -> None:
    c = cabinet()
    for _ in range(40):
        blip(c, down_s=0.4)
        c.advance(1.0)
    assert c.brief() == ["reader.flapping dock-1 flapping 3"]
    started = c.events[0]
    assert isinstance(started, ev.ReaderFlapping)
    assert started.window_s == WINDOW_S
    assert started.connection == 3
    # Healthy for a whole window (1 s of it already): the episode ends, with its count.
    c.advance(WINDOW_S - 1.5)
    assert len(c.events) == 1
    c.advance(1.0)
    assert c.brief() == ["reader.flapping dock-1 flapping 3", "reader.flapping dock-1 stable 40"]
    stable = c.events[1]
    assert isinstance(stable, ev.ReaderFlapping)
    # The episode: from the alert to a whole window after the last recovery.
    assert stable.duration_s == pytest.approx((stable.time - started.time).total_seconds())
    assert stable.duration_s > 40 + WINDOW_S
    # A single blip later is an ordinary short outage again.
    blip(c)
    c.advance(2 * WINDOW_S)
    assert len(c.events) == 2


def test_a_hostile_reader_cannot_flood_the_outbox() -> None:
    c = cabinet()
    for _ in range(1200):  # a reconnect every 3 s for an hour
        blip(c, down_s=0.4)
        c.advance(2.5)
    assert c.brief() == ["reader.flapping dock-1 flapping 3"]


def test_a_flapping_reader_that_stays_away_a_whole_window_is_reported_offline() -> None:
    c = cabinet()
    for _ in range(3):
        blip(c, down_s=0.4)
        c.advance(1.0)
    c.set_reader("dock-1", ReaderState.OFFLINE)
    c.advance(DEBOUNCE_S + 1)
    assert c.brief() == ["reader.flapping dock-1 flapping 3"]
    c.advance(WINDOW_S)
    assert c.brief() == ["reader.flapping dock-1 flapping 3", "reader.offline dock-1"]
    c.set_reader("dock-1", ReaderState.ONLINE, reconnect=True)
    assert c.brief()[-1] == "reader.online dock-1"


def test_outages_and_flapping_survive_a_restart() -> None:
    c = cabinet()
    for _ in range(3):
        blip(c, down_s=0.4)
        c.advance(1.0)
    c.set_reader("dock-2", ReaderState.OFFLINE)
    c.advance(4.0)
    c.restart()
    c.advance(DEBOUNCE_S - 4.0 + 0.2)  # the debounce counts from the outage, not the restart
    assert c.brief() == ["reader.flapping dock-1 flapping 3", "reader.offline dock-2"]
    c.advance(WINDOW_S)
    assert c.brief()[-1] == "reader.flapping dock-1 stable 3"
