"""The reference consumer for an asyncio program: a cabinet's events from the broker, opened,
handed to a callback on the event loop (the demo's backend side).

The consumer runs paho's network thread; each opened event is decoded there and passed to the
loop with ``call_soon_threadsafe``, so ``on_event`` runs on the loop like any other callback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from agent.privacy.envelope import Opener
from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder

__all__ = ["EventFeed"]


class EventFeed:
    """Subscribe to the events on a (loopback) broker; ``on_event`` gets each opened event."""

    def __init__(
        self,
        opener: Opener,
        on_event: Callable[[dict[str, Any]], None],
        *,
        port: int,
        host: str = "127.0.0.1",
    ) -> None:
        self._decoder = EventDecoder(opener)
        self._on_event = on_event
        self._opts = ConsumerOptions(host=host, port=port)
        self._consumer: Consumer | None = None

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 (a bound on a thread's wait)
        """Connect and subscribe; returns once subscribed, so no later event is missed."""
        loop = asyncio.get_running_loop()

        def deliver(delivered: Delivered) -> None:
            event = json.loads(delivered.plaintext)
            loop.call_soon_threadsafe(self._on_event, event)

        self._consumer = Consumer(self._opts, self._decoder, deliver)
        self._consumer.start()
        if not await asyncio.to_thread(self._consumer.subscribed.wait, timeout):
            raise RuntimeError("the backend consumer could not subscribe to the broker")

    async def stop(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.stop)
            self._consumer = None
