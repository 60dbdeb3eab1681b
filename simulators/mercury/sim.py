"""A Mercury serial UHF module (M6e / M6e Nano) on a real pseudo-terminal or on TCP.

The module starts in its bootloader (as a powered-up M6e does), answers the commands the
driver uses, and in continuous-read mode streams tag records for a population of tags
placed at antennas, each with a mean RSSI, a spread and a per-cycle read probability.

Fault switches (``sim.faults``): garbage bytes, silence, unplug (pty closed / TCP closed
and refused for N seconds), trickle (one byte at a time).

This is the harness: the tag population, the fault switches, the cable (``link``) and the
I/O loops; the module's firmware and its search cycles are ``module.MercuryModule``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from simulators.mercury import wire
from simulators.mercury.link import Link, PtyLink, TcpLink
from simulators.mercury.module import MercuryModule, Model, SimTag

__all__ = ["Faults", "MercurySimulator", "SimTag"]

logger = logging.getLogger(__name__)

_OUT_QUEUE = 1024


@dataclass
class Faults:
    """Fault switches; each one is time-bounded or a one-shot burst."""

    _sim: MercurySimulator = field(repr=False)
    garbage_until: float = 0.0
    silent_until: float = 0.0
    trickle_delay_s: float = 0.0
    trickle_until: float | None = None
    straddle: bool = False  # every write ends mid-frame: its last byte goes with the next

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

    def straddle_writes(self, on: bool = True) -> None:
        """Hold back the last byte of every write until the next one, so that every read of a
        prompt host ends mid-frame (a serial line read as its bytes arrive). Off: the held
        byte goes out with the next write."""
        self.straddle = on

    def clear(self) -> None:
        self.straddle = False
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


class MercurySimulator:
    """A simulated module. ``await start()``, point the driver at ``url``, ``await stop()``."""

    def __init__(
        self,
        transport: Literal["pty", "tcp"] = "pty",
        *,
        antennas: int | None = None,
        model: Model = "m6e",
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
        self._rng = random.Random(seed)
        self.module = MercuryModule(
            model, antennas, rng=self._rng, start_in_bootloader=start_in_bootloader
        )
        self.antenna_count = self.module.antenna_count
        self._host = host
        self._port = port
        self.cycle_s = cycle_s
        self.keepalive_s = keepalive_s
        self.faults = Faults(self)
        self.tags: dict[bytes, SimTag] = {}
        self.clones: dict[bytes, SimTag] = {}  # EPC → a second tag carrying it (its own TID)
        # bookkeeping visible to tests
        self.commands: Counter[int] = Counter()
        self.connections = 0
        self.records_sent = 0
        self.records_by_epc: Counter[bytes] = Counter()
        self.unplugged = False
        self._changed = asyncio.Event()
        self._out: asyncio.Queue[bytes] = asyncio.Queue(_OUT_QUEUE)
        self._link: Link | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._link_tasks: set[asyncio.Task[None]] = set()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._pty_path: Path | None = None
        self._scanner = wire.CommandScanner()
        self._started = False
        self._held = b""  # the byte a straddled write held back

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
        return self._link.slave_name if isinstance(self._link, PtyLink) else None

    # --- the module's state, as tests read it -------------------------------------------

    @property
    def antennas_present(self) -> set[int]:
        """The ports with an antenna plugged in (assign to rewire them)."""
        return self.module.antennas_present

    @antennas_present.setter
    def antennas_present(self, ports: set[int]) -> None:
        self.module.antennas_present = ports

    @property
    def in_bootloader(self) -> bool:
        return self.module.in_bootloader

    @property
    def region(self) -> int:
        return self.module.region

    @property
    def protocol(self) -> int:
        return self.module.protocol

    @property
    def search_list(self) -> list[int]:
        return self.module.search_list

    @property
    def read_power_centi(self) -> int:
        return self.module.read_power_centi

    @property
    def gpio(self) -> dict[int, bool]:
        return self.module.gpio

    @property
    def reading(self) -> bool:
        return self.module.reading

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
        tid: str | bytes | None = None,
    ) -> SimTag:
        """A tag at ``antenna``; ``tid`` its TID bank (hex), default one derived from the EPC."""
        tag = self._make_tag(
            epc, antenna, rssi_mean, rssi_spread, read_probability, duty, burst_rounds, tid
        )
        self.tags[tag.epc] = tag
        return tag

    def add_clone(self, epc: str | bytes, antenna: int, tid: str | bytes) -> SimTag:
        """A cloned tag: ``epc`` (maybe another tag's) on a chip with its own ``tid``."""
        tag = self._make_tag(epc, antenna, -55.0, 3.0, 0.9, 1.0, 1.0, tid)
        self.clones[tag.epc] = tag
        return tag

    def remove_clone(self, epc: str | bytes) -> None:
        self.clones.pop(bytes.fromhex(epc) if isinstance(epc, str) else epc, None)

    def _make_tag(
        self,
        epc: str | bytes,
        antenna: int,
        rssi_mean: float,
        rssi_spread: float,
        read_probability: float,
        duty: float,
        burst_rounds: float,
        tid: str | bytes | None,
    ) -> SimTag:
        raw = bytes.fromhex(epc) if isinstance(epc, str) else bytes(epc)
        raw_tid = bytes.fromhex(tid) if isinstance(tid, str) else tid
        if raw_tid is not None and (not raw_tid or len(raw_tid) % 2 or len(raw_tid) > 64):
            raise ValueError("TID must be 1..32 whole 16-bit words")
        if not raw or len(raw) % 2 or len(raw) > 62:
            raise ValueError("EPC must be a whole number of 16-bit words (≤ 496 bits)")
        if not 1 <= antenna <= 15:
            raise ValueError("antenna ports are 1..15")
        if not 0.0 < duty <= 1.0 or burst_rounds < 1.0:
            raise ValueError("duty must be within (0, 1] and burst_rounds >= 1")
        return SimTag(
            raw,
            antenna,
            rssi_mean,
            rssi_spread,
            read_probability,
            duty,
            burst_rounds,
            reachable=self._rng.random() < duty,
            tid=raw_tid,
        )

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
            self.module.antennas_present.add(port)
        else:
            self.module.antennas_present.discard(port)
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
        self.module.power_cycle()
        if self.transport == "pty":
            assert self._pty_path is not None
            link = PtyLink(self._pty_path)
            self._attach(link)
        else:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
            self._port = self._server.sockets[0].getsockname()[1]
        self.unplugged = False
        self._notify()

    def _attach(self, link: Link) -> None:
        old, self._link = self._link, link
        if old is not None:
            old.close()
        self.connections += 1
        self._scanner = wire.CommandScanner()
        self._held = b""
        self._spawn(self._reader_loop(link), "mercury-sim-reader", link=True)
        self._notify()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._attach(TcpLink(reader, writer))

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

    # --- I/O loops ----------------------------------------------------------------------

    async def _reader_loop(self, link: Link) -> None:
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
                answer = self.module.handle(cmd)
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
            data, self._held = self._held + data, b""
            if self.faults.straddle:
                data, self._held = data[:-1], data[-1:]
                if not data:
                    continue
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
        module = self.module
        last_record = time.monotonic()
        while True:
            await asyncio.sleep(self.cycle_s)
            if not module.reading:
                if module.stop_pending:
                    self._finish_stop()
                continue
            now = time.monotonic()
            chunk = bytearray()
            present = [*self.tags.values(), *self.clones.values()]
            for tag, frame in module.search_round(present, now):
                chunk += frame
                self.records_sent += 1
                self.records_by_epc[tag.epc] += 1
            if chunk:
                last_record = now
                self._enqueue(bytes(chunk))
            elif now - last_record >= self.keepalive_s:
                last_record = now
                self._enqueue(module.no_tags())
            if module.stop_pending:
                self._finish_stop()

    def _finish_stop(self) -> None:
        for frame in self.module.finish_stop():
            self._enqueue(frame)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
