"""What the broker link is doing, for status, selftest and metrics: outages and episodes.

The publisher (``agent/mqtt/publisher.py``) tells this bookkeeping what happened to each
connection; it decides how the ending is reported and paced (``drivers.supervisor.Retry``):

- a failed connect attempt or a lost connection: the broker is *unreachable* (since when);
- *episodes* rather than outages, reported once with a "since" that survives the reconnects and
  quiet per-cycle lines: another client with our client id takes the session over, the broker
  stops acknowledging publishes, or it refuses our command subscriptions.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.logging_setup import ThrottledLog
from agent.mqtt.config import MqttConfig
from agent.mqtt.session import EndKind, MqttSession, SubscribeResult
from agent.mqtt.states import BrokerState, CommandsState
from drivers.supervisor import Pace, Retry

logger = logging.getLogger(__name__)

# A connection that lived this long (or carried traffic) was healthy: the backoff starts over.
HEALTHY_SESSION_S = 30.0
# A takeover without a reason code (MQTT 3.1.1, or a v5 broker that just closes the socket):
# this many connections in a row closed by the broker within QUICK_CLOSE_S of their CONNACK.
QUICK_CLOSE_S = 10.0
QUICK_CLOSES = 3
# A session that lasts this long ends a takeover episode (at least; see LinkWatch.stable_s).
STABLE_MIN_S = 10.0
# While an episode (takeover, no acknowledgements, refused subscription) lasts, its per-cycle
# lines go to DEBUG and one WARNING says it still lasts this often.
REMIND_S = 600.0
LOST_LOG_INTERVAL_S = 60.0
ALERT_TAKEN_OVER = "mqtt.session_taken_over"
ALERT_COMMANDS_REFUSED = "mqtt.commands_refused"


@dataclass
class PublisherStats:
    """Progress counters for metrics and status."""

    published: int = 0
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reconnects: int = 0
    connected: bool = False
    in_flight: int = 0
    peak_in_flight: int = 0
    window: int = 0  # effective in-flight window (config, capped by the broker's Receive Maximum)
    # Sending one event at a time to find one the broker refuses silently (isolate.py).
    isolating: bool = False
    last_publish_latency_s: float | None = None
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
    # Called when the link's state as shown (STATUS=, state) changes: wherever it is set.
    listeners: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHOWN and self.__dict__.get(name, value) != value:
            object.__setattr__(self, name, value)
            for listener in self.__dict__.get("listeners", ()):
                listener()
            return
        object.__setattr__(self, name, value)

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


# What the status line and the link's state are made of (the durations are read when shown).
_SHOWN = frozenset(
    {
        "connected",
        "unreachable_since_mono",
        "not_acknowledging_since_mono",
        "taken_over_since_mono",
        "commands",
    }
)


def _age(since_mono: float | None, now_mono: float | None) -> float | None:
    if since_mono is None:
        return None
    now = time.monotonic() if now_mono is None else now_mono
    return max(0.0, now - since_mono)


def _silent(delay: float) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Ended(Retry):
    """How a connection that got its CONNACK ended; ``report`` says so once the delay is known."""

    report: Callable[[float], None] = _silent


class LinkWatch:
    """The broker link's outages and episodes, kept in ``stats`` and said once in the log."""

    def __init__(
        self,
        cfg: MqttConfig,
        stats: PublisherStats,
        *,
        client_id: str,
        command_filter: str,
        now: Callable[[], datetime],
        alert: Callable[[str, str], None],
    ) -> None:
        self._cfg = cfg
        self.stats = stats
        self._client_id = client_id
        self._command_filter = command_filter
        self._now = now
        self._alert = alert
        self.waiting: int | str = "?"  # outbox depth at the last session end (log lines)
        self._failed_connects = 0  # connect attempts failed since the last CONNACK
        self._quick_closes = 0  # connections in a row the broker closed soon after CONNACK
        self._ack_episode_reconnects = 0  # reconnects when the no-PUBACK episode began
        self._reminded: dict[str, float] = {}  # episode -> monotonic time of its last WARNING
        self._lost_log = ThrottledLog(logger, LOST_LOG_INTERVAL_S)

    def close(self) -> None:
        self._lost_log.close()

    # ------------------------------------------------------------------ connect

    def connect_failed(self, reason: str, since: datetime, since_mono: float) -> None:
        """A connect attempt (TCP, TLS, CONNACK) failed."""
        self.unreachable(reason, since, since_mono)
        self._failed_connects += 1
        self._quick_closes = 0

    def retrying(self, retry: Retry, delay: float) -> None:
        """Say how the attempt or the connection ended, now that the delay is known."""
        if isinstance(retry, Ended):
            retry.report(delay)
        elif retry.pace is Pace.LONGEST:
            logger.warning("MQTT connect refused: %s; retry in %.1f s", retry.reason, delay)
        else:
            log = logger.warning if self.stats.connect_failures <= 1 else logger.info
            log("MQTT connect failed: %s; retry in %.1f s", retry.reason, delay)

    def connected(self) -> None:
        """CONNACK: the broker is reachable again."""
        st = self.stats
        down_for = st.unreachable_for()
        if down_for is not None and self._failed_connects:
            logger.warning(
                "MQTT broker reachable again after %.0f s (%d failed attempt(s))",
                down_for,
                st.connect_failures,
            )
        elif down_for is not None:  # a lost connection, back at the first attempt
            logger.info("MQTT reconnected after %.1f s", down_for)
        self._failed_connects = 0
        st.unreachable_since = st.unreachable_since_mono = None
        st.connect_failures = 0
        st.connected_since = self._now()

    def unreachable(self, reason: str, since: datetime, since_mono: float) -> None:
        """A connect attempt failed or the connection was lost: the broker is unreachable."""
        st = self.stats
        st.last_error = reason
        st.connect_failures += 1
        if st.unreachable_since_mono is None:
            st.unreachable_since = since
            st.unreachable_since_mono = since_mono

    # ------------------------------------------------------------------ session end

    def session_ended(self, session: MqttSession, reason: str, carried: bool) -> Ended:
        """Account for a connection that ended: how to report and pace the next attempt.

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
            report = functools.partial(self._taken_over, kind, reason)
            return Ended(reason, Pace.GROWING, healthy=False, report=report)
        if (
            kind in (EndKind.NO_ACK, EndKind.KEEPALIVE) and session.unanswered_since is not None
        ) or (st.not_acknowledging_since_mono is not None and session.acks == 0):
            report = functools.partial(self._not_acknowledging, session.unanswered_since, reason)
            return Ended(reason, Pace.NEXT, healthy=False, report=report)
        self.unreachable(reason, self._now(), now_mono)
        # A connection that carried traffic or lived long was healthy: start over gently.
        healthy = carried or lived > HEALTHY_SESSION_S
        return Ended(reason, healthy=healthy, report=functools.partial(self._lost, reason))

    def _lost(self, reason: str, delay: float) -> None:
        # A flapping link costs a line per interval (with a count), not one per reconnect.
        self._lost_log.log(
            logging.WARNING, "lost", "MQTT connection lost (%s); reconnect in %.1f s", reason, delay
        )

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
            return kind in (EndKind.CLOSED, EndKind.LINK) and lived < self.stable_s()
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
                self._client_id,
                label(st.taken_over_since),
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
            self._client_id,
            st.takeover_evidence,
            hint,
            delay,
        )
        self._alert(
            ALERT_TAKEN_OVER,
            f"session taken over by another client with our client id (cloned cabinet?); "
            f"{st.takeover_evidence}",
        )

    def takeover_check(self, connack_at: float | None) -> None:
        """A session that has lasted ``stable_s`` ends the takeover episode."""
        st = self.stats
        if st.taken_over_since_mono is None or connack_at is None:
            return
        lived = time.monotonic() - connack_at
        if lived < self.stable_s():
            return
        logger.warning(
            "MQTT session no longer taken over: connected for %.0f s without interference "
            "(%d takeover(s) since %s)",
            lived,
            st.takeovers,
            label(st.taken_over_since),
        )
        st.taken_over_since = st.taken_over_since_mono = None
        st.takeovers = 0
        st.takeover_evidence = None
        self._quick_closes = 0

    def takeover_check_in(self, connack_at: float | None) -> float | None:
        """Seconds until ``takeover_check`` can end the takeover episode (None: no episode)."""
        if self.stats.taken_over_since_mono is None or connack_at is None:
            return None
        return max(0.0, connack_at + self.stable_s() - time.monotonic())

    def stable_s(self) -> float:
        """How long a session must last to show that no clone is fighting for it: longer than
        the clone's longest reconnect delay (it has our config) plus a connect."""
        cfg = self._cfg
        return max(STABLE_MIN_S, 2 * cfg.backoff.max_s + cfg.connect_timeout_s)

    def _not_acknowledging(self, unanswered_since: float | None, reason: str, delay: float) -> None:
        st = self.stats
        if st.not_acknowledging_since_mono is not None:
            self._episode_line(
                "no-ack",
                "MQTT broker still acknowledges no publish (since %s, %d reconnect(s)); "
                "%s event(s) waiting; next attempt in %.1f s",
                label(st.not_acknowledging_since),
                st.reconnects - self._ack_episode_reconnects,
                self.waiting,
                delay,
            )
            return
        now_mono = time.monotonic()
        since_mono = now_mono if unanswered_since is None else unanswered_since
        st.not_acknowledging_since_mono = since_mono
        st.not_acknowledging_since = self._now() - timedelta(seconds=now_mono - since_mono)
        self._reminded["no-ack"] = now_mono
        self._ack_episode_reconnects = st.reconnects
        logger.warning(
            "MQTT broker accepts connections but does not acknowledge publishes (%s; first "
            "unacknowledged publish at %s); %s event(s) waiting; next attempt in %.1f s",
            reason,
            label(st.not_acknowledging_since),
            self.waiting,
            delay,
        )

    def acknowledged(self) -> None:
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

    def in_episode(self) -> bool:
        st = self.stats
        return st.taken_over_since_mono is not None or st.not_acknowledging_since_mono is not None

    # ------------------------------------------------------------------ commands

    def subscribed(self, result: SubscribeResult) -> None:
        """The broker answered our command subscriptions: refused ones are an episode."""
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
            self._command_filter,
        )
        self._alert(
            ALERT_COMMANDS_REFUSED,
            f"commands: not subscribed (broker refused: {reasons}); check the broker ACL for "
            f"{self._command_filter}",
        )

    # ------------------------------------------------------------------ helpers

    def _episode_line(self, episode: str, msg: str, *args: object) -> None:
        """A per-cycle line of an episode already reported: DEBUG, a WARNING every REMIND_S."""
        now = time.monotonic()
        if now - self._reminded.get(episode, now) >= REMIND_S:
            self._reminded[episode] = now
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)


def label(when: datetime | None) -> str:
    return "?" if when is None else when.isoformat(timespec="seconds")
