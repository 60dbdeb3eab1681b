"""The daemon's task tree: readers under one TaskGroup, structured shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.config import AgentConfig
from drivers.registry import make_reader
from drivers.types import (
    Clock,
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    SystemClock,
    TagRead,
)

logger = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 5.0


@dataclass
class ReadStats:
    """What the daemon has seen from one reader (for logs, the CLI and metrics)."""

    reads: int = 0
    epcs: set[str] = field(default_factory=set)
    per_antenna: dict[int, int] = field(default_factory=dict)


class ReaderHub:
    """The ReaderSink every reader driver delivers into; keeps counters and logs changes."""

    def __init__(self) -> None:
        self.stats: dict[str, ReadStats] = {}
        self.health: dict[str, ReaderHealth] = {}
        self.gpi: list[GpiEdge] = []
        self.changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        for r in reads:
            st = self.stats.setdefault(r.reader_id, ReadStats())
            st.reads += r.seen_count
            st.per_antenna[r.antenna] = st.per_antenna.get(r.antenna, 0) + r.seen_count
            if r.epc not in st.epcs:
                st.epcs.add(r.epc)
                logger.debug("reader %s: new tag %s on antenna %d", r.reader_id, r.epc, r.antenna)
        self.changed.set()

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health[health.reader_id] = health
        self.changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        logger.info("reader %s: GPI %d %s", edge.reader_id, edge.port, "high" if edge.high else "low")
        self.gpi.append(edge)
        del self.gpi[:-100]
        self.changed.set()


class _StopRequested(Exception):
    """Raised inside the task group to unwind it on a stop request."""


class Daemon:
    """Composition root: builds the parts from config and runs them as one task tree."""

    def __init__(self, cfg: AgentConfig, *, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.hub = ReaderHub()
        self.readers: list[ReaderDriver] = [
            make_reader(rc, self.hub, self.clock) for rc in cfg.readers
        ]
        self.stop_event = asyncio.Event()
        self.started = asyncio.Event()

    def request_stop(self) -> None:
        self.stop_event.set()

    async def run(self) -> None:
        """Run until ``request_stop()``; then shut down in order within the budget."""
        logger.info(
            "cabinet-agent starting: site %s cabinet %s, %d reader(s)",
            self.cfg.cabinet.site_id,
            self.cfg.cabinet.cabinet_id,
            len(self.readers),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                for reader in self.readers:
                    tg.create_task(reader.run(), name=f"reader:{reader.reader_id}")
                    await reader.start_inventory()
                tg.create_task(self._report_loop(), name="read-summary")
                tg.create_task(self._wait_stop(), name="stop-watch")
                self.started.set()
        except* _StopRequested:
            pass
        logger.info("cabinet-agent stopped")

    async def _wait_stop(self) -> None:
        await self.stop_event.wait()
        logger.info("stop requested; shutting down")
        raise _StopRequested

    async def _report_loop(self) -> None:
        """Log a one-line summary of reads per reader every few seconds (INFO)."""
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(5.0)
            for rid, st in sorted(self.hub.stats.items()):
                delta = st.reads - last.get(rid, 0)
                last[rid] = st.reads
                if delta:
                    logger.info(
                        "reader %s: %d reads in 5s, %d distinct tags so far",
                        rid,
                        delta,
                        len(st.epcs),
                    )


async def run_until_signalled(daemon: Daemon) -> None:
    """Run the daemon; SIGTERM/SIGINT request an orderly stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
