"""The backend's MQTT subscription: options, connection, QoS 1 subscription (shared or not).

``MqttSubscriber`` owns a paho client and its network thread; a subclass's ``handle`` gets each
message on that thread. With ``manual_ack`` the PUBACK is sent only when ``handle`` calls
``ack``: a consumer that records events acknowledges after its database commit, so a consumer
killed in between gets the message again (from its persistent session) instead of losing it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.mqtt.config import is_loopback_host

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOPIC", "ConsumerOptions", "MqttSubscriber", "check_transport", "stop_client"]

DEFAULT_TOPIC = "cabinets/v1/+/+/events"


@dataclass
class ConsumerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    topic: str = DEFAULT_TOPIC
    share_group: str | None = None
    client_id: str | None = None
    session_expiry_s: int = 0
    protocol: str = "5"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    allow_plaintext: bool = False

    @property
    def subscription(self) -> str:
        if self.share_group:
            return f"$share/{self.share_group}/{self.topic}"
        return self.topic


def check_transport(opts: ConsumerOptions) -> None:
    """ValueError for plaintext MQTT off this machine without ``allow_plaintext``."""
    if opts.ca_file is None and not opts.allow_plaintext and not is_loopback_host(opts.host):
        raise ValueError(
            f"plaintext MQTT to {opts.host!r} refused: give --tls-ca or --allow-plaintext"
        )


def stop_client(client: mqtt.Client) -> None:
    """Disconnect a client started with ``loop_start()``, stop its thread and close its sockets.

    paho keeps loop_start's wake-up socket pair open until the client is garbage-collected
    (eclipse-paho/paho.mqtt.python#627), and a client whose callbacks refer back to their owner
    (or whose thread refers back to it) waits for the cyclic collector: ``reinitialise()`` closes
    every socket of the client now.
    """
    client.disconnect()
    client.loop_stop()
    client.reinitialise()


class MqttSubscriber:
    """A paho client on its own network thread, subscribed QoS 1 to ``opts.subscription``."""

    def __init__(self, opts: ConsumerOptions, *, manual_ack: bool = False) -> None:
        check_transport(opts)
        self.opts = opts
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.last_message = time.monotonic()
        v5 = opts.protocol == "5"
        self.client_id = opts.client_id or f"cabinet-consumer-{uuid.uuid4().hex[:12]}"
        kwargs: dict[str, Any] = {}
        if not v5:
            kwargs["clean_session"] = opts.session_expiry_s == 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=manual_ack,
            **kwargs,
        )
        self._v5 = v5
        self._client.reconnect_delay_set(1, 5)
        if opts.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(opts.ca_file))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if opts.cert_file is not None:
                ctx.load_cert_chain(str(opts.cert_file), str(opts.key_file or opts.cert_file))
            self._client.tls_set_context(ctx)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        kwargs: dict[str, Any] = {"keepalive": 30}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.opts.session_expiry_s
            kwargs["clean_start"] = self.opts.session_expiry_s == 0
            kwargs["properties"] = props
        self._client.connect_async(self.opts.host, self.opts.port, **kwargs)
        self._client.loop_start()

    def stop(self) -> None:
        stop_client(self._client)

    def handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """One message, on the network thread (subclasses)."""
        raise NotImplementedError

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            logger.error("broker refused the consumer: %s", reason)
            return
        self.connected.set()
        if self._v5:
            client.subscribe([(self.opts.subscription, SubscribeOptions(qos=1))])
        else:
            client.subscribe([(self.opts.subscription, 1)])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            logger.error("subscription refused: %s", [str(r) for r in reasons])
            return
        self.subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.last_message = time.monotonic()
        self.handle(client, msg)
