"""LLRP driver ⇄ bundled LLRP simulator over real sockets: reads, commands, faults, hostility."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest

from drivers.backoff import Backoff
from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.reader import LlrpReader
from drivers.supervisor import WAIT_GRACE_S
from drivers.types import GpiEdge, ReaderHealth, ReaderState, TagRead
from simulators.llrp import LlrpSimulator, SimTag

# Short keepalive/backoff so faults are noticed and healed quickly; the bounds asserted below
# are derived from these numbers, never from wall-clock measurements.
KEEPALIVE_S = 1.0
BACKOFF_MAX_S = 0.5
# Worst case to heal: watchdog (3× keepalive) + backoff + reconnect/configure, with a generous
# margin for a loaded 2-core CI machine.
HEAL_BOUND_S = 3 * KEEPALIVE_S + BACKOFF_MAX_S + 20.0


class RecordingSink:
    """A ReaderSink that records everything and lets tests await conditions."""

    def __init__(self) -> None:
        self.reads: list[TagRead] = []
        self.health: list[ReaderHealth] = []
        self.gpi: list[GpiEdge] = []
        self._changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        self.reads.extend(reads)
        self._changed.set()

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.append(health)
        self._changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        self.gpi.append(edge)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = HEAL_BOUND_S) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def epcs(self) -> set[str]:
        return {r.epc for r in self.reads}


async def keepalive_round_trip(sim: LlrpSimulator) -> None:
    """Wait until the driver has answered a keepalive the simulator sends after this call.

    The driver handles frames in order and hands a report's reads to the sink before it reads
    the next frame: once this returns, everything the simulator sent before that keepalive has
    reached the sink. The event a "nothing (more) arrived" assertion needs, not a fixed sleep.
    """
    sent = sim.stats.keepalives_sent
    await sim.wait_until(lambda: sim.stats.keepalive_acks > sent, timeout=HEAL_BOUND_S)


def _cfg(port: int, **kw: object) -> LlrpReaderConfig:
    base: dict[str, object] = {
        "id": "dock-1",
        "host": "127.0.0.1",
        "port": port,
        "antennas": [1, 2, 3, 4],
        "keepalive_s": KEEPALIVE_S,
        "connect_timeout_s": 5.0,
        "inventory_deadline_s": 15.0,
        "backoff": {"initial_s": 0.05, "max_s": BACKOFF_MAX_S},
        "gpi_ports": [1],
    }
    base.update(kw)
    return LlrpReaderConfig.model_validate(base)


@asynccontextmanager
async def running(
    reader: LlrpReader,
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(reader.run(), name="reader-under-test")
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@asynccontextmanager
async def sim_and_reader(
    personality: str = "impinj", n_tags: int = 0, **cfg_kw: object
) -> AsyncIterator[tuple[LlrpSimulator, LlrpReader, RecordingSink]]:
    async with LlrpSimulator(
        personality=personality, antennas=4, host="127.0.0.1", port=0, seed=3
    ) as sim:
        if n_tags:
            sim.add_random_tags(n=n_tags, antennas=[1, 2, 3, 4], seed=11)
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, **cfg_kw), sink)
        async with running(reader):
            yield sim, reader, sink


async def test_500_tags_over_4_antennas_all_reported_with_their_antenna() -> None:
    async with sim_and_reader(n_tags=500) as (sim, reader, sink):
        await reader.start_inventory()
        expected = {t.epc: t.antenna for t in sim.tags}
        assert len(expected) == 500
        await sink.until(lambda: sink.epcs() >= set(expected))
        seen_on: dict[str, set[int]] = {}
        for r in sink.reads:
            seen_on.setdefault(r.epc, set()).add(r.antenna)
            assert r.reader_id == "dock-1"
            assert r.peak_rssi_dbm is not None
            assert -100 < r.peak_rssi_dbm < 0
            assert r.seen_count >= 1
        assert set(seen_on) == set(expected)
        for epc, antenna in expected.items():
            assert seen_on[epc] == {antenna}, epc
        assert reader.health.state == ReaderState.INVENTORYING


async def test_zebra_personality_reads_too() -> None:
    async with sim_and_reader(personality="zebra", n_tags=20) as (sim, reader, sink):
        await reader.start_inventory()
        await sink.until(lambda: sink.epcs() >= {t.epc for t in sim.tags})


async def test_stop_and_start_inventory_on_command() -> None:
    async with sim_and_reader(n_tags=10) as (sim, reader, sink):
        await reader.start_inventory()
        await sink.until(lambda: len(sink.epcs()) == 10)
        await reader.stop_inventory()
        await sink.until(lambda: reader.health.state == ReaderState.ONLINE)
        # Reads buffered before the reader confirmed the stop may still arrive: once the driver
        # has answered a keepalive sent after the confirmation, they all have. After one more
        # keepalive period nothing more may, at the reader or in the sink.
        await keepalive_round_trip(sim)
        settled = len(sink.reads)
        reports = sim.stats.reports_sent
        await keepalive_round_trip(sim)
        assert len(sink.reads) == settled
        assert sim.stats.reports_sent == reports
        sim.add_tag(SimTag(epc="e2801160600002084a5f3c11", antenna=2, rssi_mean=-50.0))
        await reader.start_inventory()
        await sink.until(lambda: "e2801160600002084a5f3c11" in sink.epcs())
        assert reader.health.state == ReaderState.INVENTORYING


async def test_a_scan_that_follows_at_once_gets_the_old_report_before_it_starts() -> None:
    """A quick door cycle: the pass ends (stop) and the next begins (start) at once, and the
    shelf changed in between. The reader's end-of-ROSpec report, sent before it confirms the
    stop, holds what it read for the old pass, and reaches the sink after the stop. What the
    engine relies on to keep it out of the new pass (docs/domain.md, "Scan pass"): between the
    last of those reads and the new read cycle the driver says the reader is not inventorying
    (ONLINE), and it says INVENTORYING again only once the new cycle runs; every read after
    that is of the shelf as it is now."""
    async with sim_and_reader(n_tags=10) as (sim, reader, sink):
        timeline: list[ReaderState | str] = []
        deliver, report = sink.tag_reads, sink.reader_health

        async def reads(batch: Sequence[TagRead]) -> None:
            timeline.extend(r.epc for r in batch)
            await deliver(batch)

        async def health(h: ReaderHealth) -> None:
            timeline.append(h.state)
            await report(h)

        sink.tag_reads, sink.reader_health = reads, health  # type: ignore[method-assign]
        await reader.start_inventory()
        await sink.until(lambda: len(sink.epcs()) == 10)
        old = sink.epcs()
        mark = len(timeline)
        await reader.stop_inventory()
        for epc in old:  # everything leaves the shelf, a new tag arrives
            sim.remove_tag(epc)
        new = "e2801160600002084a5f3c12"
        sim.add_tag(SimTag(epc=new, antenna=1, rssi_mean=-50.0))
        await reader.start_inventory()
        await sink.until(lambda: new in timeline[mark:])
        after = timeline[mark:]
        assert ReaderState.ONLINE in after, after
        online = after.index(ReaderState.ONLINE)
        assert ReaderState.INVENTORYING in after[online:], after
        resumed = after.index(ReaderState.INVENTORYING, online)
        # The old cycle's last report came after the stop (the case is real)...
        assert old & set(after[:resumed]), after
        # ...every old read before the stop's ONLINE or in the pause, none once reading again.
        assert not old & set(after[resumed:]), after


async def test_a_stop_and_start_while_the_start_is_awaited_restart_the_reader_once_it_answers() -> (
    None
):
    """A stop then a start while the reader has not answered the first start (a reader shared
    between cabinets, restarted for a cabinet joining: drivers/shared.py). sllurp can stop only
    a reader that inventories, so the driver keeps the stop for the cycle that start begins:
    once the reader answers, it is stopped, and started again after the stop is confirmed. The
    old cycle's reads come while the driver says ONLINE; INVENTORYING comes only with the new
    cycle, in which the shelf is read as it is now."""
    async with sim_and_reader(n_tags=10) as (sim, reader, sink):
        await sink.until(lambda: reader.health.state == ReaderState.ONLINE)
        timeline: list[ReaderState | str] = []
        deliver, report = sink.tag_reads, sink.reader_health

        async def reads(batch: Sequence[TagRead]) -> None:
            timeline.extend(r.epc for r in batch)
            await deliver(batch)

        async def health(h: ReaderHealth) -> None:
            timeline.append(h.state)
            await report(h)

        sink.tag_reads, sink.reader_health = reads, health  # type: ignore[method-assign]
        sim.faults.hold_starts()
        enables = sim.received_counts.get("ENABLE_ROSPEC", 0)
        await reader.start_inventory()
        await sim.wait_until(
            lambda: sim.received_counts.get("ENABLE_ROSPEC", 0) > enables, HEAL_BOUND_S
        )
        await reader.stop_inventory()
        await reader.start_inventory()
        sim.faults.hold_stops()  # the old cycle reads on until the test has seen its reads
        sim.faults.release_starts()
        await sink.until(lambda: len(sink.epcs()) == 10)
        old = sink.epcs()
        for epc in old:  # everything leaves the shelf, a new tag arrives
            sim.remove_tag(epc)
        new = "e2801160600002084a5f3c12"
        sim.add_tag(SimTag(epc=new, antenna=1, rssi_mean=-50.0))
        await keepalive_round_trip(sim)  # the stop, written with the start's answer, arrived
        assert sim.received_counts.get("DISABLE_ROSPEC", 0) == 1
        assert ReaderState.INVENTORYING not in timeline, timeline
        sim.faults.release_stops()
        await sink.until(
            lambda: (
                ReaderState.INVENTORYING in timeline
                and new in timeline[timeline.index(ReaderState.INVENTORYING) :]
            )
        )
        resumed = timeline.index(ReaderState.INVENTORYING)
        assert old & set(timeline[:resumed]), timeline
        assert not old & set(timeline[resumed:]), timeline
        assert sim.received_counts.get("ENABLE_ROSPEC", 0) == enables + 2


async def test_online_without_inventory_reads_nothing() -> None:
    async with sim_and_reader(n_tags=5) as (sim, reader, sink):
        await sink.until(lambda: reader.health.state == ReaderState.ONLINE)
        await keepalive_round_trip(sim)
        assert sink.reads == []
        assert sim.stats.inventory_cycles == 0


async def test_gpi_change_becomes_an_edge_and_gpo_write_reaches_the_reader() -> None:
    async with sim_and_reader() as (sim, reader, sink):
        await sink.until(lambda: reader.health.healthy)
        sim.set_gpi(1, True)
        await sink.until(lambda: any(e.port == 1 and e.high for e in sink.gpi))
        sim.set_gpi(1, False)
        await sink.until(lambda: any(e.port == 1 and not e.high for e in sink.gpi))
        await reader.set_gpo(2, True)
        assert sim.gpo_state[2] is True
        await reader.set_gpo(2, False)
        assert sim.gpo_state[2] is False


async def test_set_gpo_while_offline_is_a_clear_error() -> None:
    sink = RecordingSink()
    reader = LlrpReader(_cfg(1), sink)
    with pytest.raises(Exception, match="not online"):
        await reader.set_gpo(1, True)


async def test_health_reports_connecting_online_and_session_number() -> None:
    async with sim_and_reader() as (_sim, reader, sink):
        await reader.start_inventory()
        await sink.until(lambda: reader.health.state == ReaderState.INVENTORYING)
        states = [h.state for h in sink.health]
        assert states[0] == ReaderState.CONNECTING
        assert ReaderState.INVENTORYING in states
        assert all(h.session == 1 for h in sink.health)


FAULTS: dict[str, Callable[[LlrpSimulator], object]] = {
    "silence": lambda sim: sim.faults.silence(),
    "drop_mid_frame": lambda sim: sim.faults.drop_mid_frame(),
    "garbage": lambda sim: sim.faults.garbage(),
    "reboot": lambda sim: sim.faults.reboot(1.0),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_every_fault_is_healed_and_reads_resume(fault: str) -> None:
    async with sim_and_reader(n_tags=8) as (sim, reader, sink):
        await reader.start_inventory()
        await sink.until(lambda: len(sink.epcs()) == 8)
        FAULTS[fault](sim)
        await sink.until(lambda: any(h.state == ReaderState.OFFLINE for h in sink.health))
        offline = next(h for h in sink.health if h.state == ReaderState.OFFLINE)
        assert offline.detail  # a reason for the technician
        # Recovery: a new session reaches inventorying and new reads arrive.
        await sink.until(
            lambda: reader.health.state == ReaderState.INVENTORYING and reader.health.session >= 2
        )
        assert reader.last_delay_s <= BACKOFF_MAX_S
        before = len(sink.reads)
        await sink.until(lambda: len(sink.reads) > before)


async def test_busy_reader_backs_off_longest_then_recovers() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sim.add_random_tags(n=3, antennas=[1], seed=1)
        sim.faults.busy_next_connect()
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: any(h.state == ReaderState.OFFLINE for h in sink.health))
            offline = next(h for h in sink.health if h.state == ReaderState.OFFLINE)
            assert "another client" in offline.detail
            assert BACKOFF_MAX_S / 2 <= reader.last_delay_s <= BACKOFF_MAX_S
            await sink.until(lambda: len(sink.epcs()) == 3)


async def test_trickled_bytes_still_configure_and_read() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sim.add_random_tags(n=4, antennas=[1, 2], seed=2)
        sim.faults.trickle(0.0005)
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, inventory_deadline_s=60.0), sink)
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: len(sink.epcs()) == 4, timeout=90)
            assert all(h.session == 1 for h in sink.health)


async def test_second_client_is_refused_and_first_keeps_reading() -> None:
    async with sim_and_reader(n_tags=4) as (sim, reader, sink):
        await reader.start_inventory()
        await sink.until(lambda: len(sink.epcs()) == 4)
        sink2 = RecordingSink()
        intruder = LlrpReader(_cfg(sim.port, id="dock-2"), sink2)
        async with running(intruder):
            await sink2.until(lambda: any(h.state == ReaderState.OFFLINE for h in sink2.health))
            assert "another client" in sink2.health[-1].detail
        before = len(sink.reads)
        await sink.until(lambda: len(sink.reads) > before)
        assert reader.health.session == 1, sink.health


async def test_unreachable_reader_reports_advice_and_keeps_trying() -> None:
    # A port nobody listens on: bind, note the port, close.
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    sink = RecordingSink()
    reader = LlrpReader(_cfg(port), sink)
    async with running(reader):
        await sink.until(lambda: sum(h.state == ReaderState.OFFLINE for h in sink.health) >= 2)
    detail = next(h.detail for h in sink.health if h.state == ReaderState.OFFLINE)
    assert "connection refused" in detail
    assert "powered" in detail


# -- hostile peers ---------------------------------------------------------------------------


def _header(msg_type: int, body: bytes, msg_id: int = 1) -> bytes:
    return struct.pack("!HII", (1 << 10) | msg_type, 10 + len(body), msg_id) + body


async def test_random_and_mutated_frames_never_crash_or_hang_the_driver() -> None:
    """A hostile server sends mutated frames; the driver must end each session and retry."""
    rng = random.Random(1234)
    from tests.conftest import CAPTURES

    seeds = [_header(61, p.read_bytes()) for p in sorted(CAPTURES.glob("ROAccessReport-*.bytes"))]
    seeds.append(_header(63, (CAPTURES / "ReaderEventNotification-000.bytes").read_bytes()))
    seeds.append(_header(11, (CAPTURES / "GetReaderCapabilitiesResponse-000.bytes").read_bytes()))
    connections = 0
    done = asyncio.Event()

    async def hostile(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            for _ in range(5):
                blob = bytearray(rng.choice(seeds))
                for _ in range(rng.randint(1, 6)):
                    blob[rng.randrange(len(blob))] = rng.randrange(256)
                if rng.random() < 0.3:
                    blob = bytearray(rng.randbytes(rng.randint(1, 64)))
                w.write(bytes(blob))
            await w.drain()
            await asyncio.sleep(0.05)
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
            if connections >= 40:
                done.set()

    srv = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    sink = RecordingSink()
    reader = LlrpReader(_cfg(port, backoff={"initial_s": 0.01, "max_s": 0.02}), sink)
    try:
        async with running(reader) as task:
            async with asyncio.timeout(60):
                await done.wait()
            assert not task.done(), "the driver task must survive every hostile session"
        assert reader.stats.sessions >= 40
        assert sum(reader.stats.errors.values()) >= 39
        assert sink.reads == [] or all(len(r.epc) > 0 for r in sink.reads)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_cancel_closes_the_socket_promptly() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        task = asyncio.create_task(reader.run())
        await sink.until(lambda: reader.health.healthy)
        task.cancel()
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert reader.health.state == ReaderState.STOPPED
        # The reader's CLOSE_CONNECTION_RESPONSE was read before the socket closed (closing at
        # once made the reader answer into a reset).
        assert reader.stats.closes_acknowledged == 1
        async with asyncio.timeout(5):
            while sim.connections.active:
                await asyncio.sleep(0.02)


async def test_current_gpi_level_is_reported_on_connect() -> None:
    """A door opened while the agent was away must be seen at (re)connect, not only on change."""
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sim.set_gpi(1, True)
        sim.set_gpi(2, True)  # not configured: must not be reported
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        async with running(reader):
            await sink.until(lambda: any(e.port == 1 for e in sink.gpi))
            assert [(e.port, e.high) for e in sink.gpi] == [(1, True)]
            assert reader.health.healthy


async def test_inventory_started_long_after_connecting_keeps_the_session() -> None:
    """The ready deadline restarts when inventory is requested (not only at connect)."""
    async with sim_and_reader(n_tags=3, connect_timeout_s=2.0, inventory_deadline_s=3.0) as (
        _sim,
        reader,
        sink,
    ):
        await sink.until(lambda: reader.health.state == ReaderState.ONLINE)
        await asyncio.sleep(4.0)  # idle for longer than the deadline
        await reader.start_inventory()
        await sink.until(lambda: len(sink.epcs()) == 3)
        assert reader.health.state == ReaderState.INVENTORYING
        assert all(h.state != ReaderState.OFFLINE for h in sink.health)
        assert reader.health.session == 1


async def test_absurd_timestamps_in_a_report_do_not_crash_the_driver() -> None:
    sink = RecordingSink()
    reader = LlrpReader(_cfg(1), sink)
    body = {
        "TagReportData": [
            {"EPC": b"3000abcdef00000000000003", "AntennaID": 1, "FirstSeenTimestampUTC": 2**63},
            {"EPC": b"3000abcdef00000000000004", "AntennaID": 2, "FirstSeenTimestampUTC": -5},
        ]
    }
    await reader._on_report(body)
    assert [r.epc for r in sink.reads] == ["3000abcdef00000000000003", "3000abcdef00000000000004"]
    assert all(r.first_seen.year >= 2026 for r in sink.reads)  # our clock, not the reader's
    assert not any(r.reader_clock for r in sink.reads)


async def test_a_plausible_first_seen_timestamp_is_the_readers_clock() -> None:
    sink = RecordingSink()
    reader = LlrpReader(_cfg(1), sink)
    at = datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
    body = {
        "TagReportData": [
            {
                "EPC": b"3000abcdef00000000000005",
                "AntennaID": 1,
                "FirstSeenTimestampUTC": int(at.timestamp()) * 1_000_000 + 250000,
            },
            {"EPC": b"3000abcdef00000000000006", "AntennaID": 1},
        ]
    }
    await reader._on_report(body)
    first, second = sink.reads
    assert (first.first_seen, first.reader_clock) == (at, True)
    assert not second.reader_clock  # no timestamp: our clock


async def test_a_reader_that_drops_every_session_is_reconnected_ever_more_slowly() -> None:
    """A reader that lets the driver configure and then drops it (failing hardware, a hostile
    peer) must not be reconnected at the shortest delay forever: the delay grows until a
    session stays up for ``backoff.stable_s``."""
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sim.faults.flap(0.5)
        sink = RecordingSink()
        backoff = Backoff(0.02, 0.4, rng=random.Random(5))
        reader = LlrpReader(
            _cfg(sim.port, backoff={"initial_s": 0.02, "max_s": 0.4, "stable_s": 30.0}),
            sink,
            backoff=backoff,
        )
        async with running(reader):
            # Every session got configured (healthy) before the reader dropped it.
            await sink.until(lambda: len({h.session for h in sink.health if h.healthy}) >= 6, 60.0)
            assert backoff.attempts >= 5, "the backoff started over on a configure"
            assert reader.retries >= 5


async def test_a_stable_session_starts_the_delays_over() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sim.faults.flap(1.0)
        sink = RecordingSink()
        backoff = Backoff(0.02, 0.4, rng=random.Random(5))
        reader = LlrpReader(
            _cfg(sim.port, backoff={"initial_s": 0.02, "max_s": 0.4, "stable_s": 0.3}),
            sink,
            backoff=backoff,
        )
        async with running(reader):
            await sink.until(lambda: len({h.session for h in sink.health if h.healthy}) >= 4, 60.0)
            # Each session stayed configured for longer than stable_s: never more than one step.
            assert backoff.attempts == 1
            assert reader.retries == 1


# -- the supervisor through a real reader ----------------------------------------------------


async def test_a_configuration_the_reader_cannot_do_fails_the_reader_for_good() -> None:
    """Eight antennas asked of a four-port reader: sllurp's capability check refuses it. No
    reconnect can change that, so the reader is reported FAILED once and never retried."""
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, antennas=list(range(1, 9))), sink)
        task = asyncio.create_task(reader.run(), name="reader-under-test")
        try:
            async with asyncio.timeout(HEAL_BOUND_S):
                await asyncio.wait([task])  # run() returns: the supervisor gave it up
        finally:
            task.cancel()
        assert task.exception() is None
        assert reader.health.state == ReaderState.FAILED
        assert "cannot do what its configuration asks" in reader.health.detail
        assert "available=1,2,3,4" in reader.health.detail
        assert [h.state for h in sink.health] == [ReaderState.CONNECTING, ReaderState.FAILED]
        assert reader.stats.sessions == 1
        assert reader.stats.errors == {"PermanentError": 1}
        assert len(sim.connections.established_at) == 1
        # The session was closed politely, and nothing came back to try again.
        await sim.wait_until(lambda: sim.connections.active == 0, timeout=HEAL_BOUND_S)


class _FakeClock:
    def __init__(self) -> None:
        self.mono = 500.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return self.mono


async def test_a_pending_connect_longer_than_the_watchdog_window_is_not_a_stall() -> None:
    """A connect bounded by connect_timeout_s = 60 s is waiting as designed, not stuck: the
    driver's progress stays current until its deadline (the daemon's window is 20 s)."""
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    # stays pending (nobody accepts, nothing refuses).
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname())
    try:
        clock = _FakeClock()
        sink = RecordingSink()
        reader = LlrpReader(
            _cfg(srv.getsockname()[1], connect_timeout_s=60.0, inventory_deadline_s=90.0),
            sink,
            clock=clock,
        )
        async with running(reader):
            await sink.until(lambda: reader.health.state == ReaderState.CONNECTING)
            started = clock.mono
            clock.mono = started + 30.0
            assert reader.last_progress == clock.mono
            clock.mono = started + 60.0 + WAIT_GRACE_S + 1.0
            assert reader.last_progress == started  # past its own bound: that would be stuck
            assert reader.health.state == ReaderState.CONNECTING
    finally:
        filler.close()
        srv.close()


class GatedSink(RecordingSink):
    """Blocks the driver in its first delivery after ``close()`` until ``open()``; notes the
    driver's "heard" stamp at every delivery."""

    def __init__(self) -> None:
        super().__init__()
        self.reader: LlrpReader | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.blocked = asyncio.Event()
        self.stamps: list[float] = []  # reader.last_frame as each delivery began

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        assert self.reader is not None
        self.stamps.append(self.reader.last_frame)
        if not self.gate.is_set():
            self.blocked.set()
            async with asyncio.timeout(HEAL_BOUND_S):
                await self.gate.wait()
        await super().tag_reads(reads)


async def test_heard_is_stamped_only_once_a_backlog_larger_than_a_read_is_delivered() -> None:
    """The liveness barrier takes "heard at T" to mean "every read received before T is
    delivered". A backlog of reports larger than one 64 KiB read (a stalled consumer, here a
    sink that blocks) must not be stamped as heard after its first chunk."""
    async with LlrpSimulator(
        personality="impinj", antennas=4, host="127.0.0.1", port=0, seed=3
    ) as sim:
        sim.add_random_tags(n=300, antennas=[1, 2, 3, 4], seed=11)
        sink = GatedSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        sink.reader = reader
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: len(sink.reads) > 0)
            sink.gate.clear()
            async with asyncio.timeout(HEAL_BOUND_S):
                await sink.blocked.wait()
            # A backlog of more than one read (64 KiB) but less than the stream's pause
            # threshold (128 KiB: beyond it the rest waits in the kernel) reaches the driver.
            sent = sim.stats.bytes_out
            await sim.wait_until(lambda: sim.stats.bytes_out - sent >= 80 * 1024)
            sim.faults.silence()
            # Everything written reaches the driver's socket buffer (same loop, loopback).
            await asyncio.sleep(0.2)
            received_by = reader._clock.monotonic()
            first = len(sink.stamps)
            sink.gate.set()
            # Silenced: only the backlog can stamp the reader heard after received_by.
            async with asyncio.timeout(KEEPALIVE_S * 2):
                while reader.last_frame <= received_by:
                    await asyncio.sleep(0.01)
            assert len(sink.stamps) > first + 1, "the backlog was not larger than one report"
            late = [s for s in sink.stamps[first:] if s > received_by]
            assert not late, f"{len(late)} deliveries of the backlog came after the stamp"


async def test_a_stream_whose_reads_all_end_mid_frame_still_stamps_the_reader_heard() -> None:
    """On a real network a busy report stream seldom ends a TCP segment on an LLRP frame
    boundary. With every read ending mid-frame (the simulator writes each frame's first half
    with the previous frame's second half) the reader must still be stamped heard — a frame
    later than it arrived, never before its reads reached the sink — or every scan pass would
    end incomplete ("silent") while the reader streams."""
    async with LlrpSimulator(
        personality="impinj", antennas=4, host="127.0.0.1", port=0, seed=5
    ) as sim:
        sim.add_random_tags(n=40, antennas=[1, 2, 3, 4], seed=13)
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: len(sink.reads) > 0)
            sim.faults.straddle()
            # Frames the simulator sends from here on arrive split across reads.
            await sim.wait_until(lambda: sim.stats.frames_out > 0)
            sent = sim.stats.frames_out
            await sim.wait_until(lambda: sim.stats.frames_out >= sent + 3)
            since = reader._clock.monotonic()
            before = len(sink.reads)
            async with asyncio.timeout(HEAL_BOUND_S):
                while reader.last_frame <= since:
                    await asyncio.sleep(0.01)
            assert len(sink.reads) > before, "the straddled stream delivered no reads"
            assert reader.health.state is ReaderState.INVENTORYING
