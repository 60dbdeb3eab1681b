"""An idle engine asks for no wake-up: ``next_deadline()`` names the next timer (or none), and
one tick at that time does what ticking every 100 ms did. The engine loop's watchdog probe
counts waiting for an input as alive, never a queued input left untaken."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from types import SimpleNamespace

from agent.domain import events as ev
from agent.domain.engine import Phase, Relock
from agent.domain.now import Now
from agent.engine_runner import NUDGE, EngineRunner
from drivers.types import ReaderState
from tests.domain_harness import ALICE, T0, Cabinet, domain_config


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
