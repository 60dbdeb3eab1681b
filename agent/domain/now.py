"""The injected time every domain input carries: wall clock for events, monotonic for timers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeAlias

from drivers.types import Clock

ClockTrust: TypeAlias = Literal["trusted", "untrusted"]


@dataclass(frozen=True, slots=True)
class Now:
    """One instant: ``wall`` (aware UTC) stamps events; ``mono`` (seconds) drives every timer.

    Timers use the monotonic clock so a wall-clock step (NTP on a board without RTC) neither
    fires nor stalls them. The agent passes trusted time as ``wall`` (``agent.trusted_time``);
    ``trusted`` is False while the system's wall clock is not proven right, and every event
    then says so (``clock: "untrusted"``). ``proven``: while ``wall`` is a wall-clock reading
    taken on faith at boot (provisional), the best proven time, a lower bound; validity windows
    (an allow-list's expiry) are judged by it (``judged``), so such a reading never locks
    anyone out by itself.
    """

    wall: datetime
    mono: float
    trusted: bool = True
    proven: datetime | None = None

    def __post_init__(self) -> None:
        if self.wall.tzinfo is None or self.wall.utcoffset() is None:
            raise ValueError("Now.wall must be timezone-aware")
        if self.proven is not None and self.proven.tzinfo is None:
            raise ValueError("Now.proven must be timezone-aware")

    @classmethod
    def of(cls, clock: Clock) -> Now:
        """Read both clocks of ``clock``."""
        return cls(clock.now().astimezone(UTC), clock.monotonic())

    def after(self, seconds: float) -> Now:
        """The instant ``seconds`` later on both clocks."""
        step = timedelta(seconds=seconds)
        proven = None if self.proven is None else self.proven + step
        return Now(self.wall + step, self.mono + seconds, self.trusted, proven)

    @property
    def judged(self) -> datetime:
        """The time validity windows are judged by: the proven time, else ``wall``."""
        return self.wall if self.proven is None else min(self.wall, self.proven)

    @property
    def clock(self) -> ClockTrust:
        """The ``clock`` field of events stamped at this instant."""
        return "trusted" if self.trusted else "untrusted"
