"""A simulated cabinet door with a sensor and an electric lock.

The sensor reports to a GPI callback (e.g. the LLRP simulator's ``set_gpi(port, high)``,
sync or async); the lock follows GPO writes given to :meth:`SimulatedDoor.on_gpo`.
A locked door opens only by force, as a real one does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

GpiCallback = Callable[[int, bool], object]  # may return an awaitable


class DoorLockedError(Exception):
    """The door is locked: it cannot be opened without force."""


class SimulatedDoor:
    """Physical door + lock: ``open()``/``close()``/``force_open()``; lock via ``on_gpo``."""

    def __init__(
        self,
        report_gpi: GpiCallback,
        *,
        sensor_port: int = 1,
        sensor_open_when_high: bool = True,
        lock_port: int = 1,
        lock_release_high: bool = True,
        is_open: bool = False,
        locked: bool = True,
    ) -> None:
        self._report_gpi = report_gpi
        self._sensor_port = sensor_port
        self._open_when_high = sensor_open_when_high
        self._lock_port = lock_port
        self._release_high = lock_release_high
        self._open = is_open
        self._locked = locked
        self.forced_openings = 0
        self.gpo_writes: list[tuple[int, bool]] = []  # every GPO write seen, in order

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def locked(self) -> bool:
        return self._locked

    def on_gpo(self, port: int, high: bool) -> None:
        """A GPO write from the controller; only the lock port matters."""
        self.gpo_writes.append((port, high))
        if port == self._lock_port:
            self._locked = high != self._release_high

    async def set_gpo(self, port: int, high: bool) -> None:
        """Awaitable form of :meth:`on_gpo`, shaped like a reader driver's ``set_gpo``."""
        self.on_gpo(port, high)

    async def report(self) -> None:
        """Report the current sensor level (as a reader does when GPI reporting starts)."""
        result = self._report_gpi(self._sensor_port, self._open == self._open_when_high)
        if inspect.isawaitable(result):
            await result

    async def open(self) -> None:
        """Pull the handle: refused while the lock is engaged."""
        if self._locked:
            raise DoorLockedError("the door is locked")
        await self._move(is_open=True)

    async def force_open(self) -> None:
        """Break the door open, lock or not."""
        if self._locked and not self._open:
            self.forced_openings += 1
        await self._move(is_open=True)

    async def close(self) -> None:
        """Push the door shut (a spring latch closes even while locked)."""
        await self._move(is_open=False)

    async def _move(self, *, is_open: bool) -> None:
        if self._open == is_open:
            return
        self._open = is_open
        await self.report()
