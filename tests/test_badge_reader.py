"""Badge driver against the badge simulator over a real pty and real TCP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from agent.config import ConfigError, load_config, parse_config
from agent.privacy.pseudonym import (
    P2_DEFAULT,
    BadgePseudonyms,
    Pseudonymizer,
    SiteKey,
    is_pseudonym,
)
from drivers.backoff import Backoff
from drivers.badge.config import BadgeReaderConfig
from drivers.badge.reader import BadgeReader, BadgeSink
from drivers.types import BadgeRead, ReaderHealth, ReaderState
from simulators.badge import BadgeSimulator
from tests.pii import assert_no_raw_ids

TIMEOUT_S = 15.0
ROOT = Path(__file__).resolve().parent.parent
SITE_KEY = SiteKey("k1", bytes(range(32)), P2_DEFAULT)
# What the reads must carry, computed here on the test's thread.
PSEUDONYMIZER = Pseudonymizer.from_site_key("site-test", SITE_KEY)


class CountingPseudonyms:
    """The agent's pseudonymizer (p2, derived in a worker thread), counting its derivations."""

    def __init__(self) -> None:
        self.ring = BadgePseudonyms("site-test", SITE_KEY)
        self.calls = 0

    async def __call__(self, raw_id: str) -> str:
        self.calls += 1
        return await self.ring.badge(raw_id)


TRANSPORTS = ["pty", "tcp"]


@pytest_asyncio.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    """serialio opens and closes ports via asyncio.to_thread; join those threads here.

    pytest-asyncio closes the loop only after the thread-leak guard has looked.
    """
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


class FakeClock:
    """Monotonic time moves only when the test says so."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self._epoch = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._epoch + timedelta(seconds=self.mono)

    def monotonic(self) -> float:
        return self.mono


class RecordingSink:
    def __init__(self) -> None:
        self.reads: list[BadgeRead] = []
        self.health: list[ReaderHealth] = []
        self._changed = asyncio.Event()

    async def badge_read(self, read: BadgeRead) -> None:
        self.reads.append(read)
        self._changed.set()

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        self.health.append(health)
        self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_online(self, session: int) -> None:
        await self.wait(
            lambda: any(h.state == ReaderState.ONLINE and h.session == session for h in self.health)
        )


async def eventually(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    """Poll a condition that has no event of its own (driver counters), bounded."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # counters have no event to await: bounded poll
            await asyncio.sleep(0.01)


@dataclass
class Rig:
    sim: BadgeSimulator
    reader: BadgeReader
    sink: RecordingSink
    clock: FakeClock
    derivations: CountingPseudonyms


@asynccontextmanager
async def rig(
    transport: str,
    protocol: str = "em4100",
    pseudonymize: Callable[[str], Awaitable[str]] | None = None,
    **cfg: object,
) -> AsyncIterator[Rig]:
    counting = CountingPseudonyms()
    sim = BadgeSimulator(transport=transport, protocol=protocol, seed=7)  # type: ignore[arg-type]
    async with sim:
        config = BadgeReaderConfig.model_validate(
            {"id": "badge-1", "url": sim.url, "protocol": protocol, **cfg}
        )
        sink = RecordingSink()
        clock = FakeClock()
        reader = BadgeReader(
            config,
            sink,
            pseudonymize or counting,
            clock=clock,
            backoff=Backoff(initial_s=0.05, max_s=0.2, floor_s=0.02),
        )
        task = asyncio.create_task(reader.run(), name="badge-reader-under-test")
        try:
            await sink.wait_online(session=1)
            await sim.wait_for_client()
            yield Rig(sim, reader, sink, clock, counting)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert reader.health.state == ReaderState.STOPPED


async def present_and_wait(r: Rig, card: str, **kw: float) -> int:
    """Present a card and wait until the driver has handled every frame sent (delivered it,
    dropped it as a repeat, or failed to pseudonymize it)."""

    def handled() -> int:
        st = r.reader.stats
        return st.reads + st.repeats_suppressed + st.pseudonymizer_failures

    before = handled()
    sent = await r.sim.present(card, **kw)
    await eventually(lambda: handled() >= before + sent)
    return sent


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_held_card_yields_one_read_per_interval(transport: str) -> None:
    async with rig(transport, repeat_interval_s=2.0) as r:
        sent = await present_and_wait(r, "0A1B2C3D4E", hold_s=0.3, repeat_every_s=0.03)
        assert sent > 1
        assert len(r.sink.reads) == 1
        assert r.reader.stats.repeats_suppressed == sent - 1
        # Repeats are recognised before the (memory-hard) derivation: one per read.
        assert r.derivations.calls == 1

        # Still held, half an interval later: still one read.
        r.clock.mono += 1.0
        await present_and_wait(r, "0A1B2C3D4E", hold_s=0.1, repeat_every_s=0.03)
        assert len(r.sink.reads) == 1

        # A full interval after the read: exactly one more.
        r.clock.mono += 1.0
        await present_and_wait(r, "0A1B2C3D4E", hold_s=0.2, repeat_every_s=0.03)
        assert len(r.sink.reads) == 2

        # Another card is read at once, interval or not.
        await present_and_wait(r, "00000000FF")
        assert len(r.sink.reads) == 3
        assert r.derivations.calls == 3

        first, second, other = r.sink.reads
        assert first.pseudonym == second.pseudonym == PSEUDONYMIZER.badge("0A1B2C3D4E")
        assert other.pseudonym == PSEUDONYMIZER.badge("00000000FF")
        assert all(is_pseudonym(x.pseudonym) and x.reader_id == "badge-1" for x in r.sink.reads)
        assert second.at - first.at == timedelta(seconds=2)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ascii_lines_reader(transport: str) -> None:
    async with rig(transport, protocol="ascii-lines", repeat_interval_s=0) as r:
        await r.sim.send_garbage(30, end_line=True)
        await present_and_wait(r, "12ab34cd")
        await present_and_wait(r, "12AB34CD")
        await eventually(lambda: r.reader.stats.rejected_lines >= 1)
        # repeat_interval_s = 0: every line is a read; case does not change the pseudonym
        assert [x.pseudonym for x in r.sink.reads] == [PSEUDONYMIZER.badge("12AB34CD")] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_checksums_ignored_garbage_resynced_split_frames(transport: str) -> None:
    async with rig(transport, repeat_interval_s=0) as r:
        r.sim.faults.bad_checksum = True
        for _ in range(3):
            await r.sim.send_frame("1122334455")
        await eventually(lambda: r.reader.stats.bad_checksums == 3)
        assert r.sink.reads == []

        r.sim.faults.bad_checksum = False
        r.sim.faults.garbage_before = 20
        r.sim.faults.split = True
        await r.sim.send_frame("1122334455")
        await r.sink.wait(lambda: len(r.sink.reads) == 1)
        stats = r.reader.stats
        assert stats.frames == 1
        assert stats.dropped_bytes == 3 * 14 + 20
        assert r.sink.reads[0].pseudonym == PSEUDONYMIZER.badge("1122334455")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unplug_goes_offline_then_recovers(transport: str) -> None:
    async with rig(transport, repeat_interval_s=0) as r:
        await r.sim.unplug()
        await r.sink.wait(lambda: r.sink.health[-1].state == ReaderState.OFFLINE)
        assert not r.reader.health.healthy
        assert r.sink.health[-1].detail  # a reason is given

        await r.sim.replug()
        await r.sink.wait_online(session=2)
        await r.sim.wait_for_client()
        await present_and_wait(r, "CAFEBABE00")
        assert [x.pseudonym for x in r.sink.reads] == [PSEUDONYMIZER.badge("CAFEBABE00")]
        assert r.reader.stats.connects == 2


async def _hostile_pseudonymizer(raw_id: str) -> str:
    if raw_id.startswith("BAD"):
        raise ValueError(f"cannot pseudonymize {raw_id}")
    return await BadgePseudonyms("site-test", SITE_KEY).badge(raw_id)


async def test_raw_badge_id_appears_nowhere(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    good, bad = "5EC2E7C0DE", "BADC0FFEE1"
    async with rig(
        "tcp", protocol="ascii-lines", pseudonymize=_hostile_pseudonymizer, repeat_interval_s=0
    ) as r:
        await present_and_wait(r, good)
        await present_and_wait(r, bad)
        await eventually(lambda: r.reader.stats.pseudonymizer_failures == 1)
        await r.sim.unplug()
        await r.sink.wait(lambda: r.sink.health[-1].state == ReaderState.OFFLINE)
        emitted = [repr(x) for x in (*r.sink.reads, *r.sink.health)]
        emitted += [str(x) for x in (*r.sink.reads, *r.sink.health)]
        emitted.append(repr(r.reader.stats))
    assert len(r.sink.reads) == 1

    logged = []
    for rec in caplog.records:
        logged.append(rec.getMessage())
        logged.append(repr(rec.args))
        if rec.exc_info:
            logged.append("".join(traceback.format_exception(*rec.exc_info)))
    haystack = "\n".join(emitted + logged)
    for raw in (good, bad):
        assert raw not in haystack.upper()
    # and in every encoding a careless write could use
    dump = tmp_path / "everything-observable.txt"
    dump.write_text(haystack, encoding="utf-8")
    assert_no_raw_ids([dump], [good, bad])
    assert any(
        "pseudonymizer failed (ValueError); read dropped (1 so far)" in line for line in logged
    )


async def test_unreachable_device_reports_offline_with_reason() -> None:
    sink = RecordingSink()
    cfg = BadgeReaderConfig(id="badge-1", url="/nonexistent/ttyBADGE")
    reader = BadgeReader(cfg, sink, CountingPseudonyms(), backoff=Backoff(0.05, 0.1, 0.02))
    task = asyncio.create_task(reader.run(), name="badge-reader-offline")
    try:
        await sink.wait(lambda: any(h.state == ReaderState.OFFLINE for h in sink.health))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    offline = [h for h in sink.health if h.state == ReaderState.OFFLINE]
    assert "/nonexistent/ttyBADGE" in offline[0].detail
    assert len(offline) == 1  # repeated identical failures are not re-reported
    assert sink.reads == []
    assert isinstance(sink, BadgeSink)


# --- config --------------------------------------------------------------------------------


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="named group 'id'"):
        BadgeReaderConfig(id="b1", url="/dev/ttyUSB0", protocol="ascii-lines", pattern="[0-9]+")
    with pytest.raises(ValidationError, match="ascii-lines"):
        BadgeReaderConfig(id="b1", url="/dev/ttyUSB0", pattern="(?P<id>[0-9]+)")
    with pytest.raises(ValidationError, match="ascii-lines"):
        BadgeReaderConfig(id="b1", url="/dev/ttyUSB0", id_base=10)
    with pytest.raises(ValidationError, match="id_base"):
        BadgeReaderConfig(id="b1", url="/dev/ttyUSB0", protocol="ascii-lines", id_base=8)
    with pytest.raises(ValidationError, match="baud"):
        BadgeReaderConfig(id="b1", url="/dev/ttyUSB0?baud=fast")
    with pytest.raises(ValidationError, match="not a device path or URL"):
        BadgeReaderConfig(id="b1", url="ttyUSB0")
    cfg = BadgeReaderConfig(id="b1", url="/dev/ttyUSB0?baud=19200")
    assert cfg.target().baudrate == 19200
    assert BadgeReaderConfig(id="b1", url="/dev/ttyUSB0").target().baudrate == 9600


def _agent_config(**extra: object) -> dict[str, object]:
    return {
        "cabinet": {"site_id": "site-1", "cabinet_id": "cab-1"},
        "readers": [{"type": "llrp", "id": "dock-1", "host": "127.0.0.1", "gpi_ports": [1]}],
        **extra,
    }


def test_agent_config_badge_and_door_sections() -> None:
    cfg = parse_config(
        _agent_config(
            badge_readers=[{"id": "badge-1", "url": "socket://127.0.0.1:7001"}],
            door={"reader": "dock-1", "sensor_gpi": 1, "lock_gpo": 2},
        )
    )
    assert cfg.badge_readers[0].protocol == "em4100"
    assert cfg.door is not None
    assert cfg.door.lock_gpo == 2
    assert parse_config(_agent_config()).badge_readers == []
    example = load_config(ROOT / "config" / "agent.example.toml")
    assert example.badge_readers[0].protocol == "em4100"
    assert example.door is not None

    with pytest.raises(ConfigError) as exc:
        parse_config(
            _agent_config(
                badge_readers=[{"id": "dock-1", "url": "socket://127.0.0.1:7001"}],
            )
        )
    assert any("dock-1" in p for p in exc.value.problems)
    with pytest.raises(ConfigError) as exc:
        parse_config(_agent_config(door={"reader": "nope", "sensor_gpi": 1, "lock_gpo": 1}))
    assert any("'nope' is not a configured reader" in p for p in exc.value.problems)
    with pytest.raises(ConfigError) as exc:
        parse_config(
            _agent_config(
                readers=[{"type": "llrp", "id": "dock-1", "host": "127.0.0.1", "gpi_ports": [2]}],
                door={"reader": "dock-1", "sensor_gpi": 1, "lock_gpo": 1},
            )
        )
    assert any("sensor_gpi 1 is not in the gpi_ports" in p for p in exc.value.problems)
    with pytest.raises(ConfigError) as exc:
        parse_config(_agent_config(badge_readers=[{"id": "b", "url": "x", "prtocol": 1}]))
    assert any(p.startswith("badge_readers[0].prtocol: unknown key") for p in exc.value.problems)


# --- cabinet-sim badge ---------------------------------------------------------------------


@pytest.mark.parametrize("where", [["--tcp", "0"], ["--pty"]])
async def test_simulator_cli_presents_cards_from_stdin(where: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.cli",  # the cabinet-sim entry point
        "badge",
        "--protocol",
        "em4100",
        *where,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    sink = RecordingSink()
    task: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(TIMEOUT_S):
            banner = (await proc.stdout.readline()).decode()
        url = banner.rsplit(" at ", 1)[1].strip()
        cfg = BadgeReaderConfig(id="badge-cli", url=url, repeat_interval_s=0)
        reader = BadgeReader(cfg, sink, CountingPseudonyms(), backoff=Backoff(0.05, 0.2, 0.02))
        task = asyncio.create_task(reader.run(), name="badge-reader-cli")
        await sink.wait_online(session=1)
        # The simulator may not have accepted the TCP client yet: resend until a read lands,
        # giving each card time to be read (a p2 derivation per read: resending at the echo's
        # pace would queue hundreds of cards ahead of the unplug below).
        async with asyncio.timeout(TIMEOUT_S):
            while not sink.reads:
                proc.stdin.write(b"0102030405\n")
                await proc.stdin.drain()
                assert b"presented" in await proc.stdout.readline()
                with contextlib.suppress(TimeoutError):
                    await sink.wait(lambda: bool(sink.reads), timeout_s=1.0)
        proc.stdin.write(b"!unplug 0.2\n")
        await proc.stdin.drain()
        await sink.wait(lambda: any(h.state == ReaderState.OFFLINE for h in sink.health))
        await sink.wait_online(session=2)
        proc.stdin.close()
        async with asyncio.timeout(TIMEOUT_S):
            assert await proc.wait() == 0
    finally:
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert {r.pseudonym for r in sink.reads} == {PSEUDONYMIZER.badge("0102030405")}
