"""``TrustedClock``: a real :class:`~drivers.types.Clock` run through the agent's own time
(thread-safe: the store's thread reads it too), with the floor loaded and saved."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any, Final

from agent.domain.now import Now
from agent.trusted_time.estimate import (
    BUILD_FLOOR,
    STEP_TOLERANCE_S,
    Basis,
    ClockStep,
    ClockView,
    TrustedTime,
)
from agent.trusted_time.floor import KV_KEY, FloorRecord, FloorStore, decode_floor, encode_floor
from agent.trusted_time.sync import NoSync, SyncSource
from drivers.types import Clock

logger = logging.getLogger(__name__)

# A wall clock that cannot be read at all (past year 9999) stands for this reading.
UNREADABLE_WALL: Final = datetime.max.replace(tzinfo=UTC)
# The floor is written when it moved this far from the stored value (and at every stop).
PERSIST_EVERY_S: Final = 60.0
# How often the time source (kernel NTP state, or a file) is asked at most.
SYNC_POLL_S: Final = 1.0


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
