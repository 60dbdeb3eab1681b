"""An idle engine asks for no wake-up: ``next_deadline()`` names the next timer (or none), and
one tick at that time does what ticking every 100 ms did. The engine loop's watchdog probe
counts waiting for an input as alive, never a queued input left untaken."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from agent.domain import events as ev
from agent.domain.engine import CabinetEngine, Phase, Relock
from agent.domain.localtime import zone
from agent.domain.now import Now
from agent.engine_runner import NUDGE, STOP_ENGINE, AppStats, EngineRunner, Inputs
from drivers.types import ReaderState, TagRead
from tests.domain_harness import ALICE, T0, Cabinet, Tag, domain_config, epc


def _at(mono: float) -> Now:
    return Now(T0 + timedelta(seconds=mono - 1000.0), mono)


def test_an_idle_cabinet_without_background_inventory_needs_no_timer() -> None:
    cab = Cabinet()
    assert cab.engine.phase is Phase.IDLE
    assert cab.engine.next_deadline() is None


def test_the_background_inventory_is_the_idle_cabinets_only_timer() -> None:
    cab = Cabinet(config=domain_config(background_period_s=600))
    assert cab.engine.next_deadline() == cab.now.mono + 600


def test_an_unlocked_door_relocks_at_its_deadline_with_one_tick() -> None:
    cab = Cabinet()
    cab.badge(ALICE)
    assert cab.engine.phase is Phase.UNLOCKED
    deadline = cab.engine.next_deadline()
    assert deadline == cab.now.mono + cab.config.relock_after_s
    assert not any(isinstance(c, Relock) for c in cab.engine.tick(_at(deadline - 0.01)).commands)
    out = cab.engine.tick(_at(deadline))
    assert any(isinstance(c, Relock) for c in out.commands)
    assert cab.engine.next_deadline() is None


def test_a_door_left_open_alerts_at_each_deadline() -> None:
    cab = Cabinet()
    cab.badge(ALICE)
    cab.open()
    opened = cab.now.mono
    for alert in (1, 2):
        deadline = cab.engine.next_deadline()
        assert deadline == opened + alert * cab.config.left_open_s
        out = cab.engine.tick(_at(deadline))
        assert [e.alert for e in out.events if isinstance(e, ev.DoorLeftOpen)] == [alert]


def test_a_reader_outage_is_reported_at_its_debounce_deadline() -> None:
    cab = Cabinet(config=domain_config(reader_offline_debounce_s=10))
    cab.set_reader("dock-2", ReaderState.OFFLINE)
    down = cab.now.mono
    assert cab.engine.next_deadline() == down + 10
    out = cab.engine.tick(_at(down + 10))
    assert [e.reader_id for e in out.events if isinstance(e, ev.ReaderOffline)] == ["dock-2"]


def _tick_at(engine: CabinetEngine, now: Now, mono: float) -> list[ev.Event]:
    """One tick at monotonic ``mono`` (the wall clock moved as much)."""
    return engine.tick(Now(now.wall + timedelta(seconds=mono - now.mono), mono)).events


def test_an_overdue_check_out_is_a_timer_of_the_idle_cabinet() -> None:
    cab = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(overdue_after_s=3600))
    cab.cycle(ALICE, take=[epc(0)])
    assert cab.engine.phase is Phase.IDLE
    deadline = cab.engine.next_deadline()
    assert deadline is not None
    assert cab.now.mono < deadline <= cab.now.mono + 3600
    assert not any(
        isinstance(e, ev.ItemOverdue) for e in _tick_at(cab.engine, cab.now, deadline - 0.01)
    )
    late = [e for e in _tick_at(cab.engine, cab.now, deadline) if isinstance(e, ev.ItemOverdue)]
    assert [e.epc for e in late] == [epc(0)]
    assert cab.engine.next_deadline() is None


def test_a_door_open_by_day_wakes_the_engine_when_the_night_begins() -> None:
    # 20:58:30 UTC = 21:58:30 in Paris; the night (60 s periods) starts at 22:00 Paris.
    night = {"left_open_s": 600.0, "night_left_open_s": 60.0, "night_start": "22:00"}
    t0 = datetime(2026, 3, 10, 20, 58, 30, tzinfo=UTC)
    paris = zone("Europe/Paris")
    cab = Cabinet(config=domain_config(**night), t0=t0, timezone=paris)
    cab.badge(ALICE)
    cab.open()
    now = cab.now
    night_starts = datetime(2026, 3, 10, 21, 0, tzinfo=UTC)
    # Only ticks at the engine's own deadlines, as the engine loop does when nothing comes.
    alerts: list[ev.DoorLeftOpen] = []
    ticks = 0
    while not alerts:
        deadline = cab.engine.next_deadline()
        assert deadline is not None
        ticks += 1
        assert ticks < 10
        alerts = [e for e in _tick_at(cab.engine, now, deadline) if isinstance(e, ev.DoorLeftOpen)]
    [first] = alerts
    assert first.night is True
    assert first.time == night_starts  # on time: the deadline was the night's start
    assert first.alert == 1  # one night period (90 s open), as when ticking every 100 ms


def test_a_supervisor_wait_lapses_at_its_deadline() -> None:
    cab = Cabinet()
    cab._apply(cab.engine.await_supervisor("uid:1000", "recount", 30.0, cab.now))
    assert cab.engine.awaiting_supervisor
    deadline = cab.engine.next_deadline()
    assert deadline == cab.now.mono + 30.0
    _tick_at(cab.engine, cab.now, deadline)
    assert not cab.engine.awaiting_supervisor
    assert cab.engine.next_deadline() is None


def test_a_technicians_open_door_is_due_on_the_technicians_limit() -> None:
    cab = Cabinet()
    cab._apply(cab.engine.open_technician("uid:1000", "restock", cab.now))
    cab.open()
    limit = cab.config.technician_left_open_s
    deadline = cab.engine.next_deadline()
    assert deadline == cab.now.mono + limit
    out = _tick_at(cab.engine, cab.now, deadline)
    [alert] = [e for e in out if isinstance(e, ev.DoorLeftOpen)]
    assert alert.technician == "uid:1000"
    assert cab.engine.next_deadline() == deadline + limit


def test_a_running_scan_is_judged_on_every_tick() -> None:
    cab = Cabinet()
    cab.badge(ALICE)
    cab.open()
    cab.close()
    assert cab.engine.phase is Phase.SCANNING
    assert cab.engine.next_deadline() == cab.now.mono  # due now: the loop ticks at TICK_S


def _runner(*, parked: bool, queued: bool) -> EngineRunner:
    # Only the probe's inputs are set: the probe reads nothing else.
    runner = object.__new__(EngineRunner)
    runner.store = SimpleNamespace(disk_full=False)  # type: ignore[assignment]
    runner._committing = False
    runner._parked = parked
    queue: asyncio.Queue[object] = asyncio.Queue()
    if queued:
        queue.put_nowait(NUDGE)
    runner.inputs = SimpleNamespace(queue=queue)  # type: ignore[assignment]
    runner.engine_progress = 12.5
    return runner


def test_waiting_for_an_input_is_alive_but_an_untaken_input_is_not() -> None:
    before = time.monotonic()
    assert _runner(parked=True, queued=False).engine_alive() >= before
    assert _runner(parked=True, queued=True).engine_alive() == 12.5
    assert _runner(parked=False, queued=False).engine_alive() == 12.5


async def test_the_engine_loop_lets_go_of_the_reads_it_counted_while_it_waits() -> None:
    """A report can carry a whole scan: the loop must not keep it alive until the next input."""
    cab = Cabinet(tags={epc(i): Tag("top") for i in range(3)})
    runner = object.__new__(EngineRunner)
    runner.engine = cab.engine
    runner.inputs = Inputs(AppStats())
    runner.store = SimpleNamespace(disk_full=False)  # type: ignore[assignment]
    runner.clock = SimpleNamespace(  # type: ignore[assignment]
        monotonic=lambda: cab.now.mono, reading=lambda: cab.now
    )
    runner.readers = []
    runner._parked = False
    runner._committing = False
    runner.engine_progress = 0.0
    runner.on_step = []
    batch = tuple(
        TagRead("dock-1", epc(i), 1, -50.0, T0) for i in range(3)
    )  # counted only while a scan runs; the loop takes it all the same
    before = sys.getrefcount(batch)
    task = asyncio.create_task(runner.run(), name="engine-under-test")
    try:
        await runner.inputs.queue.put(batch)
        async with asyncio.timeout(5):
            while not (runner._parked and runner.inputs.queue.empty()):
                await asyncio.sleep(0)
        assert sys.getrefcount(batch) == before
        await runner.inputs.queue.put(STOP_ENGINE)
        async with asyncio.timeout(5):
            await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
