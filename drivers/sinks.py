"""Ready-made ReaderSinks (the value types stay free of asyncio: see drivers/types.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from drivers.types import GpiEdge, ReaderHealth, TagRead


class QueueSink:
    """A ReaderSink that puts everything on one bounded asyncio queue (back-pressure on full)."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.queue: asyncio.Queue[TagRead | ReaderHealth | GpiEdge] = asyncio.Queue(maxsize)

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        for read in reads:
            await self.queue.put(read)

    async def reader_health(self, health: ReaderHealth) -> None:
        await self.queue.put(health)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        await self.queue.put(edge)
