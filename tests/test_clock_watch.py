"""The clock watch notices a wall-clock step: told by the kernel (a timerfd cancelled when the
clock is set), or by reading the clock where the kernel cannot tell (agent/clock_watch.py).

The agent's wall clock here is a fake one the test steps; the kernel's own clock is only
nudged by one nanosecond and back (``adjtimex(ADJ_SETOFFSET)``, needs CAP_SYS_TIME): that is
what wakes the kernel path, while its own checks are an hour apart.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from agent.alerts import AlertLines
from agent.clock_set import ClockSetError, ClockSetSignal
from agent.clock_watch import ClockWatch
from agent.documents import Documents
from agent.store.store import Store
from agent.trusted_time import ClockStep, TrustedClock
from agent.trusted_time.sync import _Timex

REAL = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0
BOUND_S = 20.0


@dataclass
class FakeClock:
    wall: datetime = REAL
    mono: float = 500.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@dataclass
class Synced:
    name: str = "test"

    def synchronised(self) -> bool:
        return True


@dataclass
class NoDocs:
    deferred: dict[str, Any] = field(default_factory=dict)
    on_deferred: list[Any] = field(default_factory=list)

    def deferred_due(self) -> list[str]:
        return []

    def clock_changed(self) -> None:
        return None


class Kv:
    def __init__(self) -> None:
        self.kv: dict[str, bytes | None] = {}

    async def kv_get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    async def kv_put(self, key: str, value: bytes | None) -> None:
        self.kv[key] = value


_ADJ_SETOFFSET = 0x0100
_ADJ_NANO = 0x2000


def nudge_kernel_clock() -> None:
    """Set the kernel's wall clock 1 ns on and 1 ns back: a clock set, by nothing in all."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for sec, nsec in ((0, 1), (-1, 999_999_999)):
        timex = _Timex(modes=_ADJ_SETOFFSET | _ADJ_NANO, time_sec=sec, time_usec=nsec)
        if libc.adjtimex(ctypes.byref(timex)) < 0:
            err = ctypes.get_errno()
            raise AssertionError(
                f"adjtimex(ADJ_SETOFFSET) failed (errno {err}): needs CAP_SYS_TIME"
            )


class Rig:
    def __init__(self) -> None:
        self.source = FakeClock()
        self.clock = TrustedClock(self.source, sync=Synced())
        self.clock.restore(None)
        self.clock.reading()
        self.clock.take_steps()  # the start: synchronised, trusted
        self.steps: asyncio.Queue[ClockStep] = asyncio.Queue()

    def watch(self, **kwargs: Any) -> ClockWatch:
        return ClockWatch(
            self.clock, AlertLines(), cast(Documents, NoDocs()), self.steps.put, **kwargs
        )

    async def running(self, watch: ClockWatch) -> asyncio.Task[None]:
        task = asyncio.create_task(watch.run(cast(Store, Kv())))
        async with asyncio.timeout(BOUND_S):
            while not self.clock._persisted:  # its first check saved the floor
                await asyncio.sleep(0.01)
        return task

    def step(self, seconds: float) -> None:
        self.source.wall += timedelta(seconds=seconds)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_kernel_says_when_the_wall_clock_is_set() -> None:
    rig = Rig()
    watch = rig.watch(check_s=HOUR, idle_check_s=HOUR)  # no look of its own within the test
    task = await rig.running(watch)
    try:
        assert watch.kernel_watching
        rig.step(HOUR)
        nudge_kernel_clock()
        async with asyncio.timeout(BOUND_S):
            step = await rig.steps.get()
        assert step.step_s == pytest.approx(HOUR)
        assert not step.trusted
        assert watch.clock_sets >= 1
        # Re-armed: a second set is heard too (the clock stepped back: trusted again).
        rig.step(-HOUR)
        nudge_kernel_clock()
        async with asyncio.timeout(BOUND_S):
            back = await rig.steps.get()
        assert back.step_s == pytest.approx(-HOUR)
        assert back.trusted
    finally:
        await _stop(task)


async def test_polling_sees_the_step_where_the_kernel_is_not_asked() -> None:
    rig = Rig()
    watch = rig.watch(mode="poll", check_s=0.05, idle_check_s=HOUR)
    task = await rig.running(watch)
    try:
        assert not watch.kernel_watching
        rig.step(HOUR)
        async with asyncio.timeout(BOUND_S):
            step = await rig.steps.get()
        assert step.step_s == pytest.approx(HOUR)
    finally:
        await _stop(task)


async def test_without_timerfd_it_falls_back_to_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> ClockSetSignal:
        raise ClockSetError("no timerfd in the C library: test")

    monkeypatch.setattr(ClockSetSignal, "open", staticmethod(unavailable))
    rig = Rig()
    watch = rig.watch(check_s=0.05, idle_check_s=HOUR)
    task = await rig.running(watch)
    try:
        assert not watch.kernel_watching
        rig.step(-HOUR)
        async with asyncio.timeout(BOUND_S):
            step = await rig.steps.get()
        assert step.step_s == pytest.approx(-HOUR)
    finally:
        await _stop(task)


def test_the_signal_is_quiet_until_the_clock_is_set() -> None:
    signal = ClockSetSignal.open()
    try:
        assert signal.consume() is False
        nudge_kernel_clock()
        assert signal.consume() is True  # cancelled, and armed again
        assert signal.consume() is False
    finally:
        signal.close()
