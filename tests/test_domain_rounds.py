"""A tag is steady if it was read in enough of the pass's rounds, counted on the agent's clock,
or of the rounds of a reader that read it, counted on that reader's clock (docs/domain.md,
"What counts as inventory"): a stalled loop hands the engine seconds of reads at one moment,
and a reader's rounds may only ever add steadiness, never take it away. Drives the pure engine
with the fake-clock cabinet harness."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from agent.domain.inventory import ScanAccumulator
from drivers.types import ReaderHealth, ReaderState, TagRead
from tests.domain_harness import (
    BOB,
    DRAWER_ANTENNA,
    DRAWERS,
    READER_PORTS,
    T0,
    Cabinet,
    Tag,
    domain_config,
    epc,
)

WRENCH, DRILL, CALIPER, NEIGHBOUR, SPANNER = epc(1), epc(2), epc(3), epc(4), epc(5)


def _cabinet(*, reader_clock: bool, side: bool = False, **overrides: object) -> Cabinet:
    """Wrench and drill read by dock-1; ``side``: a spanner read by dock-2 too."""
    tags = {WRENCH: Tag("top"), DRILL: Tag("bottom")}
    if side:
        tags[SPANNER] = Tag("side")
    cab = Cabinet(config=domain_config(**overrides), tags=tags, reader_clock=reader_clock)
    cab.alive()
    return cab


def _open_session(cab: Cabinet) -> int:
    """Bob badges and opens; returns where his events start."""
    start = len(cab.events)
    cab.badge(BOB)
    cab.advance(1.0)
    cab.open()
    cab.advance(2.0)
    return start


def _stalled_return(cab: Cabinet, drawer: str = "top") -> None:
    """The caliper is put back in ``drawer``; it is first read once the loop has stalled, 1 s
    into the pass. For 3 s nothing is processed while the readers read; then all of it at
    once."""
    late = cab.ticks + 11
    cab.tags[CALIPER] = Tag(drawer, answers=lambda tick: tick >= late)
    cab.close()
    cab.advance(1.0)
    cab.alive()
    stalled: list[TagRead] = []
    for _ in range(30):
        cab._step(1)
        stalled.extend(cab._read_round())
    cab._apply(cab.engine.on_tags(stalled, cab.now))
    cab.alive()
    cab.until_idle()


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
    cab.alive()
    for jump in jumps:
        cab.clock_skew["dock-1"] = jump
        cab.advance(0.2)
        cab.alive()
    cab.until_idle()


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


def test_a_tag_read_alternately_by_two_readers_stays_steady() -> None:
    """The caliper lies at the edge of dock-1's and dock-2's fields: dock-1 reads it in the
    pass's first, third, ... second, dock-2 in the others. In the pass's rounds it was read in
    every one; on either reader's own it was read in half of them. Taken against its readers'
    rounds alone it never joined: a returned item looked absent. (A 6 s pass, and no second
    one: the alternation keeps to the first pass's rounds.)"""
    cab = _cabinet(reader_clock=True, side=True, confirm_pass=False, scan_min_ms=6000)
    start = _open_session(cab)
    first = cab.ticks + 1  # the pass's first reads: its rounds and both readers' start here

    def edge(tick: int) -> tuple[str, int]:
        return DRAWER_ANTENNA["top" if (tick - first) // 10 % 2 == 0 else "side"]

    cab.tags[CALIPER] = Tag("top", antenna=edge)
    cab.close()
    cab.until_idle()
    assert cab.brief(start) == [
        "session.opened badge bob",
        "item.returned 003 top bob",  # read as strongly in either drawer: ties go by name
        "session.closed complete out=0 in=1 bob",
    ]


def test_two_readers_with_far_apart_clocks_each_count_their_own_rounds() -> None:
    """dock-2's clock is 20 years behind dock-1's: only differences within one reader's reads
    count. The caliper, put back in dock-2's drawer and first read during a stall, joins on
    dock-2's rounds; a neighbour's tag dock-1 read in two of the pass's rounds does not."""
    cab = _cabinet(reader_clock=True, side=True)
    cab.clock_skew["dock-2"] = timedelta(days=-20 * 365)
    start = _open_session(cab)
    closed = cab.ticks
    cab.tags[NEIGHBOUR] = Tag("bottom", answers=lambda tick: tick in (closed + 1, closed + 25))
    _stalled_return(cab, "side")
    assert cab.brief(start) == [
        "session.opened badge bob",
        "item.returned 003 side bob",
        "session.closed complete out=0 in=1 bob",
    ]


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How far dock-1's clock is off, by the tick (since the door closed), None: its reads carry no
# time of its own: wrong clocks that must not change what the pass's rounds decide.
CLOCKS: dict[str, Callable[[int], timedelta | None]] = {
    "right": lambda t: timedelta(0),
    # Stands still from the door's close: every read looks made at one moment.
    "stands still": lambda t: -timedelta(milliseconds=100 * t),
    # Runs a tenth as fast: the pass looks a tenth as long.
    "runs slow": lambda t: -timedelta(milliseconds=90 * t),
    # Runs ten times as fast: each 100 ms looks a round long.
    "runs fast": lambda t: timedelta(milliseconds=900 * t),
    # Reset to 1970 (a battery-less RTC) 1.5 s into the pass, set right 2 s later.
    "to 1970 and back": lambda t: (EPOCH - T0) if 15 <= t < 35 else timedelta(0),
    # The same as the LLRP driver passes it on: a 1970 timestamp is not the reader's time.
    "to 1970 and back, dropped": lambda t: None if 15 <= t < 35 else timedelta(0),
    # Stepped back and forth by less than a round each tick (reads a little out of order).
    "wobbles": lambda t: -timedelta(milliseconds=900) if t % 2 else timedelta(0),
}


@pytest.mark.parametrize("case", list(CLOCKS))
def test_a_wrong_reader_clock_neither_makes_nor_unmakes_steadiness(case: str) -> None:
    """dock-1's clock is wrong in its own way; the pass (6 s) comes out as with a right one.
    The caliper is read five times a second (every other report): steady in the pass's rounds,
    whatever dock-1's clock says (running fast, it is in half of dock-1's rounds only). A
    neighbour's tag is read twice, in the pass's first round and 4 s into it: steady in no
    honest count of rounds (a clock that stands still or runs slow puts both reads in one of
    dock-1's few rounds)."""
    skew = CLOCKS[case]
    cab = _cabinet(reader_clock=True, confirm_pass=False, scan_min_ms=6000)
    start = _open_session(cab)
    closed = cab.ticks
    cab.tags[CALIPER] = Tag("top", answers=lambda tick: tick % 2 == 0)
    cab.tags[NEIGHBOUR] = Tag("bottom", answers=lambda tick: tick in (closed + 1, closed + 40))
    cab.close()
    for _ in range(round(60 / 0.1)):
        off = skew(cab.ticks + 1 - closed)  # for the next tick's reads
        cab.reader_clock = off is not None
        cab.clock_skew["dock-1"] = off or timedelta(0)
        cab.advance(0.1)
        cab.alive()
        if cab.engine.phase.value == "idle" and not cab.scanning:
            break
    assert cab.brief(start) == [
        "session.opened badge bob",
        "item.returned 003 top bob",
        "session.closed complete out=0 in=1 bob",
    ]


def test_a_tag_read_in_one_round_only_is_not_steady_on_a_quiet_reader() -> None:
    """Two neighbours' tags answer in one moment of the pass (read twice, 100 ms apart): one
    in dock-1's field (it reads the cabinet's tags all along), one in dock-2's, which reads
    nothing else. On dock-2's own rounds (one, with reads) the second was read in all of them;
    the pass's rounds are what it must meet, and it was read in one of six. (One pass: no
    second one to refute them.)"""
    cab = _cabinet(reader_clock=True, confirm_pass=False, scan_min_ms=6000)
    start = _open_session(cab)
    flicker = cab.ticks + 12
    cab.tags[NEIGHBOUR] = Tag("bottom", answers=lambda tick: tick in (flicker, flicker + 1))
    cab.tags[SPANNER] = Tag("side", answers=lambda tick: tick in (flicker, flicker + 1))
    cab.close()
    cab.until_idle()
    assert cab.brief(start) == [
        "session.opened badge bob",
        "session.closed complete out=0 in=0 bob",
    ]


@pytest.mark.parametrize(
    "at", [datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)], ids=str
)
def test_a_reader_time_at_the_end_of_datetime_is_counted_not_a_crash(at: datetime) -> None:
    """A reader stamps its reads with the last (or first) representable time, then a right
    one: the pass counts them (a round on its clock is never computed as a sum past the end of
    datetime) and its rounds decide as before."""
    config = domain_config(presence_round_ms=1000)
    health = {r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r in READER_PORTS}
    acc = ScanAccumulator(config, config.antenna_map(), health, started=0.0)
    for k in range(30):
        stamp = at if k < 5 else T0 + timedelta(seconds=k / 10)
        acc.add([TagRead("dock-1", "aa", 1, -50.0, stamp, reader_clock=True)], 1.0 + k / 10)
    result = acc.result(4.05)
    assert result.present == {"aa": "top"}
    assert result.steady == {"aa"}


# dock-2's clock for its k-th report (0.1 s apart on the agent's clock) of a tag going by:
# hostile or broken ways to spread 0.8 s of reads over many of its own rounds.
QUIET_READER_CLOCKS: dict[str, Callable[[int], datetime]] = {
    # Runs ten times as fast: each report looks a round after the last.
    "runs fast": lambda k: T0 + timedelta(seconds=k),
    # Goes back by more than a round before every report (each starts a new origin).
    "jumps back every report": lambda k: T0 - timedelta(seconds=2 * k),
}


@pytest.mark.parametrize("case", list(QUIET_READER_CLOCKS))
def test_a_tag_going_by_a_quiet_reader_is_not_steady_on_its_wrong_clock(case: str) -> None:
    """dock-1 reads the cabinet's wrench all along a 6 s pass (six rounds, on any clock).
    dock-2, whose own field is empty (its drawer's items are out), reads a tag carried past
    the cabinet for 0.8 s: in one of the pass's rounds. Its clock runs fast, or goes back
    before each report: on it, the 0.8 s look like eight rounds, as many as the pass's, and
    the passer-by is in every one. Its rounds must not make it steady: a reader cannot have
    read in more rounds than the agent's time since the pass began holds, and a tag that
    joins on them is an ``item.returned`` now and a false check-out once it is gone."""
    clock = QUIET_READER_CLOCKS[case]
    config = domain_config(presence_round_ms=1000)
    health = {r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r in READER_PORTS}
    acc = ScanAccumulator(config, config.antenna_map(), health, started=0.0)
    for k in range(60):
        now = k / 10
        reads = [TagRead("dock-1", "aa", 1, -50.0, T0 + timedelta(seconds=now), reader_clock=True)]
        if 20 <= k < 28:
            reads.append(TagRead("dock-2", "bb", 1, -50.0, clock(k - 20), reader_clock=True))
        acc.add(reads, now)
    result = acc.result(6.0)
    assert result.present == {"aa": "top", "bb": "side"}
    assert result.steady == {"aa"}


# dock-3's clock for a read it made ``t`` seconds into the pass: right, or stepped back an
# hour 3 s in (a new origin, mid-pass, for a reader that is not the first to stamp the tag).
THIRD_READER_CLOCKS: dict[str, Callable[[float], datetime]] = {
    "right": lambda t: T0 + timedelta(seconds=t),
    "back an hour mid-pass": lambda t: T0 + timedelta(seconds=t, hours=-1 if t >= 3 else 0),
}


@pytest.mark.parametrize("case", list(THIRD_READER_CLOCKS))
def test_a_tag_steady_on_the_third_reader_that_stamped_it_only(case: str) -> None:
    """Three readers stamp their reads with their own clocks; the loop stalls from 1 s to 4 s
    into a 6 s pass (the reads made then are all handled at 4 s). The caliper is put back 1 s
    in: dock-1, then dock-3, then dock-2 read it once at that moment; from then on dock-3 reads
    it in every report, dock-2 once more 3 s in. In the pass's rounds (three: before, at the
    end of and after the stall) it is in two, too few; on dock-1's in one of six; dock-2's (two
    rounds) are too few to count. On dock-3's own, the rounds it made every read in, it is in
    all, through dock-3's clock going back (its rounds carry on after the ones counted): it is
    steady there, and only there, whichever order the readers first read it in."""
    clock = THIRD_READER_CLOCKS[case]
    config = domain_config(presence_round_ms=1000, drawers={**DRAWERS, "back": ["dock-3:1"]})
    antennas = config.antenna_map()
    health = {
        r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r, _ in sorted(antennas)
    }
    acc = ScanAccumulator(config, antennas, health, started=0.0)

    def stamped(reader: str, tag: str, port: int, at: datetime) -> TagRead:
        return TagRead(reader, tag, port, -50.0, at, reader_clock=True)

    for k in range(60):
        t = k / 10  # when the readers made the reads; handled at the stall's end if in it
        reads = [stamped("dock-1", "aa", 1, T0 + timedelta(seconds=t))]
        if k == 10:
            reads.append(stamped("dock-1", "cc", 1, T0 + timedelta(seconds=t)))
        if k >= 10:
            reads.append(stamped("dock-3", "cc", 1, clock(t)))
        if k in (10, 30):
            reads.append(stamped("dock-2", "cc", 1, T0 + timedelta(seconds=t)))
        acc.add(reads, 4.0 if 1.0 <= t < 4.0 else t)
    result = acc.result(6.0)
    assert result.present == {"aa": "top", "cc": "back"}
    assert result.steady == {"aa", "cc"}


def test_a_tag_read_by_two_later_readers_counts_their_rounds_apart() -> None:
    """Three readers read all along a 6 s pass with their own clocks (the loop stalls from 1 s
    to 4 s, as above). A neighbour's tag is read by dock-1 once 1 s in, then by dock-2 in its
    rounds 1 and 2 and by dock-3 in its rounds 3 and 4: two of six on either, not steady (the
    ratio here is 0.6); in the pass's rounds, one of three. Counted as one reader's, the four
    rounds would make it steady."""
    config = domain_config(
        presence_round_ms=1000,
        presence_min_ratio=0.6,
        drawers={**DRAWERS, "back": ["dock-3:1"]},
    )
    antennas = config.antenna_map()
    health = {
        r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r, _ in sorted(antennas)
    }
    acc = ScanAccumulator(config, antennas, health, started=0.0)
    for k in range(60):
        t = k / 10
        at = T0 + timedelta(seconds=t)
        reads = [
            TagRead(reader, tag, 1, -50.0, at, reader_clock=True)
            for reader, tag in (("dock-1", "aa"), ("dock-2", "bb"), ("dock-3", "ee"))
        ]
        if k == 10:
            reads.append(TagRead("dock-1", "dd", 1, -50.0, at, reader_clock=True))
        if 10 <= k < 30:
            reads.append(TagRead("dock-2", "dd", 1, -50.0, at, reader_clock=True))
        if 30 <= k < 50:
            reads.append(TagRead("dock-3", "dd", 1, -50.0, at, reader_clock=True))
        acc.add(reads, 4.0 if 1.0 <= t < 4.0 else t)
    result = acc.result(6.0)
    assert result.present == {"aa": "top", "bb": "side", "dd": "side", "ee": "back"}
    assert result.steady == {"aa", "bb", "ee"}
