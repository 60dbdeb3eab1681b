"""Trusted time: the agent's own estimate of the time, and whether the wall clock agrees with it.

DESIGN §7b. Cabinet controllers often have no RTC: the wall clock reads 1970 until NTP steps
it, and a bad NTP server or GPS receiver may step it anywhere later. Nothing here trusts a
wall-clock *step*:

- The agent keeps an **estimate** ``E`` of the true time on the monotonic clock: an anchor
  time carried on by the monotonic time elapsed since. While the wall clock ``W`` agrees with
  ``E`` (within ``STEP_TOLERANCE_S``) it is *trusted* and ``E`` follows it, at most
  ``SLEW_PPM`` fast (NTP's slewing is followed; a run of small steps is not: it soon disagrees).
  A small step (up to ``SLEW_LIMIT_S``) is absorbed at that rate, untrusted until absorbed.
- A **step** — ``W`` moving away from ``E``, forward or backward, beyond the tolerance — is
  reported once (:class:`ClockStep`) and makes the wall clock *untrusted*: ``E`` runs on,
  events carry ``E`` with ``clock: "untrusted"``. Trust comes back when ``W`` agrees with ``E``
  again, or when a fresh signed document corroborates ``W`` (:meth:`TrustedTime.corroborate`:
  the backend signed it just now, by its own clock).
- At start, ``E`` comes from the persisted **floor** (the agent's proven time when last saved,
  and the newest verified ``issued_at`` minus the skew allowance). When the previous run saved
  it in this same boot, the monotonic clock still runs from then, so ``E`` continues exactly
  (basis ``clock``). After a reboot the downtime is unknown: the floor is only a lower bound
  (basis ``floor``). A wall clock at or after it is plausible but unproven: it is taken
  *provisionally* (basis ``provisional``): it stamps events, untrusted, while the proven time
  ``P`` (the floor carried on) judges validity windows and is what gets persisted; nothing
  destructive (age-based drop, audit pruning) runs on it. One behind the floor (no RTC: 1970)
  is not taken at all, and ``E`` runs on from the floor.
- A time is **proven** by time sync (``SyncSource``: the kernel's NTP state by default), a
  fresh signed document (``corroborate``), or agreeing with a proven ``E``. A synchronised
  wall clock is taken as proven whenever ``E`` is not, and when sync is just acquired; a step
  of a proven ``E`` is not excused by it.
- The floor is raised by ``E`` and by verified documents, never by an unproven reading, and
  never past ``LATEST_TIME``: no reading, document or stored record can overflow a datetime.

``TrustedTime`` is the pure state machine (fed ``(wall, mono)`` readings); ``TrustedClock`` wraps
a real :class:`~drivers.types.Clock` with it (thread-safe: the store's thread reads it too) and
loads/saves the floor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from agent.domain.now import Now
from drivers.types import Clock

logger = logging.getLogger(__name__)

# No clock may read earlier than this build: the floor of a cabinet that never saw anything.
BUILD_FLOOR: Final = datetime(2026, 1, 1, tzinfo=UTC)
# No reading, signed time or stored floor after this is plausible for this software: such a
# wall clock is never trusted, such a document is refused. It also keeps every computation on
# these times far from datetime's year-9999 limit.
LATEST_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)
# A wall clock that cannot be read at all (past year 9999) stands for this reading.
UNREADABLE_WALL: Final = datetime.max.replace(tzinfo=UTC)
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
# The floor is written when it moved this far from the stored value (and at every stop).
PERSIST_EVERY_S: Final = 60.0
KV_KEY: Final = "time.floor"
# How often the time source (kernel NTP state, or a file) is asked at most.
SYNC_POLL_S: Final = 1.0
# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC mean unsynchronised.
_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x40
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")

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


@dataclass(frozen=True, slots=True)
class FloorRecord:
    """What is persisted between runs (``time.floor`` in the store's kv)."""

    floor: datetime  # the agent's proven time when saved (never a provisional reading)
    trusted: bool = True  # whether the wall clock was trusted then
    basis: Basis = Basis.CLOCK
    boot: str | None = None  # the kernel boot id then: same boot, same monotonic clock
    mono: float | None = None  # the monotonic time of ``floor``
    since: datetime | None = None  # when the wall clock stopped being trusted (agent time)


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
        self._time = _sane(floor)  # the agent's time E at monotonic _mono
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
        self.untrusted_since = None if was_trusted or since is None else _sane(since)
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
        t = _sane(t)
        proven = t if self._basis is Basis.CLOCK else _sane(lower)
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
        self._time = self._proven = _sane(wall)
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
        at = _sane(at)
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
        self._time = self._proven = _sane(wall)
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


class SyncSource(Protocol):
    """Whether the wall clock is synchronised to a time server (``[time] sync_source``)."""

    name: str

    def synchronised(self) -> bool:
        """Never raises: unknown or unavailable reads as not synchronised."""
        ...


class NoSync:
    """``none``: no time source; only the consistency rules and signed documents prove time."""

    name = "none"

    def synchronised(self) -> bool:
        return False


class FileSync:
    """``file:<path>``: synchronised while the file exists (a site's own time daemon, tests)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def synchronised(self) -> bool:
        try:
            return self.path.is_file()
        except OSError:
            return False


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h): the fields up to ``tai``, then room for the reserved tail.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("reserved", ctypes.c_int * 16),
    ]


class KernelSync:
    """``kernel``: Linux ``adjtimex(2)`` read-only (modes 0, unprivileged). systemd-timesyncd,
    chrony and ntpd clear STA_UNSYNC once they have synchronised the clock."""

    name = "kernel"

    def __init__(self) -> None:
        self._adjtimex: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._adjtimex = libc.adjtimex
        except (OSError, AttributeError):
            logger.info("time sync: adjtimex is not available; the clock counts as unsynchronised")

    def synchronised(self) -> bool:
        if self._adjtimex is None:
            return False
        timex = _Timex()  # modes 0: read only
        try:
            state = self._adjtimex(ctypes.byref(timex))
        except OSError:
            return False
        return bool(0 <= state < _TIME_ERROR and not timex.status & _STA_UNSYNC)


def sync_source(spec: str) -> SyncSource:
    """The ``[time] sync_source`` setting: ``kernel``, ``none`` or ``file:<path>``."""
    if spec == "kernel":
        return KernelSync()
    if spec == "none":
        return NoSync()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileSync(Path(spec[len("file:") :]))
    raise ValueError(f"unknown time sync source {spec!r}")


class FloorStore(Protocol):
    """Where the floor is kept (``agent.store.Store`` provides it)."""

    async def kv_get(self, key: str) -> bytes | None: ...

    async def kv_put(self, key: str, value: bytes | None) -> None: ...


class TrustedClock:
    """A :class:`~drivers.types.Clock` whose ``now()`` is the agent's time. Thread-safe.

    Until ``restore()`` it runs from ``BUILD_FLOOR``; ``restore()`` installs the persisted
    floor (raised by the stored documents) before anything else reads the time. ``boot_id``
    (:func:`read_boot_id`) tells a restart within the same boot, whose monotonic clock goes on.
    """

    def __init__(
        self,
        source: Clock,
        *,
        boot_id: str | None = None,
        tolerance_s: float = STEP_TOLERANCE_S,
        sync: SyncSource | None = None,
    ) -> None:
        self.source = source
        self.boot_id = boot_id
        self.sync: SyncSource = sync or NoSync()
        self._sync_at: float | None = None  # monotonic time of the last sync query
        self._synced = False
        self._tolerance = tolerance_s
        self._lock = threading.Lock()
        self._state = TrustedTime(tolerance_s=tolerance_s)
        self._persisted: FloorRecord | None = None
        self._restored = False

    # -- drivers.types.Clock ------------------------------------------------------------------

    def now(self) -> datetime:
        return self.reading().wall

    def monotonic(self) -> float:
        return self.source.monotonic()

    # -- the agent's time ---------------------------------------------------------------------

    def reading(self) -> Now:
        """Read the clocks once: the agent's time, monotonic time, and the wall clock's trust."""
        with self._lock:
            return self._observe()

    def provisional(self) -> bool:
        """The wall clock was taken at start on faith (no time sync or document yet)."""
        with self._lock:
            self._observe()
            return self._state.provisional

    def trusted(self) -> bool:
        with self._lock:
            return self._state.trusted

    def view(self) -> ClockView:
        """A fresh reading, with the wall clock, for judging a signed document."""
        with self._lock:
            now = self._observe()
            state = self._state
            return ClockView(
                now.judged, now.trusted, state.last_wall, lower_bound=state.basis is not Basis.CLOCK
            )

    def trusted_now(self) -> datetime | None:
        """The agent's time while the wall clock is trusted; None before ``restore()`` and
        while it is not, also while it is provisional (the store's age-based pruning waits)."""
        now = self.reading()
        if not self._restored or not now.trusted:
            return None
        return now.wall

    def raise_floor(self, at: datetime) -> bool:
        """A verified signed document proves ``at`` has passed."""
        with self._lock:
            return self._state.raise_floor(at, self.source.monotonic())

    def corroborate(self, issued_at: datetime, skew_s: float) -> bool:
        """A fresh signed document issued at ``issued_at``: does it vouch for the wall clock?"""
        with self._lock:
            return self._state.corroborate(self._wall(), self.source.monotonic(), issued_at, skew_s)

    def take_steps(self) -> list[ClockStep]:
        with self._lock:
            return self._state.take_steps()

    def snapshot(self) -> dict[str, Any]:
        """For ``cabinetctl status``: agent time, wall clock, trust, since when and why, basis,
        the proven time (what expiry is judged by), the floor, the time source's answer."""
        with self._lock:
            now = self._observe()
            state = self._state
            wall = state.last_wall
            since = state.untrusted_since
            since_mono = state.untrusted_mono
            reason = state.reason
            basis = state.basis
            persisted = self._persisted
            synced = self._synced
        return {
            "time": now.wall.isoformat(),
            "proven": now.judged.isoformat(),
            "wall": None if wall is None else wall.isoformat(),
            "trusted": now.trusted,
            "provisional": basis is Basis.PROVISIONAL,
            "since": None if since is None else since.isoformat(),
            # How long, on the monotonic clock, in this run (None: since before this run).
            "for_s": None if since_mono is None else round(max(0.0, now.mono - since_mono)),
            "reason": reason,
            "basis": str(basis),
            "floor": None if persisted is None else persisted.floor.isoformat(),
            "sync_source": self.sync.name,
            "synced": synced,
        }

    # -- persistence --------------------------------------------------------------------------

    async def load(self, store: FloorStore, evidence: list[datetime] | None = None) -> None:
        """Install the persisted floor, raised by ``evidence`` (stored documents' issue times)."""
        raw = await store.kv_get(KV_KEY)
        record: FloorRecord | None = None
        if raw is not None:
            try:
                record = decode_floor(raw)
                self._persisted = record
            except ValueError as err:
                logger.error("stored time floor unreadable (%s); starting from the build date", err)
        self.restore(record, evidence)

    def restore(self, record: FloorRecord | None, evidence: list[datetime] | None = None) -> None:
        """Start from ``record``: continued exactly within the same boot, else a lower bound."""
        with self._lock:
            mono = self.source.monotonic()
            if (
                record is not None
                and record.boot is not None
                and record.boot == self.boot_id
                and record.mono is not None
                and record.mono <= mono
            ):
                # The same boot: the monotonic clock ran on since the save, E continues.
                state = TrustedTime(
                    record.floor,
                    was_trusted=record.trusted,
                    basis=record.basis,
                    mono=record.mono,
                    since=record.since,
                    tolerance_s=self._tolerance,
                )
            else:
                # A reboot: the downtime is unknown, the floor is a lower bound, and this run's
                # untrusted time starts at its first reading.
                floor = BUILD_FLOOR if record is None else max(record.floor, BUILD_FLOOR)
                state = TrustedTime(
                    floor,
                    was_trusted=True if record is None else record.trusted,
                    basis=Basis.FLOOR,
                    tolerance_s=self._tolerance,
                )
            for at in evidence or []:
                state.raise_floor(at, mono)
            self._state = state
            self._restored = True

    def persist_due(self) -> bool:
        """The floor moved ``PERSIST_EVERY_S`` from the stored one, or the trust changed."""
        with self._lock:
            floor, trusted, basis = self._state.floor, self._state.trusted, self._state.basis
        old = self._persisted
        if old is None:
            return True
        moved = abs((floor - old.floor).total_seconds())
        return trusted != old.trusted or basis != old.basis or moved >= PERSIST_EVERY_S

    async def save(self, store: FloorStore) -> None:
        """Write the floor (with the trust, basis and monotonic time) to the store."""
        with self._lock:
            state = self._state
            record = FloorRecord(
                state.floor,
                state.trusted,
                state.basis,
                self.boot_id,
                state.mono,
                state.untrusted_since,
            )
        await store.kv_put(KV_KEY, encode_floor(record))
        self._persisted = record

    def _observe(self) -> Now:
        """One reading (the lock held); the time source is asked at most every SYNC_POLL_S."""
        mono = self.source.monotonic()
        if self._sync_at is None or not 0 <= mono - self._sync_at < SYNC_POLL_S:
            self._sync_at = mono
            self._synced = self.sync.synchronised()
        return self._state.observe(self._wall(), mono, self._synced)

    def _wall(self) -> datetime:
        try:
            return self.source.now()
        except (ValueError, OverflowError, OSError):
            return UNREADABLE_WALL  # past year 9999: absurd, never trusted


def read_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    """The kernel's boot id (Linux), or None: a restart within one boot keeps its time."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if 0 < len(text) <= 64 else None


def encode_floor(record: FloorRecord) -> bytes:
    """The record as stored; every time held below ``LATEST_TIME`` (what ``decode_floor``
    accepts), whatever was handed in."""
    data: dict[str, Any] = {
        "floor": _sane(record.floor).isoformat(),
        "trusted": record.trusted,
        "basis": str(record.basis),
    }
    if record.boot is not None and record.mono is not None:
        data.update(boot=record.boot, mono=record.mono)
    if record.since is not None:
        data["since"] = _sane(record.since).isoformat()
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_floor(raw: bytes) -> FloorRecord:
    """Inverse of ``encode_floor`` (older records hold only floor and trust); ValueError if
    it is not that, or holds an absurd time."""
    try:
        data = json.loads(raw)
        floor = datetime.fromisoformat(data["floor"])
        trusted = data["trusted"]
        basis = Basis(data.get("basis", Basis.CLOCK))
        boot = data.get("boot")
        mono = data.get("mono")
        since_raw = data.get("since")
        since = None if since_raw is None else datetime.fromisoformat(since_raw)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{type(err).__name__}") from None
    if not isinstance(trusted, bool):
        raise ValueError("malformed")
    for value in (floor, since):
        if value is not None and (value.tzinfo is None or not value < LATEST_TIME):
            raise ValueError("a time is not timezone-aware or is absurd")
    if boot is not None and not isinstance(boot, str):
        raise ValueError("malformed boot id")
    if mono is not None and (
        isinstance(mono, bool) or not isinstance(mono, int | float) or not math.isfinite(mono)
    ):
        raise ValueError("malformed monotonic time")
    return FloorRecord(
        floor.astimezone(UTC),
        trusted,
        basis,
        boot,
        None if mono is None else float(mono),
        None if since is None else since.astimezone(UTC),
    )


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


def _sane(at: datetime) -> datetime:
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
