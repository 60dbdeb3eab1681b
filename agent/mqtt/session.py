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
import enum
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.logging_setup import printable
from agent.mqtt.config import MqttConfig, TlsConfig
from drivers.errors import PermanentError, RefusedError, TransientError

logger = logging.getLogger(__name__)

# PUBACK reason codes >= 0x80 are refusals (MQTT v5 §2.4).
FAILURE_THRESHOLD = 0x80
MISC_PERIOD_S = 1.0  # the first loop_misc after the connect (and with a paho we cannot read)
MISC_MIN_S = 0.05  # never sooner than this after the last (a deadline just missed)
_MAX_READS_PER_WAKEUP = 64
# Room for everything in an inbound packet but a command's payload: fixed header (5), topic
# (2 + up to 65,535), packet id (2) and MQTT v5 properties. The packet limit we advertise and
# enforce is ``max_command_bytes`` plus this.
PACKET_HEADER_ROOM = 80 * 1024
# One socket read takes at most this much: paho asks for the whole remaining length at once.
READ_CHUNK = 256 * 1024
# paho reads a packet as recv(1) for its type, recv(1) per length byte, then recv(rest): three
# system calls per 4-byte PUBACK. Reads smaller than this are served from one buffered recv.
READ_BUFFER = 16 * 1024
# paho writes each queued packet with its own send(); up to this many bytes of queued packets
# go out in one.
WRITE_COALESCE = 64 * 1024
_DISCONNECT = 0xE0
# Bytes of an oversize PUBLISH discarded per wake-up before the loop gets a turn.
DISCARD_PER_CALL = 4 * 1024 * 1024
_PUBLISH = 0x30
# MQTT v5 DISCONNECT reason: another connection with our client id took the session over.
SESSION_TAKEN_OVER = 0x8E


class EndKind(enum.StrEnum):
    """Who or what ended a connection (``MqttSession.end_kind``)."""

    LOCAL = "local"  # we ended it: stop, a local refusal, an outbox error
    NO_ACK = "no-ack"  # our PUBACK deadline passed: the broker does not acknowledge publishes
    KEEPALIVE = "keepalive"  # no PINGRESP within the keepalive: the broker does not answer
    TAKEN_OVER = "taken-over"  # DISCONNECT 0x8E: another client with our client id
    BROKER = "broker"  # another DISCONNECT from the broker (server shutting down, …)
    CLOSED = "closed"  # the far end closed the connection without a DISCONNECT (EOF)
    LINK = "link"  # reset, I/O error, undecodable or oversize packet


class ConnectionLost(TransientError):
    """The connection ended before the operation completed."""


class ConnectRefused(RefusedError):
    """The broker (or the TLS layer) refused us; retry, but with the longest backoff."""


class PinMismatch(ConnectRefused):
    """The broker's public key is not one of the configured SPKI pins."""


@dataclass(frozen=True, slots=True)
class ConnackInfo:
    session_present: bool
    receive_maximum: int | None  # MQTT v5: how many QoS 1 publishes the broker accepts in flight


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    """The broker's answer to our command subscriptions (SUBACK)."""

    granted: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (topic, the broker's reason)


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    retained: bool
    # Set when the PUBLISH was larger than the inbound limit: its payload was discarded unread
    # (``payload`` is empty) and this is the size the broker announced.
    oversize: int | None = None


def max_inbound_packet(cfg: MqttConfig) -> int:
    """The largest MQTT packet the agent accepts (and advertises as Maximum Packet Size)."""
    return cfg.max_command_bytes + PACKET_HEADER_ROOM


class OversizePacketError(ConnectionError):
    """A packet other than PUBLISH announced more bytes than the inbound limit."""


class _BoundedClient(mqtt.Client):
    """paho's client with a bound on what one inbound packet may make it hold in memory.

    paho reads a packet's remaining length, then asks the socket for all of it and buffers it
    before any callback runs (a 200 MiB PUBLISH peaked the agent at ~726 MiB). paho 2 has no
    limit of its own, so its one read primitive (``_sock_recv``) is wrapped here: reads are
    chunked, and once the fixed header of an oversize PUBLISH has been read, only its first
    ``PACKET_HEADER_ROOM`` bytes (topic, packet id, properties) are kept while the rest is
    discarded as it streams in. paho then completes the packet as usual (PUBACK included) with a
    truncated payload that ``MqttSession`` never hands on: the message is refused by size. An
    oversize packet of any other type ends the connection (no broker sends one).

    This reaches into ``_in_packet``, paho's read state (unchanged from paho 1.x through 2.2);
    the tests drive it through a real broker on both protocol versions.
    """

    def __init__(self, *args: Any, max_packet: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet = max_packet
        self.oversize: int | None = None  # announced size of the PUBLISH being discarded
        self.refusal: str | None = None  # why the connection was ended from here
        self.eof = False  # the far end closed the connection (a read returned nothing)
        self.read_error: OSError | None = None
        self._rbuf = b""  # read from the socket, not yet handed to paho
        self._rpos = 0

    def buffered(self) -> bool:
        """Bytes already read from the socket wait here: the kernel will not report them."""
        return self._rpos < len(self._rbuf)

    def _raw_recv(self, bufsize: int) -> bytes:
        """At most ``bufsize`` bytes: from the read buffer, else from the socket.

        A small read fills the buffer with one ``recv`` of READ_BUFFER bytes, so a burst of
        PUBACKs costs one system call instead of three per packet. Never more than the caller
        asked for is handed on, so the bounds of ``_bounded_recv`` hold as before.
        """
        if self._rpos < len(self._rbuf):
            end = self._rpos + bufsize
            data = self._rbuf[self._rpos : end]
            self._rpos = min(end, len(self._rbuf))
            if self._rpos >= len(self._rbuf):
                self._rbuf, self._rpos = b"", 0
            return data
        if bufsize >= READ_BUFFER:
            return super()._sock_recv(bufsize)
        data = super()._sock_recv(READ_BUFFER)
        if len(data) > bufsize:
            self._rbuf, self._rpos = data, bufsize
            return data[:bufsize]
        return data

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """A PUBACK without properties, decoded without paho's per-packet objects.

        paho builds a ``Properties`` object and two ``ReasonCode`` objects (each a scan of its
        name table) per PUBACK, the largest share of a drain's CPU after the system calls. A
        PUBACK of 2 bytes (MQTT 3.1.1, or v5 success), 3 (v5 reason code) or 4 with an empty
        property length is decoded here and handed to paho's own completion
        (``_do_on_publish``) with a shared reason code per value and shared empty properties.
        Anything else (properties, a reason code paho does not know, a malformed packet, a
        PUBCOMP) goes through paho unchanged.
        """
        packet = self._in_packet["packet"]
        size = len(packet)
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        plain = size == 2 or (v5 and (size == 3 or (size == 4 and packet[3] == 0)))
        reason = _puback_reason(packet[2] if size > 2 else 0) if plain else None
        if cmd != "PUBACK" or reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        self._coalesce_out()
        return super()._packet_write()

    def _coalesce_out(self) -> None:
        """Join the packets paho queued into one, so they leave in one ``send()``.

        paho writes its queue packet by packet: a window of publishes queued in one loop
        iteration cost a system call each. Only packets whose completion paho does not act on
        are joined: a QoS 0 PUBLISH (paho reports it published once written) and a DISCONNECT
        (paho closes the socket once written) stay packets of their own. QoS 1 publishes are
        done at their PUBACK, not when written, so joining changes nothing about delivery.
        """
        queue = self._out_packet
        if len(queue) < 2:
            return
        parts: list[bytes] = []
        size = 0
        while queue and size < WRITE_COALESCE:
            head = queue[0]
            kind = head["command"] & 0xF0
            if kind == _DISCONNECT or (kind == _PUBLISH and head["qos"] == 0):
                break
            queue.popleft()
            data = bytes(head["packet"][head["pos"] :])
            parts.append(data)
            size += len(data)
        if len(parts) == 1:
            queue.appendleft(_plain_packet(parts[0]))
        elif parts:
            queue.appendleft(_plain_packet(b"".join(parts)))

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            data = self._bounded_recv(bufsize)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as err:
            self.read_error = err
            raise
        if not data and bufsize > 0:
            self.eof = True
        return data

    def _bounded_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if not packet["have_remaining"] or packet["remaining_length"] <= self.max_packet:
            return self._raw_recv(min(bufsize, READ_CHUNK))
        if self.oversize is None:
            if packet["command"] & 0xF0 != _PUBLISH:
                self.refusal = (
                    f"broker sent a packet of {packet['remaining_length']} bytes "
                    f"(type 0x{packet['command']:02x}); the limit is {self.max_packet}"
                )
                raise OversizePacketError(self.refusal)
            self.oversize = int(packet["remaining_length"])
        kept = len(packet["packet"])
        if kept < PACKET_HEADER_ROOM and packet["to_process"] > 1:
            return self._raw_recv(min(bufsize, PACKET_HEADER_ROOM - kept))
        budget = DISCARD_PER_CALL
        while packet["to_process"] > 1:
            if budget <= 0:
                raise BlockingIOError  # the socket stays readable: the loop calls again
            data = self._raw_recv(min(packet["to_process"] - 1, READ_CHUNK, budget))
            if not data:
                return data
            packet["to_process"] -= len(data)
            budget -= len(data)
        # The last byte goes to paho, which then handles the (truncated) packet normally.
        return self._raw_recv(1)


_PUBACK_REASONS: dict[int, ReasonCode] = {}
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def _puback_reason(value: int) -> ReasonCode | None:
    """paho's PUBACK reason code for ``value``, built once; None if paho does not know it."""
    reason = _PUBACK_REASONS.get(value)
    if reason is None:
        try:
            reason = ReasonCode(PacketTypes.PUBACK, identifier=value)
        except Exception:  # noqa: BLE001 -- paho's own decoding then says what is wrong
            return None
        _PUBACK_REASONS[value] = reason
    return reason


def _plain_packet(data: bytes) -> Any:
    """A queued write paho has nothing to do for once sent (command 0: no packet type)."""
    return {
        "command": 0,
        "mid": 0,
        "qos": 0,
        "pos": 0,
        "to_process": len(data),
        "packet": data,
        "info": None,
    }


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails (paho drops it unclosed, to the collector)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def build_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Client TLS context: private CA only, hostname checked, TLS 1.3 unless configured 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslsocket_class = _ClosingSSLSocket
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
    # Only a TLS connection with spki_pins gets here: no X.509 code in the other daemons.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

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
        echo_topic: str | None = None,
    ) -> None:
        self._cfg = cfg
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._on_inbound = on_inbound
        self._v5 = cfg.protocol == "5"
        # MQTT 3.1.1 has no PUBACK reason code: a broker that refuses a publish (mosquitto's
        # ACL) still acknowledges it and drops the message. A publish with ``confirm=True`` is
        # therefore done only once its PUBACK *and* its copy, delivered back to us on
        # ``echo_topic`` (which the caller subscribes), have arrived: the broker took it and
        # routed it. None (MQTT v5): the PUBACK's reason code says it.
        self.echo_topic = echo_topic
        kwargs: dict[str, Any] = {}
        if not self._v5:
            kwargs["clean_session"] = not cfg.persistent_session
        self.max_packet = max_inbound_packet(cfg)
        self._client = _BoundedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            max_packet=self.max_packet,
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
        self.end_kind: EndKind | None = None  # set with ``closed``
        self.connack_at: float | None = None  # time.monotonic() of a successful CONNACK
        # Publishes done on this connection: PUBACK (any reason code), and the echo where one
        # is awaited.
        self.acks = 0
        # When ``closed`` resolved: time.monotonic() the oldest unacknowledged publish was sent.
        self.unanswered_since: float | None = None
        self._pending: dict[int, _Pending] = {}
        self._by_digest: dict[bytes, int] = {}  # payload digest -> mid, for publishes to echo
        self.echoes = 0  # our own publishes delivered back (MQTT 3.1.1 confirmation)
        self._subscribing: dict[int, tuple[list[str], asyncio.Future[SubscribeResult]]] = {}
        self._misc_handle: asyncio.TimerHandle | None = None
        self._misc_at: float | None = None  # time.monotonic() the next loop_misc runs
        self._ack_timeout_s = float(cfg.keepalive_s)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> ConnackInfo:
        """TCP + TLS (worker thread), CONNECT, CONNACK, all within ``connect_timeout_s``.

        Raises TransientError (ConnectRefused for a refusal). The worker thread cannot be
        interrupted (name resolution, for one, has no timeout): when the deadline passes first,
        the attempt is abandoned and the thread closes its own socket when it returns.
        """
        cfg = self._cfg
        where = f"{cfg.host}:{cfg.effective_port}"
        connect_kwargs: dict[str, Any] = {"keepalive": cfg.keepalive_s}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s if cfg.persistent_session else 0
            # The broker must not send us more than we accept (mosquitto drops such messages
            # for this client); _BoundedClient enforces the same limit where it is ignored.
            props.MaximumPacketSize = self.max_packet
            connect_kwargs["clean_start"] = not cfg.persistent_session
            connect_kwargs["properties"] = props
        lock = threading.Lock()
        state = {"finished": False, "abandoned": False}

        def work_fn() -> None:
            try:
                self._client.connect(cfg.host, cfg.effective_port, **connect_kwargs)
            finally:
                with lock:
                    state["finished"] = True
                    abandoned = state["abandoned"]
                if abandoned:
                    self._close_socket()  # nobody waits for this attempt any more

        def abandon() -> None:
            work.cancel()  # still queued: it never runs
            with lock:
                state["abandoned"] = True
                finished = state["finished"]
            if finished:
                self._close_socket()

        work = self._loop.run_in_executor(self._executor, work_fn)
        work.add_done_callback(_retrieve)
        deadline = self._loop.time() + cfg.connect_timeout_s
        try:
            # Shielded: the thread is never interrupted; abandon() settles what it leaves.
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(work)
        except TimeoutError:
            abandon()
            raise TransientError(
                f"cannot reach broker {where}: no connection within {cfg.connect_timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            abandon()
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
        except OSError as err:
            self._close_socket()
            raise TransientError(f"cannot reach broker {where}: {err}") from None
        self._attach()
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._connack)
        except TimeoutError:
            self.abort("no CONNACK")
            raise TransientError(
                f"broker sent no CONNACK within {cfg.connect_timeout_s:g} s"
            ) from None
        except BaseException:
            self.abort("connect aborted")
            raise

    def abort(self, reason: str, kind: EndKind = EndKind.LOCAL) -> None:
        """Drop the connection now (no DISCONNECT: the will is published)."""
        self._close_socket()
        self._finish(reason, kind)

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

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, confirm: bool = False
    ) -> asyncio.Future[int]:
        """QoS 1 publish; the future resolves with the PUBACK reason code (0 on MQTT 3.1.1).

        ``confirm`` (with an ``echo_topic``, on ``topic`` == ``echo_topic``): resolve only once
        the broker has also delivered the message back to us (MQTT 3.1.1, see __init__).
        """
        if self.closed.done():
            raise ConnectionLost(f"connection closed: {self.closed.result()}")
        digest: bytes | None = None
        if confirm and self.echo_topic is not None:
            if topic != self.echo_topic:
                raise ValueError(f"cannot confirm a publish on {topic}: the echo topic is another")
            digest = hashlib.sha256(payload).digest()
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # NO_CONN / QUEUE_SIZE: the connection is unusable or we broke our own bound.
            self.abort(f"publish refused locally ({mqtt.error_string(info.rc)})")
            raise ConnectionLost(f"publish refused locally: {mqtt.error_string(info.rc)}")
        fut: asyncio.Future[int] = self._loop.create_future()
        sent = time.monotonic()
        self._pending[info.mid] = _Pending(fut, sent, digest)
        if self._misc_at is not None and sent + self._ack_timeout_s < self._misc_at:
            self._schedule_misc()  # this publish's ack timeout comes first
        if digest is not None:
            self._by_digest[digest] = info.mid
        return fut

    def subscribe(self, topics: Sequence[str]) -> asyncio.Future[SubscribeResult]:
        """QoS 1 subscriptions; the future resolves with the broker's SUBACK (which topics it
        granted, which it refused and why), or fails with ConnectionLost."""
        fut: asyncio.Future[SubscribeResult] = self._loop.create_future()
        if not topics:
            fut.set_result(SubscribeResult((), ()))
            return fut
        if self.closed.done():
            raise ConnectionLost(f"connection closed: {self.closed.result()}")
        if self._v5:
            rc, mid = self._client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        else:
            rc, mid = self._client.subscribe([(t, 1) for t in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self.abort(f"subscribe refused locally ({mqtt.error_string(rc)})")
            raise ConnectionLost(f"subscribe refused locally: {mqtt.error_string(rc)}")
        self._subscribing[mid] = (list(topics), fut)
        return fut

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
        self._schedule_misc(MISC_PERIOD_S)

    def _readable(self) -> None:
        sock = self._sock
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                rc = self._client.loop_read()
            except Exception as err:  # noqa: BLE001 -- a packet paho cannot decode
                # (a truncated field raises struct.error, an invalid topic UnicodeDecodeError):
                # the broker is broken or hostile; this connection ends, the agent goes on.
                self.abort(
                    f"undecodable packet from broker ({type(err).__name__}: {printable(err)})",
                    EndKind.LINK,
                )
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._client.socket() is None:
                # Normally on_disconnect has already said why; this covers the rest.
                self._finish(self._client.refusal or self._lost_reason(), self._lost_kind())
                return
            # Our read buffer, or TLS, may hold bytes the kernel no longer reports as readable.
            if self._client.buffered():
                continue
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
            self._finish(f"write failed ({mqtt.error_string(rc)})", EndKind.LINK)

    def _misc(self) -> None:
        self._misc_handle = None
        if self.closed.done():
            return
        rc = self._client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._finish(f"keepalive failed ({mqtt.error_string(rc)})", EndKind.KEEPALIVE)
            return
        if self._pending:
            oldest = min(self._pending.values(), key=lambda p: p.sent)
            if time.monotonic() - oldest.sent > self._ack_timeout_s:
                # A link that swallows bytes (dead NAT) keeps TCP up for minutes: give up early.
                if oldest.code is None:
                    why = f"no PUBACK for {self._ack_timeout_s:.0f} s"
                else:
                    # Acknowledged but never routed back to us: the broker dropped it.
                    why = (
                        f"publish acknowledged but not delivered back within "
                        f"{self._ack_timeout_s:.0f} s (MQTT 3.1.1 confirmation): the broker "
                        f"dropped it (an ACL refusing {self.echo_topic}, or our read access "
                        "to it?)"
                    )
                self.abort(why, EndKind.NO_ACK)
                return
        self._schedule_misc()

    def _schedule_misc(self, delay: float | None = None) -> None:
        """Run ``loop_misc`` when something can be due, not every second: paho's keepalive (a
        PINGREQ after ``keepalive_s`` without traffic, the end of an unanswered one) or the ack
        timeout of the oldest publish. Traffic only moves those later, and a publish whose ack
        timeout comes sooner reschedules (``publish``)."""
        if self._misc_handle is not None:
            self._misc_handle.cancel()
        now = time.monotonic()
        if delay is None:
            delay = max(MISC_MIN_S, self._misc_due() - now)
        self._misc_at = now + delay
        self._misc_handle = self._loop.call_later(delay, self._misc)

    def _misc_due(self) -> float:
        """time.monotonic() when ``loop_misc`` next has something to do."""
        now = time.monotonic()
        keepalive = float(self._cfg.keepalive_s)
        client = self._client
        # paho's own bookkeeping, on its clock (time.monotonic); the names differ by version.
        heard = getattr(client, "_last_bytes_received", getattr(client, "_last_msg_in", None))
        said = getattr(client, "_last_msg_out", None)
        ping = getattr(client, "_ping_t", None)
        number = int | float
        if not (
            isinstance(heard, number) and isinstance(said, number) and isinstance(ping, number)
        ):
            return now + MISC_PERIOD_S  # a paho we cannot read: look every second
        due = min(heard, said) + keepalive
        if ping > 0:
            due = min(due, ping + keepalive)
        if self._pending:
            due = min(due, min(p.sent for p in self._pending.values()) + self._ack_timeout_s)
        return min(due, now + keepalive)

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

    def _finish(self, reason: str, kind: EndKind = EndKind.LOCAL) -> None:
        if self._misc_handle is not None:
            self._misc_handle.cancel()
            self._misc_handle = None
            self._misc_at = None
        if not self._connack.done():
            self._connack.set_exception(ConnectionLost(reason))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        if not self.closed.done():
            self.end_kind = kind
            if self._pending:
                self.unanswered_since = min(p.sent for p in self._pending.values())
            elif kind is EndKind.NO_ACK:  # nothing could be confirmed (a refused echo topic)
                self.unanswered_since = self.connack_at or time.monotonic()
            self.closed.set_result(reason)
        pending = list(self._pending.values())
        self._pending.clear()
        self._by_digest.clear()
        for entry in pending:
            fut = entry.fut
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))
                fut.exception()  # consumers may already be gone; never "never retrieved"
        subscribing = list(self._subscribing.values())
        self._subscribing.clear()
        for _topics, sub in subscribing:
            if not sub.done():
                sub.set_exception(ConnectionLost(reason))
                sub.exception()

    def _lost_reason(self) -> str:
        """Why the link ended, when the broker did not say (no DISCONNECT packet)."""
        if self._client.eof:
            return "connection closed by the broker"
        err = self._client.read_error
        if err is not None:
            return f"connection lost: {printable(err.strerror or err)}"
        return "connection lost"

    def _lost_kind(self) -> EndKind:
        return EndKind.CLOSED if self._client.eof else EndKind.LINK

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
        self.connack_at = time.monotonic()
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
        if flags.is_disconnect_packet_from_server:
            # MQTT v5: the broker says why. Its optional reason string is its own text: shown,
            # made printable and short.
            said = getattr(properties, "ReasonString", None) if properties else None
            detail = f" ({printable(said, 120)})" if said else ""
            if reason.value == SESSION_TAKEN_OVER:
                self._finish(f"broker: session taken over{detail}", EndKind.TAKEN_OVER)
            else:
                self._finish(f"broker: {reason}{detail}", EndKind.BROKER)
        elif reason.value == 0:  # our own DISCONNECT went out
            self._finish("disconnected", EndKind.LOCAL)
        elif reason.value == 0x8D:  # paho's "Keep alive timeout": no PINGRESP in time
            self._finish(
                f"no answer from the broker within the keepalive ({self._cfg.keepalive_s} s)",
                EndKind.KEEPALIVE,
            )
        elif self._client.refusal is not None:
            self._finish(self._client.refusal, EndKind.LINK)
        else:
            self._finish(self._lost_reason(), self._lost_kind())

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._pending.get(mid)
        if entry is None:
            return
        entry.code = int(reason.value)
        if entry.digest is None or entry.echoed:
            self._complete(mid, entry)

    def _complete(self, mid: int, entry: _Pending) -> None:
        """The publish is done: acknowledged (and, where confirmed, delivered back)."""
        del self._pending[mid]
        if entry.digest is not None:
            self._by_digest.pop(entry.digest, None)
        self.acks += 1
        if not entry.fut.done():
            entry.fut.set_result(entry.code or 0)

    def _echoed(self, payload: bytes) -> None:
        """One of our publishes came back on the echo topic: the broker routed it."""
        mid = self._by_digest.get(hashlib.sha256(payload).digest())
        if mid is None:
            return  # a redelivery, a copy from an earlier connection, or not ours
        entry = self._pending[mid]
        entry.echoed = True
        self.echoes += 1
        if entry.code is not None:
            self._complete(mid, entry)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        oversize, self._client.oversize = self._client.oversize, None
        if self.echo_topic is not None and message.topic == self.echo_topic:
            if oversize is None:
                self._echoed(bytes(message.payload))
            return  # never a command
        if oversize is not None:
            logger.warning(
                "inbound message of %d bytes on %s exceeds the limit of %d: discarded unread",
                oversize,
                printable(message.topic),
                self.max_packet,
            )
            if self._on_inbound is not None:
                self._on_inbound(Inbound(message.topic, b"", bool(message.retain), oversize))
            return
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
        entry = self._subscribing.pop(mid, None)
        if entry is None:
            return
        topics, fut = entry
        granted: list[str] = []
        refused: list[tuple[str, str]] = []
        for i, topic in enumerate(topics):
            # A SUBACK with fewer codes than topics is the broker's fault: a refusal.
            code = reasons[i] if i < len(reasons) else None
            if code is None:
                refused.append((topic, "no answer for this topic in the SUBACK"))
            elif code.is_failure:
                # MQTT 3.1.1 has one failure code (0x80) and no reason: say so, not "Unspecified".
                why = printable(code, 80) if self._v5 else "refused (MQTT 3.1.1 gives no reason)"
                refused.append((topic, why))
            else:
                granted.append(topic)
        if not fut.done():
            fut.set_result(SubscribeResult(tuple(granted), tuple(refused)))


@dataclass(slots=True)
class _Pending:
    """A publish awaiting its PUBACK (and, when ``digest`` is set, its echo)."""

    fut: asyncio.Future[int]
    sent: float  # time.monotonic()
    digest: bytes | None  # SHA-256 of the payload, for a publish confirmed by its echo
    code: int | None = None  # the PUBACK's reason code, once it came
    echoed: bool = False


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned attempt's outcome as seen (it was reported, or nobody needs it)."""
    if not fut.cancelled():
        fut.exception()
