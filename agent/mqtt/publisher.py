"""Store-and-forward publisher: sealed outbox rows → MQTT QoS 1, deleted only after PUBACK.

Contract (docs/delivery.md): at-least-once. A row leaves the outbox only once the broker has
acknowledged it with a success reason code; a refusal (reason >= 0x80) is recorded with
``mark_failed`` (dead-lettered by the store after N tries, with an alert). At most
``inflight_window`` publishes are unacknowledged. After a (re)connect, rows appended since the
connect ("live") go first; the older backlog is replayed through a token bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent import __version__
from agent.logging_setup import ThrottledLog, printable
from agent.mqtt.config import MqttConfig
from agent.mqtt.session import (
    FAILURE_THRESHOLD,
    ConnectionLost,
    ConnectRefused,
    EndKind,
    Inbound,
    MqttSession,
    SubscribeResult,
    build_tls_context,
)
from agent.mqtt.states import BrokerState, CommandsState
from agent.privacy.signed import (
    ALLOW_LIST,
    ASSET_REGISTRY,
    DocumentChecker,
    DocumentError,
    SignedDocument,
)
from agent.store.types import OutboxRow, OutboxStats
from drivers.backoff import Backoff
from drivers.errors import CabinetError, TransientError

logger = logging.getLogger(__name__)

AGENT_VERSION = __version__  # the package version, announced in the status message
COMMAND_KINDS = (ALLOW_LIST, ASSET_REGISTRY)
PREFETCH = 256
MAX_UNCOMMITTED_ACKS = 4096
INBOUND_QUEUE = 16
ACK_RETRY_S = 1.0
SHUTDOWN_FLUSH_S = 3.0
# A bounded wait counts as progress until its own deadline plus this (scheduling slack).
WAIT_GRACE_S = 2.0
# A connection that lived this long (or carried traffic) was healthy: the backoff starts over.
HEALTHY_SESSION_S = 30.0
# A takeover without a reason code (MQTT 3.1.1, or a v5 broker that just closes the socket):
# this many connections in a row closed by the broker within QUICK_CLOSE_S of their CONNACK.
QUICK_CLOSE_S = 10.0
QUICK_CLOSES = 3
# A session that lasts this long ends a takeover episode (at least; see Publisher._stable_s).
STABLE_MIN_S = 10.0
# While an episode (takeover, no acknowledgements, refused subscription) lasts, its per-cycle
# lines go to DEBUG and one WARNING says it still lasts this often.
REMIND_S = 600.0
# Repeated log lines about inbound messages (queue full, refusals): one per key and interval.
INBOUND_LOG_INTERVAL_S = 10.0
LOST_LOG_INTERVAL_S = 60.0
ALERT_TAKEN_OVER = "mqtt.session_taken_over"
ALERT_COMMANDS_REFUSED = "mqtt.commands_refused"


class Outbox(Protocol):
    """What the publisher needs from the state store (``agent.store.Store`` provides it)."""

    async def peek(
        self, limit: int, *, exclude: Collection[int] = (), after_seq: int | None = None
    ) -> list[OutboxRow]: ...

    async def ack(self, seqs: Sequence[int]) -> int: ...

    async def mark_failed(self, seq: int, reason: str) -> bool: ...

    async def stats(self) -> OutboxStats: ...


class DocumentSink(Protocol):
    """Where verified backend documents go (and who hears about refused ones)."""

    def installed(self, kind: str) -> bytes | None:
        """The raw installed document of ``kind`` (rollback and conflict checks), or None."""

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        """Apply a verified document; called only after every check passed.

        May still refuse it (DocumentError) or fail to store it (CabinetError)."""

    def rejected(self, kind: str, reason: str, detail: str) -> None:
        """A document was refused (never applied); report it."""


@dataclass
class PublisherStats:
    """Progress counters for metrics, status and the systemd watchdog."""

    published: int = 0
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reconnects: int = 0
    connected: bool = False
    in_flight: int = 0
    peak_in_flight: int = 0
    window: int = 0  # effective in-flight window (config, capped by the broker's Receive Maximum)
    last_publish_latency_s: float | None = None
    # time.monotonic() of the last turn of the publisher's loop: a connect attempt made, a
    # backoff or poll wait ended, a drain iteration, a PUBACK. Never "the broker answered".
    last_progress: float = 0.0
    backlog_mark: int = 0  # rows with seq <= this were waiting when we connected
    commands_accepted: int = 0
    commands_rejected: int = 0
    commands_dropped: int = 0
    last_error: str | None = None  # why the last connection attempt or session ended
    connect_attempts: int = 0
    connect_failures: int = 0
    # Since when the broker could not be reached: set by the first failed attempt or the lost
    # connection, cleared by the next CONNACK. Wall clock (a label) and monotonic (durations).
    unreachable_since: datetime | None = None
    unreachable_since_mono: float | None = None
    connected_since: datetime | None = None
    # The broker accepts connections but acknowledges no publish: since the first publish left
    # unacknowledged after the last PUBACK. Survives reconnects; the next PUBACK clears it.
    not_acknowledging_since: datetime | None = None
    not_acknowledging_since_mono: float | None = None
    # Another client with our client id keeps taking the session over (one episode): since
    # when, how many takeovers in it, and what told us (a reason code, or the pattern).
    taken_over_since: datetime | None = None
    taken_over_since_mono: float | None = None
    takeovers: int = 0
    takeovers_total: int = 0
    takeover_evidence: str | None = None
    commands: CommandsState = CommandsState.NOT_YET
    commands_refused: dict[str, str] = field(default_factory=dict)  # topic -> broker's reason
    commands_refusals: int = 0  # SUBACKs that refused a cmd topic

    def unreachable_for(self, now_mono: float | None = None) -> float | None:
        """Seconds the broker has been unreachable, or None while it is not."""
        return _age(self.unreachable_since_mono, now_mono)

    def not_acknowledging_for(self, now_mono: float | None = None) -> float | None:
        """Seconds since the first publish the broker left unacknowledged, or None."""
        return _age(self.not_acknowledging_since_mono, now_mono)

    def taken_over_for(self, now_mono: float | None = None) -> float | None:
        """Seconds since the takeover episode began, or None."""
        return _age(self.taken_over_since_mono, now_mono)

    @property
    def state(self) -> BrokerState:
        """One word for the link: a failing connect first, then the episodes, then up/down."""
        if self.unreachable_since_mono is not None:
            return BrokerState.UNREACHABLE
        if self.taken_over_since_mono is not None:
            return BrokerState.TAKEN_OVER
        if self.not_acknowledging_since_mono is not None:
            return BrokerState.NOT_ACKNOWLEDGING
        return BrokerState.CONNECTED if self.connected else BrokerState.CONNECTING


def _age(since_mono: float | None, now_mono: float | None) -> float | None:
    if since_mono is None:
        return None
    now = time.monotonic() if now_mono is None else now_mono
    return max(0.0, now - since_mono)


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
        self._verifier = verifier
        self._documents = documents
        self._now = now
        self._on_alert = on_alert
        base = f"{cfg.topic_prefix}/{site_id}/{cabinet_id}"
        self.client_id = f"cabinet-{site_id}-{cabinet_id}"
        self.command_filter = f"{base}/cmd/#"  # what a broker ACL must let us read
        self.events_topic = f"{base}/events"
        self.status_topic = f"{base}/status"
        self.command_topics = {f"{base}/cmd/{kind}": kind for kind in COMMAND_KINDS}
        self._key_ids = sorted(key_ids)
        self.stats = PublisherStats(last_progress=time.monotonic())
        self._tls = build_tls_context(cfg.tls) if cfg.tls is not None else None
        self._bucket = TokenBucket(cfg.replay_rate, cfg.replay_burst)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # a slot freed up or an ack committed
        self._window = cfg.inflight_window
        # seq -> (PUBACK future, monotonic send time); the future identifies the attempt.
        self._inflight: dict[int, tuple[asyncio.Future[int], float]] = {}
        self._uncommitted: set[int] = set()  # PUBACKed, delete not yet committed
        self._to_ack: list[int] = []
        self._to_fail: list[tuple[int, str]] = []
        self._ack_ready = asyncio.Event()
        self._failure_backoff = Backoff(cfg.failure_backoff.initial_s, cfg.failure_backoff.max_s)
        self._pause_until = 0.0
        self._inbound: asyncio.Queue[Inbound] = asyncio.Queue(INBOUND_QUEUE)
        self._alive_until = 0.0  # inside a bounded wait: alive until this monotonic time
        self._failed_connects = 0  # connect attempts failed since the last CONNACK
        self._quick_closes = 0  # connections in a row the broker closed soon after CONNACK
        self._ack_episode_reconnects = 0  # reconnects when the no-PUBACK episode began
        self._reminded: dict[str, float] = {}  # episode -> monotonic time of its last WARNING
        self._waiting: int | str = "?"  # outbox depth at the last session end (log lines)
        self._lost_log = ThrottledLog(logger, LOST_LOG_INTERVAL_S)
        self._inbound_log = ThrottledLog(logger, INBOUND_LOG_INTERVAL_S)
        # Owned worker threads (connect + TLS handshake, signature checks), shut down by run().
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mqtt-worker")

    # ------------------------------------------------------------------ public API

    def notify(self) -> None:
        """New rows were committed to the outbox: look now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run()`` to finish: flush acks, publish offline status, disconnect."""
        self._stopping.set()
        self._wake.set()

    def alive_at(self) -> float:
        """Watchdog probe: when the loop last turned, or now while it sits in a bounded wait.

        Every wait of the connection loop and the drain is bounded (connect timeout, backoff,
        poll interval); while one lasts the publisher is doing its job, however long the broker
        stays away. A loop stuck on an unbounded await (a store call that never returns) stops
        turning, and the watchdog is withheld.
        """
        now = time.monotonic()
        return now if now <= self._alive_until else self.stats.last_progress

    async def run(self) -> None:
        """Connect, drain, reconnect with jittered backoff; returns after ``stop()``."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._ack_writer(), name="mqtt-ack-writer")
                tg.create_task(self._command_worker(), name="mqtt-commands")
                await self._connection_loop()
                raise _SessionEnded  # stop requested: end the helper tasks
        except* _SessionEnded:
            pass
        finally:
            self._inbound_log.close()
            self._lost_log.close()
            try:
                await self._final_flush()
            finally:
                self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ connection loop

    async def _connection_loop(self) -> None:
        backoff = Backoff(self._cfg.backoff.initial_s, self._cfg.backoff.max_s)
        first = True
        while not self._stopping.is_set():
            self._beat()
            if not first:
                self.stats.reconnects += 1
            first = False
            session = MqttSession(
                self._cfg,
                self.client_id,
                will=(self.status_topic, self._status("offline", "connection lost")),
                tls_context=self._tls,
                on_inbound=self._on_inbound,
                executor=self._executor,
            )
            self.stats.connect_attempts += 1
            attempt_wall, attempt_mono = self._now(), time.monotonic()
            try:
                # connect() keeps its own deadline (connect_timeout_s); the grace only covers
                # scheduling, so a connect that overruns it shows up as a stalled publisher.
                with self._bounded(self._cfg.connect_timeout_s):
                    connack = await session.connect()
            except ConnectRefused as err:
                self._unreachable(str(err), attempt_wall, attempt_mono)
                self._failed_connects += 1
                self._quick_closes = 0
                delay = backoff.longest()
                logger.warning("MQTT connect refused: %s; retry in %.1f s", err, delay)
                await self._sleep_unless_stopping(delay)
                continue
            except TransientError as err:
                self._unreachable(str(err), attempt_wall, attempt_mono)
                self._failed_connects += 1
                self._quick_closes = 0
                delay = backoff.next_delay()
                log = logger.warning if self.stats.connect_failures <= 1 else logger.info
                log("MQTT connect failed: %s; retry in %.1f s", err, delay)
                await self._sleep_unless_stopping(delay)
                continue
            self._beat()
            down_for = self.stats.unreachable_for()
            if down_for is not None and self._failed_connects:
                logger.warning(
                    "MQTT broker reachable again after %.0f s (%d failed attempt(s))",
                    down_for,
                    self.stats.connect_failures,
                )
            elif down_for is not None:  # a lost connection, back at the first attempt
                logger.info("MQTT reconnected after %.1f s", down_for)
            self._failed_connects = 0
            self.stats.unreachable_since = self.stats.unreachable_since_mono = None
            self.stats.connect_failures = 0
            self.stats.connected_since = self._now()
            acked_before = self.stats.acked
            try:
                await self._serve(session, connack.receive_maximum)
            finally:
                self.stats.connected = False
                self.stats.connected_since = None
                self._inflight.clear()
                self.stats.in_flight = 0
                reason = session.closed.result() if session.closed.done() else "stopping"
                if self._stopping.is_set():
                    await self._say_goodbye(session)
                session.abort(reason)
            if self._stopping.is_set():
                return
            try:
                self._waiting = (await self._outbox.stats()).depth
            except CabinetError:
                self._waiting = "?"
            delay = self._session_ended(session, reason, backoff, self.stats.acked > acked_before)
            await self._sleep_unless_stopping(delay)

    def _session_ended(
        self, session: MqttSession, reason: str, backoff: Backoff, carried: bool
    ) -> float:
        """Account for a connection that ended; the delay before the next attempt.

        Three endings are episodes rather than outages, reported once with a "since" that
        survives the reconnects (and whose per-cycle lines are quiet): the broker takes the
        session over (another client with our client id), or it stops acknowledging publishes.
        Anything else is a lost connection, as before.
        """
        st = self.stats
        st.last_error = reason
        kind = session.end_kind or EndKind.LOCAL
        now_mono = time.monotonic()
        connack_at = session.connack_at if session.connack_at is not None else now_mono
        lived = now_mono - connack_at
        if self._is_takeover(kind, lived):
            # Never start over after a takeover, even if the session carried traffic: the
            # clone reconnects too, and two clients at full speed would hammer the broker.
            delay = backoff.next_delay_growing()
            self._taken_over(kind, reason, delay)
            return delay
        if (
            kind in (EndKind.NO_ACK, EndKind.KEEPALIVE) and session.unanswered_since is not None
        ) or (st.not_acknowledging_since_mono is not None and session.acks == 0):
            delay = backoff.next_delay()
            self._not_acknowledging(session, reason, delay)
            return delay
        self._unreachable(reason, self._now(), now_mono)
        # A connection that carried traffic or lived long was healthy: start over gently.
        if carried or lived > HEALTHY_SESSION_S:
            backoff.reset()
        delay = backoff.next_delay()
        # A flapping link costs a line per interval (with a count), not one per reconnect.
        self._lost_log.log(
            logging.WARNING, "lost", "MQTT connection lost (%s); reconnect in %.1f s", reason, delay
        )
        return delay

    def _is_takeover(self, kind: EndKind, lived: float) -> bool:
        """Does this ending start or continue a takeover episode?

        MQTT v5 brokers may say so (DISCONNECT 0x8E). Without a reason code (3.1.1, or a v5
        broker that just closes the socket, as mosquitto 2.0 does) the pattern tells: the
        broker closes the connection soon after CONNACK, several times in a row. A reset link
        (RST rather than FIN) is neutral: a busy takeover can end that way too.
        """
        if kind is EndKind.TAKEN_OVER:
            return True
        quick = lived < QUICK_CLOSE_S
        if self.stats.taken_over_since_mono is not None:
            # Backoffs grow during the episode, so sessions get longer: short of stable, it goes on.
            return kind in (EndKind.CLOSED, EndKind.LINK) and lived < self._stable_s()
        if kind is EndKind.CLOSED and quick:
            self._quick_closes += 1
            return self._quick_closes >= QUICK_CLOSES
        if not (kind is EndKind.LINK and quick):
            self._quick_closes = 0
        return False

    def _taken_over(self, kind: EndKind, reason: str, delay: float) -> None:
        st = self.stats
        st.takeovers_total += 1
        if st.taken_over_since_mono is not None:
            st.takeovers += 1
            self._episode_line(
                "takeover",
                "MQTT session still taken over by another client with our client id %s "
                "(since %s, %d takeover(s)); next attempt in %.1f s",
                self.client_id,
                _label(st.taken_over_since),
                st.takeovers,
                delay,
            )
            return
        if kind is EndKind.TAKEN_OVER:
            st.takeovers = 1
            st.takeover_evidence = "the broker said so (DISCONNECT reason 0x8E)"
            hint = ""
        else:
            st.takeovers = self._quick_closes
            st.takeover_evidence = (
                f"probable: the broker closed the connection {self._quick_closes} times in a "
                f"row within {QUICK_CLOSE_S:g} s of CONNACK without saying why"
            )
            hint = " (an MQTT 3.1.1 broker may also close a connection for an ACL refusal)"
        st.taken_over_since = self._now()
        st.taken_over_since_mono = time.monotonic()
        self._reminded["takeover"] = st.taken_over_since_mono
        logger.warning(
            "MQTT session taken over by another client with our client id (cloned cabinet? a "
            "second agent?): %s; %s%s; reconnecting ever more slowly while it lasts "
            "(next in %.1f s)",
            self.client_id,
            st.takeover_evidence,
            hint,
            delay,
        )
        self._alert(
            ALERT_TAKEN_OVER,
            f"session taken over by another client with our client id (cloned cabinet?); "
            f"{st.takeover_evidence}",
        )

    def _takeover_check(self, connack_at: float | None) -> None:
        """A session that has lasted ``_stable_s`` ends the takeover episode."""
        st = self.stats
        if st.taken_over_since_mono is None or connack_at is None:
            return
        lived = time.monotonic() - connack_at
        if lived < self._stable_s():
            return
        logger.warning(
            "MQTT session no longer taken over: connected for %.0f s without interference "
            "(%d takeover(s) since %s)",
            lived,
            st.takeovers,
            _label(st.taken_over_since),
        )
        st.taken_over_since = st.taken_over_since_mono = None
        st.takeovers = 0
        st.takeover_evidence = None
        self._quick_closes = 0

    def _stable_s(self) -> float:
        """How long a session must last to show that no clone is fighting for it: longer than
        the clone's longest reconnect delay (it has our config) plus a connect."""
        cfg = self._cfg
        return max(STABLE_MIN_S, 2 * cfg.backoff.max_s + cfg.connect_timeout_s)

    def _not_acknowledging(self, session: MqttSession, reason: str, delay: float) -> None:
        st = self.stats
        if st.not_acknowledging_since_mono is not None:
            self._episode_line(
                "no-ack",
                "MQTT broker still acknowledges no publish (since %s, %d reconnect(s)); "
                "%s event(s) waiting; next attempt in %.1f s",
                _label(st.not_acknowledging_since),
                st.reconnects - self._ack_episode_reconnects,
                self._waiting,
                delay,
            )
            return
        now_mono = time.monotonic()
        since_mono = session.unanswered_since
        if since_mono is None:
            since_mono = now_mono
        st.not_acknowledging_since_mono = since_mono
        st.not_acknowledging_since = self._now() - timedelta(seconds=now_mono - since_mono)
        self._reminded["no-ack"] = now_mono
        self._ack_episode_reconnects = st.reconnects
        logger.warning(
            "MQTT broker accepts connections but does not acknowledge publishes (%s; first "
            "unacknowledged publish at %s); %s event(s) waiting; next attempt in %.1f s",
            reason,
            _label(st.not_acknowledging_since),
            self._waiting,
            delay,
        )

    def _acknowledged(self) -> None:
        """A PUBACK arrived (whatever its reason code): the broker acknowledges again."""
        st = self.stats
        if st.not_acknowledging_since_mono is None:
            return
        logger.warning(
            "MQTT broker acknowledging publishes again after %.0f s (%d reconnect(s))",
            time.monotonic() - st.not_acknowledging_since_mono,
            st.reconnects - self._ack_episode_reconnects,
        )
        st.not_acknowledging_since = st.not_acknowledging_since_mono = None

    def _episode_line(self, episode: str, msg: str, *args: object) -> None:
        """A per-cycle line of an episode already reported: DEBUG, a WARNING every REMIND_S."""
        now = time.monotonic()
        if now - self._reminded.get(episode, now) >= REMIND_S:
            self._reminded[episode] = now
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)

    def _in_episode(self) -> bool:
        st = self.stats
        return st.taken_over_since_mono is not None or st.not_acknowledging_since_mono is not None

    def _alert(self, kind: str, detail: str) -> None:
        if self._on_alert is not None:
            self._on_alert(kind, detail)

    def _unreachable(self, reason: str, since: datetime, since_mono: float) -> None:
        """A connect attempt failed or the connection was lost: the broker is unreachable."""
        self._beat()
        self.stats.last_error = reason
        self.stats.connect_failures += 1
        if self.stats.unreachable_since_mono is None:
            self.stats.unreachable_since = since
            self.stats.unreachable_since_mono = since_mono

    async def _serve(self, session: MqttSession, receive_maximum: int | None) -> None:
        self._window = min(self._cfg.inflight_window, receive_maximum or self._cfg.inflight_window)
        self.stats.window = self._window
        try:
            stats = await self._outbox.stats()
            self.stats.backlog_mark = stats.next_seq - 1
            self.stats.connected = True
            # Once per connection is a line per cycle during an episode: quiet then.
            log = logger.debug if self._in_episode() else logger.info
            log(
                "MQTT connected as %s (window %d, %d row(s) waiting)",
                self.client_id,
                self._window,
                stats.depth,
            )
            if self.stats.commands is not CommandsState.REFUSED:
                self.stats.commands = CommandsState.SUBSCRIBING
            session.subscribe(list(self.command_topics)).add_done_callback(self._on_suback)
            # The birth message is not an outbox row: its PUBACK is not awaited, but it proves
            # that the broker acknowledges.
            birth = session.publish(self.status_topic, self._status("online"), retain=True)
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
                # Bounded, to notice a session that has lasted long enough to end a takeover.
                done, _ = await asyncio.wait(
                    waiters, timeout=STABLE_MIN_S / 2, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                self._takeover_check(session.connack_at)
        finally:
            stop.cancel()
            await asyncio.wait([stop])
        raise _SessionEnded

    def _on_birth_ack(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._acknowledged()

    def _on_suback(self, fut: asyncio.Future[SubscribeResult]) -> None:
        """The broker answered our command subscriptions: refused ones are an episode."""
        if fut.cancelled() or fut.exception() is not None:
            return  # the connection ended first: the next one subscribes again
        result = fut.result()
        st = self.stats
        if not result.refused:
            if st.commands is CommandsState.REFUSED:
                logger.warning("broker granted the command subscription(s) again")
            st.commands = CommandsState.SUBSCRIBED
            st.commands_refused = {}
            return
        st.commands_refusals += 1
        refused = dict(result.refused)
        reasons = ", ".join(sorted(set(refused.values())))
        if st.commands is CommandsState.REFUSED and refused == st.commands_refused:
            self._episode_line(
                "commands",
                "broker still refuses the command subscription(s) (%s)",
                reasons,
            )
            return
        st.commands = CommandsState.REFUSED
        st.commands_refused = refused
        self._reminded["commands"] = time.monotonic()
        logger.warning(
            "broker refused the command subscription(s) %s (%s): this cabinet cannot receive "
            "allow-lists or asset registries; check the broker ACL: it must let this cabinet "
            "read %s",
            ", ".join(sorted(refused)),
            reasons,
            self.command_filter,
        )
        self._alert(
            ALERT_COMMANDS_REFUSED,
            f"commands: not subscribed (broker refused: {reasons}); check the broker ACL for "
            f"{self.command_filter}",
        )

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
        so a slow commit on the database thread does not idle the in-flight window.
        """
        mark = self.stats.backlog_mark
        live: deque[OutboxRow] = deque()
        backlog: deque[OutboxRow] = deque()
        live_cursor = mark
        backlog_cursor: int | None = None
        backlog_done = False
        prefetch: asyncio.Task[list[OutboxRow]] | None = None
        last_live_check = 0.0
        try:
            while True:
                self._beat()
                await self._wait_for_slot(session)
                now = time.monotonic()
                if not live and (
                    self._wake.is_set() or now - last_live_check >= self._cfg.poll_interval_s
                ):
                    self._wake.clear()
                    last_live_check = now
                    rows = await self._outbox.peek(
                        PREFETCH, exclude=self._busy(), after_seq=live_cursor
                    )
                    if rows:
                        live.extend(rows)
                        live_cursor = rows[-1].seq
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
                # Caught up. Re-scan from the start now and then: a row refused earlier in this
                # session, or one below the cursors (a restored database), must not be stranded.
                await self._sleep_or_wake(self._cfg.poll_interval_s)
                if self._rescan_due():
                    backlog_cursor = None
                    backlog_done = False
                    mark = max(mark, live_cursor)
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.wait([prefetch])

    def _rescan_due(self) -> bool:
        return not self._inflight

    def _busy(self) -> set[int]:
        return set(self._inflight) | self._uncommitted | {s for s, _ in self._to_fail}

    async def _wait_for_slot(self, session: MqttSession) -> None:
        while True:
            if session.closed.done():
                raise ConnectionLost(session.closed.result())
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await self._sleep_unless_stopping(pause)
                continue
            if len(self._inflight) < self._window and len(self._uncommitted) < MAX_UNCOMMITTED_ACKS:
                return
            self._progress.clear()
            # Bounded: a connection whose PUBACKs stop is aborted by the session (ack timeout).
            with self._bounded(self._cfg.poll_interval_s):
                await _wait_event(self._progress, self._cfg.poll_interval_s)

    def _send(self, session: MqttSession, row: OutboxRow) -> None:
        fut = session.publish(self.events_topic, row.envelope)
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
            return  # connection lost: the row stays in the outbox and is sent again
        reason = fut.result()
        self._acknowledged()
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
            self.stats.last_progress = now
            self._uncommitted.add(seq)
            self._to_ack.append(seq)
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

    def _on_inbound(self, msg: Inbound) -> None:
        try:
            self._inbound.put_nowait(msg)
        except asyncio.QueueFull:
            # Documents are retained on the broker: the newest comes back at the next subscribe.
            # A flood costs a line per interval (with a count), not a line per message.
            self.stats.commands_dropped += 1
            self._inbound_log.log(
                logging.WARNING,
                "queue-full",
                "command queue full; dropped a message on %s (%d dropped so far)",
                printable(msg.topic),
                self.stats.commands_dropped,
            )

    async def _command_worker(self) -> None:
        while True:
            msg = await self._inbound.get()
            await self.handle_command(msg.topic, msg.payload, size=msg.oversize)

    async def handle_command(self, topic: str, payload: bytes, *, size: int | None = None) -> bool:
        """Verify a document received on a cmd topic and install it; False if refused.

        ``size``: the announced size of a message whose payload was discarded unread because
        it exceeded the inbound limit (``payload`` is then empty).
        """
        kind = self.command_topics.get(topic)
        if kind is None:
            self._inbound_log.log(
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
        self.stats.commands_accepted += 1
        logger.info("installed %s v%d (signed by %s)", kind, doc.version, doc.kid)
        return True

    def _reject(self, kind: str, reason: str, detail: str) -> None:
        self.stats.commands_rejected += 1
        # The detail may quote the document (the broker's bytes): printable before it reaches
        # a log line or status.
        detail = printable(detail, 300)
        self._inbound_log.log(
            logging.WARNING,
            ("refused", kind, reason),
            "refused %s document: %s (%s)",
            kind,
            reason,
            detail,
        )
        if self._documents is not None:
            self._documents.rejected(kind, reason, detail)

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
        with self._bounded(delay):
            await _wait_event(self._stopping, delay)

    async def _sleep_or_wake(self, delay: float) -> None:
        if self._wake.is_set():
            return
        with self._bounded(delay):
            await _wait_event(self._wake, delay)

    def _beat(self) -> None:
        """The loop turned (see ``PublisherStats.last_progress``)."""
        self.stats.last_progress = time.monotonic()

    @contextlib.contextmanager
    def _bounded(self, seconds: float) -> Iterator[None]:
        """A wait of at most ``seconds``: the publisher counts as alive until it is over."""
        self._beat()
        self._alive_until = time.monotonic() + seconds + WAIT_GRACE_S
        try:
            yield
        finally:
            self._alive_until = 0.0
            self._beat()


def _label(when: datetime | None) -> str:
    return "?" if when is None else when.isoformat(timespec="seconds")


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
    "BrokerState",
    "CommandsState",
    "DocumentSink",
    "Outbox",
    "Publisher",
    "PublisherStats",
    "TokenBucket",
]
