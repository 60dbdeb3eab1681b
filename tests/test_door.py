"""Door sensor edges, lock pulses and timeouts, against the simulated door."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from pydantic import ValidationError

from drivers.door import Door, DoorCommandError, DoorConfig, DoorSink
from drivers.errors import TransientError
from drivers.types import DoorEdge, DoorState, GpiEdge
from simulators.door import DoorLockedError, SimulatedDoor

TIMEOUT_S = 10.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class ManualSleep:
    """An injected sleep that returns only when the test releases it."""

    def __init__(self) -> None:
        self.requests: list[float] = []
        self._gates: list[asyncio.Event] = []
        self._requested = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        gate = asyncio.Event()
        self.requests.append(seconds)
        self._gates.append(gate)
        self._requested.set()
        await gate.wait()

    async def wait_requests(self, n: int) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while len(self.requests) < n:
                self._requested.clear()
                await self._requested.wait()

    def release(self) -> None:
        for gate in self._gates:
            gate.set()


class EdgeSink:
    def __init__(self) -> None:
        self.edges: list[DoorEdge] = []

    async def door_edge(self, edge: DoorEdge) -> None:
        self.edges.append(edge)


def _cfg(**kw: object) -> DoorConfig:
    base: dict[str, object] = {"reader": "dock-1", "sensor_gpi": 1, "lock_gpo": 2}
    return DoorConfig.model_validate(base | kw)


def _edge(high: bool, port: int = 1, reader: str = "dock-1") -> GpiEdge:
    return GpiEdge(reader, port, high, T0)


@pytest_asyncio.fixture
async def sleep() -> AsyncIterator[ManualSleep]:
    manual = ManualSleep()
    yield manual
    manual.release()


# --- sensor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("open_when_high", [True, False])
async def test_edges_with_polarity_and_debounce(open_when_high: bool) -> None:
    sink = EdgeSink()
    door = Door(_cfg(sensor_open_when_high=open_when_high), _never_called, sink)
    assert isinstance(sink, DoorSink)
    assert door.state is None
    opened = open_when_high
    for high in (not opened, not opened, opened, opened, opened, not opened):
        await door.gpi_edge(_edge(high))
    # other port and other reader: not our sensor
    await door.gpi_edge(_edge(opened, port=2))
    await door.gpi_edge(_edge(opened, reader="dock-2"))
    assert [e.state for e in sink.edges] == [DoorState.CLOSED, DoorState.OPEN, DoorState.CLOSED]
    assert all(e.door_id == "door" and e.at == T0 for e in sink.edges)
    assert door.state == DoorState.CLOSED


def test_translate_without_sink() -> None:
    door = Door(_cfg(id="cab-door"), _never_called)
    assert door.translate(_edge(True)) == DoorEdge("cab-door", DoorState.OPEN, T0)
    assert door.translate(_edge(True)) is None


# --- lock -----------------------------------------------------------------------------------


@pytest.mark.parametrize("release_high", [True, False])
async def test_unlock_pulse_relocks_after_pulse(release_high: bool, sleep: ManualSleep) -> None:
    sim = SimulatedDoor(_noop_gpi, lock_port=2, lock_release_high=release_high)
    door = Door(_cfg(lock_release_high=release_high), sim.set_gpo, sleep=sleep)
    await door.unlock(pulse_s=3.0)
    assert sim.gpo_writes == [(2, release_high)]
    assert not sim.locked
    assert door.locked is False
    assert door.relock_pending
    await sleep.wait_requests(1)
    assert sleep.requests == [3.0]

    sleep.release()
    await _wait(lambda: not door.relock_pending)
    assert sim.gpo_writes == [(2, release_high), (2, not release_high)]
    assert sim.locked
    assert door.locked is True
    await door.close()
    assert len(sim.gpo_writes) == 2  # already locked: close writes nothing


async def test_default_pulse_comes_from_config(sleep: ManualSleep) -> None:
    sim = SimulatedDoor(_noop_gpi, lock_port=2)
    door = Door(_cfg(release_pulse_s=7.5), sim.set_gpo, sleep=sleep)
    await door.unlock()
    await sleep.wait_requests(1)
    assert sleep.requests == [7.5]
    await door.close()
    assert sim.locked
    with pytest.raises(ValueError, match="positive"):
        await door.unlock(pulse_s=0)


async def test_hold_keeps_released_until_lock(sleep: ManualSleep) -> None:
    sim = SimulatedDoor(_noop_gpi, lock_port=2)
    door = Door(_cfg(), sim.set_gpo, sleep=sleep)
    await door.unlock(pulse_s=1.0)
    await sleep.wait_requests(1)
    assert door.hold() is True
    sleep.release()
    await _wait(lambda: not door.relock_pending)
    assert sim.gpo_writes == [(2, True)]
    assert not sim.locked
    assert door.hold() is False  # nothing left to hold

    await door.lock()
    assert sim.gpo_writes == [(2, True), (2, False)]
    assert sim.locked
    await door.close()


async def test_second_unlock_restarts_the_pulse(sleep: ManualSleep) -> None:
    sim = SimulatedDoor(_noop_gpi, lock_port=2)
    door = Door(_cfg(), sim.set_gpo, sleep=sleep)
    await door.unlock(pulse_s=1.0)
    await sleep.wait_requests(1)
    await door.unlock(pulse_s=2.0)
    await sleep.wait_requests(2)
    # the first pulse's re-lock was cancelled: only one re-lock will follow
    sleep.release()
    await _wait(lambda: not door.relock_pending)
    assert sim.gpo_writes == [(2, True), (2, True), (2, False)]
    await door.close()


async def test_close_cancels_pending_relock_and_locks(sleep: ManualSleep) -> None:
    sim = SimulatedDoor(_noop_gpi, lock_port=2)
    door = Door(_cfg(), sim.set_gpo, sleep=sleep)
    await door.unlock(pulse_s=60.0)
    await sleep.wait_requests(1)
    await door.close()
    assert not door.relock_pending
    assert sim.gpo_writes == [(2, True), (2, False)]
    assert sim.locked


async def test_lock_command_timeout_is_a_clear_error() -> None:
    stuck = asyncio.Event()

    async def set_gpo(port: int, high: bool) -> None:
        await stuck.wait()  # a reader that never answers

    door = Door(_cfg(command_timeout_s=0.05), set_gpo)
    with pytest.raises(DoorCommandError) as exc:
        await door.lock()
    assert "door door: lock (GPO 2 -> low) timed out after 0.05s" in str(exc.value)
    assert isinstance(exc.value, TransientError)
    assert door.locked is None
    with pytest.raises(DoorCommandError, match=r"unlock \(GPO 2 -> high\) timed out"):
        await door.unlock(pulse_s=60.0)
    assert door.relock_pending  # fail secure: the re-lock is still scheduled
    stuck.set()  # the reader answers again
    await door.close()
    assert door.locked is True


async def test_gpo_failure_is_wrapped_and_relock_retried(
    sleep: ManualSleep, caplog: pytest.LogCaptureFixture
) -> None:
    writes: list[tuple[int, bool]] = []
    failures = 2

    async def flaky(port: int, high: bool) -> None:
        nonlocal failures
        if not high and failures:
            failures -= 1
            raise TransientError("reader offline")
        writes.append((port, high))

    door = Door(_cfg(), flaky, sleep=sleep)
    await door.unlock(pulse_s=1.0)
    await sleep.wait_requests(1)
    sleep.release()
    # pulse, then two failed re-locks each followed by a backoff sleep
    await sleep.wait_requests(2)
    assert door.lock_fault is not None
    assert "re-lock (GPO 2 -> low) failed: reader offline" in door.lock_fault
    sleep.release()
    await sleep.wait_requests(3)
    sleep.release()
    await _wait(lambda: not door.relock_pending)
    assert writes == [(2, True), (2, False)]
    assert door.lock_fault is None
    assert door.locked is True
    await door.close()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    for line in retries:  # one "door <id>:" prefix, as the error names the door itself
        assert line == "door door: re-lock (GPO 2 -> low) failed: reader offline; retrying"


async def test_unlock_failure_still_schedules_relock(sleep: ManualSleep) -> None:
    async def refuse_release(port: int, high: bool) -> None:
        if high:
            raise TransientError("reader offline")

    door = Door(_cfg(), refuse_release, sleep=sleep)
    with pytest.raises(DoorCommandError, match=r"unlock .* failed: reader offline"):
        await door.unlock(pulse_s=1.0)
    assert door.relock_pending
    await door.close()
    assert door.locked is True


# --- simulated door -------------------------------------------------------------------------


async def test_simulated_door_refuses_to_open_while_locked_except_by_force() -> None:
    reported: list[tuple[int, bool]] = []
    sim = SimulatedDoor(lambda port, high: reported.append((port, high)), sensor_port=3)
    assert sim.locked
    with pytest.raises(DoorLockedError):
        await sim.open()
    assert not sim.is_open
    assert reported == []

    await sim.force_open()
    assert sim.is_open
    assert sim.forced_openings == 1
    await sim.close()  # a spring latch closes while locked
    assert reported == [(3, True), (3, False)]

    sim.on_gpo(1, True)  # lock released
    await sim.open()
    assert reported[-1] == (3, True)
    assert sim.forced_openings == 1


async def test_full_door_cycle_through_door_driver(sleep: ManualSleep) -> None:
    """Driver ⇄ simulated door: unlock, open, close, re-lock, with inverted sensor polarity."""
    sink = EdgeSink()
    door: Door | None = None

    async def gpi(port: int, high: bool) -> None:
        assert door is not None
        await door.gpi_edge(GpiEdge("dock-1", port, high, T0))

    sim = SimulatedDoor(gpi, sensor_port=1, sensor_open_when_high=False, lock_port=2)
    door = Door(_cfg(sensor_open_when_high=False), sim.set_gpo, sink, sleep=sleep)
    await sim.report()
    assert door.state == DoorState.CLOSED

    with pytest.raises(DoorLockedError):
        await sim.open()
    await door.unlock(pulse_s=5.0)
    await sim.open()
    await sleep.wait_requests(1)
    sleep.release()  # the pulse ends while the door is open: the bolt re-engages anyway
    await _wait(lambda: not door.relock_pending)
    assert sim.locked
    await sim.close()
    assert [e.state for e in sink.edges] == [DoorState.CLOSED, DoorState.OPEN, DoorState.CLOSED]
    with pytest.raises(DoorLockedError):
        await sim.open()
    await door.close()


def test_door_config_validation() -> None:
    with pytest.raises(ValidationError, match="sensor_gpi"):
        DoorConfig.model_validate({"reader": "dock-1", "lock_gpo": 1})
    with pytest.raises(ValidationError, match="release_pulse_s"):
        _cfg(release_pulse_s=0)
    with pytest.raises(ValidationError, match="extra"):
        _cfg(lock_polarity="high")


# --- helpers --------------------------------------------------------------------------------


async def _never_called(port: int, high: bool) -> None:
    raise AssertionError("no GPO write expected")


def _noop_gpi(port: int, high: bool) -> None:
    return None


async def _wait(predicate: object) -> None:
    assert callable(predicate)
    async with asyncio.timeout(TIMEOUT_S):
        while not predicate():  # the re-lock task has no public event: bounded poll
            await asyncio.sleep(0.001)


async def test_failed_lock_keeps_retrying_in_the_background() -> None:
    """Fail secure: a lock command that fails is retried until the lock is engaged."""
    from drivers.backoff import Backoff
    from drivers.door import Door, DoorCommandError, DoorConfig

    writes: list[tuple[int, bool]] = []
    failures = 3

    async def set_gpo(port: int, high: bool) -> None:
        nonlocal failures
        if not high and failures > 0:
            failures -= 1
            raise DoorCommandError("reader refused the GPO write")
        writes.append((port, high))

    door = Door(
        DoorConfig(reader="dock-1", sensor_gpi=1, lock_gpo=2, command_timeout_s=1.0),
        set_gpo,
        relock_backoff=Backoff(initial_s=0.01, max_s=0.02),
    )
    with pytest.raises(DoorCommandError):
        await door.lock()
    assert door.relock_pending
    assert door.lock_fault is not None
    async with asyncio.timeout(10):
        while door.locked is not True:
            await asyncio.sleep(0.01)
    assert writes == [(2, False)]
    assert failures == 0
    await door.close()
