"""Badge reader driver: a serial URL, a sans-IO codec, and the pseudonymizer at the seam.

The raw card number lives only between the codec's ``RawBadge`` and the
``pseudonymize()`` call; what leaves this module is a :class:`BadgeRead` with a pseudonym.

``pseudonymize`` is a coroutine: the agent's is memory-hard (tens of milliseconds of a worker
thread), so a card held to the reader, which repeats its frame ~10 times a second, is recognised
as a repeat *before* it is derived again. The driver remembers only a keyed digest of the last
card under a random key that lives in this object's memory alone (never written, never logged):
enough to say "same card as a moment ago", useless to anyone who later reads the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from drivers.backoff import Backoff
from drivers.badge.codec import CodecStats, RawBadge, make_codec
from drivers.badge.config import BadgeReaderConfig
from drivers.errors import PermanentError
from drivers.serialio import SerialConnection
from drivers.supervisor import Retry, Supervisor
from drivers.types import BadgeRead, Clock, ReaderHealth, ReaderState, SystemClock

logger = logging.getLogger(__name__)

Pseudonymize = Callable[[str], Awaitable[str]]


@runtime_checkable
class BadgeSink(Protocol):
    """Where a badge reader delivers what it observed. Awaiting gives back-pressure."""

    async def badge_read(self, read: BadgeRead) -> None: ...

    async def badge_reader_health(self, health: ReaderHealth) -> None: ...


@dataclass(frozen=True, slots=True)
class BadgeReaderStats:
    """Counters since the driver was built (codec counters plus the driver's own)."""

    frames: int
    dropped_bytes: int
    bad_checksums: int
    rejected_lines: int
    overlong_lines: int
    reads: int  # BadgeReads delivered to the sink
    repeats_suppressed: int  # frames of a card still held within repeat_interval_s
    pseudonymizer_failures: int
    connects: int


class BadgeReader:
    """One badge reader on a serial URL; ``run()`` keeps it connected until cancelled."""

    def __init__(
        self,
        cfg: BadgeReaderConfig,
        sink: BadgeSink,
        pseudonymize: Pseudonymize,
        *,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._cfg = cfg
        self._sink = sink
        self._pseudonymize = pseudonymize
        self._clock: Clock = clock or SystemClock()
        self._codec = make_codec(cfg.protocol, cfg.pattern, cfg.max_line, cfg.id_base)
        self._health = ReaderHealth(cfg.id, ReaderState.STOPPED, self._clock.now())
        self._session = 0
        self._reads = 0
        self._suppressed = 0
        self._pseudonymizer_failures = 0
        # Only the last delivered card is remembered, as a digest under a key of this process's
        # memory alone: a reader sees one card at a time.
        self._repeat_key = os.urandom(32)
        self._last_card: bytes | None = None
        self._last_at = 0.0
        # stable_s=0: every connection that opened starts the delays over (a badge reader is
        # idle most of the time; only failing to open it backs off).
        self._sv = Supervisor(
            self._run_session,
            backoff=backoff or Backoff(initial_s=cfg.backoff.initial_s, max_s=cfg.backoff.max_s),
            stable_s=0.0,
            on_retry=self._offline,
            on_failed=self._failed,
            on_stopped=self._stopped,
            clock=self._clock.monotonic,
        )

    @property
    def reader_id(self) -> str:
        return self._cfg.id

    @property
    def health(self) -> ReaderHealth:
        return self._health

    @property
    def stats(self) -> BadgeReaderStats:
        c: CodecStats = self._codec.stats
        return BadgeReaderStats(
            frames=c.frames,
            dropped_bytes=c.dropped_bytes,
            bad_checksums=c.bad_checksums,
            rejected_lines=c.rejected_lines,
            overlong_lines=c.overlong_lines,
            reads=self._reads,
            repeats_suppressed=self._suppressed,
            pseudonymizer_failures=self._pseudonymizer_failures,
            connects=self._session,
        )

    async def run(self) -> None:
        """Connect, read badges, reconnect with jittered backoff; until cancelled (or a
        permanent error: the badge reader is then reported FAILED)."""
        await self._sv.run()

    async def _run_session(self) -> None:
        target = self._cfg.target()
        if self._health.state == ReaderState.STOPPED:
            await self._set_health(ReaderState.CONNECTING, "")
        conn = await SerialConnection.open(target, self._cfg.open_timeout_s)
        try:
            self._session += 1
            self._codec.reset()
            self._sv.up()
            logger.info("badge reader %s: connected to %s", self.reader_id, target.url)
            await self._set_health(ReaderState.ONLINE, "")
            await self._pump(conn)
        finally:
            await conn.close()

    async def _offline(self, retry: Retry, delay: float) -> None:
        await self._set_health(ReaderState.OFFLINE, retry.reason)

    async def _failed(self, err: PermanentError) -> None:
        logger.error(
            "badge reader %s: %s; not retried: fix its configuration and restart",
            self.reader_id,
            err,
        )
        await self._set_health(ReaderState.FAILED, str(err))

    async def _stopped(self) -> None:
        self._health = replace(
            self._health, state=ReaderState.STOPPED, at=self._clock.now(), detail="stopped"
        )
        await self._sink.badge_reader_health(self._health)

    async def _pump(self, conn: SerialConnection) -> None:
        while True:
            data = await conn.read()
            for raw in self._codec.feed(data):
                await self._deliver(raw)

    async def _deliver(self, raw: RawBadge) -> None:
        card = hmac.digest(self._repeat_key, raw.reveal().encode("utf-8"), hashlib.sha256)
        now = self._clock.monotonic()
        if (
            self._last_card is not None
            and hmac.compare_digest(card, self._last_card)
            and now - self._last_at < self._cfg.repeat_interval_s
        ):
            self._suppressed += 1
            return
        try:
            pseudonym = await self._pseudonymize(raw.reveal())
        except Exception as err:  # noqa: BLE001  the message may quote the raw id: type only
            self._pseudonymizer_failures += 1
            n = self._pseudonymizer_failures
            # A held card repeats ~10 frames/s: log the 1st, 2nd, 4th, 8th… failure only.
            if n & (n - 1) == 0:
                logger.error(
                    "badge reader %s: pseudonymizer failed (%s); read dropped (%d so far)",
                    self.reader_id,
                    type(err).__name__,
                    n,
                )
            return
        self._last_card = card
        self._last_at = now
        self._reads += 1
        logger.debug("badge reader %s: badge read", self.reader_id)
        await self._sink.badge_read(BadgeRead(self.reader_id, pseudonym, self._clock.now()))

    async def _set_health(self, state: ReaderState, detail: str) -> None:
        if state == self._health.state and detail == self._health.detail:
            return
        if state == ReaderState.OFFLINE:
            logger.warning("badge reader %s offline: %s", self.reader_id, detail)
        self._health = ReaderHealth(
            self.reader_id, state, self._clock.now(), detail=detail, session=self._session
        )
        await self._sink.badge_reader_health(self._health)
