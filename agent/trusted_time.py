"""Trusted time: the best UTC time the agent knows, and whether the wall clock can be believed.

DESIGN §7b. Cabinet controllers often have no RTC: the wall clock reads 1970 until NTP steps
it, and may be stepped again later. Nothing here trusts it blindly:

- The agent keeps a **floor**: a time it knows has passed. It is never earlier than what the
  agent already handed out (every committed event is stamped with trusted time) nor than a
  signed document it has verified (its ``issued_at`` minus the clock-skew allowance). The floor
  is persisted in the store (``time.floor``) and survives restarts.
- **Trusted time** ``T`` runs from the floor on the monotonic clock. While the wall clock is
  not behind ``T`` (by more than ``STEP_TOLERANCE_S``) it is *trusted* and ``T`` follows it
  (forward steps included); a wall clock that is behind is *untrusted*: ``T`` goes on from the
  floor on the monotonic clock, never backwards, and every event says ``clock: "untrusted"``.
- A **step** — the wall clock moving against the monotonic clock by more than the tolerance,
  or its trust changing — is noticed once and reported once (:class:`ClockStep`).

``TrustedTime`` is the pure state machine (fed ``(wall, mono)`` readings); ``TrustedClock`` wraps
a real :class:`~drivers.types.Clock` with it (thread-safe: the store's thread reads it too) and
loads/saves the floor.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from agent.domain.now import Now
from drivers.types import Clock

logger = logging.getLogger(__name__)

# No clock may read earlier than this build: the floor of a cabinet that never saw anything.
BUILD_FLOOR: Final = datetime(2026, 1, 1, tzinfo=UTC)
# Wall vs monotonic disagreement below this is jitter, not a step (NTP slews both alike).
STEP_TOLERANCE_S: Final = 2.0
# The floor is written when it moved this far past the stored value (and at every stop).
PERSIST_EVERY_S: Final = 60.0
KV_KEY: Final = "time.floor"


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock stepped (or its trust changed). Reported once."""

    step_s: float  # how far the wall clock moved against the monotonic clock (<0: backward)
    wall: datetime  # the wall clock after the step
    time: datetime  # trusted time at that instant
    trusted: bool  # whether the wall clock is trusted from now on
    at_start: bool  # noticed at start, against the persisted floor (step_s includes downtime)


class TrustedTime:
    """Pure: feed it ``observe(wall, mono)``; it answers the trusted time and its trust.

    ``floor`` is what is known to have passed; ``was_trusted`` is the trust persisted with it
    (so a clock that was already untrusted before a restart is not reported again).
    """

    def __init__(
        self,
        floor: datetime = BUILD_FLOOR,
        *,
        was_trusted: bool = True,
        tolerance_s: float = STEP_TOLERANCE_S,
    ) -> None:
        if floor.tzinfo is None:
            raise ValueError("floor must be timezone-aware")
        self._tolerance = tolerance_s
        self._anchor = floor  # trusted time at monotonic _anchor_mono
        self._anchor_mono: float | None = None  # set by the first reading
        self._last = floor  # the latest trusted time handed out: never goes back
        self._offset: float | None = None  # wall - mono at the last reading (seconds)
        self._was_trusted = was_trusted
        self.trusted = was_trusted
        self.last_wall: datetime | None = None
        self._steps: list[ClockStep] = []

    @property
    def floor(self) -> datetime:
        """The latest trusted time handed out (what must be persisted)."""
        return self._last

    def observe(self, wall: datetime, mono: float) -> Now:
        """One reading of both clocks: the trusted ``Now`` (``wall`` is trusted time)."""
        if wall.tzinfo is None:
            raise ValueError("wall must be timezone-aware")
        wall = wall.astimezone(UTC)
        if self._anchor_mono is None:
            self._anchor_mono = mono
        expected = self._anchor + timedelta(seconds=max(0.0, mono - self._anchor_mono))
        trusted = (wall - expected).total_seconds() >= -self._tolerance
        if trusted:
            t = max(wall, self._last)
            # Re-anchor on what was handed out, so a small backward step stalls T (never back).
            self._anchor, self._anchor_mono = t, mono
        else:
            t = max(expected, self._last)
        offset = wall.timestamp() - mono
        if self._offset is None:
            if trusted != self._was_trusted:
                # A restart that finds the wall clock behind the floor, or fixed meanwhile.
                step = (wall - self._last).total_seconds()
                self._steps.append(ClockStep(step, wall, t, trusted, at_start=True))
        elif abs(offset - self._offset) > self._tolerance or trusted != self.trusted:
            self._steps.append(ClockStep(offset - self._offset, wall, t, trusted, at_start=False))
        self._offset = offset
        self.trusted = trusted
        self.last_wall = wall
        self._last = t
        return Now(t, mono, trusted)

    def raise_floor(self, at: datetime, mono: float) -> bool:
        """Evidence that ``at`` has passed (a verified document); True if the floor moved."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        anchor_mono = mono if self._anchor_mono is None else self._anchor_mono
        expected = self._anchor + timedelta(seconds=max(0.0, mono - anchor_mono))
        if at <= max(expected, self._last):
            return False
        self._anchor, self._anchor_mono = at, mono
        self._last = max(self._last, at)
        return True

    def take_steps(self) -> list[ClockStep]:
        """Steps noticed since the last call (each is returned once)."""
        steps, self._steps = self._steps, []
        return steps


class FloorStore(Protocol):
    """Where the floor is kept (``agent.store.Store`` provides it)."""

    async def kv_get(self, key: str) -> bytes | None: ...

    async def kv_put(self, key: str, value: bytes | None) -> None: ...


class TrustedClock:
    """A :class:`~drivers.types.Clock` whose ``now()`` is trusted time. Thread-safe.

    Until ``restore()`` it runs from ``BUILD_FLOOR``; ``restore()`` installs the persisted
    floor (raised by the stored documents) before anything else reads the time.
    """

    def __init__(self, source: Clock, *, tolerance_s: float = STEP_TOLERANCE_S) -> None:
        self.source = source
        self._tolerance = tolerance_s
        self._lock = threading.Lock()
        self._state = TrustedTime(tolerance_s=tolerance_s)
        self._persisted: tuple[datetime, bool] | None = None

    # -- drivers.types.Clock ------------------------------------------------------------------

    def now(self) -> datetime:
        return self.reading().wall

    def monotonic(self) -> float:
        return self.source.monotonic()

    # -- trusted time -------------------------------------------------------------------------

    def reading(self) -> Now:
        """Read the clocks once: trusted time, monotonic time, and whether the wall is trusted."""
        with self._lock:
            return self._state.observe(self.source.now(), self.source.monotonic())

    def trusted(self) -> bool:
        with self._lock:
            return self._state.trusted

    def raise_floor(self, at: datetime) -> bool:
        """A verified signed document proves ``at`` has passed."""
        with self._lock:
            return self._state.raise_floor(at, self.source.monotonic())

    def take_steps(self) -> list[ClockStep]:
        with self._lock:
            return self._state.take_steps()

    def snapshot(self) -> dict[str, Any]:
        """For ``cabinetctl status``: trusted time, wall clock, trust, persisted floor."""
        now = self.reading()
        with self._lock:
            wall = self._state.last_wall
            persisted = self._persisted
        return {
            "time": now.wall.isoformat(),
            "wall": None if wall is None else wall.isoformat(),
            "trusted": now.trusted,
            "floor": None if persisted is None else persisted[0].isoformat(),
        }

    # -- persistence --------------------------------------------------------------------------

    async def load(self, store: FloorStore, evidence: list[datetime] | None = None) -> None:
        """Install the persisted floor, raised by ``evidence`` (stored documents' issue times)."""
        raw = await store.kv_get(KV_KEY)
        floor, was_trusted = BUILD_FLOOR, True
        if raw is not None:
            try:
                floor, was_trusted = decode_floor(raw)
                self._persisted = (floor, was_trusted)
            except ValueError as err:
                logger.error("stored time floor unreadable (%s); starting from the build date", err)
        self.restore(max([floor, *(evidence or [])]), was_trusted=was_trusted)

    def restore(self, floor: datetime, *, was_trusted: bool = True) -> None:
        with self._lock:
            floor = max(floor, self._state.floor, BUILD_FLOOR)
            self._state = TrustedTime(floor, was_trusted=was_trusted, tolerance_s=self._tolerance)

    def persist_due(self) -> bool:
        """The floor moved ``PERSIST_EVERY_S`` past the stored one, or the trust changed."""
        with self._lock:
            floor, trusted = self._state.floor, self._state.trusted
        if self._persisted is None:
            return True
        old_floor, old_trusted = self._persisted
        return trusted != old_trusted or (floor - old_floor).total_seconds() >= PERSIST_EVERY_S

    async def save(self, store: FloorStore) -> None:
        """Write the floor (and the trust) to the store."""
        with self._lock:
            floor, trusted = self._state.floor, self._state.trusted
        await store.kv_put(KV_KEY, encode_floor(floor, trusted))
        self._persisted = (floor, trusted)


def encode_floor(floor: datetime, trusted: bool) -> bytes:
    return json.dumps(
        {"floor": floor.astimezone(UTC).isoformat(), "trusted": trusted},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def decode_floor(raw: bytes) -> tuple[datetime, bool]:
    """Inverse of ``encode_floor``; ValueError if it is not that."""
    try:
        data = json.loads(raw)
        floor = datetime.fromisoformat(data["floor"])
        trusted = data["trusted"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}") from None
    if floor.tzinfo is None or not isinstance(trusted, bool):
        raise ValueError("malformed")
    return floor.astimezone(UTC), trusted
