"""A Mercury serial UHF module (M6e / M6e Nano) on a real pseudo-terminal or on TCP.

The module starts in its bootloader (as a powered-up M6e does), answers the commands the
driver uses, and in continuous-read mode streams tag records for a population of tags
placed at antennas, each with a mean RSSI, a spread and a per-cycle read probability.

Fault switches (``sim.faults``): garbage bytes, silence, unplug (pty closed / TCP closed
and refused for N seconds), trickle (one byte at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import tempfile
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from simulators.mercury import wire

logger = logging.getLogger(__name__)

VERSION_OPCODE = 0x03
BOOT_FIRMWARE = 0x04
GET_CURRENT_PROGRAM = 0x0C
READ_TAG_ID_MULTIPLE = 0x22
MULTI_PROTOCOL_TAG_OP = 0x2F
GET_ANTENNA_PORT = 0x61
GET_REGION = 0x67
SET_ANTENNA_PORT = 0x91
SET_READ_TX_POWER = 0x92
SET_TAG_PROTOCOL = 0x93
SET_GPIO = 0x96
SET_REGION = 0x97

ST_OK = 0x0000
ST_WRONG_DATA = 0x0100
ST_INVALID_OPCODE = 0x0101
ST_POWER_TOO_HIGH = 0x0103
ST_INVALID_PARAMETER = 0x0105
ST_POWER_TOO_LOW = 0x0106
ST_INVALID_REGION = 0x010B
ST_NO_TAGS_FOUND = 0x0400
ST_NO_PROTOCOL = 0x0401
ST_INVALID_PROTOCOL = 0x0402
ST_AFE_NOT_ON = 0x0405
ST_INVALID_ANTENNA_CONFIG = 0x0507

MODELS = {"m6e": (0x18, 4, 3150), "nano": (0x30, 1, 2700), "micro": (0x20, 2, 3000)}
REGIONS = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF}
_OUT_QUEUE = 1024


@dataclass
class SimTag:
    """A tag somewhere in the cabinet. ``duty`` < 1: intermittent — it can answer only in that
    share of the search cycles, in runs of ``burst_rounds`` cycles on average (a neighbour
    cabinet's tag drifting in and out of a fade)."""

    epc: bytes
    antenna: int
    rssi_mean: float = -55.0
    rssi_spread: float = 3.0
    read_probability: float = 0.9
    duty: float = 1.0
    burst_rounds: float = 1.0
    reachable: bool = True

    def next_round(self, rng: random.Random) -> bool:
        """Advance the fade (two-state Markov chain); whether it can answer this cycle."""
        if self.duty >= 1.0:
            return True
        if self.reachable:
            self.reachable = rng.random() >= 1.0 / self.burst_rounds
        else:
            self.reachable = rng.random() < min(
                1.0, self.duty / ((1.0 - self.duty) * self.burst_rounds)
            )
        return self.reachable


@dataclass
class Faults:
    """Fault switches; each one is time-bounded or a one-shot burst."""

    _sim: MercurySimulator = field(repr=False)
    garbage_until: float = 0.0
    silent_until: float = 0.0
    trickle_delay_s: float = 0.0
    trickle_until: float | None = None

    def garbage(self, n: int = 64, *, seconds: float = 0.0) -> None:
        """Send ``n`` random bytes now; with ``seconds``, replace all output by garbage."""
        self._sim._enqueue(bytes(self._sim._rng.getrandbits(8) for _ in range(n)))
        if seconds > 0:
            self.garbage_until = time.monotonic() + seconds

    def silence(self, seconds: float) -> None:
        """The module hangs: no output, commands ignored, for ``seconds``."""
        self.silent_until = time.monotonic() + seconds

    def unplug(self, seconds: float) -> None:
        """Pull the cable: pty closed / TCP closed and refused, back after ``seconds``."""
        self._sim._unplug(seconds)

    def trickle(self, delay_s: float = 0.002, *, seconds: float | None = None) -> None:
        """Send one byte at a time with ``delay_s`` between bytes (for ``seconds`` or until cleared)."""
        self.trickle_delay_s = delay_s
        self.trickle_until = None if seconds is None else time.monotonic() + seconds

    def clear(self) -> None:
        self.garbage_until = self.silent_until = 0.0
        self.trickle_delay_s = 0.0
        self.trickle_until = None

    @property
    def silent(self) -> bool:
        return time.monotonic() < self.silent_until

    @property
    def garbling(self) -> bool:
        return time.monotonic() < self.garbage_until

    @property
    def trickling(self) -> float:
        if self.trickle_delay_s and (
            self.trickle_until is None or time.monotonic() < self.trickle_until
        ):
            return self.trickle_delay_s
        return 0.0


class _Link:
    """Where bytes go: one pty master or one TCP connection."""

    async def read(self) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _PtyLink(_Link):
    def __init__(self, link_path: Path) -> None:
        self.master, self.slave = os.openpty()
        # Raw on both ends: no echo, no CR/LF translation, no signals on 0x03.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_name = os.ttyname(self.slave)
        self._path = link_path
        with contextlib.suppress(FileNotFoundError):
            link_path.unlink()
        link_path.symlink_to(self.slave_name)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], object]) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self.master, ready)
        try:
            await fut
        finally:
            remove(self.master)

    async def read(self) -> bytes:
        while not self._closed:
            try:
                return os.read(self.master, 4096)
            except BlockingIOError:
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
            except OSError as err:
                if err.errno == errno.EIO:  # no slave open right now: nothing to read
                    await asyncio.sleep(0.05)
                    continue
                raise
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._closed:
            try:
                sent = os.write(self.master, view)
            except BlockingIOError:
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
                continue
            view = view[sent:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class _TcpLink(_Link):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(4096)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


class MercurySimulator:
    """A simulated module. ``await start()``, point the driver at ``url``, ``await stop()``."""

    def __init__(
        self,
        transport: Literal["pty", "tcp"] = "pty",
        *,
        antennas: int | None = None,
        model: Literal["m6e", "nano", "micro"] = "m6e",
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cycle_s: float = 0.05,
        keepalive_s: float = 0.5,
        start_in_bootloader: bool = True,
    ) -> None:
        if transport not in ("pty", "tcp"):
            raise ValueError(f"transport must be 'pty' or 'tcp', not {transport!r}")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the simulator listens on loopback only")
        self.transport = transport
        self.model = model
        self._hw, default_ports, self._max_power = MODELS[model]
        self.antenna_count = antennas if antennas is not None else default_ports
        self._rng = random.Random(seed)
        self._host = host
        self._port = port
        self.cycle_s = cycle_s
        self.keepalive_s = keepalive_s
        self._start_in_bootloader = start_in_bootloader
        self.faults = Faults(self)
        self.tags: dict[bytes, SimTag] = {}
        self.antennas_present: set[int] = set(range(1, self.antenna_count + 1))
        # module state
        self.in_bootloader = start_in_bootloader
        self.region = 0
        self.protocol = 0
        self.search_list: list[int] = []
        self.read_power_centi = 3000
        self.gpio: dict[int, bool] = {}
        self.reading = False
        self._metadata = 0x01FF
        self._read_started = 0.0
        self._stop_pending = False
        # bookkeeping visible to tests
        self.commands: Counter[int] = Counter()
        self.connections = 0
        self.records_sent = 0
        self.records_by_epc: Counter[bytes] = Counter()
        self.unplugged = False
        self._changed = asyncio.Event()
        self._out: asyncio.Queue[bytes] = asyncio.Queue(_OUT_QUEUE)
        self._link: _Link | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._link_tasks: set[asyncio.Task[None]] = set()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._pty_path: Path | None = None
        self._scanner = wire.CommandScanner()
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.transport == "pty":
            assert self._pty_path is not None, "start() first"
            return f"{self._pty_path}?baud=115200"
        return f"socket://{self._host}:{self._port}"

    @property
    def pty_slave(self) -> str | None:
        """The current /dev/pts/N behind the stable ``url`` symlink (pty transport)."""
        return self._link.slave_name if isinstance(self._link, _PtyLink) else None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.transport == "pty":
            self._tmpdir = tempfile.TemporaryDirectory(prefix="mercury-sim-")
            self._pty_path = Path(self._tmpdir.name) / "ttyMERCURY0"
        await self._plug()
        self._spawn(self._writer_loop(), "mercury-sim-writer")
        self._spawn(self._stream_loop(), "mercury-sim-stream")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for task in list(self._tasks) + list(self._link_tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._link_tasks, return_exceptions=True)
        await self._unplug_now()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> MercurySimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- tag population -----------------------------------------------------------------

    def add_tag(
        self,
        epc: str | bytes,
        antenna: int = 1,
        *,
        rssi_mean: float = -55.0,
        rssi_spread: float = 3.0,
        read_probability: float = 0.9,
        duty: float = 1.0,
        burst_rounds: float = 1.0,
    ) -> SimTag:
        raw = bytes.fromhex(epc) if isinstance(epc, str) else bytes(epc)
        if not raw or len(raw) % 2 or len(raw) > 62:
            raise ValueError("EPC must be a whole number of 16-bit words (≤ 496 bits)")
        if not 1 <= antenna <= 15:
            raise ValueError("antenna ports are 1..15")
        if not 0.0 < duty <= 1.0 or burst_rounds < 1.0:
            raise ValueError("duty must be within (0, 1] and burst_rounds >= 1")
        tag = SimTag(
            raw,
            antenna,
            rssi_mean,
            rssi_spread,
            read_probability,
            duty,
            burst_rounds,
            reachable=self._rng.random() < duty,
        )
        self.tags[raw] = tag
        return tag

    def add_neighbour_tag(
        self,
        epc: str | bytes,
        antenna: int = 1,
        *,
        rssi_mean: float = -79.0,
        duty: float = 0.3,
        burst_rounds: float = 6.0,
    ) -> SimTag:
        """A tag of the cabinet next door, read through the wall: weak (near a typical -80 dBm
        floor) and intermittent (answers in ``duty`` of the cycles, in short runs)."""
        return self.add_tag(
            epc,
            antenna,
            rssi_mean=rssi_mean,
            rssi_spread=2.0,
            read_probability=1.0,
            duty=duty,
            burst_rounds=burst_rounds,
        )

    def add_neighbour_tags(
        self, n: int, antennas: Iterable[int] | None = None, **kw: float
    ) -> list[SimTag]:
        """``n`` random neighbour tags spread over ``antennas`` (default: all ports)."""
        ports = list(antennas) if antennas is not None else list(range(1, self.antenna_count + 1))
        made = []
        for k in range(n):
            epc = bytes(self._rng.getrandbits(8) for _ in range(12))
            made.append(self.add_neighbour_tag(epc, ports[k % len(ports)], **kw))
        return made

    def add_random_tags(self, n: int, antennas: Iterable[int] | None = None) -> list[SimTag]:
        """``n`` random EPC-96 tags spread over ``antennas`` (default: all ports)."""
        ports = list(antennas) if antennas is not None else list(range(1, self.antenna_count + 1))
        made = []
        for k in range(n):
            epc = bytes(self._rng.getrandbits(8) for _ in range(12))
            made.append(
                self.add_tag(
                    epc,
                    ports[k % len(ports)],
                    rssi_mean=self._rng.uniform(-70, -40),
                    rssi_spread=self._rng.uniform(1, 4),
                    read_probability=self._rng.uniform(0.6, 1.0),
                )
            )
        return made

    def set_antenna_connected(self, port: int, connected: bool) -> None:
        """Plug or unplug the antenna of ``port``: unplugged, it reads nothing (and the M6e's
        antenna detection reports it; the Nano's cannot)."""
        if not 1 <= port <= self.antenna_count:
            raise ValueError(f"antenna port {port} outside 1..{self.antenna_count}")
        if connected:
            self.antennas_present.add(port)
        else:
            self.antennas_present.discard(port)
        self._notify()

    def remove_tag(self, epc: str | bytes) -> None:
        self.tags.pop(bytes.fromhex(epc) if isinstance(epc, str) else epc, None)

    def move_tag(self, epc: str | bytes, antenna: int) -> None:
        self.tags[bytes.fromhex(epc) if isinstance(epc, str) else epc].antenna = antenna

    async def wait_until(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """Wait (bounded) until the simulator's state satisfies ``predicate``."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._changed.wait()

    # --- links --------------------------------------------------------------------------

    def _spawn(self, coro: object, name: str, *, link: bool = False) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        bucket = self._link_tasks if link else self._tasks
        bucket.add(task)
        task.add_done_callback(bucket.discard)

    async def _plug(self) -> None:
        self._power_cycle()
        if self.transport == "pty":
            assert self._pty_path is not None
            link = _PtyLink(self._pty_path)
            self._attach(link)
        else:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
            self._port = self._server.sockets[0].getsockname()[1]
        self.unplugged = False
        self._notify()

    def _attach(self, link: _Link) -> None:
        old, self._link = self._link, link
        if old is not None:
            old.close()
        self.connections += 1
        self._scanner = wire.CommandScanner()
        self._spawn(self._reader_loop(link), "mercury-sim-reader", link=True)
        self._notify()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._attach(_TcpLink(reader, writer))

    def _unplug(self, seconds: float) -> None:
        self.unplugged = True  # output stops now; the link is torn down on the next turn

        async def cycle() -> None:
            await self._unplug_now()
            await asyncio.sleep(seconds)
            if self._started:
                await self._plug()

        self._spawn(cycle(), "mercury-sim-unplug")

    async def _unplug_now(self) -> None:
        self.unplugged = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._link_tasks):
            task.cancel()
        await asyncio.gather(*self._link_tasks, return_exceptions=True)
        if self._link is not None:
            self._link.close()
            self._link = None
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()
        while not self._out.empty():
            self._out.get_nowait()
        self._notify()

    def _power_cycle(self) -> None:
        self.in_bootloader = self._start_in_bootloader
        self.region = 0
        self.protocol = 0
        self.search_list = []
        self.reading = False
        self._stop_pending = False
        self.gpio = {}

    # --- I/O loops ----------------------------------------------------------------------

    async def _reader_loop(self, link: _Link) -> None:
        while True:
            data = await link.read()
            if not data:
                if link is self._link:
                    self._link = None
                link.close()
                self._notify()
                return
            if self.faults.silent:
                continue
            for cmd in self._scanner.feed(data):
                self.commands[cmd.opcode] += 1
                answer = self._handle(cmd)
                if answer is not None:
                    self._enqueue(answer)
                self._notify()

    def _enqueue(self, data: bytes) -> None:
        if self._link is None or self.unplugged:
            return  # nobody on the line: a real module talks into the void
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(data)

    async def _writer_loop(self) -> None:
        while True:
            data = await self._out.get()
            link = self._link
            if link is None or self.faults.silent:
                continue
            if self.faults.garbling:
                data = bytes(self._rng.getrandbits(8) for _ in range(len(data)))
            delay = self.faults.trickling
            try:
                if delay:
                    for k in range(len(data)):
                        await link.write(data[k : k + 1])
                        await asyncio.sleep(delay)
                else:
                    await link.write(data)
            except OSError:
                continue  # the link went away under us; the reader loop notices

    async def _stream_loop(self) -> None:
        last_record = time.monotonic()
        while True:
            await asyncio.sleep(self.cycle_s)
            if not self.reading:
                if self._stop_pending:
                    self._finish_stop()
                continue
            now = time.monotonic()
            chunk = bytearray()
            for tag in list(self.tags.values()):
                if tag.antenna not in self.search_list or tag.antenna not in self.antennas_present:
                    continue
                if not tag.next_round(self._rng) or self._rng.random() >= tag.read_probability:
                    continue
                rssi = round(self._rng.gauss(tag.rssi_mean, tag.rssi_spread))
                record = wire.tag_record(
                    epc=tag.epc,
                    metadata=self._metadata,
                    read_count=1,
                    rssi=max(-127, min(-1, rssi)),
                    antenna=tag.antenna,
                    frequency_khz=self._rng.randrange(902750, 927250, 500),
                    timestamp_ms=int((now - self._read_started) * 1000),
                )
                chunk += wire.response(READ_TAG_ID_MULTIPLE, ST_OK, record)
                self.records_sent += 1
                self.records_by_epc[tag.epc] += 1
            if chunk:
                last_record = now
                self._enqueue(bytes(chunk))
            elif now - last_record >= self.keepalive_s:
                last_record = now
                self._enqueue(wire.response(READ_TAG_ID_MULTIPLE, ST_NO_TAGS_FOUND))
            if self._stop_pending:
                self._finish_stop()

    def _finish_stop(self) -> None:
        self.reading = False
        self._stop_pending = False
        self._enqueue(wire.response(READ_TAG_ID_MULTIPLE, ST_NO_TAGS_FOUND))
        self._enqueue(wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, b"\x02"))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()

    # --- commands -----------------------------------------------------------------------

    def _version_data(self) -> bytes:
        return (
            bytes([0x14, 0x12, 0x08, 0x00, self._hw, 0x00, 0x00, 0x02])
            + bytes([0x20, 0x15, 0x03, 0x10, 0x01, 0x03, 0x01, 0x47])
            + (0x10).to_bytes(4, "big")  # protocol 5 (Gen2) supported
        )

    def _handle(self, cmd: wire.HostCommand) -> bytes | None:
        op, data = cmd.opcode, cmd.data
        if op == VERSION_OPCODE:
            return wire.response(op, ST_OK, self._version_data())
        if op == GET_CURRENT_PROGRAM:
            return wire.response(op, ST_OK, bytes([0x11 if self.in_bootloader else 0x12]))
        if op == BOOT_FIRMWARE:
            if not self.in_bootloader:
                return wire.response(op, ST_INVALID_OPCODE)
            self.in_bootloader = False
            return wire.response(op, ST_OK, self._version_data())
        if self.in_bootloader:
            return wire.response(op, ST_INVALID_OPCODE)
        handler = {
            SET_REGION: self._set_region,
            GET_REGION: lambda d: (ST_OK, bytes([self.region])),
            SET_TAG_PROTOCOL: self._set_protocol,
            SET_ANTENNA_PORT: self._set_antennas,
            GET_ANTENNA_PORT: self._get_antennas,
            SET_READ_TX_POWER: self._set_power,
            SET_GPIO: self._set_gpio,
        }.get(op)
        if op == MULTI_PROTOCOL_TAG_OP:
            return self._tag_op(data)
        if handler is None:
            return wire.response(op, ST_INVALID_OPCODE)
        status, payload = handler(data)
        return wire.response(op, status, payload)

    def _set_region(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 1:
            return ST_WRONG_DATA, b""
        if data[0] not in REGIONS:
            return ST_INVALID_REGION, b""
        self.region = data[0]
        return ST_OK, b""

    def _set_protocol(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 2:
            return ST_WRONG_DATA, b""
        if int.from_bytes(data, "big") != 0x0005:
            return ST_INVALID_PROTOCOL, b""
        self.protocol = 5
        return ST_OK, b""

    def _set_antennas(self, data: bytes) -> tuple[int, bytes]:
        if len(data) == 2:  # plain tx, rx
            pairs = [(data[0], data[1])]
        elif len(data) >= 3 and data[0] == 0x02 and len(data) % 2 == 1:
            pairs = [(data[k], data[k + 1]) for k in range(1, len(data), 2)]
        else:
            return ST_INVALID_PARAMETER, b""
        ports = [tx for tx, rx in pairs]
        if any(tx != rx or not 1 <= tx <= self.antenna_count for tx, rx in pairs):
            return ST_INVALID_ANTENNA_CONFIG, b""
        self.search_list = ports
        return ST_OK, b""

    def _get_antennas(self, data: bytes) -> tuple[int, bytes]:
        if data != b"\x05":
            return ST_INVALID_PARAMETER, b""
        out = bytearray([0x05])
        for port in range(1, self.antenna_count + 1):
            # The Nano has no detection circuit: it answers, but reports every port undetected
            # (as the URA log of a real M6e Nano shows).
            seen = port in self.antennas_present and self.model != "nano"
            out += bytes([port, 1 if seen else 0])
        return ST_OK, bytes(out)

    def _set_power(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 2:
            return ST_WRONG_DATA, b""
        centi = int.from_bytes(data, "big", signed=True)
        if centi > self._max_power:
            return ST_POWER_TOO_HIGH, b""
        if centi < 0:
            return ST_POWER_TOO_LOW, b""
        self.read_power_centi = centi
        return ST_OK, b""

    def _set_gpio(self, data: bytes) -> tuple[int, bytes]:
        if len(data) == 4 and data[0] == 0x01:  # direction: option, pin, output, level
            pin, level = data[1], bool(data[3])
        elif len(data) == 2:
            pin, level = data[0], bool(data[1])
        else:
            return ST_WRONG_DATA, b""
        if not 1 <= pin <= 4:
            return ST_INVALID_PARAMETER, b""
        self.gpio[pin] = level
        return ST_OK, b""

    def _tag_op(self, data: bytes) -> bytes | None:
        if len(data) >= 3 and data[2] == 0x02:  # stop continuous reading
            if self.reading:
                self._stop_pending = True  # answered after the current search cycle
                return None
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, b"\x02")
        if len(data) < 8 or data[2] != 0x01 or data[3] != READ_TAG_ID_MULTIPLE:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_INVALID_PARAMETER)
        if self.region == 0:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_AFE_NOT_ON)
        if self.protocol != 5 or data[6] != 0x05:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_NO_PROTOCOL)
        sub = data[8:]
        if len(sub) != data[7] + 1 or len(sub) < 8 or sub[0] != READ_TAG_ID_MULTIPLE:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_INVALID_PARAMETER)
        self._metadata = int.from_bytes(sub[6:8], "big") & 0x01FF
        if not self.search_list:
            self.search_list = [1]
        self.reading = True
        self._stop_pending = False
        self._read_started = time.monotonic()
        return wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, bytes([0x01, 0x22, 0x00, 0x00]))
