"""An LLRP 1.0.1 reader on a real TCP socket: capabilities, config, ROSpecs, reports, GPIO, faults.

:class:`LlrpSimulator` wires the parts and is what tests and tools use: the reader model
(``reader``, sans-IO), its inventories over the simulated tags (``inventory``, ``tags``), the
TCP server (``server``), and here the harness API: place tags, plug antennas, drive GPIs,
watch GPOs and wait for the reader's state.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from simulators.llrp.codec import Message, ROSpecState
from simulators.llrp.faults import Faults
from simulators.llrp.inventory import InventoryRun
from simulators.llrp.personality import PERSONALITIES, Personality
from simulators.llrp.reader import GpoWrite, ReaderModel, SimStats
from simulators.llrp.readerconfig import ReaderConfig
from simulators.llrp.rospec import ROSpec
from simulators.llrp.server import Connection, ConnectionStats, ReaderServer
from simulators.llrp.tags import SimTag, TagPopulation, neighbour_tag, random_epc96

__all__ = ["ConnectionStats", "GpoWrite", "LlrpSimulator", "SimStats"]

logger = logging.getLogger(__name__)

_RECEIVED_MAX = 20000


class LlrpSimulator:
    """A simulated LLRP reader (Impinj Speedway R420- or Zebra FX9600-like) on a TCP port."""

    def __init__(
        self,
        personality: str | Personality = "impinj",
        antennas: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cycle_s: float = 0.05,
        seed: int | None = None,
        *,
        read_probability: float = 1.0,
        gpi_ports_enabled: bool = False,
        model_sessions: bool = True,
        s1_persistence_s: float = 1.0,
        notify_existing_on_reject: bool = True,
        max_message_len: int = 1 << 20,
        sensitivity_dbm: float = -84.0,
        antenna_detection: bool = True,
    ) -> None:
        if isinstance(personality, str) and personality not in PERSONALITIES:
            raise ValueError(f"personality must be one of {sorted(PERSONALITIES)}")
        self.personality = (
            personality if isinstance(personality, Personality) else PERSONALITIES[personality]
        )
        self.antennas = antennas if antennas is not None else self.personality.max_antennas
        if not 1 <= self.antennas <= 64:
            raise ValueError("antennas must be within 1..64")
        if cycle_s <= 0:
            raise ValueError("cycle_s must be > 0")
        if not 0.0 <= read_probability <= 1.0:
            raise ValueError("read_probability must be within [0, 1]")
        self.host = host
        self.rng = random.Random(seed)
        self.read_probability = read_probability
        self.stats = SimStats()
        self._received: deque[tuple[str, dict[str, Any]]] = deque(maxlen=_RECEIVED_MAX)
        self.received_counts: dict[str, int] = {}
        self._waiters: list[tuple[asyncio.Future[None], Callable[[], bool]]] = []
        self.reader = ReaderModel(
            self,
            self.personality,
            self.antennas,
            self.rng,
            self.stats,
            model_sessions=model_sessions,
            s1_persistence_s=s1_persistence_s,
            sensitivity_dbm=sensitivity_dbm,
            antenna_detection=antenna_detection,
            gpi_default=gpi_ports_enabled,
        )
        self.server = ReaderServer(
            self.reader,
            self.stats,
            host=host,
            port=port,
            cycle_s=cycle_s,
            max_message_len=max_message_len,
            notify_existing_on_reject=notify_existing_on_reject,
            notify=self._notify,
            record=self._record,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; ``port`` holds the bound port afterwards."""
        await self.server.listen()
        logger.info(
            "llrp-sim: %s reader with %d antennas on %s:%d",
            self.personality.name,
            self.antennas,
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        """Close the listener and every connection; stop inventory; await every task."""
        await self.server.stop()
        if self.reader.gpo_gate is not None:
            self.reader.gpo_gate.set()  # held writes go to their closed session: dropped
        for fut, _ in self._waiters:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> LlrpSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"llrp://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self.server.up.is_set()

    async def wait_up(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the reader accepts connections again (after a reboot fault)."""
        async with asyncio.timeout(timeout):
            await self.server.up.wait()

    def close_client(self, *, notify: bool = True) -> None:
        """The reader ends the session: a ConnectionCloseEvent (unless ``notify`` is False), then
        the socket closes after everything queued is sent."""
        self.server.close_client(notify=notify)

    # -- the parts' state, for tests -------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self.server.faults

    @property
    def connections(self) -> ConnectionStats:
        return self.server.connections

    @property
    def unsent_frames(self) -> int:
        """Messages queued for the connected client and not yet written to its socket: they
        pile up while the client does not read (TCP backpressure)."""
        conn = self.server.current
        return 0 if conn is None else conn.queue.qsize()

    @property
    def cycle_s(self) -> float:
        return self.server.cycle_s

    @property
    def max_message_len(self) -> int:
        return self.server.max_message_len

    @property
    def notify_existing_on_reject(self) -> bool:
        return self.server.notify_existing_on_reject

    @property
    def model_sessions(self) -> bool:
        return self.reader.model_sessions

    @property
    def s1_persistence_s(self) -> float:
        return self.reader.s1_persistence_s

    @property
    def sensitivity_dbm(self) -> float:
        return self.reader.sensitivity_dbm

    @property
    def antenna_detection(self) -> bool:
        return self.reader.antenna_detection

    @property
    def tags(self) -> TagPopulation:
        return self.reader.tags

    @property
    def config(self) -> ReaderConfig:
        return self.reader.config

    @property
    def rospecs(self) -> dict[int, ROSpec]:
        return self.reader.rospecs

    @property
    def access_specs(self) -> dict[int, dict[str, Any]]:
        return self.reader.access_specs

    @property
    def antenna_connected(self) -> dict[int, bool]:
        return self.reader.antenna_connected

    @property
    def gpi_state(self) -> dict[int, bool]:
        return self.reader.gpi_state

    @property
    def gpo_history(self) -> list[GpoWrite]:
        return self.reader.gpo_history

    @property
    def gpo_listeners(self) -> list[Callable[[int, bool], None]]:
        return self.reader.gpo_listeners

    def hold_gpo_writes(self) -> asyncio.Event:
        """From now on a GPO write (the lock) is neither applied nor answered until the
        returned event is set: it is in flight as long as the test needs (``gpo_held``)."""
        gate = asyncio.Event()
        self.reader.gpo_gate = gate
        return gate

    @property
    def gpo_held(self) -> int:
        """GPO writes waiting for the gate of ``hold_gpo_writes``."""
        return self.reader.gpo_held

    @property
    def _current(self) -> Connection | None:
        # The established session (tests look at what it holds).
        return self.server.current

    # -- tags ----------------------------------------------------------------------------------

    def add_tag(self, tag: SimTag) -> SimTag:
        """Place a tag in the field (replacing one with the same EPC)."""
        self.reader.check_antenna(tag.antenna)
        for ant in tag.also_at:
            self.reader.check_antenna(ant)
        self.tags.add(tag)
        return tag

    def add_random_tags(
        self,
        n: int,
        antennas: Iterable[int] | None = None,
        seed: int | None = None,
        *,
        rssi_range: tuple[float, float] = (-70.0, -45.0),
        rssi_spread: float = 2.0,
        read_probability: float | None = None,
    ) -> list[SimTag]:
        """Place ``n`` random EPC-96 tags, each at one of ``antennas`` (default: all)."""
        rng = random.Random(seed) if seed is not None else self.rng
        ants = list(antennas) if antennas is not None else list(range(1, self.antennas + 1))
        for ant in ants:
            self.reader.check_antenna(ant)
        made: list[SimTag] = []
        for _ in range(n):
            epc = random_epc96(rng)
            while epc in self.tags:
                epc = random_epc96(rng)
            tag = SimTag(
                epc=epc,
                antenna=rng.choice(ants),
                rssi_mean=round(rng.uniform(*rssi_range), 1),
                rssi_spread=rssi_spread,
                read_probability=(
                    self.read_probability if read_probability is None else read_probability
                ),
            )
            self.tags.add(tag)
            made.append(tag)
        return made

    def add_neighbour_tags(
        self,
        n: int,
        antennas: Iterable[int] | None = None,
        seed: int | None = None,
        *,
        rssi_mean: float = -79.0,
        duty: float = 0.3,
        burst_rounds: float = 6.0,
    ) -> list[SimTag]:
        """``n`` tags of the cabinet next door, heard weakly and now and then by ``antennas``
        (default: all): see :func:`simulators.llrp.tags.neighbour_tag`."""
        rng = random.Random(seed) if seed is not None else self.rng
        ants = list(antennas) if antennas is not None else list(range(1, self.antennas + 1))
        for ant in ants:
            self.reader.check_antenna(ant)
        made: list[SimTag] = []
        for _ in range(n):
            epc = random_epc96(rng)
            while epc in self.tags:
                epc = random_epc96(rng)
            tag = neighbour_tag(
                epc, rng.choice(ants), rssi_mean=rssi_mean, duty=duty, burst_rounds=burst_rounds
            )
            self.tags.add(tag)
            made.append(tag)
        return made

    def remove_tag(self, epc: str) -> SimTag:
        return self.tags.remove(epc)

    def add_clone(self, tag: SimTag) -> SimTag:
        """A cloned tag: ``tag.epc`` (maybe another tag's) on a chip with its own ``tag.tid``."""
        self.reader.check_antenna(tag.antenna)
        self.tags.add_clone(tag)
        return tag

    def remove_clone(self, epc: str) -> SimTag:
        return self.tags.remove_clone(epc)

    def move_tag(
        self, epc: str, antenna: int, also_at: Mapping[int, float] | None = None
    ) -> SimTag:
        self.reader.check_antenna(antenna)
        return self.tags.move(epc, antenna, also_at)

    def set_antenna_connected(self, antenna: int, connected: bool) -> None:
        """Plug or unplug an antenna: it stops reading, and an AntennaEvent says so if enabled
        (never with ``antenna_detection=False``: that reader says nothing about its antennas)."""
        self.reader.set_antenna_connected(antenna, connected)

    # -- GPIO ----------------------------------------------------------------------------------

    def set_gpi(self, port: int, high: bool) -> None:
        """Change a general-purpose input; reports a GPIEvent if the port and event are enabled."""
        self.reader.set_gpi(port, high)

    @property
    def gpo_state(self) -> dict[int, bool]:
        return dict(self.reader.gpo)

    async def wait_gpo(self, port: int, high: bool, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once GPO ``port`` is at ``high`` (at once if it already is)."""
        gpo = self.reader.gpo
        if port not in gpo:
            raise ValueError(f"GPO port {port} outside 1..{len(gpo)}")
        await self.wait_until(lambda: self.reader.gpo[port] == high, timeout)

    # -- observation helpers for tests -----------------------------------------------------------

    @property
    def received_messages(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self._received)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds; re-checked whenever the simulator's state changes."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, predicate)
        self._waiters.append(entry)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._waiters.remove(entry)

    async def wait_message(self, name: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until ``count`` messages called ``name`` were received; returns the latest one."""
        await self.wait_until(lambda: self.received_counts.get(name, 0) >= count, timeout)
        for got, params in reversed(self._received):
            if got == name:
                found: dict[str, Any] = params
                return found
        return {}

    async def wait_inventorying(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self.wait_until(
            lambda: any(rs.state == ROSpecState.Active for rs in self.rospecs.values()), timeout
        )

    def _notify(self) -> None:
        for fut, pred in self._waiters:
            if not fut.done() and pred():
                fut.set_result(None)

    def _record(self, msg: Message) -> None:
        self._received.append((msg.name, msg.params))
        self.received_counts[msg.name] = self.received_counts.get(msg.name, 0) + 1

    # -- the reader's host (ReaderHost) -----------------------------------------------------------

    @property
    def session(self) -> Connection | None:
        return self.server.current

    def start_run(self, run: InventoryRun) -> asyncio.Task[None]:
        return self.server.start_run(run)

    def notify(self) -> None:
        self._notify()
