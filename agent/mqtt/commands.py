"""Inbound commands: signed backend documents on the cabinet's ``cmd`` topics, checked before use.

Messages arrive on paho's callback (``on_inbound``: a bounded queue, never blocking the loop); the
publisher's command worker hands each to ``Commands.handle``, which verifies the document (in a
worker thread), and installs it through the ``DocumentSink`` only after every check passed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from datetime import datetime
from typing import Protocol

from agent.logging_setup import ThrottledLog, printable
from agent.mqtt.config import MqttConfig
from agent.mqtt.link import PublisherStats
from agent.mqtt.session import Inbound
from agent.privacy.signed import DocumentChecker, DocumentError, SignedDocument
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

INBOUND_QUEUE = 16
# Repeated log lines about inbound messages (queue full, refusals): one per key and interval.
INBOUND_LOG_INTERVAL_S = 10.0


class DocumentSink(Protocol):
    """Where verified backend documents go (and who hears about refused ones)."""

    def installed(self, kind: str) -> bytes | None:
        """The raw installed document of ``kind`` (rollback and conflict checks), or None."""

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        """Apply a verified document; called only after every check passed.

        May still refuse it (DocumentError) or fail to store it (CabinetError)."""

    def rejected(self, kind: str, reason: str, detail: str) -> None:
        """A document was refused (never applied); report it."""


class Commands:
    """Verifies and installs the documents received on ``topics`` (topic -> document kind)."""

    def __init__(
        self,
        cfg: MqttConfig,
        topics: Mapping[str, str],
        stats: PublisherStats,
        executor: Executor,
        *,
        verifier: DocumentChecker | None,
        documents: DocumentSink | None,
        now: Callable[[], datetime],
    ) -> None:
        self._cfg = cfg
        self._topics = topics
        self._stats = stats
        self._executor = executor
        self._verifier = verifier
        self._documents = documents
        self._now = now
        self.inbound: asyncio.Queue[Inbound] = asyncio.Queue(INBOUND_QUEUE)
        self._log = ThrottledLog(logger, INBOUND_LOG_INTERVAL_S)

    def close(self) -> None:
        self._log.close()

    def on_inbound(self, msg: Inbound) -> None:
        """paho delivered a message: queue it, or count it dropped when the queue is full."""
        try:
            self.inbound.put_nowait(msg)
        except asyncio.QueueFull:
            # Documents are retained on the broker: the newest comes back at the next subscribe.
            # A flood costs a line per interval (with a count), not a line per message.
            self._stats.commands_dropped += 1
            self._log.log(
                logging.WARNING,
                "queue-full",
                "command queue full; dropped a message on %s (%d dropped so far)",
                printable(msg.topic),
                self._stats.commands_dropped,
            )

    async def handle(self, topic: str, payload: bytes, *, size: int | None = None) -> bool:
        """Verify a document received on a cmd topic and install it; False if refused.

        ``size``: the announced size of a message whose payload was discarded unread because
        it exceeded the inbound limit (``payload`` is then empty).
        """
        kind = self._topics.get(topic)
        if kind is None:
            self._log.log(
                logging.WARNING,
                "unexpected-topic",
                "message on unexpected topic %s ignored",
                printable(topic),
            )
            return False
        size = len(payload) if size is None else size
        if size > self._cfg.max_command_bytes:
            self._reject(
                kind,
                DocumentError.MALFORMED,
                f"{size} bytes exceeds the limit of {self._cfg.max_command_bytes}",
            )
            return False
        if not payload:
            return False  # a cleared retained message, nothing to install
        if self._verifier is None or self._documents is None:
            self._reject(kind, "no-verifier", "no signing keys configured; commands refused")
            return False
        current = self._documents.installed(kind)
        try:
            doc = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                functools.partial(
                    self._verifier.verify, payload, kind, self._now(), 0, current=current
                ),
            )
        except DocumentError as err:
            self._reject(kind, err.reason, err.detail)
            return False
        if current == payload:
            return True  # idempotent re-delivery of the installed document
        try:
            await self._documents.install(doc, payload)
        except DocumentError as err:
            self._reject(kind, err.reason, err.detail)
            return False
        except CabinetError as err:
            self._reject(kind, "install-failed", str(err))
            return False
        self._stats.commands_accepted += 1
        logger.info("installed %s v%d (signed by %s)", kind, doc.version, doc.kid)
        return True

    def _reject(self, kind: str, reason: str, detail: str) -> None:
        self._stats.commands_rejected += 1
        # The detail may quote the document (the broker's bytes): printable before it reaches
        # a log line or status.
        detail = printable(detail, 300)
        self._log.log(
            logging.WARNING,
            ("refused", kind, reason),
            "refused %s document: %s (%s)",
            kind,
            reason,
            detail,
        )
        if self._documents is not None:
            self._documents.rejected(kind, reason, detail)
