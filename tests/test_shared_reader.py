"""A reader shared by two cabinets (drivers/shared.py): the real LLRP driver against the LLRP
simulator over a real socket, its antenna ports split between two ports of the SharedReader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from drivers.llrp.reader import LlrpReader
from drivers.shared import ReaderPort, SharedReader
from drivers.types import ReaderHealth, ReaderState, TagRead
from simulators.llrp import LlrpSimulator, SimTag
from simulators.llrp.codec import epc_hex
from tests.test_llrp_driver import HEAL_BOUND_S, RecordingSink, _cfg, keepalive_round_trip

TAG_A = "e2801160600002000000a001"  # on antenna 1: cabinet A's
TAG_B = "e2801160600002000000a002"  # on antenna 3: cabinet B's
STOPS = ("DISABLE_ROSPEC", "STOP_ROSPEC")


class OrderedSink(RecordingSink):
    """Also keeps reads and health in the order they came (``log``)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[TagRead | ReaderHealth] = []

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        self.log.extend(reads)
        await super().tag_reads(reads)

    async def reader_health(self, health: ReaderHealth) -> None:
        self.log.append(health)
        await super().reader_health(health)


@asynccontextmanager
async def shared_reader() -> AsyncIterator[
    tuple[
        LlrpSimulator,
        SharedReader,
        tuple[ReaderPort, OrderedSink],
        tuple[ReaderPort, OrderedSink],
    ]
]:
    async with LlrpSimulator(antennas=4, seed=3) as sim:
        sim.add_tag(SimTag(epc=TAG_A, antenna=1, rssi_mean=-50.0))
        sim.add_tag(SimTag(epc=TAG_B, antenna=3, rssi_mean=-50.0))
        shared = SharedReader(lambda sink: LlrpReader(_cfg(sim.port, gpi_ports=[1, 2]), sink))
        sink_a, sink_b = OrderedSink(), OrderedSink()
        port_a = shared.port("crib-a", [1, 2], sink_a)
        port_b = shared.port("crib-b", [3, 4], sink_b)
        task = asyncio.create_task(shared.run(), name="shared-reader-under-test")
        try:
            await sink_a.until(lambda: port_a.health.state == ReaderState.ONLINE)
            yield sim, shared, (port_a, sink_a), (port_b, sink_b)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_reads_go_to_the_cabinet_owning_the_antenna_and_health_to_both() -> None:
    async with shared_reader() as (sim, _shared, (a, sink_a), (b, sink_b)):
        await a.start_inventory()
        await b.start_inventory()
        await sink_a.until(lambda: TAG_A in sink_a.epcs())
        await sink_b.until(lambda: TAG_B in sink_b.epcs())
        assert {r.antenna for r in sink_a.reads} <= {1, 2}
        assert {r.antenna for r in sink_b.reads} <= {3, 4}
        assert sink_a.epcs() == {TAG_A}
        assert sink_b.epcs() == {TAG_B}
        # B joined while the reader's answer to A's start may still have been awaited: the
        # restart it asked for may still be under way.
        await sink_a.until(lambda: a.health.state == ReaderState.INVENTORYING)
        # One connection, whose health both cabinets hear.
        assert sim.server.connections.total == 1
        assert [h.state for h in sink_a.health] == [h.state for h in sink_b.health]


async def test_one_cabinet_ending_its_scan_does_not_end_the_others() -> None:
    async with shared_reader() as (sim, shared, (a, sink_a), (b, sink_b)):
        await a.start_inventory()
        await b.start_inventory()
        await sink_b.until(lambda: TAG_B in sink_b.epcs())
        await b.stop_inventory()
        # B's stop reached nobody: the reader keeps inventorying for A, and A keeps reading.
        await keepalive_round_trip(sim)
        held_b = len(sink_b.reads)
        dropped = shared.dropped_reads
        seen_a = len(sink_a.reads)
        await sink_a.until(lambda: len(sink_a.reads) > seen_a)
        await sink_a.until(lambda: shared.dropped_reads > dropped)  # B's tag read, not passed
        assert a.health.state == ReaderState.INVENTORYING
        assert len(sink_b.reads) == held_b
        # A's stop is the last one: now the reader stops.
        await a.stop_inventory()
        await sink_a.until(lambda: a.health.state == ReaderState.ONLINE, HEAL_BOUND_S)


async def test_a_cabinet_joining_a_running_read_cycle_counts_from_a_new_one() -> None:
    """A keeps the reader inventorying; B's door is open meanwhile (its tag read, routed to
    nobody), the tag is taken, the door closed and B's scan starts within one report period:
    the report that holds those reads lags (held) and reaches B once its reads are routed.
    B's start restarts the reader, so B hears ONLINE before that report is handed over and
    INVENTORYING only with the new read cycle, in which the tag is no longer read: a pass of
    B that counts from its INVENTORYING never counts it (docs/domain.md, "Scan pass"). Joined
    to the running cycle instead, B heard INVENTORYING all along and got the stale reads."""
    async with shared_reader() as (sim, _shared, (a, sink_a), (b, sink_b)):
        await a.start_inventory()
        await sink_a.until(lambda: a.health.state == ReaderState.INVENTORYING)
        await sink_a.until(lambda: TAG_A in sink_a.epcs())
        sim.faults.hold_reports()
        sim.faults.hold_stops()  # the reader acts on a stop only after those reports
        await sim.wait_until(
            lambda: any(
                epc_hex(t) == TAG_B
                for r in sim.reader.reports_held or ()
                for t in r["TagReportData"]
            ),
            HEAL_BOUND_S,
        )
        sim.remove_tag(TAG_B)
        stops = sum(sim.received_counts.get(n, 0) for n in STOPS)
        mark = len(sink_b.log)
        await b.start_inventory()
        # The restart's stop reached the reader (held: it reads on, its reports still lag).
        await sim.wait_until(
            lambda: sum(sim.received_counts.get(n, 0) for n in STOPS) > stops, HEAL_BOUND_S
        )
        await sink_b.until(lambda: b.health.state == ReaderState.ONLINE)
        sim.faults.release_reports()
        await keepalive_round_trip(sim)  # every held report handed over
        sim.faults.release_stops()

        def states() -> list[ReaderState]:
            return [e.state for e in sink_b.log[mark:] if isinstance(e, ReaderHealth)]

        await sink_b.until(lambda: states()[-1:] == [ReaderState.INVENTORYING])
        await sink_a.until(lambda: a.health.state == ReaderState.INVENTORYING)
        seen_a = len(sink_a.reads)
        await sink_a.until(lambda: len(sink_a.reads) > seen_a)  # the new cycle reads
        await keepalive_round_trip(sim)
        log = sink_b.log[mark:]
        assert states() == [ReaderState.ONLINE, ReaderState.INVENTORYING], log
        fresh = log.index(
            next(
                e
                for e in log
                if isinstance(e, ReaderHealth) and e.state == ReaderState.INVENTORYING
            )
        )
        stale = [e for e in log[:fresh] if isinstance(e, TagRead) and e.epc == TAG_B]
        assert stale, log  # the lagging report did reach B: before its new read cycle
        assert not [e for e in log[fresh:] if isinstance(e, TagRead) and e.epc == TAG_B], log
        # A's own cycle was restarted too: it heard the stop and the new start.
        assert a.health.state == ReaderState.INVENTORYING


async def test_a_cabinet_joining_while_the_readers_start_is_awaited_counts_from_a_new_cycle() -> (
    None
):
    """B's scan starts while the reader has not yet answered A's start: the stop-then-start
    B's start asks for cannot act on a reader that is not inventorying yet, so the driver
    remembers it and, once the reader answers the start, stops it, waits for the stop's
    confirmation and starts it again. The cycle begun for A before B's start (its reads, here
    of a tag taken meanwhile) reaches B while B hears ONLINE; B's INVENTORYING comes only with
    the new cycle. Without it B heard INVENTORYING with A's cycle and counted its reads."""
    async with shared_reader() as (sim, _shared, (a, sink_a), (b, sink_b)):
        sim.faults.hold_starts()
        enables = sim.received_counts.get("ENABLE_ROSPEC", 0)
        await a.start_inventory()
        await sim.wait_until(
            lambda: sim.received_counts.get("ENABLE_ROSPEC", 0) > enables, HEAL_BOUND_S
        )
        stops = sum(sim.received_counts.get(n, 0) for n in STOPS)
        mark = len(sink_b.log)
        await b.start_inventory()
        assert b.health.state == ReaderState.ONLINE  # the start is still awaited
        sim.faults.hold_stops()  # the old cycle reads on until the test has seen its reads
        sim.faults.release_starts()

        def states() -> list[ReaderState]:
            return [e.state for e in sink_b.log[mark:] if isinstance(e, ReaderHealth)]

        await sink_b.until(lambda: TAG_B in sink_b.epcs())  # the old cycle's reads reach B
        sim.remove_tag(TAG_B)
        # Every report of TAG_B handed over, and the owed stop (written with the answer to the
        # start, before those reports were read) received by the reader.
        await keepalive_round_trip(sim)
        assert sum(sim.received_counts.get(n, 0) for n in STOPS) > stops
        assert states() == [], sink_b.log[mark:]  # B heard no INVENTORYING of the old cycle
        sim.faults.release_stops()

        await sink_b.until(lambda: states()[-1:] == [ReaderState.INVENTORYING])
        await sink_a.until(lambda: a.health.state == ReaderState.INVENTORYING)
        seen_a = len(sink_a.reads)
        await sink_a.until(lambda: len(sink_a.reads) > seen_a)  # the new cycle reads
        await keepalive_round_trip(sim)
        log = sink_b.log[mark:]
        assert states() == [ReaderState.INVENTORYING], log
        assert sim.received_counts.get("ENABLE_ROSPEC", 0) == enables + 2  # A's, the restart's
        fresh = log.index(
            next(
                e
                for e in log
                if isinstance(e, ReaderHealth) and e.state == ReaderState.INVENTORYING
            )
        )
        assert [e for e in log[:fresh] if isinstance(e, TagRead) and e.epc == TAG_B], log
        assert not [e for e in log[fresh:] if isinstance(e, TagRead) and e.epc == TAG_B], log


async def test_repeated_starts_while_the_readers_start_is_awaited_do_not_restart_it() -> None:
    """Starts alone are idempotent, in flight too: only a stop-then-start restarts."""
    async with shared_reader() as (sim, shared, (a, sink_a), (b, _sink_b)):
        sim.faults.hold_starts()
        enables = sim.received_counts.get("ENABLE_ROSPEC", 0)
        stops = sum(sim.received_counts.get(n, 0) for n in STOPS)
        await a.start_inventory()
        await sim.wait_until(
            lambda: sim.received_counts.get("ENABLE_ROSPEC", 0) > enables, HEAL_BOUND_S
        )
        await a.start_inventory()
        await shared.driver.start_inventory()
        sim.faults.release_starts()
        await sink_a.until(lambda: a.health.state == ReaderState.INVENTORYING)
        # A stop would have been written with the start's answer, before this keepalive.
        await keepalive_round_trip(sim)
        assert sum(sim.received_counts.get(n, 0) for n in STOPS) == stops
        assert sim.received_counts.get("ENABLE_ROSPEC", 0) == enables + 1
        assert a.health.state == ReaderState.INVENTORYING
        assert not b.wants_inventory


async def test_gpi_edges_reach_every_cabinet_of_the_reader() -> None:
    async with shared_reader() as (sim, _shared, (_a, sink_a), (_b, sink_b)):
        sim.set_gpi(2, True)
        await sink_a.until(lambda: any(e.port == 2 and e.high for e in sink_a.gpi))
        await sink_b.until(lambda: any(e.port == 2 and e.high for e in sink_b.gpi))


def test_an_antenna_belongs_to_one_cabinet() -> None:
    shared = SharedReader(lambda sink: LlrpReader(_cfg(1), sink))
    shared.port("crib-a", [1, 2], RecordingSink())
    with pytest.raises(ValueError, match=r"antennas \[2\] already owned"):
        shared.port("crib-b", [2, 3], RecordingSink())
