"""A whole door cycle over real LLRP: simulated door ⇄ LLRP simulator ⇄ LLRP driver ⇄ Door."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from drivers.door import Door, DoorConfig
from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.reader import LlrpReader
from drivers.types import DoorEdge, DoorState, GpiEdge, ReaderHealth, TagRead
from simulators.door import DoorLockedError, SimulatedDoor
from simulators.llrp import LlrpSimulator
from tests.test_door import ManualSleep

TIMEOUT_S = 20.0


class CabinetSink:
    """ReaderSink that routes GPI edges to the Door and records DoorEdges (DoorSink)."""

    def __init__(self) -> None:
        self.door: Door | None = None
        self.edges: list[DoorEdge] = []
        self.health: list[ReaderHealth] = []
        self._changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        return None

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.append(health)
        self._changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        assert self.door is not None
        await self.door.gpi_edge(edge)

    async def door_edge(self, edge: DoorEdge) -> None:
        self.edges.append(edge)
        self._changed.set()

    async def until_edges(self, *states: DoorState) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while [e.state for e in self.edges] != list(states):
                self._changed.clear()
                await self._changed.wait()


async def test_door_cycle_over_llrp() -> None:
    sleep = ManualSleep()
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as llrp:
        sim_door = SimulatedDoor(
            llrp.set_gpi, sensor_port=1, sensor_open_when_high=True, lock_port=2
        )
        llrp.gpo_listeners.append(sim_door.on_gpo)
        sink = CabinetSink()
        cfg = LlrpReaderConfig.model_validate(
            {
                "id": "dock-1",
                "host": "127.0.0.1",
                "port": llrp.port,
                "antennas": [1],
                "keepalive_s": 1.0,
                "backoff": {"initial_s": 0.05, "max_s": 0.5},
                "gpi_ports": [1],
            }
        )
        reader = LlrpReader(cfg, sink)
        door = Door(
            DoorConfig(reader="dock-1", sensor_gpi=1, lock_gpo=2, command_timeout_s=10.0),
            reader.set_gpo,
            sink,
            sleep=sleep,
        )
        sink.door = door
        task = asyncio.create_task(reader.run(), name="llrp-reader-door-cycle")
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await reader.wait_health(lambda h: h.healthy)
            # Once configured, the driver reports the sensor's current level: closed.
            await sink.until_edges(DoorState.CLOSED)

            with pytest.raises(DoorLockedError):
                await sim_door.open()
            await door.unlock(pulse_s=5.0)
            assert not sim_door.locked  # the GPO write was confirmed by the reader
            await sim_door.open()
            await sink.until_edges(DoorState.CLOSED, DoorState.OPEN)

            await sleep.wait_requests(1)
            sleep.release()
            await llrp.wait_gpo(2, False, timeout=TIMEOUT_S)
            assert sim_door.locked
            await sim_door.close()
            await sink.until_edges(DoorState.CLOSED, DoorState.OPEN, DoorState.CLOSED)
            with pytest.raises(DoorLockedError):
                await sim_door.open()

            await sim_door.force_open()
            await sink.until_edges(
                DoorState.CLOSED, DoorState.OPEN, DoorState.CLOSED, DoorState.OPEN
            )
            assert sim_door.forced_openings == 1
            assert [(w.port, w.high) for w in llrp.gpo_history] == [(2, True), (2, False)]
            await door.close()
        finally:
            sleep.release()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
