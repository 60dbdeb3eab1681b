"""One MQTT connection: a fresh paho client driven by the asyncio loop through socket callbacks.

paho-mqtt 2 is used as a codec and protocol state machine only. Its socket is registered with
the running loop (``add_reader``/``add_writer``), keepalive runs from a loop timer, and every
paho callback therefore runs on the loop thread: PUBACKs resolve asyncio futures directly.
The one blocking step, TCP connect + TLS handshake inside ``Client.connect``, runs in a worker
thread, before the socket is handed to the loop.

A session is never reconnected: each connection attempt builds a new ``Client``. paho's
in-memory queue of unacknowledged messages (``_out_messages``, re-sent with DUP on reconnect)
dies with the old client, so the outbox is the only retry path (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.mqtt.config import MqttConfig, TlsConfig
from drivers.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

# PUBACK reason codes >= 0x80 are refusals (MQTT v5 §2.4).
FAILURE_THRESHOLD = 0x80
MISC_PERIOD_S = 1.0
_MAX_READS_PER_WAKEUP = 64


class ConnectionLost(TransientError):
    """The connection ended before the operation completed."""


class ConnectRefused(TransientError):
    """The broker (or the TLS layer) refused us; retry, but with the longest backoff."""


class PinMismatch(ConnectRefused):
    """The broker's public key is not one of the configured SPKI pins."""


@dataclass(frozen=True, slots=True)
class ConnackInfo:
    session_present: bool
    receive_maximum: int | None  # MQTT v5: how many QoS 1 publishes the broker accepts in flight


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    retained: bool


def build_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Client TLS context: private CA only, hostname checked, TLS 1.3 unless configured 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        if tls.cert_file is not None and tls.key_file is not None:
            ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (OSError, ssl.SSLError) as err:
        raise PermanentError(f"cannot load TLS material: {err}") from None
    return ctx


def spki_sha256_of_der(cert_der: bytes) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo of a DER certificate."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class MqttSession:
    """A single connection; ``closed`` resolves (with a reason) when it ends, never reopens."""

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        will: tuple[str, bytes] | None,
        tls_context: ssl.SSLContext | None,
        on_inbound: Callable[[Inbound], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._cfg = cfg
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._on_inbound = on_inbound
        self._v5 = cfg.protocol == "5"
        kwargs: dict[str, Any] = {}
        if not self._v5:
            kwargs["clean_session"] = not cfg.persistent_session
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            **kwargs,
        )
        # Our window is the bound; paho must never queue behind it (its queue would be
        # a second, invisible outbox). +4 leaves room for status and subscribe traffic.
        self._client.max_inflight_messages_set(cfg.inflight_window + 4)
        self._client.max_queued_messages_set(cfg.inflight_window + 4)
        self._client.connect_timeout = cfg.connect_timeout_s
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._pins = list(cfg.tls.spki_pins) if cfg.tls is not None else []
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        c.on_socket_unregister_write = self._on_socket_unregister_write
        self._sock: Any = None
        self._attached = False  # socket handed to the loop (after the connect thread is done)
        self._want_write = False
        self._flush_scheduled = False
        self._writer_added = False
        self._connack: asyncio.Future[ConnackInfo] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._pending: dict[int, tuple[asyncio.Future[int], float]] = {}
        self._misc_handle: asyncio.TimerHandle | None = None
        self._ack_timeout_s = float(cfg.keepalive_s)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> ConnackInfo:
        """TCP + TLS (worker thread), CONNECT, wait for CONNACK; raise Transient/ConnectRefused."""
        cfg = self._cfg
        connect_kwargs: dict[str, Any] = {"keepalive": cfg.keepalive_s}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s if cfg.persistent_session else 0
            connect_kwargs["clean_start"] = not cfg.persistent_session
            connect_kwargs["properties"] = props
        work = self._loop.run_in_executor(
            self._executor,
            lambda: self._client.connect(cfg.host, cfg.effective_port, **connect_kwargs),
        )
        try:
            # Shielded: a cancelled connect must still let the thread finish, then close.
            await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda _f: self._close_socket())
            raise
        except ssl.SSLCertVerificationError as err:
            self._close_socket()
            raise ConnectRefused(f"broker certificate refused: {err.verify_message}") from None
        except ssl.SSLError as err:
            self._close_socket()
            raise ConnectRefused(f"TLS handshake failed: {err.reason or err}") from None
        except PinMismatch:
            self._close_socket()
            raise
        except (OSError, TimeoutError) as err:
            self._close_socket()
            raise TransientError(
                f"cannot reach broker {cfg.host}:{cfg.effective_port}: {err}"
            ) from None
        self._attach()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                return await asyncio.shield(self._connack)
        except TimeoutError:
            self.abort("no CONNACK")
            raise TransientError("broker sent no CONNACK in time") from None
        except BaseException:
            self.abort("connect aborted")
            raise

    def abort(self, reason: str) -> None:
        """Drop the connection now (no DISCONNECT: the will is published)."""
        self._close_socket()
        self._finish(reason)

    async def disconnect(self, timeout_s: float = 2.0) -> None:
        """Polite DISCONNECT (the broker discards the will), bounded; abort if it stalls."""
        if self.closed.done():
            return
        self._client.disconnect()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self.closed)
        except TimeoutError:
            pass
        finally:
            self.abort("disconnected")

    # ------------------------------------------------------------------ operations

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[int]:
        """QoS 1 publish; the future resolves with the PUBACK reason code (0 on MQTT 3.1.1)."""
        if self.closed.done():
            raise ConnectionLost(f"connection closed: {self.closed.result()}")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # NO_CONN / QUEUE_SIZE: the connection is unusable or we broke our own bound.
            self.abort(f"publish refused locally ({mqtt.error_string(info.rc)})")
            raise ConnectionLost(f"publish refused locally: {mqtt.error_string(info.rc)}")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._pending[info.mid] = (fut, time.monotonic())
        return fut

    def subscribe(self, topics: Sequence[str]) -> None:
        """QoS 1 subscriptions (fire and forget: a refusal is logged by ``_on_subscribe``)."""
        if not topics:
            return
        if self._v5:
            self._client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        else:
            self._client.subscribe([(t, 1) for t in topics])

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ loop plumbing

    def _attach(self) -> None:
        sock = self._client.socket()
        if sock is None:
            raise TransientError("connection closed during connect")
        self._sock = sock
        self._attached = True
        self._loop.add_reader(sock, self._readable)
        if self._want_write:
            self._schedule_flush()
        self._misc_handle = self._loop.call_later(MISC_PERIOD_S, self._misc)

    def _readable(self) -> None:
        sock = self._sock
        for _ in range(_MAX_READS_PER_WAKEUP):
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._client.socket() is None:
                self._finish(f"read ended ({mqtt.error_string(rc)})")
                return
            # TLS may hold decrypted bytes the kernel no longer reports as readable.
            pending = getattr(sock, "pending", None)
            if pending is None or pending() == 0:
                return
        self._loop.call_soon(self._readable)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what paho queued during this loop iteration, in one go.

        Writing optimistically (rather than add_writer → wait for writable → remove_writer per
        publish) saves two epoll_ctl calls and a loop iteration per message; the fd is watched
        for writability only when the kernel buffer is actually full.
        """
        self._flush_scheduled = False
        if not self._attached:
            return
        self._writable()
        if self._attached and self._client.want_write() and not self._writer_added:
            self._writer_added = True
            self._loop.add_writer(self._sock, self._writable)

    def _writable(self) -> None:
        rc = self._client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._finish(f"write failed ({mqtt.error_string(rc)})")

    def _misc(self) -> None:
        self._misc_handle = None
        if self.closed.done():
            return
        rc = self._client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._finish(f"keepalive failed ({mqtt.error_string(rc)})")
            return
        if self._pending:
            oldest = min(sent for _fut, sent in self._pending.values())
            if time.monotonic() - oldest > self._ack_timeout_s:
                # A link that swallows bytes (dead NAT) keeps TCP up for minutes: give up early.
                self.abort(f"no PUBACK for {self._ack_timeout_s:.0f} s")
                return
        self._misc_handle = self._loop.call_later(MISC_PERIOD_S, self._misc)

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is None:
            sock = self._sock
        if sock is None:
            return
        self._detach(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _detach(self, sock: Any) -> None:
        if self._attached:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)
        self._attached = False
        self._writer_added = False

    def _finish(self, reason: str) -> None:
        if self._misc_handle is not None:
            self._misc_handle.cancel()
            self._misc_handle = None
        if not self._connack.done():
            self._connack.set_exception(ConnectionLost(reason))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(reason)
        pending = list(self._pending.values())
        self._pending.clear()
        for fut, _sent in pending:
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))
                fut.exception()  # consumers may already be gone; never "never retrieved"

    # ------------------------------------------------------------------ paho callbacks

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Runs in the connect thread, after the TLS handshake and before CONNECT is queued.
        self._sock = sock
        if self._pins:
            der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
            got = spki_sha256_of_der(der) if der else ""
            if not any(hmac.compare_digest(got, pin) for pin in self._pins):
                raise PinMismatch("broker public key does not match any configured spki_pins")

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._detach(sock)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._want_write = True
        if self._attached:
            self._schedule_flush()

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._want_write = False
        if self._attached and self._writer_added:
            self._writer_added = False
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # paho re-sends its stored QoS>0 messages right after this callback; a fresh client
        # has none, and we drop any defensively so nothing but the outbox ever re-sends.
        if hasattr(client, "drop_out_messages"):  # paho >= 2.2
            client.drop_out_messages()
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(ConnectRefused(f"broker refused CONNECT: {reason}"))
            return
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        self._connack.set_result(
            ConnackInfo(bool(flags.session_present), int(receive_max) if receive_max else None)
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        who = "broker" if flags.is_disconnect_packet_from_server else "link"
        self._finish(f"{who}: {reason}")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        fut, _sent = entry
        if not fut.done():
            fut.set_result(int(reason.value))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_inbound is not None:
            self._on_inbound(Inbound(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            logger.warning("broker refused command subscription(s): %s", ", ".join(refused))
