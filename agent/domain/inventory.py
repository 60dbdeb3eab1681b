"""Inventory: which tags are present where after a scan, whether the scan can be trusted, the diff."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, NamedTuple

from agent.domain.config import Antenna, CabinetDomainConfig
from drivers.types import ReaderHealth, TagRead

_EPC_RE = re.compile(r"(?:[0-9a-f]{2}){1,64}")
_TID_RE = re.compile(r"(?:[0-9a-f]{4}){2,32}")
# The least spread assumed of a tag's RSSI observations (dB): readers report whole dBm, and
# two or three reads that happen to agree say little about the next one.
_MIN_SPREAD_DB = 1.0
_DRAWER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_PROBLEMS = 32
# TIDs remembered per EPC in one pass: the genuine tag and a clone or two. More distinct TIDs
# for one EPC are not more evidence, only memory an attacker could make us spend.
MAX_TIDS_PER_EPC = 4


class Baseline(Mapping[str, str]):
    """The trusted contents of the cabinet: EPC → drawer. Immutable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)

    @classmethod
    def from_dict(cls, data: object) -> Baseline:
        """Validate untrusted data (a stored JSON object) into a Baseline."""
        if not isinstance(data, Mapping):
            raise ValueError("baseline must be an object of EPC → drawer")
        for epc, drawer in data.items():
            if not isinstance(epc, str) or not _EPC_RE.fullmatch(epc):
                raise ValueError(f"baseline EPC {epc!r} is not lower-case hex")
            if not isinstance(drawer, str) or not _DRAWER_RE.fullmatch(drawer):
                raise ValueError(f"baseline drawer {drawer!r} of {epc} is not a drawer name")
        return cls(data)

    def to_dict(self) -> dict[str, str]:
        """A plain (sorted) dict, for JSON."""
        return dict(sorted(self._items.items()))

    def digest(self) -> str:
        """SHA-256 over the sorted contents: two cabinets agree iff their digests do."""
        h = hashlib.sha256()
        for epc, drawer in sorted(self._items.items()):
            h.update(f"{epc}={drawer}\n".encode())
        return h.hexdigest()

    def by_drawer(self) -> dict[str, int]:
        """Tag count per drawer."""
        out: dict[str, int] = {}
        for drawer in self._items.values():
            out[drawer] = out.get(drawer, 0) + 1
        return dict(sorted(out.items()))

    def __getitem__(self, epc: str) -> str:
        return self._items[epc]

    def get(self, epc: str, default: Any = None) -> Any:  # dict speed, not Mapping's try/except
        return self._items.get(epc, default)

    def __contains__(self, epc: object) -> bool:
        return epc in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Baseline):
            return self._items == other._items
        return super().__eq__(other)

    def __repr__(self) -> str:
        return f"Baseline({len(self._items)} tags)"


class Diff(NamedTuple):
    """What changed between a baseline and a scan."""

    missing: dict[str, str]  # EPC → drawer it was in
    new: dict[str, str]  # EPC → drawer it is in
    moved: dict[str, tuple[str, str]]  # EPC → (old drawer, new drawer)


def diff(baseline: Mapping[str, str], scan: Mapping[str, str]) -> Diff:
    """Missing (in baseline, not in scan), new (in scan only) and moved (drawer changed) tags."""
    missing = {e: d for e, d in baseline.items() if e not in scan}
    new: dict[str, str] = {}
    moved: dict[str, tuple[str, str]] = {}
    for epc, drawer in scan.items():
        old = baseline.get(epc)
        if old is None:
            new[epc] = drawer
        elif old != drawer:
            moved[epc] = (old, drawer)
    return Diff(
        dict(sorted(missing.items())), dict(sorted(new.items())), dict(sorted(moved.items()))
    )


class _ReaderRounds:
    """The read rounds of one reader in a pass on its own clock (``TagRead.first_seen`` when
    ``reader_clock``), counted from its time of its first read of the pass: a clock that is
    wrong by any amount counts the same. A jump back (more than a round: reads may come a
    little out of order) starts them over from a new origin, after the rounds already counted
    (``base``); one ahead only skips rounds (only rounds with reads count)."""

    __slots__ = (
        "active",
        "agent_at_latest",
        "base",
        "handled",
        "hi",
        "last",
        "latest",
        "lo",
        "step",
        "when",
    )

    def __init__(self, origin: datetime, now: float, step: timedelta) -> None:
        self.step = step
        self.handled = now  # the agent's time of the latest batch with its reads
        self.when = origin  # the origin on the reader's clock
        self.base = 0
        self.last = -1  # the latest round in which the reader reported a read
        self.active = 0  # rounds in which it reported any read of a configured antenna
        self.latest = origin  # the reader's latest time seen ...
        self.agent_at_latest = now  # ... and the agent's time when it was counted
        self.lo = self.hi = origin  # the reader's times of round ``last``: [lo, hi)

    def read_at(self, at: datetime, now: float) -> int:
        """The round of a read the reader made at ``at`` (counted active)."""
        step = self.step
        if self.latest - at > step:
            self.base = self.last + 1  # its clock went back
            self.when = self.latest = at
            self.agent_at_latest = now
        elif at > self.latest:
            self.latest = at
            self.agent_at_latest = now
        # A read reported a little out of order counts in the latest round: rounds only
        # move forward. Differences of two datetimes never overflow; sums near the end of
        # time may (a hostile timestamp): then every read takes this slow path.
        r = max(self.last, self.base + (at - self.when) // step)
        if r > self.last:
            self.active += 1
            self.last = r
        try:
            self.lo = self.when + (r - self.base) * step
            self.hi = self.lo + step
        except OverflowError:
            self.lo = self.hi = at
        return r

    def current(self, now: float) -> int:
        """Its latest time, moved on by the agent's time since (a reader that went quiet is
        past its last active round)."""
        since = timedelta(seconds=max(0.0, now - self.agent_at_latest))
        return max(self.last, self.base + ((self.latest - self.when) + since) // self.step)


class _TheirRounds:
    """A tag's read rounds on the clock of a reader other than the first that stamped a
    qualifying read of it with its own time: a link of a chain, one per such reader (at most
    one per configured reader, so a short walk). Not slots of every tag, nor a dict: a tag read
    by one reader pays nothing for it, one at the edge of two readers' fields 64 bytes (a dict
    and a list: ~300; docs/performance.md, cabinet engine)."""

    __slots__ = ("clock", "last", "next", "rounds")

    def __init__(self, clock: _ReaderRounds, round_no: int, next_: _TheirRounds | None) -> None:
        self.clock = clock
        self.rounds = 1
        self.last = round_no
        self.next = next_


class _TagStats:
    __slots__ = (
        "by_drawer",
        "count",
        "excess",
        "excess_sq",
        "last_round",
        "more",
        "rounds",
        "their_last",
        "their_rounds",
        "theirs",
        "with_rssi",
    )

    def __init__(self) -> None:
        self.count = 0
        self.by_drawer: dict[str, list[float]] = {}  # drawer → [reads, rssi sum]
        self.rounds = 0  # the pass's read rounds with at least one qualifying read
        self.last_round = -1
        # The same on the clock of the first reader that stamped a qualifying read of it
        # with its own time (``theirs``); ``more``: the same on each other's, a chain.
        self.theirs: _ReaderRounds | None = None
        self.their_rounds = 0
        self.their_last = -1
        self.more: _TheirRounds | None = None
        # Qualifying reports that carried an RSSI, one observation each (a report of n reads
        # carries their *peak*: counting it n times would inflate the mean) ...
        self.with_rssi = 0
        self.excess = 0.0  # ... the sum of their dB above the antenna's floor ...
        self.excess_sq = 0.0  # ... and of its squares (the spread of the observations)

    def clearly_above(self, margin: float) -> bool:
        """Is the mean RSSI above the floor by ``margin`` dB, beyond the noise of few reads?

        The mean's lower bound (two standard errors, the spread taken as at least
        ``_MIN_SPREAD_DB``) must clear the margin: a weak tag read a handful of times (a
        neighbour's, through the wall) cannot pass by luck; a tag in the cabinet, read dozens
        of times well above the floor, passes as before."""
        k = self.with_rssi
        if k == 0:
            return True  # the readers report no RSSI: the rounds alone decide
        mean = self.excess / k
        var = max(0.0, self.excess_sq / k - mean * mean) * k / (k - 1) if k > 1 else 0.0
        spread = max(math.sqrt(var), _MIN_SPREAD_DB)
        return mean - 2.0 * spread / math.sqrt(k) >= margin

    def steady_on_theirs(
        self, min_ratio: float, whole: Mapping[_ReaderRounds, tuple[int, int]]
    ) -> bool:
        """Read in at least ``min_ratio`` of the rounds of a reader in ``whole`` (each its
        rounds known complete, and its current round) on that reader's own clock."""
        if self.theirs is not None:
            counted = whole.get(self.theirs)
            if counted is not None:
                complete, current = counted
                extra = 1 if self.their_last >= current else 0
                if self.their_rounds >= min_ratio * (complete + extra):
                    return True
        cell = self.more
        while cell is not None:
            counted = whole.get(cell.clock)
            if counted is not None:
                complete, current = counted
                if cell.rounds >= min_ratio * (complete + (1 if cell.last >= current else 0)):
                    return True
            cell = cell.next
        return False


def _strongest(by_drawer: Mapping[str, Sequence[float]]) -> str:
    if len(by_drawer) == 1:
        return next(iter(by_drawer))
    # Strongest mean RSSI; ties go to the drawer with more reads, then the name (deterministic).
    return max(by_drawer.items(), key=lambda kv: (kv[1][1] / kv[1][0], kv[1][0], kv[0]))[0]


@dataclass(frozen=True)
class ScanResult:
    """The outcome of one or more scan passes."""

    present: Mapping[str, str]  # EPC → drawer
    complete: bool
    problems: tuple[str, ...]
    reads: int
    duration_ms: int
    passes: int = 1
    # EPC → drawer → (reads, RSSI sum), for present tags; read-only by contract.
    stats: Mapping[str, Mapping[str, Sequence[float]]] = field(default_factory=dict, repr=False)
    # Present tags read *consistently*: in enough of the pass's rounds, clearly above the floor.
    # Only these may join an inventory they were not in (a weak, intermittent tag — a neighbour
    # cabinet's, read through the wall — may keep a known tag present, never add one).
    steady: frozenset[str] = frozenset()
    # Drawers whose antennas reported any read at all (a tag, a neighbour, under the floor or
    # not): a drawer that held tags and is not among them may be blind (an unplugged antenna).
    heard: frozenset[str] = frozenset()
    # Present tags whose readers read a TID with them: EPC → TID read → the drawer where the
    # tag answering with that TID read strongest (a clone shares the EPC, not the place).
    tids: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)

    def merge(self, other: ScanResult) -> ScanResult:
        """Union of two passes: a tag present in either is present; location by combined RSSI.
        A tag is steady only if it was steady in both."""
        stats: dict[str, Mapping[str, Sequence[float]]] = dict(self.stats)
        present = dict(self.present)
        for epc, theirs in other.stats.items():
            mine = stats.get(epc)
            if mine is None:
                stats[epc] = theirs
                present[epc] = other.present[epc]
                continue
            combined = {d: [c[0], c[1]] for d, c in mine.items()}
            for drawer, (n, total) in theirs.items():
                cell = combined.setdefault(drawer, [0.0, 0.0])
                cell[0] += n
                cell[1] += total
            stats[epc] = combined
            present[epc] = _strongest(combined)
        return ScanResult(
            present=MappingProxyType(dict(sorted(present.items()))),
            complete=self.complete and other.complete,
            problems=self.problems + tuple(p for p in other.problems if p not in self.problems),
            reads=self.reads + other.reads,
            duration_ms=self.duration_ms + other.duration_ms,
            passes=self.passes + other.passes,
            stats=MappingProxyType(stats),
            steady=self.steady & other.steady,
            heard=self.heard | other.heard,
            tids=_merge_tids(self.tids, other.tids),
        )


def _merge_tids(
    a: Mapping[str, Mapping[str, str]], b: Mapping[str, Mapping[str, str]]
) -> Mapping[str, Mapping[str, str]]:
    """TIDs of either pass (a TID's drawer as the later pass found it)."""
    if not b:
        return a
    out = dict(a)
    for epc, tids in b.items():
        merged = {**out.get(epc, {}), **tids}
        out[epc] = MappingProxyType(dict(sorted(merged.items())[:MAX_TIDS_PER_EPC]))
    return MappingProxyType(out)


class ScanAccumulator:
    """Collects the TagReads and reader health of one scan pass.

    A tag is present after ``min_reads`` reads at or above its antenna's RSSI floor (a read
    without RSSI counts, at the floor). It is also *steady* if its mean RSSI is at least
    ``presence_margin_db`` above the floor and it was read in at least ``presence_min_ratio``
    of the pass's read rounds (``presence_round_ms`` each, counted from the pass's first read
    on the agent's clock, when it handles the reads: ``now``; only rounds in which the readers
    reported anything count) *or* of the rounds of a reader that read it, on that reader's own
    clock (``TagRead.first_seen`` when ``reader_clock``). A stalled loop squeezes seconds of
    reads into one of the pass's rounds; on the reader's clock they fall in the rounds they
    were made in. A reader's rounds may only add steadiness: they count only if there are at
    least as many of them as of the pass's (its clock cannot squeeze reads the agent saw
    apart: a clock that stands still, runs slow, or a reader that read little in the pass),
    and no more of them than the agent's time since the pass began holds (a clock that runs
    fast or keeps going back).
    The pass is complete only if every configured reader was healthy, on the same connection
    and with every configured antenna connected, all along.
    """

    def __init__(
        self,
        config: CabinetDomainConfig,
        antennas: Mapping[Antenna, str],
        health: Mapping[str, ReaderHealth | None],
        started: float,
    ) -> None:
        self._min_reads = config.min_reads
        self._max_tags = config.max_tags
        self._round_s = config.presence_round_ms / 1000
        self._min_ratio = config.presence_min_ratio
        self._margin = config.presence_margin_db
        self._first_read: float | None = None  # rounds count from the pass's first read
        self._active_rounds = 0  # rounds in which any configured antenna reported a read
        self._last_active = -1
        # Read rounds on the clock of each reader that stamps its reads with it.
        self._step = timedelta(milliseconds=config.presence_round_ms)
        self._reader_rounds: dict[str, _ReaderRounds] = {}
        self._heard: set[str] = set()
        self._antennas = {a: (drawer, config.rssi_floor(*a)) for a, drawer in antennas.items()}
        self._ports: dict[str, set[int]] = {}
        for reader, port in antennas:
            self._ports.setdefault(reader, set()).add(port)
        self.started = started
        self.last_new = started
        self.reads = 0  # qualifying reads counted
        self.ignored = 0  # reads from unconfigured antennas, below the floor, or malformed
        self._tags: dict[str, _TagStats] = {}
        # EPC → TID read with it → drawer → [reads, RSSI sum] (counted reads only).
        self._tids: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._present = 0
        self._problems: list[str] = []
        self._closed = False
        self._sessions: dict[str, int] = {}
        for reader in sorted(self._ports):
            h = health.get(reader)
            if h is None:
                self._problem(f"{reader} not connected")
                continue
            self._sessions[reader] = h.session
            self._check(h)

    @property
    def complete(self) -> bool:
        return not self._problems

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(self._problems)

    @property
    def tags_present(self) -> int:
        return self._present

    def add(self, reads: Iterable[TagRead], now: float) -> None:
        """Count a batch of reads observed at monotonic time ``now``."""
        if self._closed:
            raise RuntimeError("scan pass already ended")
        antennas = self._antennas
        tags = self._tags
        min_reads = self._min_reads
        reader_rounds = self._reader_rounds
        round_no = -1
        t_rid: str | None = None  # the reader of ``clock`` (the last read with its time)
        clock: _ReaderRounds | None = None
        for read in reads:
            rid = read.reader_id
            ant = antennas.get((rid, read.antenna))
            if ant is None:
                self.ignored += 1
                continue
            if round_no < 0:
                if self._first_read is None:
                    self._first_read = now
                round_no = int((now - self._first_read) // self._round_s)
                if round_no > self._last_active:
                    self._active_rounds += 1
                    self._last_active = round_no
            theirs: _ReaderRounds | None = None
            if read.reader_clock:
                at = read.first_seen
                if rid != t_rid:
                    t_rid = rid
                    clock = reader_rounds.get(rid)
                    if clock is not None:
                        clock.handled = now
                if clock is None:
                    clock = reader_rounds[rid] = _ReaderRounds(at, now, self._step)
                    their_no = clock.read_at(at, now)
                elif clock.lo <= at < clock.hi:  # most reads: in the latest round
                    their_no = clock.last
                    if at > clock.latest:
                        clock.latest = at
                        clock.agent_at_latest = now
                else:
                    their_no = clock.read_at(at, now)
                theirs = clock
            drawer, floor = ant
            self._heard.add(drawer)
            rssi = read.peak_rssi_dbm
            measured = rssi is not None
            if rssi is None:
                rssi = floor
            elif rssi < floor:
                self.ignored += 1
                continue
            n = read.seen_count if read.seen_count > 0 else 1
            stats = tags.get(read.epc)
            if stats is None:
                if not _EPC_RE.fullmatch(read.epc):
                    self.ignored += 1
                    continue
                if len(tags) >= self._max_tags:
                    self.ignored += 1
                    self._problem("tag limit reached")
                    continue
                stats = tags[read.epc] = _TagStats()
                self.last_new = now
            before = stats.count
            stats.count = before + n
            if round_no > stats.last_round:
                stats.rounds += 1
                stats.last_round = round_no
            if theirs is not None:
                if stats.theirs is theirs:
                    if their_no > stats.their_last:
                        stats.their_rounds += 1
                        stats.their_last = their_no
                elif stats.theirs is None:
                    stats.theirs = theirs
                    stats.their_rounds = 1
                    stats.their_last = their_no
                else:  # first stamped by another reader: this one's cell in ``more``
                    more = stats.more
                    while more is not None and more.clock is not theirs:
                        more = more.next
                    if more is None:
                        stats.more = _TheirRounds(theirs, their_no, stats.more)
                    elif their_no > more.last:
                        more.rounds += 1
                        more.last = their_no
            if measured:
                stats.with_rssi += 1
                stats.excess += rssi - floor
                stats.excess_sq += (rssi - floor) ** 2
            if before < min_reads <= stats.count:
                self._present += 1
                self.last_new = now
            tid = read.tid
            if tid is not None and _TID_RE.fullmatch(tid):
                known = self._tids.setdefault(read.epc, {})
                cells = known.get(tid)
                if cells is None and len(known) < MAX_TIDS_PER_EPC:
                    cells = known[tid] = {}
                if cells is not None:
                    tcell = cells.get(drawer)
                    if tcell is None:
                        cells[drawer] = [n, rssi * n]
                    else:
                        tcell[0] += n
                        tcell[1] += rssi * n
            cell = stats.by_drawer.get(drawer)
            if cell is None:
                stats.by_drawer[drawer] = [n, rssi * n]
            else:
                cell[0] += n
                cell[1] += rssi * n
            self.reads += n

    def health(self, h: ReaderHealth) -> None:
        """Note a reader health change that happened during the pass."""
        if h.reader_id not in self._ports:
            return
        start = self._sessions.get(h.reader_id)
        if start is None:
            self._sessions[h.reader_id] = h.session
        elif h.session != start:
            self._problem(f"{h.reader_id} reconnected")
        self._check(h)

    def result(self, now: float) -> ScanResult:
        """The pass outcome: present tags with their drawers. Ends the pass (no ``add`` after)."""
        self._closed = True
        min_reads = self._min_reads
        present: dict[str, str] = {}
        stats: dict[str, Mapping[str, Sequence[float]]] = {}
        steady: set[str] = set()
        # Rounds in which the readers reported anything (a stalled loop or a slow start is
        # nobody's absence); the current, partial round counts only for a tag read in it.
        current = 0 if self._first_read is None else int((now - self._first_read) // self._round_s)
        whole = self._active_rounds - (1 if self._last_active >= current else 0)
        # The same on the clocks of the readers whose rounds may add steadiness: as many as the
        # pass's at least. The agent's clock squeezes reads together (a stalled loop) and
        # pulls them apart by a report across a round's edge at most; a reader's that shows
        # fewer squeezes them more than the agent did (a clock that stands still or runs
        # slow), or the reader read in fewer rounds than the readers together (a quiet reader,
        # one neighbour's tag read once): a tag read a few times must not pass on them.
        # Nor more of them than the agent's time since the pass began holds (a round of slack
        # for a read made just before it): reads are made before the agent handles them, so
        # a reader's rounds up to its latest batch fit in that time, however the loop stalled.
        # More is a clock that runs fast or goes back (each jump a new origin), and on such
        # rounds a tag going by for a moment would be steady.
        counted: dict[_ReaderRounds, tuple[int, int]] = {}
        for clock in self._reader_rounds.values():
            if (
                clock.active >= self._active_rounds
                and clock.last <= (clock.handled - self.started) / self._round_s + 1
            ):
                its = clock.current(now)
                counted[clock] = (clock.active - (1 if clock.last >= its else 0), its)
        min_ratio = self._min_ratio
        for epc, s in self._tags.items():
            if s.count >= min_reads:
                present[epc] = _strongest(s.by_drawer)
                stats[epc] = s.by_drawer  # handed over, not copied: the pass is over
                rounds = whole + (1 if s.last_round >= current else 0)
                if (
                    s.rounds >= min_ratio * rounds
                    or (counted and s.theirs is not None and s.steady_on_theirs(min_ratio, counted))
                ) and s.clearly_above(self._margin):
                    steady.add(epc)
        return ScanResult(
            present=MappingProxyType(dict(sorted(present.items()))),
            complete=self.complete,
            problems=self.problems,
            reads=self.reads,
            duration_ms=max(0, round((now - self.started) * 1000)),
            stats=MappingProxyType(stats),
            steady=frozenset(steady),
            heard=frozenset(self._heard),
            tids=MappingProxyType(
                {
                    e: MappingProxyType({t: _strongest(c) for t, c in sorted(ts.items())})
                    for e, ts in self._tids.items()
                    if e in present
                }
            ),
        )

    def _check(self, h: ReaderHealth) -> None:
        if not h.healthy:
            self._problem(f"{h.reader_id} {h.state.value}")
        if h.antennas_connected is not None:
            for port in sorted(self._ports[h.reader_id] - h.antennas_connected):
                self._problem(f"{h.reader_id} antenna {port} disconnected")

    def fail(self, reason: str) -> None:
        """Mark the pass incomplete for a reason found outside the reads (a silent reader)."""
        self._problem(reason)

    def _problem(self, text: str) -> None:
        if text not in self._problems and len(self._problems) < MAX_PROBLEMS:
            self._problems.append(text)
