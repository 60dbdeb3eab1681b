"""The agent's own time as a pure state machine: the estimate ``E``, the proven time ``P``, the
wall clock's trust and the steps noticed (fed ``(wall, mono, synced)`` readings, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final, Literal

from agent.domain.now import Now

# No clock may read earlier than this build: the floor of a cabinet that never saw anything.
BUILD_FLOOR: Final = datetime(2026, 1, 1, tzinfo=UTC)
# No reading, signed time or stored floor after this is plausible for this software: such a
# wall clock is never trusted, such a document is refused. It also keeps every computation on
# these times far from datetime's year-9999 limit.
LATEST_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)
# Wall vs agent time disagreement below this is jitter or a small correction, not a step.
STEP_TOLERANCE_S: Final = 2.0
# How fast the agent's time follows a trusted wall clock that drifts from the monotonic clock.
# On Linux both clocks are slewed alike by NTP, so they only part by steps: this absorbs a
# small step (a leap second, timesyncd's >0.4 s corrections) in minutes, while a run of small
# steps (a hostile time server creeping the clock) soon exceeds the tolerance.
SLEW_PPM: Final = 500.0
# A wall clock within this of the agent's time but beyond the tolerance (an RTC a little off,
# corrected by NTP after the agent started) is untrusted, yet the agent's time still slews
# towards it at SLEW_PPM, and trusts it again once they agree. A larger step does not pull.
SLEW_LIMIT_S: Final = 120.0
# At a boot without proof, a wall clock further than this past the floor is reported at once
# (agent.clock_step at_start, provisional): more likely a glitch than the downtime of a reboot.
BOOT_JUMP_REPORT_S: Final = 7 * 86_400.0
# The most that the first step of a just-synchronised clock may move an already proven time
# (an RTC's drift since the proof): beyond it, the time source is the glitch.
FIRST_SYNC_STEP_S: Final = 600.0

StepCause = Literal["wall", "document", "sync"]


class Basis(StrEnum):
    """What the agent's time rests on."""

    CLOCK = "clock"  # proven: a trusted wall-clock reading, time sync or a document, carried on
    FLOOR = "floor"  # the persisted floor after a reboot: a lower bound (downtime not counted)
    # A wall clock at or after the floor, accepted at boot on faith (no time sync, no document
    # yet): it stamps events (untrusted), but the proven time is still only the floor.
    PROVISIONAL = "provisional"


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock stepped, or its trust changed. Reported once."""

    step_s: float  # how far the wall clock moved against the monotonic clock (<0: backward)
    wall: datetime  # the wall clock after the step
    time: datetime  # the agent's time at that instant
    trusted: bool  # whether the wall clock is trusted from now on
    at_start: bool  # noticed at start (step_s: wall clock minus the agent's time)
    # "document": a fresh signed document corroborated the wall clock; step_s is then how far
    # the agent's time moved to it. "sync": the kernel reports time synchronisation (NTP) and
    # the wall clock was taken as proven; step_s is how far the agent's time moved to it.
    cause: StepCause = "wall"
    provisional: bool = False  # accepted on faith at boot, not proven (never trusted)


@dataclass(frozen=True, slots=True)
class ClockView:
    """What the agent knows of the time when it judges a signed document."""

    time: datetime  # the agent's best proven time (E, or the floor while provisional)
    trusted: bool = True  # whether the wall clock agrees with it
    wall: datetime | None = None  # the wall clock (may be corroborated by a document)
    # ``time`` is only a lower bound of the true time (after a reboot without proof): a
    # document may then be issued up to ``max_document_ahead_days`` after it. False: ``time``
    # is carried on exactly from a proven reading, and the skew allowance applies as if trusted.
    lower_bound: bool = False


class TrustedTime:
    """Pure: feed it ``observe(wall, mono, synced)``; it answers the agent's time and the trust.

    ``floor`` is the agent's time at monotonic ``mono`` (None: at the first reading); ``basis``
    says whether that is an estimate carried on from a proven reading (``CLOCK``) or only a
    lower bound (``FLOOR``); ``was_trusted`` is the trust persisted with it (a clock already
    untrusted before a restart is not reported again).

    Two times are kept on the same monotonic anchor: ``E`` (what stamps events) and the proven
    time ``P`` (what may judge expiry and be persisted). They differ only while ``PROVISIONAL``:
    ``E`` is then a wall clock accepted on faith at boot, ``P`` the floor carried on.
    """

    def __init__(
        self,
        floor: datetime = BUILD_FLOOR,
        *,
        was_trusted: bool = True,
        basis: Basis = Basis.FLOOR,
        mono: float | None = None,
        since: datetime | None = None,
        tolerance_s: float = STEP_TOLERANCE_S,
        slew_ppm: float = SLEW_PPM,
    ) -> None:
        if floor.tzinfo is None:
            raise ValueError("floor must be timezone-aware")
        self._tolerance = tolerance_s
        self._slew = slew_ppm / 1e6
        self._time = sane_time(floor)  # the agent's time E at monotonic _mono
        self._proven = self._time  # the proven time P at monotonic _mono
        self._mono = mono
        # A provisional reading is not carried across a restart: the floor is (a lower bound).
        self._basis: Basis = Basis.FLOOR if basis is Basis.PROVISIONAL else basis
        self._was_trusted = was_trusted
        self.trusted = was_trusted
        # Why the wall clock is not trusted (None while it is), for status and selftest.
        self.reason: str | None = None if was_trusted else "carried over from before a restart"
        # Since when *this run* (or this boot, across restarts) has been untrusted: a record
        # from before a reboot passes no ``since``, and the first reading sets it.
        self.untrusted_since = None if was_trusted or since is None else sane_time(since)
        # The monotonic time it started in this run (None: before this run, or trusted).
        self.untrusted_mono: float | None = None
        self.last_wall: datetime | None = None
        self._offset: float | None = None  # wall - mono at the last reading (seconds)
        self._synced: bool | None = None  # the time source's answer at the last reading
        self._steps: list[ClockStep] = []

    @property
    def floor(self) -> datetime:
        """The proven time at the last reading (what is persisted)."""
        return self._proven

    @property
    def mono(self) -> float | None:
        """The monotonic time of ``floor``."""
        return self._mono

    @property
    def basis(self) -> Basis:
        return self._basis

    @property
    def provisional(self) -> bool:
        return self._basis is Basis.PROVISIONAL

    def estimate(self, mono: float) -> datetime:
        """The agent's time at monotonic ``mono``, without reading the wall clock."""
        if self._mono is None:
            return self._time
        return _plus(self._time, max(0.0, mono - self._mono))

    def proven(self, mono: float) -> datetime:
        """The best proven time at monotonic ``mono`` (E unless provisional: then the floor)."""
        if self._mono is None:
            return self._proven
        return _plus(self._proven, max(0.0, mono - self._mono))

    def observe(self, wall: datetime, mono: float, synced: bool = False) -> Now:
        """One reading of both clocks: the ``Now`` to stamp events with (``wall`` is E).

        ``synced``: the kernel (or the configured source) says the wall clock is synchronised
        to a time server. That proves a wall clock the agent has no proof against: while its
        time is only a lower bound or provisional, or when synchronisation was just acquired
        (NTP's first step). A step of a proven time is not excused by it (a bad time server).
        """
        if wall.tzinfo is None:
            raise ValueError("wall must be timezone-aware")
        wall = wall.astimezone(UTC)
        at_start = self._offset is None
        if self._mono is None:
            self._mono = mono
        elapsed = max(0.0, mono - self._mono)
        expected = _plus(self._time, elapsed)
        lower = _plus(self._proven, elapsed)
        gap = (wall - expected).total_seconds()  # timedelta arithmetic: never overflows
        sane = BUILD_FLOOR <= wall < LATEST_TIME
        newly_synced = synced and self._synced is False
        self._synced = synced
        basis = self._basis
        # Sync proves a wall clock the agent has no proof against. Its first step after being
        # acquired may also correct a proven time — by what a clock drifts, not by a day: a
        # source that flaps off and on again must not launder a glitch (hostile re-test N1).
        first_step = newly_synced and abs(gap) <= FIRST_SYNC_STEP_S
        if synced and sane and (basis is not Basis.CLOCK or first_step):
            self._accept_synced(wall, mono, gap, at_start)
            return Now(self._time, mono, True)
        provisional = False
        if wall >= LATEST_TIME:
            agrees = False  # absurd: never trusted, not even after a reboot
        elif basis is Basis.CLOCK:
            # Hysteresis: trust is lost beyond the tolerance, regained within half of it.
            limit_s = self._tolerance if self.trusted else self._tolerance / 2
            agrees = abs(gap) <= limit_s
        else:
            # FLOOR or PROVISIONAL: the downtime is unknown, any time at or after the proven
            # floor is plausible; it is taken provisionally, on faith, and proves nothing.
            provisional = (wall - lower).total_seconds() >= -self._tolerance
            agrees = False
        if provisional:
            t = max(wall, lower)
            self._basis = Basis.PROVISIONAL
        elif not agrees:
            if basis is Basis.PROVISIONAL:
                self._basis = Basis.FLOOR  # behind the floor now: the reading is abandoned
                t = lower
            else:
                t = expected
            if basis is Basis.CLOCK and abs(gap) <= SLEW_LIMIT_S and wall < LATEST_TIME:
                limit = self._slew * elapsed
                t = _plus(expected, min(max(gap, -limit), limit))
        else:
            limit = self._slew * elapsed
            t = _plus(expected, min(max(gap, -limit), limit))
        t = sane_time(t)
        proven = t if self._basis is Basis.CLOCK else sane_time(lower)
        offset = _timestamp(wall) - mono
        if at_start:
            if provisional:
                # A wall clock far past the floor (more than the downtime of a reboot usually
                # is: an RTC or time source glitching at boot) is reported at once; a fresh
                # install (nothing seen yet) has nothing to compare with.
                if gap > BOOT_JUMP_REPORT_S and lower > BUILD_FLOOR:
                    self._steps.append(
                        ClockStep(gap, wall, t, False, at_start=True, provisional=True)
                    )
            elif agrees != self._was_trusted:
                # A restart that finds the wall clock disagreeing, or fixed meanwhile.
                self._steps.append(ClockStep(gap, wall, t, agrees, at_start=True))
        else:
            moved = offset - (self._offset or 0.0)
            # While untrusted a further jitter-sized move is no news (a creeping time server
            # would be reported at every tick): only a real step, or a change of trust.
            step_limit = self._tolerance if self.trusted else SLEW_LIMIT_S
            if abs(moved) > step_limit or agrees != self.trusted:
                self._steps.append(
                    ClockStep(moved, wall, t, agrees, at_start=False, provisional=provisional)
                )
        if agrees:
            self.untrusted_since = None
            self.untrusted_mono = None
            self.reason = None
        else:
            if self.untrusted_since is None:
                self.untrusted_since = t
                self.untrusted_mono = mono
            self.reason = _untrusted_reason(self._basis, wall)
        self._offset = offset
        self.trusted = agrees
        self.last_wall = wall
        self._time, self._proven, self._mono = t, proven, mono
        return Now(t, mono, agrees, None if self._basis is not Basis.PROVISIONAL else proven)

    def _accept_synced(self, wall: datetime, mono: float, gap: float, at_start: bool) -> None:
        """The time source vouches for the wall clock: it becomes the proven time, trusted."""
        if at_start:
            if not self._was_trusted:
                self._steps.append(ClockStep(gap, wall, wall, True, at_start=True, cause="sync"))
        elif not self.trusted or abs(gap) > self._tolerance:
            self._steps.append(ClockStep(gap, wall, wall, True, at_start=False, cause="sync"))
        self._basis = Basis.CLOCK
        self._time = self._proven = sane_time(wall)
        self._mono = mono
        self._offset = _timestamp(wall) - mono
        self.trusted = True
        self.untrusted_since = None
        self.untrusted_mono = None
        self.reason = None
        self.last_wall = wall

    def raise_floor(self, at: datetime, mono: float) -> bool:
        """Evidence that ``at`` has passed (a verified document); True if the agent's time moved.

        Never past ``LATEST_TIME``; the basis stays (a lower bound stays a lower bound).
        """
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        at = sane_time(at)
        if self._mono is None:
            self._mono = mono
        elapsed = max(0.0, mono - self._mono)
        lower = _plus(self._proven, elapsed)
        if at <= lower:
            return False
        self._time = max(_plus(self._time, elapsed), at)
        self._proven, self._mono = at, mono
        return True

    def corroborate(self, wall: datetime, mono: float, issued_at: datetime, skew_s: float) -> bool:
        """A fresh signed document issued at ``issued_at`` vouches for the wall clock ``wall``.

        When the wall clock is untrusted and within ``skew_s`` of ``issued_at``, the backend
        signed the document "now" by its own clock and the wall clock agrees: the agent's time
        moves to the wall clock (backwards too, when it had gone wrong) and it is trusted again.
        True if it was; the change is reported as a :class:`ClockStep` with cause "document".
        """
        wall = wall.astimezone(UTC)
        if self.trusted or wall >= LATEST_TIME:
            return False
        if abs((issued_at - wall).total_seconds()) > skew_s:
            return False
        expected = self.estimate(mono)
        step = (wall - expected).total_seconds()
        self._steps.append(ClockStep(step, wall, wall, True, at_start=False, cause="document"))
        self._time = self._proven = sane_time(wall)
        self._mono = mono
        self._basis = Basis.CLOCK
        self._offset = _timestamp(wall) - mono
        self.trusted = True
        self.untrusted_since = None
        self.untrusted_mono = None
        self.reason = None
        self.last_wall = wall
        return True

    def take_steps(self) -> list[ClockStep]:
        """Steps noticed since the last call (each is returned once)."""
        steps, self._steps = self._steps, []
        return steps


def plus(at: datetime, delta: timedelta) -> datetime:
    """``at + delta``, saturating at datetime's limits instead of raising OverflowError."""
    try:
        return at + delta
    except OverflowError:
        edge = datetime.max if delta > timedelta(0) else datetime.min
        return edge.replace(tzinfo=at.tzinfo)


def _plus(at: datetime, seconds: float) -> datetime:
    try:
        delta = timedelta(seconds=seconds)
    except OverflowError:
        delta = timedelta.max if seconds > 0 else timedelta.min
    return plus(at, delta)


def sane_time(at: datetime) -> datetime:
    """``at`` in UTC, held below ``LATEST_TIME`` (a floor or evidence never reaches past it)."""
    at = at.astimezone(UTC)
    return min(at, LATEST_TIME - timedelta(days=1))


def _untrusted_reason(basis: Basis, wall: datetime) -> str:
    if basis is Basis.PROVISIONAL:
        return "no time sync yet: the wall clock was taken at start on faith, not proven"
    if basis is Basis.FLOOR:
        return "no time source yet: the wall clock reads before what the agent has seen"
    if wall >= LATEST_TIME:
        return "the wall clock reads an absurd time (2200 or later)"
    return "the wall clock stepped away from the agent's time"


def _timestamp(at: datetime) -> float:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
