"""Prometheus metrics on loopback: what a fleet dashboard needs to see from one cabinet.

prometheus-client provides the exposition format and the WSGI app; the standard library's WSGI
server serves it, its listening socket watched by the event loop (no thread waits for a scrape:
each accepted scrape gets one short thread); everything lives in our own registry, not the library's global one, so tests
and reloads never collide. Label values are reader ids, antenna ports, event types and drop
reasons: bounded sets from config and code, never tag EPCs or badge pseudonyms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
)

from agent import __version__
from agent.metrics_config import MetricsConfig
from agent.mqtt.states import BrokerState
from drivers.errors import TransientError
from drivers.types import ReaderState

logger = logging.getLogger(__name__)

__all__ = ["Metrics", "MetricsConfig", "MetricsServer", "MetricsServerError"]

_STOP_TIMEOUT_S = 10.0
# A scrape waits this long for the loop to sample the parts; then it serves the last sample.
SCRAPE_REFRESH_TIMEOUT_S = 5.0

# MQTT publish round trips: LAN ~ms, cellular backhaul ~s; beyond a minute is an outage.
PUBLISH_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class MetricsServerError(TransientError):
    """The metrics endpoint could not be started (port taken...); the agent runs on without it."""


class Metrics:
    """The agent's metrics, with one small method per thing that happens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("cabinet_agent", "cabinet-agent build", registry=r)
        self.info.info({"version": __version__})
        self.tag_reads_total = Counter(
            "cabinet_tag_reads",
            "Tag reads received (seen counts summed)",
            ["reader", "antenna"],
            registry=r,
        )
        self.reader_state_enum = Enum(
            "cabinet_reader_state",
            "Current reader state (1 for the active state)",
            ["reader"],
            states=[s.value for s in ReaderState],
            registry=r,
        )
        self.reader_reconnects_total = Counter(
            "cabinet_reader_reconnects", "Reader sessions re-established", ["reader"], registry=r
        )
        self.door_cycles_total = Counter(
            "cabinet_door_cycles", "Door cycles closed by a settle scan", ["outcome"], registry=r
        )
        self.events_total = Counter(
            "cabinet_events", "Domain events produced, by type", ["type"], registry=r
        )
        self.outbox_depth = Gauge(
            "cabinet_outbox_depth", "Sealed events awaiting delivery", registry=r
        )
        self.outbox_bytes = Gauge(
            "cabinet_outbox_bytes", "Bytes of sealed events awaiting delivery", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "cabinet_outbox_oldest_age_seconds",
            "Age of the oldest undelivered event (0 when empty)",
            registry=r,
        )
        self.publish_latency = Histogram(
            "cabinet_publish_latency_seconds",
            "Time from publish to PUBACK",
            buckets=PUBLISH_LATENCY_BUCKETS,
            registry=r,
        )
        self.mqtt_reconnects_total = Counter(
            "cabinet_mqtt_reconnects", "MQTT connections re-established", registry=r
        )
        self.mqtt_connected = Gauge(
            "cabinet_mqtt_connected", "1 while connected to the broker, else 0", registry=r
        )
        self.mqtt_unreachable = Gauge(
            "cabinet_mqtt_broker_unreachable_seconds",
            "How long the broker has been unreachable (0 while it is reachable)",
            registry=r,
        )
        self.mqtt_state = Enum(
            "cabinet_mqtt_broker_state",
            "The broker link (1 for the current state): connected, not_acknowledging (CONNACK "
            "but no PUBACK), taken_over (another client with our client id), unreachable, "
            "connecting",
            states=[s.value for s in BrokerState],
            registry=r,
        )
        self.mqtt_not_acknowledging = Gauge(
            "cabinet_mqtt_broker_not_acknowledging_seconds",
            "How long the broker has acknowledged no publish while accepting connections "
            "(0 while it acknowledges)",
            registry=r,
        )
        self.mqtt_takeovers_total = Counter(
            "cabinet_mqtt_session_takeovers",
            "Connections ended by another client with our client id (reported or probable)",
            registry=r,
        )
        self.mqtt_commands_subscribed = Gauge(
            "cabinet_mqtt_commands_subscribed",
            "1 while the broker has granted our cmd-topic subscriptions, else 0",
            registry=r,
        )
        self.mqtt_commands_total = Counter(
            "cabinet_mqtt_commands",
            "Inbound command messages: accepted, rejected (refused documents), dropped (queue "
            "full)",
            ["outcome"],
            registry=r,
        )
        self.clock_trusted = Gauge(
            "cabinet_clock_trusted",
            "1 while the wall clock is trusted (proven: agrees with the agent's time, time sync, "
            "or a fresh signed document), else 0",
            registry=r,
        )
        self.clock_provisional = Gauge(
            "cabinet_clock_provisional",
            "1 while the wall clock was taken at start on faith (no time sync yet), else 0",
            registry=r,
        )
        self.clock_untrusted = Gauge(
            "cabinet_clock_untrusted_seconds",
            "How long the wall clock has not been trusted (0 while it is)",
            registry=r,
        )
        self.clock_offset = Gauge(
            "cabinet_clock_wall_offset_seconds",
            "The wall clock minus the agent's own time (0 while they agree)",
            registry=r,
        )
        self.events_dropped_total = Counter(
            "cabinet_events_dropped",
            "Events dropped before delivery by an explicit overflow/retention policy",
            ["reason"],
            registry=r,
        )

    def tag_reads(self, reader: str, antenna: int, count: int = 1) -> None:
        """``count`` reads of any tag on one antenna."""
        self.tag_reads_total.labels(reader, str(antenna)).inc(count)

    def reader_state(self, reader: str, state: ReaderState) -> None:
        """A reader changed state."""
        self.reader_state_enum.labels(reader).state(state.value)

    def reader_reconnect(self, reader: str) -> None:
        """A reader session came back after a failure."""
        self.reader_reconnects_total.labels(reader).inc()

    def door_cycle(self, outcome: str = "complete") -> None:
        """A door cycle ended (``complete``, ``incomplete``, ...)."""
        self.door_cycles_total.labels(outcome).inc()

    def event(self, event_type: str, count: int = 1) -> None:
        """Domain events of one type were committed."""
        self.events_total.labels(event_type).inc(count)

    def outbox(self, depth: int, size_bytes: int, oldest_age_s: float) -> None:
        """The outbox's current size and backlog age."""
        self.outbox_depth.set(depth)
        self.outbox_bytes.set(size_bytes)
        self.outbox_oldest_age.set(oldest_age_s)

    def published(self, latency_s: float) -> None:
        """One event was acknowledged by the broker after ``latency_s``."""
        self.publish_latency.observe(latency_s)

    def broker(self, connected: bool, unreachable_for_s: float | None) -> None:
        """The broker connection's state: connected, or unreachable for how long."""
        self.mqtt_connected.set(1 if connected else 0)
        self.mqtt_unreachable.set(0.0 if unreachable_for_s is None else unreachable_for_s)

    def broker_link(
        self, state: str, not_acknowledging_for_s: float | None, commands_subscribed: bool
    ) -> None:
        """The broker link beyond up/down: its state, a no-PUBACK episode, our subscriptions."""
        self.mqtt_state.state(state)
        self.mqtt_not_acknowledging.set(not_acknowledging_for_s or 0.0)
        self.mqtt_commands_subscribed.set(1 if commands_subscribed else 0)

    def mqtt_reconnect(self) -> None:
        """The MQTT session came back."""
        self.mqtt_reconnects_total.inc()

    def clock(
        self, trusted: bool, provisional: bool, untrusted_for_s: float, offset_s: float
    ) -> None:
        """The agent's time: trusted, provisional, untrusted for how long, wall minus agent."""
        self.clock_trusted.set(1 if trusted else 0)
        self.clock_provisional.set(1 if provisional else 0)
        self.clock_untrusted.set(untrusted_for_s)
        self.clock_offset.set(offset_s)

    def dropped(self, reason: str, count: int = 1) -> None:
        """Events dropped by policy (never silently: also alerted)."""
        self.events_dropped_total.labels(reason).inc(count)

    def render(self) -> bytes:
        """The exposition text (what a scrape returns)."""
        return generate_latest(self.registry)


Refresh = Callable[[], Awaitable[None]]


class MetricsServer:
    """The HTTP endpoint on loopback, started and stopped from asyncio.

    ``refresh`` (optional) samples the parts into the registry; each scrape runs it on the event
    loop first, so the numbers are those of the scrape and nothing samples between scrapes.
    """

    def __init__(
        self, cfg: MetricsConfig, registry: CollectorRegistry, refresh: Refresh | None = None
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.refresh = refresh
        self._httpd: _ScrapeServer | None = None
        self.started = asyncio.Event()  # serve() made its start attempt (bound, off or failed)

    @property
    def port(self) -> int | None:
        """The bound port (useful with ``port = 0``), or None when not serving."""
        return None if self._httpd is None else int(self._httpd.server_address[1])

    async def start(self) -> None:
        """Bind and serve; a no-op when disabled. Raises MetricsServerError if the port is taken."""
        if not self.cfg.enabled or self._httpd is not None:
            return
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        server = type("_ScrapeServerFamily", (_ScrapeServer,), {"address_family": family})
        app = make_wsgi_app(self.registry)
        if self.refresh is not None:
            app = _refreshed(app, self.refresh, asyncio.get_running_loop())
        try:
            httpd: _ScrapeServer = make_server(
                self.cfg.host,
                self.cfg.port,
                app,
                server_class=server,
                handler_class=_QuietHandler,
            )
        except OSError as err:
            raise MetricsServerError(
                f"metrics endpoint {self.cfg.host}:{self.cfg.port} unavailable: {err.strerror or err}"
            ) from err
        # Accepting never blocks the loop (a client gone before accept() is an OSError the
        # server ignores); the scrape itself runs on its own short thread (ThreadingMixIn).
        httpd.socket.setblocking(False)
        asyncio.get_running_loop().add_reader(httpd.fileno(), httpd.handle_request)
        self._httpd = httpd
        logger.info("metrics on http://%s:%d/metrics", self.cfg.host, self.port)

    async def stop(self) -> None:
        """Stop accepting and close the socket (a scrape under way finishes on its thread)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        asyncio.get_running_loop().remove_reader(httpd.fileno())
        httpd.server_close()

    async def serve(self, stop_event: asyncio.Event) -> None:
        """Run until ``stop_event`` (for the daemon's TaskGroup); a failed bind is logged, not
        fatal: the cabinet's job does not depend on being scraped."""
        try:
            await self.start()
        except MetricsServerError as err:
            logger.error("%s; running without metrics", err)
        self.started.set()
        try:
            await stop_event.wait()
        finally:
            await self.stop()


def _refreshed(app: Any, refresh: Refresh, loop: asyncio.AbstractEventLoop) -> Any:
    """The WSGI app, run after ``refresh`` on the loop (the scrape's thread waits, bounded)."""

    def scrape(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        sample: concurrent.futures.Future[None] | None = None
        try:
            sample = asyncio.run_coroutine_threadsafe(_call(refresh), loop)
            sample.result(SCRAPE_REFRESH_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            # Not left running behind the scrape: scrapes of a wedged outbox read would queue
            # one sample each behind the sampling lock.
            if sample is not None:
                sample.cancel()
            logger.warning(
                "metrics: the parts were not sampled within %g s; serving the last sample",
                SCRAPE_REFRESH_TIMEOUT_S,
            )
        except RuntimeError:
            pass  # the loop is closed: the process is ending, the last sample stands
        except Exception:  # a broken sampler must not break the endpoint
            logger.exception("metrics: sampling the parts failed; serving the last sample")
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return scrape


async def _call(refresh: Refresh) -> None:
    await refresh()


class _ScrapeServer(ThreadingMixIn, WSGIServer):
    """One short daemon thread per scrape; accepted sockets block (the listener does not)."""

    daemon_threads = True
    block_on_close = False

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setblocking(True)
        sock.settimeout(_STOP_TIMEOUT_S)  # a client that never sends cannot hold its thread
        return sock, addr


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (the agent's log is for the cabinet, not for scrapes)."""

    def log_message(self, format: str, *args: Any) -> None:
        return None
