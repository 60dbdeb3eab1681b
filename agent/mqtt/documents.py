"""Installed backend documents (allow-list, asset registry) kept in the store's kv table."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.privacy.signed import KINDS, SignedDocument
from agent.store import Store

logger = logging.getLogger(__name__)

KV_PREFIX = "doc/"


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: str
    reason: str
    detail: str


class StoreDocuments:
    """A ``DocumentSink``: persists each accepted document (raw, as signed) before applying it.

    The persisted raw bytes are what the verifier compares against next time, so a rollback or
    a same-version conflict is refused across restarts.
    """

    def __init__(
        self,
        store: Store,
        installed: dict[str, bytes],
        on_install: Callable[[SignedDocument], Awaitable[None]] | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
    ) -> None:
        self._store = store
        self._installed = installed
        self._on_install = on_install
        self._on_reject = on_reject
        self.rejections: list[Rejection] = []  # most recent last, bounded

    @classmethod
    async def load(
        cls,
        store: Store,
        on_install: Callable[[SignedDocument], Awaitable[None]] | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
    ) -> StoreDocuments:
        installed: dict[str, bytes] = {}
        for kind in sorted(KINDS):
            raw = await store.kv_get(KV_PREFIX + kind)
            if raw is not None:
                installed[kind] = raw
        return cls(store, installed, on_install, on_reject)

    def installed(self, kind: str) -> bytes | None:
        return self._installed.get(kind)

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        await self._store.kv_put(KV_PREFIX + doc.kind, raw)
        self._installed[doc.kind] = raw
        if self._on_install is not None:
            await self._on_install(doc)

    def rejected(self, kind: str, reason: str, detail: str) -> None:
        rejection = Rejection(kind, reason, detail)
        self.rejections.append(rejection)
        del self.rejections[:-50]
        if self._on_reject is not None:
            self._on_reject(rejection)
