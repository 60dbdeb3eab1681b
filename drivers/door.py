"""The cabinet door: a sensor on a reader GPI, an electric lock on a reader GPO.

``Door`` turns GPI edges into debounced :class:`DoorEdge` values (polarity applied) and
drives the lock through an injected ``set_gpo`` (the reader driver's). The lock fails
secure: an unlock pulse always schedules a re-lock, and a failed re-lock is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from pydantic import Field

from drivers.backoff import Backoff
from drivers.config import READER_ID_PATTERN, StrictModel
from drivers.errors import CabinetError, TransientError
from drivers.types import DoorEdge, DoorState, GpiEdge

logger = logging.getLogger(__name__)

SetGpo = Callable[[int, bool], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


class DoorConfig(StrictModel):
    id: str = Field("door", pattern=READER_ID_PATTERN, description="door name used in events")
    reader: str = Field(pattern=READER_ID_PATTERN, description="reader whose GPI/GPO are wired")
    sensor_gpi: int = Field(ge=1, le=64, description="GPI port of the door sensor")
    sensor_open_when_high: bool = Field(True, description="sensor polarity: high means open")
    lock_gpo: int = Field(ge=1, le=64, description="GPO port driving the lock")
    lock_release_high: bool = Field(True, description="lock polarity: high releases the lock")
    release_pulse_s: float = Field(5.0, gt=0, le=600, description="unlock lasts this long")
    command_timeout_s: float = Field(2.0, gt=0, le=60, description="bound on every GPO write")


class DoorCommandError(TransientError):
    """A lock command failed or timed out."""


@runtime_checkable
class DoorSink(Protocol):
    async def door_edge(self, edge: DoorEdge) -> None: ...


class Door:
    """Door sensor and lock of one cabinet. ``close()`` ends any pending re-lock."""

    def __init__(
        self,
        cfg: DoorConfig,
        set_gpo: SetGpo,
        sink: DoorSink | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        relock_backoff: Backoff | None = None,
    ) -> None:
        self._cfg = cfg
        self._set_gpo = set_gpo
        self._sink = sink
        self._sleep = sleep
        self._relock_backoff = relock_backoff or Backoff(initial_s=0.2, max_s=5.0)
        self._state: DoorState | None = None
        self._locked: bool | None = None  # None: unknown until the first command succeeds
        self._gpo_lock = asyncio.Lock()  # GPO writes happen in call order
        self._relock: asyncio.Task[None] | None = None
        self._relock_writing = False
        self._commanded = False  # close() only re-locks a lock we have touched
        self.lock_fault: str | None = None  # last lock failure while nobody awaited it

    @property
    def door_id(self) -> str:
        return self._cfg.id

    @property
    def state(self) -> DoorState | None:
        """Last known door state (None until the sensor has reported)."""
        return self._state

    @property
    def locked(self) -> bool | None:
        """Lock state as last commanded successfully (None: unknown)."""
        return self._locked

    @property
    def relock_pending(self) -> bool:
        return self._relock is not None and not self._relock.done()

    def translate(self, edge: GpiEdge) -> DoorEdge | None:
        """The DoorEdge for a GPI edge of our sensor, or None (other port, or no change)."""
        if edge.reader_id != self._cfg.reader or edge.port != self._cfg.sensor_gpi:
            return None
        is_open = edge.high == self._cfg.sensor_open_when_high
        state = DoorState.OPEN if is_open else DoorState.CLOSED
        if state == self._state:
            return None  # contact bounce or a repeated report: same level, no edge
        self._state = state
        return DoorEdge(self._cfg.id, state, edge.at)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        """ReaderSink-shaped entry point: translate and hand the DoorEdge to the sink."""
        door_edge = self.translate(edge)
        if door_edge is not None and self._sink is not None:
            await self._sink.door_edge(door_edge)

    async def unlock(self, pulse_s: float | None = None) -> None:
        """Release the lock, then re-lock after ``pulse_s`` (default from config) unless held."""
        pulse = self._cfg.release_pulse_s if pulse_s is None else pulse_s
        if pulse <= 0:
            raise ValueError("unlock pulse must be positive")
        await self._cancel_relock()
        try:
            await self._write(release=True, what="unlock")
        finally:
            # Fail secure: even if the release write failed half-way, a re-lock follows.
            task = asyncio.create_task(
                self._relock_after(pulse), name=f"door-relock:{self.door_id}"
            )
            task.add_done_callback(self._relock_done)
            self._relock = task

    def hold(self) -> bool:
        """Keep the lock released until ``lock()``; False if no re-lock was pending."""
        task = self._relock
        if task is None or task.done() or self._relock_writing:
            return False
        task.cancel()
        return True

    async def lock(self) -> None:
        """Engage the lock now (cancels a pending re-lock).

        Fail secure: if the write fails, a background re-lock keeps retrying (with backoff)
        until it succeeds or another command supersedes it; the error is still raised.
        """
        await self._cancel_relock()
        try:
            await self._write(release=False, what="lock")
        except DoorCommandError as err:
            self.lock_fault = str(err)
            task = asyncio.create_task(self._relock_after(0.0), name=f"door-relock:{self.door_id}")
            task.add_done_callback(self._relock_done)
            self._relock = task
            raise

    async def close(self) -> None:
        """Stop the re-lock timer; if the lock was left released, try once to engage it."""
        await self._cancel_relock()
        if self._commanded and self._locked is not True:
            try:
                await self._write(release=False, what="lock")
            except DoorCommandError as err:
                logger.error("could not lock on close: %s", err)  # err names the door

    async def _cancel_relock(self) -> None:
        task, self._relock = self._relock, None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if (cur := asyncio.current_task()) is not None and cur.cancelling():
            raise asyncio.CancelledError

    def _relock_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (err := task.exception()) is not None:
            self.lock_fault = f"re-lock crashed: {type(err).__name__}"
            logger.error("door %s: re-lock task crashed", self.door_id, exc_info=err)

    async def _relock_after(self, pulse_s: float) -> None:
        await self._sleep(pulse_s)
        self._relock_writing = True
        try:
            while True:
                try:
                    await self._write(release=False, what="re-lock")
                except DoorCommandError as err:
                    self.lock_fault = str(err)
                    logger.error("%s; retrying", err)  # err names the door
                    await self._sleep(self._relock_backoff.next_delay())
                    continue
                self._relock_backoff.reset()
                return
        finally:
            self._relock_writing = False

    async def _write(self, *, release: bool, what: str) -> None:
        port = self._cfg.lock_gpo
        level = release == self._cfg.lock_release_high
        timeout = self._cfg.command_timeout_s
        desc = f"door {self.door_id}: {what} (GPO {port} -> {'high' if level else 'low'})"
        async with self._gpo_lock:
            self._commanded = True
            try:
                async with asyncio.timeout(timeout):
                    await self._set_gpo(port, level)
            except TimeoutError:
                self._locked = None
                raise DoorCommandError(f"{desc} timed out after {timeout:g}s") from None
            except CabinetError as err:
                self._locked = None
                raise DoorCommandError(f"{desc} failed: {err}") from err
            self._locked = not release
            if not release:
                self.lock_fault = None
        logger.info("%s done", desc)
