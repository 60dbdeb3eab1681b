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
    ``trusted`` is False while the system's wall clock is behind it, and every event then says
    so (``clock: "untrusted"``).
    """

    wall: datetime
    mono: float
    trusted: bool = True

    def __post_init__(self) -> None:
        if self.wall.tzinfo is None or self.wall.utcoffset() is None:
            raise ValueError("Now.wall must be timezone-aware")

    @classmethod
    def of(cls, clock: Clock) -> Now:
        """Read both clocks of ``clock``."""
        return cls(clock.now().astimezone(UTC), clock.monotonic())

    def after(self, seconds: float) -> Now:
        """The instant ``seconds`` later on both clocks."""
        return Now(self.wall + timedelta(seconds=seconds), self.mono + seconds, self.trusted)

    @property
    def clock(self) -> ClockTrust:
        """The ``clock`` field of events stamped at this instant."""
        return "trusted" if self.trusted else "untrusted"
