"""The backend on a RabbitMQ cluster: competing consumers on one replicated (quorum) queue.

RabbitMQ's MQTT plugin publishes every MQTT message to the ``amq.topic`` exchange with the topic
as routing key (``/`` becomes ``.``, and a ``.`` inside a level becomes ``/``). A durable
*quorum* queue bound there with the cabinets' events pattern (``cabinets.v1.*.*.events``) holds
the fleet's stream replicated on a majority of the nodes; a cabinet's QoS 1 publish is
acknowledged (PUBACK) only once the queues it was routed to have confirmed it, so what a cabinet
deleted from its outbox is on a majority of the nodes. Several ``cabinet-consumer consume --amqp``
processes read that one queue with manual acknowledgements (competing consumers): each message
goes to one of them; one acknowledged only after its database commit; one a consumer died
holding goes back to the queue for another.

The queue must exist before the cabinets publish (a message routed nowhere is dropped, as an
MQTT broker drops one nobody subscribed to): ``declare_events_queue`` is idempotent and every
consumer calls it at connect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from agent.mqtt.config import is_loopback_host
from backend.record.consume import RecordStats, record_with_retry
from backend.record.recorder import Outcome, Recorder

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_QUEUE",
    "AmqpRecordingConsumer",
    "amqp_binding",
    "check_amqp_url",
    "declare_events_queue",
    "mqtt_topic",
]

DEFAULT_QUEUE = "cabinet-events"
EXCHANGE = "amq.topic"  # where RabbitMQ's MQTT plugin publishes
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0


def amqp_binding(topic_filter: str) -> str:
    """An MQTT topic filter as the binding key RabbitMQ's MQTT plugin routes with."""
    words = []
    for level in topic_filter.split("/"):
        if level == "+":
            words.append("*")
        elif level == "#":
            words.append("#")
        else:
            words.append(level.replace(".", "/"))
    return ".".join(words)


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic a message was published on, from its AMQP routing key."""
    return "/".join(word.replace("/", ".") for word in routing_key.split("."))


def check_amqp_url(url: str, *, allow_plaintext: bool) -> None:
    """ValueError for a URL that is not AMQP, or plaintext AMQP off this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("--amqp takes amqp://… or amqps://… URLs")
    if parts.scheme == "amqp" and not allow_plaintext and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"plaintext AMQP to {parts.hostname!r} refused: use amqps:// or --allow-plaintext"
        )


def declare_events_queue(channel: Any, queue: str, topic_filter: str) -> None:
    """The durable quorum queue bound to the cabinets' events (idempotent)."""
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue, EXCHANGE, routing_key=amqp_binding(topic_filter))


class AmqpRecordingConsumer:
    """Consumes ``queue`` on the first reachable of ``urls`` and records every message.

    The same face as the MQTT ``RecordingConsumer`` (``start``, ``stop``, ``subscribed``,
    ``last_message``, ``stats``): one thread owns a pika ``BlockingConnection``; a message is
    acknowledged after its commit; a lost node means a reconnect to the next URL (messages in
    hand and unacknowledged go back to the queue, the record takes them once).
    """

    def __init__(
        self,
        urls: Sequence[str],
        queue: str,
        topic_filter: str,
        recorder: Recorder,
        *,
        stop: threading.Event,
        on_outcome: Callable[[Outcome], None] | None = None,
        prefetch: int = 64,
        name: str = "cabinet-consumer",
    ) -> None:
        if not urls:
            raise ValueError("no AMQP URL")
        self._urls = list(urls)
        self._queue = queue
        self._filter = topic_filter
        self._recorder = recorder
        self._stop = stop
        self._on_outcome = on_outcome
        self._prefetch = prefetch
        self._name = name
        self.subscribed = threading.Event()
        self.last_message = time.monotonic()
        self.stats = RecordStats()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="amqp-consumer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        import pika  # an optional dependency (cabinet-agent[amqp])
        from pika.exceptions import AMQPError

        attempt = 0
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            url = self._urls[attempt % len(self._urls)]
            attempt += 1
            params = pika.URLParameters(url)
            params.heartbeat = 10
            params.blocked_connection_timeout = 30
            params.socket_timeout = 5
            params.connection_attempts = 1
            params.client_properties = {"connection_name": self._name}
            try:
                connection = pika.BlockingConnection(params)
                try:
                    channel = connection.channel()
                    declare_events_queue(channel, self._queue, self._filter)
                    channel.basic_qos(prefetch_count=self._prefetch)
                    channel.basic_consume(self._queue, self._on_message)
                    self.subscribed.set()
                    logger.info("consuming %s on %s", self._queue, _where(params))
                    delay = RECONNECT_MIN_S
                    while not self._stop.is_set():
                        connection.process_data_events(time_limit=0.2)
                finally:
                    self.subscribed.clear()
                    if connection.is_open:
                        with contextlib.suppress(AMQPError, OSError):
                            connection.close()
            except (AMQPError, OSError) as err:
                if self._stop.is_set():
                    break
                self.reconnects += 1
                logger.warning(
                    "AMQP connection to %s lost or refused (%s); next node in %.1f s",
                    _where(params),
                    type(err).__name__,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.last_message = time.monotonic()
        self.stats.received += 1
        topic = mqtt_topic(str(method.routing_key))
        outcome = record_with_retry(self._recorder, topic, bytes(body), self._stop, self.stats)
        if outcome is None:
            return  # stopping before it was recorded: unacknowledged, the queue keeps it
        # Committed: counted (and reported) now. The ack may fail with the connection (a node
        # killed); the queue then hands the message to another consumer, which finds it
        # recorded: a duplicate there, so every event is counted recorded exactly once.
        self.stats.count(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        channel.basic_ack(method.delivery_tag)


def _where(params: Any) -> str:
    return f"{params.host}:{params.port}"
