"""The demo's backend side: it opens the agent's sealed events — from the broker, as the
reference consumer does, or without a broker straight from the agent's outbox (deleting each row
as a PUBACK would) — and hands each to ``on_event`` on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from simulators.broker import Mosquitto
from simulators.demo.tasks import READY_TIMEOUT_S, finish, until

if TYPE_CHECKING:
    from agent.app import CabinetApp
    from backend.feed import EventFeed
    from backend.keys import BackendKeys
    from simulators.cabinet import AgentArtefacts

logger = logging.getLogger(__name__)


class BackendSide:
    """The backend side: opens sealed envelopes from the broker, or from the outbox without one."""

    def __init__(
        self,
        keys: BackendKeys,
        art: AgentArtefacts,
        app: CabinetApp,
        broker: Mosquitto | None,
        on_event: Callable[[dict[str, Any]], None],
    ) -> None:
        from agent.privacy.envelope import Opener
        from backend.consumer import EventDecoder

        self.on_event = on_event
        self.art = art
        self.app = app
        self.broker = broker
        self.opener = Opener({keys.hpke_kid: keys.hpke_private})
        self.decoder = EventDecoder(self.opener)
        self.topic = f"cabinets/v1/{art.site_id}/{art.cabinet_id}/events"
        self.feed: EventFeed | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from backend.feed import EventFeed
        from simulators.cabinet import publish_documents

        if self.broker is None:
            self.task = asyncio.create_task(self._outbox(), name="demo:outbox-reader")
            return

        self.feed = EventFeed(self.opener, self.on_event, port=self.broker.port)
        # Subscribed before the agent publishes anything: the first events are not missed.
        await self.feed.start(READY_TIMEOUT_S)
        # The backend's documents wait for the agent on its cmd topics (retained).
        await asyncio.to_thread(publish_documents, self.art, port=self.broker.port)

    async def deliver_documents(self) -> None:
        """Make sure the agent holds the signed allow-list and asset registry."""
        app = self.app
        if self.broker is None:
            # No broker to carry them: hand them over; the agent verifies them as usual.
            for kind, raw in (
                ("allow-list", self.art.allow_list),
                ("asset-registry", self.art.asset_registry),
            ):
                doc = app.privacy.verifier.verify(raw, kind, datetime.now(UTC))
                await app.install(doc, raw)
        await until(
            lambda: {"allow-list", "asset-registry"} <= set(app.documents),
            READY_TIMEOUT_S,
            "the agent did not receive the backend's documents",
        )

    async def stop(self) -> None:
        if self.task is not None:
            await finish(self.task)
        if self.feed is not None:
            await self.feed.stop()

    async def _outbox(self) -> None:
        """Open each committed row of the agent's outbox, then delete it as a PUBACK would."""
        from agent.privacy.envelope import EnvelopeError

        app = self.app
        await app.ready.wait()
        store = app.store
        assert store is not None  # opened before ready
        last = 0
        while True:
            rows = await store.peek(256, after_seq=last)
            for row in rows:
                last = row.seq
                try:
                    delivered = self.decoder.handle(self.topic, row.envelope)
                except EnvelopeError as err:
                    logger.warning("outbox row %d could not be opened: %s", row.seq, err)
                    continue
                if delivered is not None:
                    self.on_event(json.loads(delivered.plaintext))
            if rows:
                await store.ack([row.seq for row in rows])
            if len(rows) == 256:
                continue
            # Woken by each commit; the timeout covers a commit between peek() and wait().
            async with app.committed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await app.committed.wait()
