"""The controller's hardware when it drives several cabinets: each reader and badge reader is
built and connected once, and every cabinet gets its share (``CabinetHardware``).

Readers: a :class:`drivers.shared.SharedReader` per reader, split by antenna port. Badge
readers: a :class:`BadgeBank` per badge reader; a card shown at a reader in front of several
cabinets goes to every one of them, and each judges it by its own allow-list (the door opened
within the unlock window is the session; the others relock). docs/domain.md, "Several cabinets".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import cast

from agent.logging_setup import cabinet_context
from drivers.badge.config import BadgeReaderConfig
from drivers.badge.reader import BadgeReader, BadgeSink
from drivers.registry import AnyReaderConfig, make_reader
from drivers.shared import SharedReader
from drivers.types import (
    BadgeRead,
    BadgeReaderDriver,
    Clock,
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    ReaderSink,
    TagRead,
)

logger = logging.getLogger(__name__)

# raw badge id, the pseudonym prefixes the cabinet's allow-list uses -> pseudonym
PseudonymizeWith = Callable[[str, frozenset[str]], Awaitable[str]]


@dataclass(frozen=True)
class BadgeClient:
    """A cabinet behind a shared badge reader: where its reads go, and how it names people."""

    sink: BadgeSink
    listed: Callable[[], frozenset[str]]  # prefixes its allow-list uses (key rotation)
    pseudonymize: PseudonymizeWith
    door_open: Callable[[], bool] = lambda: False  # its door is open now (sensor says so)
    # Another door of the bank opened for these people: an unlock they alone were granted here
    # and have not used lapses (CabinetEngine.withdraw_unlock). Must not block.
    withdraw: Callable[[frozenset[str]], None] = lambda actors: None
    cabinet_id: str = ""


# A card shown at a bank counts for the door opened after it for at most this long (no unlock
# window is longer: technician_unlock_s ≤ 3600).
BANK_CARD_S = 3600.0


class BadgeBank:
    """One badge reader in front of one or more cabinets (a bank): every read goes to each."""

    def __init__(self, cfg: BadgeReaderConfig, clock: Clock) -> None:
        self.clients: list[BadgeClient] = []
        self.skipped_reads = 0  # cards shown while every door of the bank stood open
        self.withdrawals = 0  # unlocks withdrawn from other doors once one door opened
        self._clock = clock
        # pseudonym → monotonic time of its last card at this bank (memory only)
        self._recent: dict[str, float] = {}
        self.driver = BadgeReader(cfg, self, self._pseudonymize, clock=clock)

    @property
    def reader_id(self) -> str:
        return self.driver.reader_id

    @property
    def health(self) -> ReaderHealth:
        return self.driver.health

    async def run(self) -> None:
        await self.driver.run()

    async def badge_read(self, read: BadgeRead) -> None:
        # A reader of one cabinet is that cabinet's, open door or not. At a bank the card is
        # for a door that is still shut: someone at a bank badges to open one.
        # A cabinet standing open already has its people, and a bank reader cannot tell who
        # stands where, so passing it on would make them a holder of a session they are not at.
        closed = self.clients
        if len(self.clients) > 1:
            closed = [c for c in self.clients if not c.door_open()]
        if not closed:
            self.skipped_reads += 1
            logger.info("badge presented at %s: every door of its bank is open", read.reader_id)
        elif len(self.clients) > 1:
            now = self._clock.monotonic()
            self._recent = {p: t for p, t in self._recent.items() if now - t <= BANK_CARD_S}
            self._recent[read.pseudonym] = now
        for client in closed:
            await client.sink.badge_read(read)

    def door_opened(self, cabinet_id: str) -> None:
        """A door of the bank opened: the people whose card at the bank unlocked it opened
        *one* cabinet; the others withdraw an unlock only they were granted (else a second
        person could open a neighbour within the window, under the first one's name)."""
        if len(self.clients) < 2 or not self._recent:
            return
        now = self._clock.monotonic()
        actors = frozenset(p for p, t in self._recent.items() if now - t <= BANK_CARD_S)
        for client in self.clients:
            if client.cabinet_id != cabinet_id:
                self.withdrawals += 1
                client.withdraw(actors)

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        for client in self.clients:
            await client.sink.badge_reader_health(health)

    async def _pseudonymize(self, raw_id: str) -> str:
        # The cabinets of one controller share the site and its keys ([privacy] is not per
        # cabinet), so one pseudonym serves them all; during a key rotation it is made under
        # the key any of their allow-lists already uses.
        listed: frozenset[str] = frozenset().union(*(c.listed() for c in self.clients))
        return await self.clients[0].pseudonymize(raw_id, listed)


class BadgeView:
    """A cabinet's handle on a bank's badge reader (the bank's driver runs once)."""

    def __init__(self, bank: BadgeBank) -> None:
        self._bank = bank

    @property
    def reader_id(self) -> str:
        return self._bank.reader_id

    @property
    def health(self) -> ReaderHealth:
        return self._bank.health

    async def run(self) -> None:
        raise RuntimeError(f"badge reader {self.reader_id} is shared: run its BadgeBank")

    def door_opened(self, cabinet_id: str) -> None:
        """This cabinet's door opened (see ``BadgeBank.door_opened``)."""
        self._bank.door_opened(cabinet_id)


class _Tagged:
    """A cabinet's sink, called from a shared device's task: what it logs names the cabinet."""

    def __init__(self, cabinet_id: str, sink: ReaderSink | BadgeSink) -> None:
        self._cabinet = cabinet_id
        self._sink = sink

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        with cabinet_context(self._cabinet):
            await cast(ReaderSink, self._sink).tag_reads(reads)

    async def reader_health(self, health: ReaderHealth) -> None:
        with cabinet_context(self._cabinet):
            await cast(ReaderSink, self._sink).reader_health(health)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        with cabinet_context(self._cabinet):
            await cast(ReaderSink, self._sink).gpi_edge(edge)

    async def badge_read(self, read: BadgeRead) -> None:
        with cabinet_context(self._cabinet):
            await cast(BadgeSink, self._sink).badge_read(read)

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        with cabinet_context(self._cabinet):
            await cast(BadgeSink, self._sink).badge_reader_health(health)


class Hardware:
    """Every reader and badge reader of the controller, each with one connection."""

    def __init__(
        self,
        readers: Sequence[AnyReaderConfig],
        badge_readers: Sequence[BadgeReaderConfig],
        clock: Clock,
    ) -> None:
        self.readers = {rc.id: SharedReader(_builder(rc, clock)) for rc in readers}
        self.banks = {bc.id: BadgeBank(bc, clock) for bc in badge_readers}

    def drivers(self) -> list[tuple[str, Callable[[], Coroutine[object, object, None]]]]:
        """(task name, run) of every device: the process runs each once."""
        out: list[tuple[str, Callable[[], Coroutine[object, object, None]]]] = [
            (f"reader:{rid}", shared.run) for rid, shared in self.readers.items()
        ]
        out += [(f"badge:{bid}", bank.run) for bid, bank in self.banks.items()]
        return out

    def for_cabinet(self, cabinet_id: str) -> CabinetHardware:
        return CabinetHardware(self, cabinet_id)


def _builder(cfg: AnyReaderConfig, clock: Clock) -> Callable[[ReaderSink], ReaderDriver]:
    def build(sink: ReaderSink) -> ReaderDriver:
        return make_reader(cfg, sink, clock)

    return build


class CabinetHardware:
    """What one cabinet's app is given instead of building its own drivers."""

    def __init__(self, hub: Hardware, cabinet_id: str) -> None:
        self._hub = hub
        self.cabinet_id = cabinet_id

    def readers(self, configs: Sequence[AnyReaderConfig], sink: ReaderSink) -> list[ReaderDriver]:
        """The cabinet's ports on its readers (``configs`` carry its own antenna ports)."""
        tagged = _Tagged(self.cabinet_id, sink)
        return [
            self._hub.readers[rc.id].port(self.cabinet_id, rc.antennas, tagged) for rc in configs
        ]

    def badge_readers(
        self, configs: Sequence[BadgeReaderConfig], client: BadgeClient
    ) -> list[BadgeReaderDriver]:
        views: list[BadgeReaderDriver] = []
        for bc in configs:
            bank = self._hub.banks[bc.id]
            bank.clients.append(
                replace(
                    client, sink=_Tagged(self.cabinet_id, client.sink), cabinet_id=self.cabinet_id
                )
            )
            views.append(BadgeView(bank))
        return views
