"""One reader, several cabinets: a reader's antenna ports split between cabinets on one
controller.

A reader accepts one client (an LLRP reader keeps one session), so the driver is built once and
the cabinets each get a :class:`ReaderPort`, a ``ReaderDriver`` that sees only its own antenna
ports. Reads are routed by antenna port to the cabinet that owns it, and only while that cabinet
is scanning, so a cabinet sees what a reader of its own would show it. Health and GPI edges go
to every cabinet (each door picks its own sensor port). The reader inventories while any cabinet
wants it to: one cabinet's end of scan never cuts another's scan short. A cabinet whose scan
starts while another one's runs has the reader restarted: its pass counts reads of a read cycle
begun for it, never a report of the running one made before its door closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from drivers.types import (
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    ReaderSink,
    TagRead,
)

logger = logging.getLogger(__name__)

MakeReader = Callable[[ReaderSink], ReaderDriver]


class SharedReader:
    """The one driver of a shared reader, and the sink that routes what it reports."""

    def __init__(self, make: MakeReader) -> None:
        self._ports: list[ReaderPort] = []
        self._by_antenna: dict[int, ReaderPort] = {}
        self._inventorying = False
        self.dropped_reads = 0  # reads of a port nobody owns, or of a cabinet not scanning
        self.driver = make(self)

    @property
    def reader_id(self) -> str:
        return self.driver.reader_id

    @property
    def ports(self) -> list[ReaderPort]:
        return list(self._ports)

    def port(self, owner: str, antennas: Iterable[int], sink: ReaderSink) -> ReaderPort:
        """A view for cabinet ``owner`` over ``antennas`` (each port belongs to one owner)."""
        port = ReaderPort(self, owner, frozenset(antennas), sink)
        taken = port.antennas & self._by_antenna.keys()
        if taken:
            raise ValueError(f"reader {self.reader_id}: antennas {sorted(taken)} already owned")
        self._ports.append(port)
        for antenna in port.antennas:
            self._by_antenna[antenna] = port
        return port

    async def run(self) -> None:
        await self.driver.run()

    # -- ReaderSink: what the driver reports ------------------------------------------------

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        routed: dict[int, list[TagRead]] = {}
        for read in reads:
            port = self._by_antenna.get(read.antenna)
            if port is None or not port.wants_inventory:
                self.dropped_reads += 1
                continue
            routed.setdefault(id(port), []).append(read)
        for port in self._ports:
            batch = routed.get(id(port))
            if batch:
                await port.sink.tag_reads(batch)

    async def reader_health(self, health: ReaderHealth) -> None:
        for port in self._ports:
            await port.sink.reader_health(health)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        for port in self._ports:
            await port.sink.gpi_edge(edge)

    # -- scan demand ------------------------------------------------------------------------

    async def demand_changed(self, joined: ReaderPort | None = None) -> None:
        """Start or stop the reader for what the ports want; ``joined``: the port whose scan
        just started."""
        want = any(p.wants_inventory for p in self._ports)
        if want:
            if joined is not None and any(
                p.wants_inventory for p in self._ports if p is not joined
            ):
                # A cabinet joining a read cycle run for another one is given a new cycle:
                # reports of the running one may still hold reads made before its door closed
                # (a tool taken a moment ago), and would reach its pass once its reads are
                # routed. Restarted, the driver says ONLINE after every report of the old
                # cycle and INVENTORYING only with the new one, as for a reader of its own
                # (docs/domain.md, "Scan pass"); the other cabinet's pass counts afresh too.
                # A reader whose answer to a start is still awaited is restarted too, once it
                # answers: the driver keeps a stop asked meanwhile for the cycle it begins.
                await self.driver.stop_inventory()
            # Always passed on: the driver's start is idempotent, and a cabinet starting its
            # scan must not depend on what the driver last heard from another cabinet.
            await self.driver.start_inventory()
        elif self._inventorying:
            await self.driver.stop_inventory()
        self._inventorying = want


class ReaderPort:
    """One cabinet's share of a :class:`SharedReader`: a ``ReaderDriver`` of its own."""

    def __init__(
        self, shared: SharedReader, owner: str, antennas: frozenset[int], sink: ReaderSink
    ) -> None:
        self._shared = shared
        self.owner = owner
        self.antennas = antennas
        self.sink = sink
        self.wants_inventory = False

    @property
    def reader_id(self) -> str:
        return self._shared.driver.reader_id

    @property
    def health(self) -> ReaderHealth:
        return self._shared.driver.health

    @property
    def last_progress(self) -> float:
        return self._shared.driver.last_progress

    @property
    def last_frame(self) -> float:
        return self._shared.driver.last_frame

    async def run(self) -> None:
        """The shared driver runs once, outside the cabinets (``SharedReader.run``)."""
        raise RuntimeError(f"reader {self.reader_id} is shared: run the SharedReader, not a port")

    async def start_inventory(self) -> None:
        joined = not self.wants_inventory
        self.wants_inventory = True
        await self._shared.demand_changed(self if joined else None)

    async def stop_inventory(self) -> None:
        self.wants_inventory = False
        await self._shared.demand_changed()

    async def set_gpo(self, port: int, high: bool) -> None:
        await self._shared.driver.set_gpo(port, high)
