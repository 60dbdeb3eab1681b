"""The value types drivers hand to the agent, and the protocols that connect them.

Nothing above ``drivers/`` ever sees vendor dictionaries or wire bytes: only these.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class TagRead:
    """One tag seen by one antenna of one reader, aggregated over a report."""

    reader_id: str
    epc: str  # lower-case hex, no separators
    antenna: int  # 1-based antenna port
    peak_rssi_dbm: float | None
    first_seen: datetime  # UTC; the reader's clock when it reports one, else ours
    seen_count: int = 1
    # The tag's TID (lower-case hex, whole 16-bit words) when the reader read it with this
    # inventory (LLRP AccessSpec, Mercury embedded read; drivers/tid.py); None: not read.
    tid: str | None = None
    # ``first_seen`` is the reader's own clock (LLRP FirstSeenTimestampUTC), not the time the
    # driver handled the report: presence rounds are then counted on it (docs/domain.md).
    reader_clock: bool = False


@dataclass(frozen=True, slots=True)
class GpiEdge:
    """A general-purpose input changed level (door sensors are wired to these)."""

    reader_id: str
    port: int
    high: bool
    at: datetime


class DoorState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class DoorEdge:
    """The cabinet door changed state (after polarity has been applied)."""

    door_id: str
    state: DoorState
    at: datetime


@dataclass(frozen=True, slots=True)
class BadgeRead:
    """A badge presented at a badge reader.

    ``pseudonym`` is the only identity a BadgeRead carries: drivers call the
    pseudonymizer before building one, so the raw card number never leaves the driver
    frame that decoded it.
    """

    reader_id: str
    pseudonym: str
    at: datetime


class ReaderState(enum.StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"  # configured and ready; not necessarily inventorying
    INVENTORYING = "inventorying"
    OFFLINE = "offline"
    STOPPED = "stopped"  # cancelled (shutdown)
    FAILED = "failed"  # stopped for a permanent error (detail says why); not retried


@dataclass(frozen=True, slots=True)
class ReaderHealth:
    """A reader's health changed. ``detail`` is a short human reason, never personal data."""

    reader_id: str
    state: ReaderState
    at: datetime
    detail: str = ""
    antennas_connected: frozenset[int] | None = None  # None: the reader does not say
    session: int = 0  # increments on every new connection; lets scans notice a reconnect

    @property
    def healthy(self) -> bool:
        return self.state in (ReaderState.ONLINE, ReaderState.INVENTORYING)


@runtime_checkable
class ReaderSink(Protocol):
    """Where a reader driver delivers what it observed. Awaiting gives back-pressure."""

    async def tag_reads(self, reads: Sequence[TagRead]) -> None: ...

    async def reader_health(self, health: ReaderHealth) -> None: ...

    async def gpi_edge(self, edge: GpiEdge) -> None: ...


@runtime_checkable
class ReaderDriver(Protocol):
    """The lifecycle contract every reader driver (LLRP, Mercury serial, …) fulfils."""

    @property
    def reader_id(self) -> str: ...

    @property
    def health(self) -> ReaderHealth: ...

    @property
    def last_progress(self) -> float:
        """Monotonic time the driver's loop last did its job: an attempt to connect, a turn of
        its session loop, or now while it deliberately waits out a backoff. A loop stuck on an
        unbounded wait stops it; the systemd watchdog gate watches it."""

    @property
    def last_frame(self) -> float:
        """Monotonic time the reader was last heard from (0.0: never).

        Stamped only after the reads it covers reached the sink: the engine's liveness barrier
        relies on "heard at T" implying "every read received before T is already delivered"
        (a backlog larger than one read of the link is stamped only once all of it is; a frame
        split across reads, once it is whole)."""

    async def run(self) -> None:
        """Connect, keep connected (reconnecting with backoff) until cancelled; returns after a
        permanent error, reported as FAILED (``drivers/supervisor.py``)."""

    async def start_inventory(self) -> None:
        """Begin (or keep) reading tags; takes effect once the reader is online."""

    async def stop_inventory(self) -> None:
        """Stop reading tags; the connection stays up."""

    async def set_gpo(self, port: int, high: bool) -> None:
        """Drive a general-purpose output (the lock). Raises if the reader is not online."""


@runtime_checkable
class BadgeReaderDriver(Protocol):
    """What the agent uses of a badge reader driver (its reads and health go to a BadgeSink).

    No progress stamp: an idle badge reader sends nothing until a card comes, so its loop waits
    on the link without bound by design (docs/badge-and-door.md); it is not a watchdog source.
    """

    @property
    def reader_id(self) -> str: ...

    @property
    def health(self) -> ReaderHealth: ...

    async def run(self) -> None:
        """Connect, deliver pseudonymized reads, reconnect with backoff; until cancelled (or a
        permanent error, reported as FAILED)."""


class Clock(Protocol):
    """Injected time source: wall clock (UTC) for timestamps, monotonic for durations."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SystemClock:
    """The real clock."""

    _unused: None = field(default=None, repr=False)

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
