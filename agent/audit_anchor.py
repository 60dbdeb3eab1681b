"""Publishing the audit chain's head (issue 11 item 6, docs/privacy.md §9).

Every ``[store] audit_anchor_interval_s`` the records appended since the last anchor are sent as
an ``audit.anchor`` event: their ``(seq, prev_hash, hash)`` links, starting with the previous
anchor's head record itself (at most ``MAX_ANCHOR_LINKS``; more records than that are sent in
the anchors that follow at once), so the backend (``cabinet-consumer``) can check that the chain it
is shown now extends the one it was shown before. A device that rewrites or truncates its
chain between anchors cannot make the next anchor link to the head the backend already holds.

The last anchored seq is kept in the store's kv (``audit.anchored``); it is written once the
request is queued to the engine (a crash before the event commits shows the backend a gap,
never a false "rewritten")."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.domain.events import MAX_ANCHOR_LINKS
from agent.store.store import Store
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

KV_KEY = "audit.anchored"


@dataclass(frozen=True, slots=True)
class AnchorRequest:
    """An engine input: publish these links as an ``audit.anchor`` event."""

    links: tuple[tuple[int, bytes, bytes], ...]


class AuditAnchoring:
    def __init__(
        self,
        store: Store,
        put: Callable[[AnchorRequest], Awaitable[None]],
        interval_s: float,
    ) -> None:
        self._store = store
        self._put = put
        self._interval_s = interval_s
        self.anchors = 0
        self.full = False  # the last anchor held as many links as one may: more follow

    async def run(self) -> None:
        anchored = await self._load()
        # At start the head is shown even if nothing was added: a chain rewritten while the
        # agent was down must not wait for the next record to be noticed.
        force = True
        while True:
            self.full = False
            try:
                anchored = await self.once(anchored, force=force)
                force = False
            except CabinetError as err:
                logger.error("audit anchor not published: %s", err)
            if self.full:
                # More records wait than one anchor holds: the rest follows at once (else
                # the backend's view falls further behind every interval under a busy
                # cabinet, and the window for an undetected rewrite has no bound).
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(self._interval_s)

    async def once(self, anchored: int, *, force: bool = False) -> int:
        """Publish the records after ``anchored`` (with that record first); the new anchor."""
        links = await self._store.audit_links(max(anchored, 1), MAX_ANCHOR_LINKS)
        if not links:
            head_seq, _ = await self._store.audit_head()
            if head_seq == 0 or head_seq >= anchored:
                return anchored  # nothing new since the last anchor
            # The chain is shorter than what was anchored (truncated): say so, show the head.
            links = await self._store.audit_links(head_seq, 1)
            if not links:
                return anchored
        elif links[-1][0] <= anchored and not force:
            return anchored  # nothing new since the last anchor
        await self._put(AnchorRequest(tuple(links)))
        head = links[-1][0]
        await self._store.kv_put(KV_KEY, struct.pack(">Q", head))
        self.anchors += 1
        logger.info("audit anchor: records %d..%d", links[0][0], head)
        self.full = len(links) >= MAX_ANCHOR_LINKS  # only once it is recorded as anchored
        return head

    async def _load(self) -> int:
        raw = await self._store.kv_get(KV_KEY)
        if raw is None or len(raw) != 8:
            return 0
        return int(struct.unpack(">Q", raw)[0])
