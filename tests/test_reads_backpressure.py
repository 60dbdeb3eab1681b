"""The hand-off from the readers to the engine is bounded in reads, not only in reports.

A reader that delivers faster than the engine consumes waits once ``max_reads`` reads are
queued; its task then stops reading the socket and the reads wait in the kernel and in the
reader (LLRP is TCP: backpressure, not loss). Real LLRP simulator, real driver, real socket,
the daemon's own ``Inputs``; the test plays a busy engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from agent.domain.commands import Unlock
from agent.engine_runner import AppStats, EngineRunner, Inputs
from drivers.door import Door, DoorConfig
from drivers.llrp.reader import DELIVER_CHUNK, LlrpReader
from drivers.types import ReaderState, TagRead
from simulators.llrp import LlrpSimulator
from tests.test_llrp_driver import HEAL_BOUND_S, _cfg, keepalive_round_trip, running

MAX_READS = 1000


async def test_a_reader_faster_than_the_engine_waits_and_loses_no_read() -> None:
    async with LlrpSimulator(
        personality="impinj", antennas=4, host="127.0.0.1", port=0, seed=3, cycle_s=0.02
    ) as sim:
        sim.add_random_tags(n=1000, antennas=[1, 2, 3, 4], seed=11)
        inputs = Inputs(AppStats(), max_reads=MAX_READS)
        handed: list[int] = []  # reads the driver handed to Inputs (tapped before queueing)

        def tap(reads: Sequence[TagRead]) -> None:
            handed.append(len(reads))

        inputs.tag_taps.append(tap)
        reader = LlrpReader(_cfg(sim.port), inputs)
        async with running(reader):
            await reader.start_inventory()
            # The engine is busy: nothing is consumed. The reads waiting for it stay bounded,
            # so the reader stops reading and the simulator's reports back up behind TCP.
            await sim.wait_until(lambda: sim.unsent_frames >= 20, timeout=HEAL_BOUND_S)
            # At most MAX_READS queued, plus the chunk of a report the reader waits to hand
            # over: a report of a whole scan (1,000 tags here) is handed over in chunks.
            assert sim.stats.tags_reported > DELIVER_CHUNK * sim.stats.reports_sent
            assert max(handed) <= DELIVER_CHUNK
            assert sum(handed) <= MAX_READS + DELIVER_CHUNK
            assert inputs.queue.reads <= MAX_READS
            assert inputs.queue.read_waits >= 1

            # The engine catches up: everything the simulator reported arrives, in order per
            # reader, once each.
            consumed: list[TagRead] = []
            in_flight_max = 0
            got = asyncio.Event()

            async def engine() -> None:
                nonlocal in_flight_max
                while True:
                    item = await inputs.queue.get()
                    if isinstance(item, tuple):
                        in_flight_max = max(in_flight_max, sum(handed) - len(consumed))
                        consumed.extend(item)
                        got.set()

            task = asyncio.create_task(engine(), name="busy-engine")
            try:
                await reader.stop_inventory()
                async with asyncio.timeout(HEAL_BOUND_S):
                    while reader.health.state is not ReaderState.ONLINE:
                        got.clear()
                        await got.wait()
                # Every frame the simulator sent before this keepalive has reached Inputs.
                await keepalive_round_trip(sim)
                async with asyncio.timeout(HEAL_BOUND_S):
                    while len(consumed) < sum(handed) or not inputs.queue.empty():
                        got.clear()
                        await got.wait()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert sim.connections.total == 1  # never dropped for not reading
        assert len(consumed) == sum(handed) == sim.stats.tags_reported
        assert in_flight_max <= MAX_READS + DELIVER_CHUNK
        assert inputs.queue.reads_peak <= MAX_READS
        assert {r.epc for r in consumed} == {t.epc for t in sim.tags}


async def test_a_lock_command_goes_through_while_the_reader_waits_for_the_engine() -> None:
    """The engine waits on the lock's GPO write, confirmed on the reader's connection behind
    reports the reader could not hand over: reads must flow meanwhile, or each would wait for
    the other until the door's command timeout (an unlock lost)."""
    async with LlrpSimulator(
        personality="impinj", antennas=4, host="127.0.0.1", port=0, seed=3, cycle_s=0.02
    ) as sim:
        sim.add_random_tags(n=1000, antennas=[1, 2, 3, 4], seed=11)
        inputs = Inputs(AppStats(), max_reads=MAX_READS)
        reader = LlrpReader(_cfg(sim.port), inputs)
        door = Door(
            DoorConfig(reader="dock-1", sensor_gpi=1, lock_gpo=2, command_timeout_s=10.0),
            reader.set_gpo,
        )
        # Only what execute() touches: the door, the inputs and the stats.
        runner = object.__new__(EngineRunner)
        runner.door = door
        runner.inputs = inputs
        runner.stats = inputs.stats
        async with running(reader):
            await reader.start_inventory()
            # Nothing consumed: the reader waits for room, its reports back up behind TCP.
            await sim.wait_until(lambda: sim.unsent_frames >= 20, timeout=HEAL_BOUND_S)
            try:
                await runner.execute(Unlock(pulse_s=60.0))
                assert runner.stats.commands_failed == 0
                assert door.locked is False
                assert sim.gpo_state[2] is True
            finally:
                await door.close()


async def test_a_command_lets_reads_through_in_every_cabinets_queue() -> None:
    """A reader shared by two cabinets waits for room in cabinet B's queue while cabinet A's
    engine waits on that reader for its lock: B's queue must take the reads meanwhile."""
    a, b = Inputs(AppStats(), max_reads=10), Inputs(AppStats(), max_reads=10)
    read = TagRead("dock-1", "e2" + "0" * 22, 1, -50.0, datetime(2026, 1, 1, tzinfo=UTC))
    await b.queue.put_reads((read,) * 10)
    tasks: list[asyncio.Task[None]] = []
    try:
        tasks.append(asyncio.create_task(b.queue.put_reads((read,) * 5), name="shared-reader"))
        async with asyncio.timeout(HEAL_BOUND_S):
            while not b.queue.read_waits:
                await asyncio.sleep(0)
        with a.queue.reads_unbounded():
            async with asyncio.timeout(HEAL_BOUND_S):
                await tasks[0]
        assert b.queue.reads == 15
        # Closed again: the bound holds, and room made by the engine lets the reader on.
        tasks.append(asyncio.create_task(b.queue.put_reads((read,)), name="shared-reader"))
        async with asyncio.timeout(HEAL_BOUND_S):
            while b.queue.read_waits < 2:
                await asyncio.sleep(0)
        assert not tasks[1].done()
        b.queue.get_nowait()
        async with asyncio.timeout(HEAL_BOUND_S):
            await tasks[1]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_reader_waiting_for_the_engine_is_not_stalled_for_the_watchdog() -> None:
    """A reader waiting for room is waiting on the engine, which has its own watchdog probe
    (alive, e.g., while it waits for the store on a full disk). Counting that wait as the
    reader's stall withheld the systemd watchdog after 20 s: systemd restarted the agent and the
    writes a full disk held in memory were lost."""
    async with LlrpSimulator(
        personality="impinj", antennas=4, host="127.0.0.1", port=0, seed=3, cycle_s=0.02
    ) as sim:
        sim.add_random_tags(n=1000, antennas=[1, 2, 3, 4], seed=11)
        inputs = Inputs(AppStats(), max_reads=MAX_READS)
        reader = LlrpReader(_cfg(sim.port), inputs)
        async with running(reader):
            await reader.start_inventory()
            # Nothing consumed: the reader waits for room, its reports back up behind TCP.
            await sim.wait_until(lambda: sim.unsent_frames >= 20, timeout=HEAL_BOUND_S)
            assert inputs.queue.read_waits >= 1
            waiting_since = time.monotonic()
            assert reader.last_progress >= waiting_since
            # The engine catches up: the reader's own loop turns again.
            inputs.queue.get_nowait()
            async with asyncio.timeout(HEAL_BOUND_S):
                while reader.last_progress < waiting_since:
                    await asyncio.sleep(0.01)
