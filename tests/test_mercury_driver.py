"""Mercury driver ⇄ simulator over a real pseudo-terminal and real TCP, with every fault."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC
from typing import Any

import pytest
import pytest_asyncio

from drivers.errors import PermanentError, TransientError
from drivers.mercury.config import MercuryReaderConfig
from drivers.mercury.reader import MercuryReader
from drivers.registry import make_reader
from drivers.types import (
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    ReaderState,
    SystemClock,
    TagRead,
)
from simulators.mercury import MercurySimulator

WAIT_S = 30.0  # generous: the box is shared and loaded; waits end on events, not on time


@pytest_asyncio.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    """serialio opens, writes and closes through asyncio.to_thread: join those threads
    before the thread-leak guard looks (pytest-asyncio closes the loop after it)."""
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


class RecordingSink:
    """Keeps everything the driver delivers; ``wait_for`` waits (bounded) for a condition."""

    def __init__(self) -> None:
        self.reads: list[TagRead] = []
        self.health: list[ReaderHealth] = []
        self._changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        self.reads.extend(reads)
        self._changed.set()

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.append(health)
        self._changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = WAIT_S) -> None:
        async with asyncio.timeout(within_s):
            while True:
                self._changed.clear()
                if predicate():
                    return
                await self._changed.wait()

    def states_since(self, index: int) -> list[ReaderState]:
        return [h.state for h in self.health[index:]]


def make_cfg(sim: MercurySimulator, **overrides: Any) -> MercuryReaderConfig:
    values: dict[str, Any] = {
        "id": "m1",
        "url": sim.url,
        "antennas": list(range(1, sim.antenna_count + 1)),
        "read_power_dbm": 25.0,
        "command_timeout_s": 3.0,
        "keepalive_s": 0.3,
        "watchdog_s": 4.0,
        "backoff": {"initial_s": 0.05, "max_s": 0.3},
    }
    values.update(overrides)
    return MercuryReaderConfig(**values)


@contextlib.asynccontextmanager
async def running(
    sim: MercurySimulator, **overrides: Any
) -> AsyncIterator[tuple[MercuryReader, RecordingSink]]:
    sink = RecordingSink()
    driver = MercuryReader(make_cfg(sim, **overrides), sink)
    task = asyncio.create_task(driver.run(), name="test-mercury-driver")
    try:
        yield driver, sink
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert driver.health.state == ReaderState.STOPPED


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_fds_back_to(before: int) -> None:
    """Closed transports release their fd on a later loop turn (or at collection): poll."""
    for _ in range(100):
        gc.collect()
        if fd_count() <= before:
            return
        await asyncio.sleep(0.02)
    assert fd_count() <= before, "file descriptors leaked"


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_every_placed_tag_is_reported_with_its_antenna(transport: str) -> None:
    async with MercurySimulator(transport, antennas=4, seed=7) as sim:  # type: ignore[arg-type]
        tags = sim.add_random_tags(12)
        want = {t.epc.hex(): t.antenna for t in tags}
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: want.keys() <= {r.epc for r in sink.reads})
            for read in sink.reads:
                assert read.reader_id == "m1"
                assert read.antenna == want[read.epc]
                assert read.peak_rssi_dbm is not None
                assert -128 <= read.peak_rssi_dbm < 0
                assert read.first_seen.tzinfo == UTC
                assert read.seen_count >= 1
            assert sink.states_since(0)[:3] == [
                ReaderState.CONNECTING,
                ReaderState.ONLINE,
                ReaderState.INVENTORYING,
            ]
            assert {h.session for h in sink.health} == {1}
            # the module came up in its bootloader and was configured as asked
            assert sim.commands[0x04] == 1
            assert sim.region == 0x0D
            assert sim.search_list == [1, 2, 3, 4]
            assert sim.read_power_centi == 2500
            assert driver.link_stats.bad_crc == 0
            assert driver.epc_crc_mismatches == 0
        if transport == "pty":
            assert sim.pty_slave is not None
            assert sim.pty_slave.startswith("/dev/pts/")


def test_driver_fulfils_the_protocol_and_is_registered() -> None:
    cfg = MercuryReaderConfig(id="m1", url="socket://127.0.0.1:9")
    driver = make_reader(cfg, RecordingSink(), SystemClock())
    assert isinstance(driver, MercuryReader)
    assert isinstance(driver, ReaderDriver)
    assert driver.reader_id == "m1"
    assert driver.health.state == ReaderState.OFFLINE  # not started: like LLRP


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_unplugged_module_is_retried_until_it_returns(transport: str) -> None:
    fds_before = fd_count()
    async with MercurySimulator(transport, antennas=2, seed=3) as sim:  # type: ignore[arg-type]
        sim.add_random_tags(4)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 10)
            mark = len(sink.health)
            sim.faults.unplug(1.0)
            await sink.wait_for(lambda: ReaderState.OFFLINE in sink.states_since(mark))
            assert sink.health[-1].antennas_connected is None
            await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)
            assert driver.health.session > 1
            reads_back = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= reads_back + 10)
            assert sim.connections >= 2
    await assert_fds_back_to(fds_before)


async def test_silent_module_trips_the_watchdog_then_recovers() -> None:
    async with MercurySimulator("pty", antennas=1, seed=5) as sim:
        sim.add_random_tags(3)
        async with running(sim, watchdog_s=1.0, command_timeout_s=1.0, cycle_timeout_ms=250) as (
            driver,
            sink,
        ):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 5)
            mark = len(sink.health)
            sim.faults.silence(2.5)
            await sink.wait_for(
                lambda: any(
                    h.state == ReaderState.OFFLINE and "no data" in h.detail
                    for h in sink.health[mark:]
                )
            )
            await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)
            back = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= back + 5)


async def test_silence_while_idle_is_noticed_by_the_keepalive_poll() -> None:
    async with (
        MercurySimulator("tcp", antennas=1, seed=5) as sim,
        running(sim, command_timeout_s=1.0, cycle_timeout_ms=250) as (driver, sink),
    ):
        await sink.wait_for(lambda: driver.health.state == ReaderState.ONLINE)
        mark = len(sink.health)
        sim.faults.silence(2.0)
        await sink.wait_for(
            lambda: any(
                h.state == ReaderState.OFFLINE and "no answer" in h.detail
                for h in sink.health[mark:]
            )
        )
        await sink.wait_for(lambda: driver.health.state == ReaderState.ONLINE)
        assert driver.health.session > 1


async def test_sustained_garbage_ends_the_session_then_recovers() -> None:
    async with MercurySimulator("tcp", antennas=2, seed=11) as sim:
        sim.add_random_tags(4)
        async with running(sim, watchdog_s=1.0, command_timeout_s=1.0, cycle_timeout_ms=250) as (
            driver,
            sink,
        ):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 5)
            mark = len(sink.health)
            sim.faults.garbage(64, seconds=2.0)
            await sink.wait_for(lambda: ReaderState.OFFLINE in sink.states_since(mark))
            await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)
            back = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= back + 5)
            stats = driver.link_stats
            assert stats.dropped_bytes > 0


async def test_garbage_burst_is_absorbed_by_resync() -> None:
    async with MercurySimulator("pty", antennas=2, seed=13) as sim:
        tags = sim.add_random_tags(4)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 5)
            mark = len(sink.health)
            for _ in range(5):
                sim.faults.garbage(300)
            before = len(sink.reads)
            await sink.wait_for(
                lambda: {t.epc.hex() for t in tags} <= {r.epc for r in sink.reads[before:]}
            )
            assert driver.link_stats.dropped_bytes > 0
            # a burst costs a record or two, never the session
            assert ReaderState.OFFLINE not in sink.states_since(mark)
            assert driver.health.session == 1


async def test_trickled_bytes_still_decode() -> None:
    async with MercurySimulator("tcp", antennas=1, seed=17) as sim:
        sim.add_random_tags(2)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 3)
            mark = len(sink.health)
            sim.faults.trickle(0.0005)
            during = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= during + 5)
            assert sim.faults.trickling  # those reads arrived one byte at a time
            sim.faults.clear()
            after = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= after + 5)
            assert ReaderState.OFFLINE not in sink.states_since(mark)


async def test_stop_and_start_inventory_on_command() -> None:
    async with MercurySimulator("tcp", antennas=2, seed=19) as sim:
        sim.add_random_tags(4)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 5)
            mark = len(sink.health)
            await driver.stop_inventory()
            await sink.wait_for(lambda: ReaderState.ONLINE in sink.states_since(mark))
            assert not sim.reading
            stopped_at = len(sink.reads)
            polls = sim.commands[0x03]
            # two keepalive polls answered: the link is alive and time has passed
            await sim.wait_until(lambda: sim.commands[0x03] >= polls + 2, WAIT_S)
            assert len(sink.reads) == stopped_at
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= stopped_at + 5)
            assert driver.health.state == ReaderState.INVENTORYING
            assert driver.health.session == 1


async def test_a_scan_that_follows_at_once_never_gets_the_last_ones_records() -> None:
    """A quick door cycle: the pass ends (stop) and the next begins (start) at once. What the
    module still streams until it confirms the stop was read for the old pass: it is dropped,
    and the new pass's reads come from a fresh read cycle only."""
    async with MercurySimulator("tcp", antennas=1, seed=23) as sim:
        sim.add_tag("e2801160600002000000c001", 1, read_probability=1.0)
        async with running(sim) as (driver, sink):
            timeline: list[str] = []
            deliver, report = sink.tag_reads, sink.reader_health

            async def reads(batch: Sequence[TagRead]) -> None:
                timeline.append("reads")
                await deliver(batch)

            async def health(h: ReaderHealth) -> None:
                timeline.append(h.state.value)
                await report(h)

            sink.tag_reads, sink.reader_health = reads, health  # type: ignore[method-assign]
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) >= 3)
            started = sim.commands[0x2F]
            mark = len(timeline)
            await driver.stop_inventory()
            await driver.start_inventory()
            await sink.wait_for(
                lambda: (
                    "online" in timeline[mark:]
                    and "inventorying" in timeline[timeline.index("online", mark) :]
                )
            )
            await sink.wait_for(lambda: "reads" in timeline[timeline.index("online", mark) :])
            after = timeline[mark:]
            # The module was really stopped and started again (stop and start tag ops)...
            assert sim.commands[0x2F] >= started + 2
            # ...its last cycle's records arrived and were dropped...
            assert driver.drained_records >= 1
            # ...and no read reached the sink between the stop and its confirmation.
            assert "reads" not in after[: after.index("online")], after
            assert driver.health.state == ReaderState.INVENTORYING


async def test_tags_moved_and_removed_while_reading() -> None:
    async with MercurySimulator("tcp", antennas=4, seed=23) as sim:
        a = sim.add_tag("e280689400005000000000aa", 1, read_probability=1.0)
        b = sim.add_tag("e280689400005000000000bb", 2, read_probability=1.0)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: {a.epc.hex(), b.epc.hex()} <= {r.epc for r in sink.reads})
            sim.move_tag(a.epc, 3)
            sim.remove_tag(b.epc)
            mark = len(sink.reads)
            await sink.wait_for(
                lambda: any(r.epc == a.epc.hex() and r.antenna == 3 for r in sink.reads[mark:])
            )
            settled = len(sink.reads)
            await sink.wait_for(lambda: len(sink.reads) >= settled + 10)
            assert all(r.epc == a.epc.hex() for r in sink.reads[settled:])
            assert all(r.antenna == 3 for r in sink.reads[settled:])


async def test_set_gpo_drives_the_module_gpio() -> None:
    async with MercurySimulator("tcp", antennas=1, seed=29) as sim:
        sink = RecordingSink()
        driver = MercuryReader(make_cfg(sim), sink)
        with pytest.raises(TransientError, match="not online"):
            await driver.set_gpo(1, True)
        task = asyncio.create_task(driver.run(), name="test-mercury-gpo")
        try:
            await sink.wait_for(lambda: driver.health.state == ReaderState.ONLINE)
            await driver.set_gpo(2, True)
            assert sim.gpio[2] is True
            await driver.set_gpo(2, False)
            assert sim.gpio[2] is False
            with pytest.raises(PermanentError, match=r"GPIO 1\.\.4"):
                await driver.set_gpo(7, True)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_module_refusing_a_setting_is_reported_failed_and_not_retried() -> None:
    """A permanent error (the module refuses the configured power) stops the reader: reported
    FAILED with the module's reason once, never retried (a reconnect cannot change it)."""
    async with MercurySimulator("tcp", model="nano", seed=31) as sim:
        sink = RecordingSink()
        driver = MercuryReader(make_cfg(sim, read_power_dbm=30.0), sink)
        task = asyncio.create_task(driver.run(), name="test-mercury-driver")
        try:
            async with asyncio.timeout(WAIT_S):
                await asyncio.wait([task])  # run() returns: the supervisor gave the reader up
        finally:
            task.cancel()
        assert task.exception() is None
        assert driver.health.state == ReaderState.FAILED
        assert "power above the module maximum" in driver.health.detail
        failed = [h for h in sink.health if h.state == ReaderState.FAILED]
        assert len(failed) == 1
        assert failed[0] is driver.health
        assert ReaderState.ONLINE not in sink.states_since(0)
        assert ReaderState.OFFLINE not in sink.states_since(0)
        assert {h.session for h in sink.health} == {1}
        assert sim.commands[0x92] == 1  # the refused SET_READ_TX_POWER was sent once
        assert driver.version is not None
        assert driver.version.model == "M6e Nano"


async def test_antennas_connected_reported_when_the_module_detects_them() -> None:
    async with MercurySimulator("pty", antennas=4, seed=37) as sim:
        sim.antennas_present = {1, 3}
        async with running(sim, detect_antennas=True) as (driver, sink):
            await sink.wait_for(lambda: driver.health.state == ReaderState.ONLINE)
            assert driver.health.antennas_connected == frozenset({1, 3})


async def test_cancel_while_the_device_is_missing_leaks_nothing() -> None:
    fds_before = fd_count()
    async with MercurySimulator("pty", antennas=1) as sim:
        sim.faults.unplug(30.0)
        await sim.wait_until(lambda: sim.unplugged, WAIT_S)
        async with running(sim) as (driver, sink):
            await sink.wait_for(
                lambda: sum(h.state == ReaderState.OFFLINE for h in sink.health) >= 2
            )
            assert "cannot open" in sink.health[-1].detail
        assert driver.health.state == ReaderState.STOPPED
    await assert_fds_back_to(fds_before)


@pytest.mark.soak
@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_random_faults_soak(transport: str) -> None:
    """Forty random faults in a row; after each one ends, every tag is read again."""
    async with MercurySimulator(transport, antennas=4, seed=43) as sim:  # type: ignore[arg-type]
        want = {t.epc.hex() for t in sim.add_random_tags(16)}
        rng = random.Random(43)
        async with running(sim, watchdog_s=1.0, command_timeout_s=1.0, cycle_timeout_ms=250) as (
            driver,
            sink,
        ):
            await driver.start_inventory()
            for _ in range(40):
                fault = rng.choice(["garbage", "garbage_long", "silence", "unplug", "trickle"])
                if fault == "garbage":
                    sim.faults.garbage(rng.randrange(1, 500))
                elif fault == "garbage_long":
                    sim.faults.garbage(64, seconds=rng.uniform(0.2, 2.0))
                elif fault == "silence":
                    sim.faults.silence(rng.uniform(0.2, 2.0))
                elif fault == "unplug":
                    sim.faults.unplug(rng.uniform(0.2, 2.0))
                else:
                    sim.faults.trickle(0.0005, seconds=rng.uniform(0.2, 1.0))
                await sim.wait_until(
                    lambda: (
                        not (
                            sim.unplugged
                            or sim.faults.silent
                            or sim.faults.garbling
                            or sim.faults.trickling
                        )
                    ),
                    120.0,
                )
                mark = len(sink.reads)
                await sink.wait_for(
                    lambda mark=mark: want <= {r.epc for r in sink.reads[mark:]}, 120.0
                )
                await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)


async def test_a_module_that_drops_every_session_is_reopened_ever_more_slowly() -> None:
    """Unplugged again each time it came online: the delay grows (no reset on configure)."""
    backoff = {"initial_s": 0.02, "max_s": 0.3, "stable_s": 30.0}
    async with (
        MercurySimulator("tcp", antennas=1, seed=7) as sim,
        running(sim, backoff=backoff) as (driver, sink),
    ):
        for session in range(1, 7):
            await sink.wait_for(lambda s=session: _online_in(sink, s))
            sim.faults.unplug(0.05)
        await sink.wait_for(lambda: sum(h.state == ReaderState.OFFLINE for h in sink.health) >= 6)
        assert driver._backoff.attempts >= 6, "the backoff started over on a configure"
        assert driver.retries >= 6


async def test_a_stable_module_session_starts_the_delays_over() -> None:
    backoff = {"initial_s": 0.02, "max_s": 0.3, "stable_s": 0.2}
    async with (
        MercurySimulator("tcp", antennas=1, seed=7) as sim,
        running(sim, backoff=backoff) as (driver, sink),
    ):
        for session in range(1, 4):
            await sink.wait_for(lambda s=session: _online_in(sink, s))
            await asyncio.sleep(0.4)  # online for longer than stable_s
            sim.faults.unplug(0.05)
        await sink.wait_for(lambda: _online_in(sink, 4))
        assert driver._backoff.attempts == 1
        assert driver.retries == 1


def _online_in(sink: RecordingSink, session: int) -> bool:
    return any(h.session == session and h.healthy for h in sink.health)


@pytest.mark.parametrize(
    ("model", "setting", "detects"),
    [
        ("m6e", None, True),  # by default wherever the module can tell ...
        ("micro", None, True),
        ("nano", None, False),  # ... never on a Nano, which would say "not detected" forever
        ("m6e", False, False),  # antennas without a DC path: switched off by configuration
        ("nano", True, True),  # forced on: its answer is believed (every port lost)
    ],
)
async def test_antenna_detection_follows_the_module_model(
    model: str, setting: bool | None, detects: bool
) -> None:
    async with MercurySimulator("tcp", model=model, seed=41) as sim:  # type: ignore[arg-type]
        ports = list(range(1, sim.antenna_count + 1))
        async with running(sim, antennas=ports, detect_antennas=setting) as (driver, sink):
            await sink.wait_for(lambda: driver.health.state == ReaderState.ONLINE)
            connected = driver.health.antennas_connected
            if not detects:
                assert connected is None
                assert sim.commands[0x61] == 0, "the agent asked a module that cannot tell"
            elif model == "nano":
                assert connected == frozenset()
            else:
                assert connected == frozenset(ports)


async def test_an_antenna_pulled_while_connected_is_noticed() -> None:
    async with (
        MercurySimulator("tcp", model="m6e", antennas=4, seed=43) as sim,
        running(sim, antennas=[1, 2, 3, 4]) as (driver, sink),
    ):
        await sink.wait_for(lambda: driver.health.antennas_connected == frozenset({1, 2, 3, 4}))
        sim.set_antenna_connected(3, False)  # idle: the keepalive poll sees it
        await sink.wait_for(lambda: driver.health.antennas_connected == frozenset({1, 2, 4}))
        assert driver.health.state == ReaderState.ONLINE
        sim.set_antenna_connected(3, True)
        await sink.wait_for(lambda: driver.health.antennas_connected == frozenset({1, 2, 3, 4}))
        # Pulled again, with a scan about to start: it is looked at before streaming.
        sim.set_antenna_connected(2, False)
        await driver.start_inventory()
        await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)
        assert driver.health.antennas_connected == frozenset({1, 3, 4})
        assert driver.health.session == 1


class GatedSink(RecordingSink):
    """Blocks the driver in its first delivery after ``gate.clear()`` until ``gate.set()``;
    notes the driver's "heard" stamp as each delivery begins."""

    def __init__(self) -> None:
        super().__init__()
        self.driver: MercuryReader | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.blocked = asyncio.Event()
        self.stamps: list[float] = []

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        assert self.driver is not None
        self.stamps.append(self.driver.last_frame)
        if not self.gate.is_set():
            self.blocked.set()
            async with asyncio.timeout(WAIT_S):
                await self.gate.wait()
        await super().tag_reads(reads)


async def test_heard_is_stamped_only_once_a_backlog_is_delivered() -> None:
    """The liveness barrier takes "heard at T" to mean "every read received before T is
    delivered". Chunks that arrived while the driver was busy delivering (a stalled consumer,
    here a sink that blocks) must not count as heard once the first of them is handled."""
    async with MercurySimulator("pty", antennas=1, seed=29) as sim:
        sim.add_random_tags(20)
        sink = GatedSink()
        driver = MercuryReader(make_cfg(sim), sink)
        sink.driver = driver
        task = asyncio.create_task(driver.run(), name="test-mercury-driver")
        try:
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) > 0)
            sink.gate.clear()
            async with asyncio.timeout(WAIT_S):
                await sink.blocked.wait()
            # Several of the module's writes (one per search cycle) queue up behind the block.
            sent = sim.records_sent
            await sim.wait_until(lambda: sim.records_sent - sent >= 80, within_s=WAIT_S)
            sim.faults.silence(1.0)
            # Everything written reaches the driver's connection (same loop, a pty).
            await asyncio.sleep(0.2)
            received_by = driver._clock.monotonic()
            first = len(sink.stamps)
            sink.gate.set()
            # Silenced: only the backlog, then the module's next writes, can stamp it heard.
            async with asyncio.timeout(WAIT_S):
                while driver.last_frame <= received_by:
                    await asyncio.sleep(0.01)
            assert len(sink.stamps) > first + 1, "the backlog was not larger than one chunk"
            late = [s for s in sink.stamps[first:] if s > received_by]
            assert not late, f"{len(late)} deliveries of the backlog came after the stamp"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_heard_is_stamped_while_every_read_ends_mid_frame() -> None:
    """A serial line read as its bytes arrive seldom ends a read on a frame boundary: a frame
    split across reads delays the "heard" stamp by that frame, never withholds it (here every
    write of the module ends one byte short of a frame). Stamped only when a read ends on a
    boundary, the reader went unstamped for seconds while it streamed."""
    async with MercurySimulator("pty", antennas=1, seed=31) as sim:
        sim.add_random_tags(5)
        sink = GatedSink()
        driver = MercuryReader(make_cfg(sim), sink)
        sink.driver = driver
        task = asyncio.create_task(driver.run(), name="test-mercury-driver")
        try:
            await driver.start_inventory()
            await sink.wait_for(lambda: len(sink.reads) > 0)
            session = driver.health.session
            sim.faults.straddle_writes()
            # Every write from now on ends mid-frame (the one before it may not have).
            sent = sim.records_sent
            await sim.wait_until(lambda: sim.records_sent > sent, within_s=WAIT_S)
            first = len(sink.stamps)
            await sink.wait_for(lambda: len(sink.stamps) >= first + 20)
            # Each delivery sees the stamp of the reads before it: it moves on nearly each time.
            moved = len(set(sink.stamps[first : first + 20]))
            assert moved >= 10, f"the stamp moved {moved - 1} times in 20 deliveries"
            assert (driver.health.state, driver.health.session) == (
                ReaderState.INVENTORYING,
                session,
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
