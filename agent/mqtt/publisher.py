"""Store-and-forward publisher: sealed outbox rows → MQTT QoS 1, deleted only after PUBACK.

Contract (docs/delivery.md): at-least-once. A row leaves the outbox only once the broker has
acknowledged it with a success reason code; a refusal (reason >= 0x80) is recorded with
``mark_failed`` (dead-lettered by the store after N tries, with an alert). At most
``inflight_window`` publishes are unacknowledged. After a (re)connect, rows appended since the
connect ("live") go first; the older backlog is replayed through a token bucket. An event the
broker refuses without a reason code (it ends the connection, or never confirms the event) is
found by sending one event at a time (``agent/mqtt/isolate.py``) and dead-lettered like a
refusal.

One connection is one session of ``drivers.supervisor`` (reconnects, backoff by how the last
one ended, the watchdog's progress); ``agent/mqtt/link.py`` keeps the link's outages and
episodes, ``agent/mqtt/commands.py`` the inbound documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from agent import __version__
from agent.mqtt.commands import Commands, DocumentSink
from agent.mqtt.config import MqttConfig
from agent.mqtt.isolate import Isolation
from agent.mqtt.link import HEALTHY_SESSION_S, STABLE_MIN_S, LinkWatch, PublisherStats
from agent.mqtt.session import (
    FAILURE_THRESHOLD,
    ConnectionLost,
    EndKind,
    MqttSession,
    SubscribeResult,
    build_tls_context,
)
from agent.mqtt.states import BrokerState, CommandsState
from agent.privacy.signed import ALLOW_LIST, ASSET_REGISTRY, ERASURE, DocumentChecker
from agent.store.types import OutboxRow, OutboxStats
from drivers.backoff import Backoff
from drivers.errors import CabinetError, PermanentError, TransientError
from drivers.supervisor import Progress, Retry, Supervisor

logger = logging.getLogger(__name__)

AGENT_VERSION = __version__  # the package version, announced in the status message
COMMAND_KINDS = (ALLOW_LIST, ASSET_REGISTRY, ERASURE)
PREFETCH = 256
MAX_UNCOMMITTED_ACKS = 4096
ACK_RETRY_S = 1.0
# A full window waits for a PUBACK; the session's ack timeout ends a connection whose PUBACKs
# stop, so this only bounds the wait for the watchdog.
SLOT_WAIT_S = 1.0
SHUTDOWN_FLUSH_S = 3.0
# Rows held back by the store (its sequence sidecar cannot be written): nothing announces when
# they can go, so the drain reads again after 1 s, doubling to HELD_RETRY_MAX_S while they stay.
HELD_RETRY_S = 1.0
HELD_RETRY_MAX_S = 5.0


class Outbox(Protocol):
    """What the publisher needs from the state store (``agent.store.Store`` provides it)."""

    async def peek(
        self, limit: int, *, exclude: Collection[int] = (), after_seq: int | None = None
    ) -> list[OutboxRow]: ...

    async def ack(self, seqs: Sequence[int]) -> int: ...

    async def mark_failed(self, seq: int, reason: str) -> bool: ...

    async def stats(self) -> OutboxStats: ...

    @property
    def held_reads(self) -> int:
        """Delivery reads that held deliverable rows back (the store's sequence sidecar could not
        be written); growing, the drain must read again: no signal says when they can go."""
        ...


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._t = clock()

    def take(self) -> float:
        """Take one token and return 0, or return the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


# How a connection ended when the broker's side ended it: it closed the socket or sent a
# DISCONNECT, the link broke, or a publish was never confirmed (agent/mqtt/isolate.py).
BROKER_ENDS = frozenset({EndKind.NO_ACK, EndKind.CLOSED, EndKind.LINK, EndKind.BROKER})


class _SessionEnded(Exception):
    """Control flow inside run(); never escapes."""


class Publisher:
    """Drains the outbox to ``cabinets/v1/<site>/<cabinet>/events``; run with ``await run()``."""

    def __init__(
        self,
        cfg: MqttConfig,
        site_id: str,
        cabinet_id: str,
        outbox: Outbox,
        *,
        key_ids: Sequence[str] = (),
        verifier: DocumentChecker | None = None,
        documents: DocumentSink | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_alert: Callable[[str, str], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._outbox = outbox
        self._now = now
        base = f"{cfg.topic_prefix}/{site_id}/{cabinet_id}"
        self.client_id = f"cabinet-{site_id}-{cabinet_id}"
        self.command_filter = f"{base}/cmd/#"  # what a broker ACL must let us read
        self.events_topic = f"{base}/events"
        self.status_topic = f"{base}/status"
        self.command_topics = {f"{base}/cmd/{kind}": kind for kind in COMMAND_KINDS}
        # MQTT 3.1.1: an event is taken once acknowledged *and* delivered back to us on its
        # own topic (no PUBACK reason codes; see MqttSession). The ACL must let us read it.
        self._echo_topic = self.events_topic if cfg.protocol == "3.1.1" else None
        self._key_ids = sorted(key_ids)
        self.stats = PublisherStats()
        self._tls = build_tls_context(cfg.tls) if cfg.tls is not None else None
        self._bucket = TokenBucket(cfg.replay_rate, cfg.replay_burst)
        self._wake = asyncio.Event()  # new rows committed: look for them now
        # Anything that can change the drain's work: a slot freed up, an ack or a failure
        # committed, new rows. The drain waits on it when it has nothing to do.
        self._progress = asyncio.Event()
        self._rescan = False  # a refused row is deliverable again: read from the start
        self._window = cfg.inflight_window
        # seq -> (PUBACK future, monotonic send time); the future identifies the attempt.
        self._inflight: dict[int, tuple[asyncio.Future[int], float]] = {}
        self._uncommitted: set[int] = set()  # PUBACKed, delete not yet committed
        self._lost: set[int] = set()  # rows whose publish died with this connection
        self._isolation = Isolation()
        self._rewind = False  # a struck event counted: read the backlog from the start again
        self._to_ack: list[int] = []
        self._to_fail: list[tuple[int, str]] = []
        self._ack_ready = asyncio.Event()
        self._failure_backoff = Backoff(cfg.failure_backoff.initial_s, cfg.failure_backoff.max_s)
        self._held_backoff = Backoff(HELD_RETRY_S, HELD_RETRY_MAX_S)
        self._pause_until = 0.0
        # Owned worker threads (connect + TLS handshake, signature checks), shut down by run().
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mqtt-worker")
        self._link = LinkWatch(
            cfg,
            self.stats,
            client_id=self.client_id,
            command_filter=self.command_filter,
            now=now,
            alert=on_alert or _no_alert,
        )
        self._commands = Commands(
            cfg,
            self.command_topics,
            self.stats,
            self._executor,
            verifier=verifier,
            documents=documents,
            now=now,
        )
        # The watchdog's view and the stop request outlive the supervisor, which run() builds:
        # holding it here would make a cycle that keeps a never-run publisher's worker thread.
        self._alive = Progress()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ public API

    def notify(self) -> None:
        """New rows were committed to the outbox: send them now (the drain waits for this)."""
        self._wake.set()
        self._progress.set()

    def stop(self) -> None:
        """Ask ``run()`` to finish: flush acks, publish offline status, disconnect."""
        self._stopping.set()
        self._wake.set()

    def alive_at(self) -> float:
        """Watchdog probe: when the loop last turned, or now while it sits in a bounded wait.

        Every wait of the connection loop and the drain is bounded (connect timeout, backoff,
        the safety-net rescan); while one lasts the publisher is doing its job, however long
        the broker stays away. A loop stuck on an unbounded await (a store call that never returns) stops
        turning, and the watchdog is withheld.
        """
        return self._alive.last_progress

    async def run(self) -> None:
        """Connect, drain, reconnect with jittered backoff; returns after ``stop()``."""
        # Each connection is one session; how it ended paces the next (link.py). A connection
        # that lived HEALTHY_SESSION_S or carried traffic starts the backoff over.
        supervisor = Supervisor(
            self._connection,
            backoff=Backoff(self._cfg.backoff.initial_s, self._cfg.backoff.max_s),
            stable_s=HEALTHY_SESSION_S,
            on_retry=self._retrying,
            on_failed=self._failed,
            progress=self._alive,
            stopping=self._stopping,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._ack_writer(), name="mqtt-ack-writer")
                tg.create_task(self._command_worker(), name="mqtt-commands")
                await supervisor.run()
                raise _SessionEnded  # stop requested: end the helper tasks
        except* _SessionEnded:
            pass
        finally:
            self._commands.close()
            self._link.close()
            try:
                await self._final_flush()
            finally:
                self._executor.shutdown(wait=False, cancel_futures=True)

    async def handle_command(self, topic: str, payload: bytes, *, size: int | None = None) -> bool:
        """Verify a document received on a cmd topic and install it; False if refused.

        ``size``: the announced size of a message whose payload was discarded unread because
        it exceeded the inbound limit (``payload`` is then empty).
        """
        return await self._commands.handle(topic, payload, size=size)

    # ------------------------------------------------------------------ connection

    async def _connection(self) -> Retry | None:
        """One connection: connect, serve until it ends; how it ended (None: stopping)."""
        if self.stats.connect_attempts:
            self.stats.reconnects += 1
        session = MqttSession(
            self._cfg,
            self.client_id,
            will=(self.status_topic, self._status("offline", "connection lost")),
            tls_context=self._tls,
            on_inbound=self._commands.on_inbound,
            executor=self._executor,
            echo_topic=self._echo_topic,
        )
        self.stats.connect_attempts += 1
        attempt_wall, attempt_mono = self._now(), time.monotonic()
        try:
            # connect() keeps its own deadline (connect_timeout_s); the grace only covers
            # scheduling, so a connect that overruns it shows up as a stalled publisher.
            with self._alive.bounded(self._cfg.connect_timeout_s):
                connack = await session.connect()
        except TransientError as err:
            # The supervisor paces the retry by the error's class (a refusal: the longest).
            self._link.connect_failed(str(err), attempt_wall, attempt_mono)
            raise
        self._alive.beat()
        self._link.connected()
        acked_before = self.stats.acked
        self._lost = set()
        try:
            await self._serve(session, connack.receive_maximum)
        finally:
            self.stats.connected = False
            self.stats.connected_since = None
            lost = self._lost | set(self._inflight)
            self._inflight.clear()
            self.stats.in_flight = 0
            reason = session.closed.result() if session.closed.done() else "stopping"
            if not self._stopping.is_set():
                self._isolation.session_ended(lost, session.end_kind in BROKER_ENDS, reason)
                self.stats.isolating = self._isolation.active
            if self._stopping.is_set():
                await self._say_goodbye(session)
            session.abort(reason)
        if self._stopping.is_set():
            return None
        try:
            self._link.waiting = (await self._outbox.stats()).depth
        except CabinetError:
            self._link.waiting = "?"
        return self._link.session_ended(session, reason, self.stats.acked > acked_before)

    async def _retrying(self, retry: Retry, delay: float) -> None:
        self._link.retrying(retry, delay)

    async def _failed(self, err: PermanentError) -> None:
        # Nothing raises one after start-up today (bad TLS material is refused before); if it
        # ever does, the events stay in the outbox and the reason shows in status.
        self.stats.last_error = str(err)
        logger.critical("MQTT publisher stopped: %s; events stay in the outbox", err)

    async def _serve(self, session: MqttSession, receive_maximum: int | None) -> None:
        self._window = min(self._cfg.inflight_window, receive_maximum or self._cfg.inflight_window)
        self.stats.window = self._window
        try:
            stats = await self._outbox.stats()
            self.stats.backlog_mark = stats.next_seq - 1
            self.stats.connected = True
            # Once per connection is a line per cycle during an episode: quiet then.
            log = logger.debug if self._link.in_episode() else logger.info
            log(
                "MQTT connected as %s (window %d, %d row(s) waiting)",
                self.client_id,
                self._window,
                stats.depth,
            )
            if self.stats.commands is not CommandsState.REFUSED:
                self.stats.commands = CommandsState.SUBSCRIBING
            topics = list(self.command_topics)
            if self._echo_topic is not None:
                topics.append(self._echo_topic)
            suback = session.subscribe(topics)
            suback.add_done_callback(functools.partial(self._on_suback, session))
            # The birth message is not an outbox row: its PUBACK is not awaited, but it proves
            # that the broker acknowledges (on MQTT 3.1.1 only a confirmed event proves that
            # the broker takes events: a refusing broker acknowledges too).
            birth = session.publish(self.status_topic, self._status("online"), retain=True)
            if self._echo_topic is None:
                birth.add_done_callback(self._on_birth_ack)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._drain(session), name="mqtt-drain")
                tg.create_task(self._watch(session), name="mqtt-session-watch")
        except* (_SessionEnded, ConnectionLost):
            pass
        except* CabinetError as group:
            # The store failed under us: drop the connection, back off, try again.
            logger.error("outbox error, reconnecting: %s", group.exceptions[0])

    async def _watch(self, session: MqttSession) -> None:
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop-wait")
        waiters: list[asyncio.Future[Any]] = [session.closed, stop]
        try:
            while True:
                # During a takeover episode, wake when this session has lasted long enough to
                # end it; otherwise only the session's end or a stop can matter here.
                check_in = self._link.takeover_check_in(session.connack_at)
                done, _ = await asyncio.wait(
                    waiters, timeout=check_in, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                self._link.takeover_check(session.connack_at)
        finally:
            stop.cancel()
            await asyncio.wait([stop])
        raise _SessionEnded

    def _on_birth_ack(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._link.acknowledged()

    def _on_suback(self, session: MqttSession, fut: asyncio.Future[SubscribeResult]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the connection ended first: the next one subscribes again
        result = fut.result()
        echo = dict(result.refused).get(self._echo_topic or "")
        if echo is not None:
            # Nothing could ever be confirmed on this connection: end it as a broker that
            # does not acknowledge (the events stay in the outbox).
            session.abort(
                f"broker refused our subscription to {self._echo_topic} ({echo}); on MQTT 3.1.1 "
                "an event counts as taken only once delivered back there: the ACL must let "
                "this cabinet read it",
                EndKind.NO_ACK,
            )
        commands = SubscribeResult(
            tuple(t for t in result.granted if t in self.command_topics),
            tuple(r for r in result.refused if r[0] in self.command_topics),
        )
        self._link.subscribed(commands)

    async def _say_goodbye(self, session: MqttSession) -> None:
        """Retained offline status, then a polite DISCONNECT (bounded)."""
        if session.closed.done():
            return
        try:
            fut = session.publish(
                self.status_topic, self._status("offline", "shutdown"), retain=True
            )
            async with asyncio.timeout(2.0):
                await fut
        except (ConnectionLost, TimeoutError):
            pass
        await session.disconnect(2.0)

    # ------------------------------------------------------------------ drain

    async def _drain(self, session: MqttSession) -> None:
        """Live rows (seq > backlog_mark) first, unthrottled; then the backlog at replay_rate.

        The next backlog batch is read from the store while the current one is being sent,
        so a slow commit on the database thread does not idle the in-flight window. Caught up,
        the drain reads nothing until something can change its work: new rows (``notify``),
        an ack or a refusal, the isolation releasing a row, rows the store held back (read again
        after 1 s, backing off to ``HELD_RETRY_MAX_S``), or the safety-net rescan
        (``poll_interval_s``).
        """
        mark = self.stats.backlog_mark
        live: deque[OutboxRow] = deque()
        backlog: deque[OutboxRow] = deque()
        live_cursor = mark
        backlog_cursor: int | None = None
        backlog_done = False
        prefetch: asyncio.Task[list[OutboxRow]] | None = None
        self._rescan = False
        self._wake.set()  # rows above the mark committed before this connection was up
        clock = asyncio.get_running_loop().time  # the clock the drain's waits run on
        rescan_at = clock() + self._cfg.poll_interval_s
        held_seen = self._outbox.held_reads
        held_at: float | None = None  # when to read again for rows the store held back
        try:
            while True:
                self._alive.beat()
                await self._wait_for_slot(session)
                if self._rewind and not live:
                    # The event just struck is older than the cursor: probe it again next,
                    # not after the rest of the backlog (one at a time, that can be long).
                    self._rewind = False
                    if prefetch is not None:
                        prefetch.cancel()
                        await asyncio.wait([prefetch])
                        prefetch = None
                    backlog.clear()
                    backlog_cursor = None
                    backlog_done = False
                    mark = max(mark, live_cursor)
                if not live and self._wake.is_set():
                    self._wake.clear()
                    rows = await self._outbox.peek(
                        PREFETCH, exclude=self._busy(), after_seq=live_cursor
                    )
                    if rows:
                        live.extend(rows)
                        live_cursor = rows[-1].seq
                    if len(rows) >= PREFETCH:
                        self._wake.set()  # more may follow: read again once these went
                if live:
                    self._send(session, live.popleft())
                    continue
                if prefetch is None and not backlog_done and len(backlog) < PREFETCH // 2:
                    prefetch = asyncio.create_task(
                        self._outbox.peek(PREFETCH, exclude=self._busy(), after_seq=backlog_cursor),
                        name="mqtt-backlog-prefetch",
                    )
                if prefetch is not None and (prefetch.done() or not backlog):
                    rows = await prefetch
                    prefetch = None
                    backlog.extend(r for r in rows if r.seq <= mark)
                    if rows:
                        backlog_cursor = rows[-1].seq
                    if not rows or rows[-1].seq >= mark:
                        backlog_done = True
                if backlog:
                    wait = self._bucket.take()
                    if wait > 0:
                        await self._sleep_or_wake(wait)
                        continue
                    self._send(session, backlog.popleft())
                    continue
                if not backlog_done:
                    continue
                # Caught up. Read from the start again when a row below the cursors may be
                # deliverable: one refused earlier (recorded, not dead-lettered), rows the
                # isolation set aside once nothing else is left, and -- the safety net -- every
                # poll_interval_s, for what no signal announces (a row below the cursors after
                # a restored database, one revived from the dead letters, a commit whose
                # notify() never came).
                if self._isolation.nothing_else_to_send():
                    self._rescan = True
                now = clock()
                # A read since the last look held rows back (the store could not record them in
                # its sequence sidecar): read again soon, later each time they stay held. Once
                # a whole pass holds nothing back, nothing more is read for them.
                held = self._outbox.held_reads
                if held != held_seen:
                    held_seen = held
                    if held_at is None:
                        held_at = now + self._held_backoff.next_delay_growing()
                elif held_at is None:
                    self._held_backoff.reset()
                if not self._inflight and (
                    self._rescan or now >= rescan_at or (held_at is not None and now >= held_at)
                ):
                    self._rescan = False
                    held_at = None
                    rescan_at = now + self._cfg.poll_interval_s
                    self._wake.set()  # and above the live cursor, for the same reasons
                    backlog_cursor = None
                    backlog_done = False
                    mark = max(mark, live_cursor)
                    continue
                if self._wake.is_set() or self._rewind:
                    continue  # announced while this task awaited the store
                # Nothing to do until new rows, an ack or refusal, or a read again is due. With
                # publishes in flight the session's ack timeout bounds the wait (it ends the
                # connection, and this task with it).
                due = rescan_at if held_at is None else min(rescan_at, held_at)
                await self._wait_for_work(SLOT_WAIT_S if self._inflight else due - now)
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.wait([prefetch])

    def _busy(self) -> set[int]:
        return (
            set(self._inflight)
            | self._uncommitted
            | {s for s, _ in self._to_fail}
            | set(self._isolation.set_aside)
        )

    async def _wait_for_slot(self, session: MqttSession) -> None:
        while True:
            if session.closed.done():
                raise ConnectionLost(session.closed.result())
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await self._sleep_unless_stopping(pause)
                continue
            window = self._isolation.window(self._window)
            if len(self._inflight) < window and len(self._uncommitted) < MAX_UNCOMMITTED_ACKS:
                return
            # Bounded: a connection whose PUBACKs stop is aborted by the session (ack timeout).
            await self._wait_for_work(SLOT_WAIT_S)

    def _send(self, session: MqttSession, row: OutboxRow) -> None:
        fut = session.publish(self.events_topic, row.envelope, confirm=True)
        self._inflight[row.seq] = (fut, time.monotonic())
        self.stats.published += 1
        self.stats.in_flight = len(self._inflight)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        fut.add_done_callback(functools.partial(self._on_puback, row.seq))

    def _on_puback(self, seq: int, fut: asyncio.Future[int]) -> None:
        entry = self._inflight.get(seq)
        sent: float | None = None
        if entry is not None and entry[0] is fut:
            # Only this attempt's own outcome may free the seq: a late failure of an attempt
            # from a dead connection must not unmark the same row sent again on a new one.
            del self._inflight[seq]
            sent = entry[1]
        self.stats.in_flight = len(self._inflight)
        self._progress.set()
        if fut.cancelled() or fut.exception() is not None:
            if sent is not None:
                self._lost.add(seq)
            return  # connection lost: the row stays in the outbox and is sent again
        reason = fut.result()
        self._link.acknowledged()
        now = time.monotonic()
        if sent is not None:
            self.stats.last_publish_latency_s = now - sent
        if reason >= FAILURE_THRESHOLD:
            self.stats.failed += 1
            delay = self._failure_backoff.next_delay()
            self._pause_until = now + delay
            logger.warning(
                "broker refused event seq %d (PUBACK reason 0x%02x); pausing %.1f s",
                seq,
                reason,
                delay,
            )
            self._to_fail.append((seq, f"PUBACK reason 0x{reason:02x}"))
        else:
            self._failure_backoff.reset()
            self._alive.beat()
            self._uncommitted.add(seq)
            self._to_ack.append(seq)
            for struck, why in self._isolation.confirmed(seq):
                # Refused alone while another event went through: a failure, as a v5
                # PUBACK refusal is (dead-lettered after [store] dead_letter_after).
                self.stats.failed += 1
                logger.warning("broker refused event seq %d: %s", struck, why)
                self._to_fail.append((struck, why))
            self.stats.isolating = self._isolation.active
        self._ack_ready.set()

    # ------------------------------------------------------------------ ack writer

    async def _ack_writer(self) -> None:
        """Commits deletions (and failures) in batches; acks that arrive meanwhile coalesce."""
        while True:
            await self._ack_ready.wait()
            self._ack_ready.clear()
            await self._commit_acks()

    async def _commit_acks(self) -> None:
        while self._to_ack or self._to_fail:
            batch, self._to_ack = self._to_ack, []
            try:
                if batch:
                    await self._outbox.ack(batch)
            except CabinetError as err:
                self._to_ack = batch + self._to_ack
                logger.error("cannot delete acknowledged rows (%s); retrying", err)
                await asyncio.sleep(ACK_RETRY_S)
                continue
            self._uncommitted.difference_update(batch)
            self.stats.acked += len(batch)
            self._progress.set()
            failures, self._to_fail = self._to_fail, []
            for i, (seq, reason) in enumerate(failures):
                try:
                    dead = await self._outbox.mark_failed(seq, reason)
                except CabinetError as err:
                    self._to_fail = failures[i:] + self._to_fail
                    logger.error("cannot record a failed delivery (%s); retrying", err)
                    await asyncio.sleep(ACK_RETRY_S)
                    break
                if dead:
                    self.stats.dead_lettered += 1
                    logger.error("event seq %d dead-lettered: %s", seq, reason)
                    self._isolation.dead_lettered(seq)
                    self.stats.isolating = self._isolation.active
                elif self._isolation.active:
                    self._rewind = True
                else:
                    self._rescan = True  # deliverable again, below the drain's cursors
                self._progress.set()

    async def _final_flush(self) -> None:
        """Commit what the broker already acknowledged, so a restart re-sends less (bounded)."""
        if not (self._to_ack or self._to_fail):
            return
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                await self._commit_acks()
        except (TimeoutError, CabinetError) as err:
            logger.warning("acks not committed at shutdown (%r); those rows will be re-sent", err)

    # ------------------------------------------------------------------ commands

    async def _command_worker(self) -> None:
        inbound = self._commands.inbound
        while True:
            msg = await inbound.get()
            await self.handle_command(msg.topic, msg.payload, size=msg.oversize)

    # ------------------------------------------------------------------ helpers

    def _status(self, state: str, reason: str | None = None) -> bytes:
        body: dict[str, object] = {
            "state": state,
            "agent": "cabinet-agent",
            "version": AGENT_VERSION,
            "protocol": self._cfg.protocol,
            "key_ids": self._key_ids,
        }
        if reason is not None:
            body["reason"] = reason
        return json.dumps(body, separators=(",", ":")).encode()

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with self._alive.bounded(delay):
            await _wait_event(self._stopping, delay)

    async def _wait_for_work(self, delay: float) -> None:
        """Until something can change the drain's work (``_progress``), at most ``delay``."""
        self._progress.clear()
        with self._alive.bounded(delay):
            await _wait_event(self._progress, delay)

    async def _sleep_or_wake(self, delay: float) -> None:
        if self._wake.is_set():
            return
        with self._alive.bounded(delay):
            await _wait_event(self._wake, delay)


def _no_alert(kind: str, detail: str) -> None:
    return None


async def _wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set.

    ``asyncio.timeout`` rather than ``wait_for``: 3.11's wait_for wraps the wait in a task and
    can lose a cancellation that races with the event being set.
    """
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


__all__ = [
    "AGENT_VERSION",
    "HEALTHY_SESSION_S",
    "STABLE_MIN_S",
    "BrokerState",
    "CommandsState",
    "DocumentSink",
    "Outbox",
    "Publisher",
    "PublisherStats",
    "TokenBucket",
]
