"""Presence rounds count on the time the reader read, not on when the agent handles the reads
(docs/domain.md, "What counts as inventory"). Drives the pure engine with the fake-clock cabinet
harness: a stalled loop hands the engine seconds of reads at one moment."""

from __future__ import annotations

from datetime import timedelta

import pytest

from drivers.types import TagRead
from tests.domain_harness import BOB, Cabinet, Tag, domain_config, epc

WRENCH, DRILL, CALIPER, NEIGHBOUR = epc(1), epc(2), epc(3), epc(4)


def _alive(cab: Cabinet) -> None:
    for rid in sorted(cab.readers):
        cab._apply(cab.engine.on_alive(rid, cab.now.mono, cab.now))


def _until_idle(cab: Cabinet, limit_s: float = 60.0) -> None:
    for _ in range(round(limit_s / 0.1)):
        cab.advance(0.1)
        _alive(cab)
        if cab.engine.phase.value == "idle" and not cab.scanning:
            return
    raise AssertionError(f"engine stuck in {cab.engine.phase}: {cab.brief()}")


def _cabinet(*, reader_clock: bool, **overrides: object) -> Cabinet:
    cab = Cabinet(
        config=domain_config(**overrides),
        tags={WRENCH: Tag("top"), DRILL: Tag("bottom")},
        reader_clock=reader_clock,
    )
    _alive(cab)
    return cab


def _open_session(cab: Cabinet) -> int:
    """Bob badges and opens; returns where his events start."""
    start = len(cab.events)
    cab.badge(BOB)
    cab.advance(1.0)
    cab.open()
    cab.advance(2.0)
    return start


def _stalled_return(cab: Cabinet) -> None:
    """The caliper is put back in the top drawer; it is first read once the loop has stalled,
    1 s into the pass. For 3 s nothing is processed while the readers read; then all of it at
    once."""
    late = cab.ticks + 11
    cab.tags[CALIPER] = Tag("top", answers=lambda tick: tick >= late)
    cab.close()
    cab.advance(1.0)
    _alive(cab)
    stalled: list[TagRead] = []
    for _ in range(30):
        cab._step(1)
        stalled.extend(cab._read_round())
    cab._apply(cab.engine.on_tags(stalled, cab.now))
    _alive(cab)
    _until_idle(cab)


def test_a_tag_first_read_in_a_stall_is_steady_on_the_readers_time() -> None:
    """Counted on the agent's time, the 3 s of reads fell in one round: the caliper, read in
    every round since it was put back, was read in too few of the pass's rounds to join."""
    cab = _cabinet(reader_clock=True)
    start = _open_session(cab)
    _stalled_return(cab)
    assert cab.brief(start) == [
        "session.opened badge bob",
        "item.returned 003 top bob",
        "session.closed complete out=0 in=1 bob",
    ]


def test_a_reader_without_timestamps_counts_rounds_on_the_agents_time() -> None:
    """The same stall with reads that carry no reader time: rounds are the agent's, as
    before, and the squeezed reads count in one round (the caliper is not steady)."""
    cab = _cabinet(reader_clock=False)
    start = _open_session(cab)
    _stalled_return(cab)
    assert cab.brief(start) == [
        "session.opened badge bob",
        "session.closed complete out=0 in=0 bob",
    ]


def _jumping_clock(cab: Cabinet, after_s: float, *jumps: timedelta) -> None:
    """A 6 s pass: the caliper is put back; a neighbour's tag is read twice, in the pass's
    first round and 4 s into it, after the jumps of dock-1's clock (stepped by NTP, a
    battery-less RTC set late), ``after_s`` into the pass and 0.2 s apart."""
    cab.tags[CALIPER] = Tag("top")
    closed = cab.ticks
    cab.tags[NEIGHBOUR] = Tag("bottom", answers=lambda tick: tick in (closed + 1, closed + 40))
    cab.close()
    cab.advance(after_s)
    _alive(cab)
    for jump in jumps:
        cab.clock_skew["dock-1"] = jump
        cab.advance(0.2)
        _alive(cab)
    _until_idle(cab)


JUMPS = {
    "right": (1.5, ()),
    "back an hour": (1.5, (timedelta(hours=-1),)),
    "a day ahead, then right": (0.5, (timedelta(days=1), timedelta(0))),
}


@pytest.mark.parametrize("case", list(JUMPS))
def test_a_reader_clock_that_jumps_counts_rounds_as_a_right_one(case: str) -> None:
    """dock-1's clock jumps mid-pass: the outcome is the one of a clock that is right (the
    first case). A jump back starts its rounds over from a new origin; counted from the old
    one, every later read fell in one round, the pass looked two rounds long, and the
    neighbour's tag, read twice in six rounds, looked steady (one pass: no second one to
    refute it). A jump ahead only skips rounds; the correction after it is a jump back."""
    after_s, jumps = JUMPS[case]
    cab = _cabinet(reader_clock=True, confirm_pass=False, scan_min_ms=6000)
    start = _open_session(cab)
    _jumping_clock(cab, after_s, *jumps)
    assert cab.brief(start) == [
        "session.opened badge bob",
        "item.returned 003 top bob",
        "session.closed complete out=0 in=1 bob",
    ]
