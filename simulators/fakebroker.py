"""A minimal MQTT broker (v5 and 3.1.1) for what a real broker will not do on demand.

It speaks just enough of MQTT to hold one agent's connection: CONNECT/CONNACK, SUBSCRIBE/SUBACK,
QoS 0/1 PUBLISH both ways, PINGREQ/PINGRESP, DISCONNECT. The fault switches are attributes,
changed at any time while it runs:

- ``ack_publishes = False``: CONNACK, then silence for publishes (no PUBACK), pings and
  subscriptions — a broker that accepts connections but acknowledges nothing.
- ``takeover_after_s = S``: S seconds after each CONNACK the connection is taken over, as when
  another client connects with the same client id: MQTT v5 gets DISCONNECT 0x8E ("Session taken
  over") first, 3.1.1 just sees the socket closed.
- ``suback_code = 0x87``: every subscription refused with that reason (0x80 on 3.1.1).
- ``inject(topic, payload, count)``: PUBLISH (QoS 0) to every connected client, as fast as the
  socket takes it (a flood, or a topic no real broker would let through).

A publish it acknowledges is also routed (QoS 0) to the clients subscribed to its topic (exact
topics and a trailing ``#``), the publisher included, as MQTT 3.1.1 brokers do: the agent
confirms its events by that echo on 3.1.1. Everything a client publishes is kept in
``publishes`` (topic, payload), and each connection's
CONNACK time in ``connects`` (``time.monotonic()``). Used by the tests and the hostile repros.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass, field

DISCONNECT_SESSION_TAKEN_OVER = b"\xe0\x02\x8e\x00"  # MQTT v5, no properties


def encode_length(n: int) -> bytes:
    """MQTT variable byte integer."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, *, v5: bool) -> bytes:
    """A QoS 0 PUBLISH (no packet id), raw topic bytes (a test may send what MQTT forbids)."""
    var = struct.pack("!H", len(topic)) + topic + (b"\x00" if v5 else b"")
    return b"\x30" + encode_length(len(var) + len(payload)) + var + payload


@dataclass(eq=False)
class _Client:
    writer: asyncio.StreamWriter
    v5: bool = True
    connected_at: float = 0.0
    filters: set[str] = field(default_factory=set)  # granted subscriptions


@dataclass
class FakeBroker:
    """``async with FakeBroker() as broker:`` serves on ``127.0.0.1:broker.port``."""

    ack_publishes: bool = True
    takeover_after_s: float | None = None
    suback_code: int = 0x01
    port: int = 0
    connects: list[float] = field(default_factory=list)
    publishes: list[tuple[str, bytes]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _clients: set[_Client] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def drop_connections(self) -> None:
        """Close every client connection (no DISCONNECT)."""
        for client in list(self._clients):
            client.writer.transport.abort()
        self._clients.clear()

    async def inject(self, topic: bytes, payload: bytes, count: int = 1) -> int:
        """PUBLISH (QoS 0) ``count`` times to every connected client; how many clients got it."""
        clients = list(self._clients)
        for client in clients:
            packet = publish_packet(topic, payload, v5=client.v5)
            for i in range(count):
                client.writer.write(packet)
                if i % 256 == 255:
                    with contextlib.suppress(ConnectionError):
                        await client.writer.drain()
            with contextlib.suppress(ConnectionError):
                await client.writer.drain()
        return len(clients)

    # ------------------------------------------------------------------ one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                first, body = await _read_packet(reader)
                self._packet(client, first, body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._clients.discard(client)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _packet(self, client: _Client, first: int, body: bytes) -> None:
        kind = first >> 4
        w = client.writer
        if kind == 1:  # CONNECT: protocol level 5 or 4 (3.1.1)
            client.v5 = len(body) > 6 and body[6] == 5
            w.write(b"\x20\x03\x00\x00\x00" if client.v5 else b"\x20\x02\x00\x00")
            client.connected_at = time.monotonic()
            self.connects.append(client.connected_at)
            self._clients.add(client)
            if self.takeover_after_s is not None:
                loop = asyncio.get_running_loop()
                loop.call_later(self.takeover_after_s, self._take_over, client)
        elif kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            (topic_len,) = struct.unpack_from("!H", body)
            topic = body[2 : 2 + topic_len].decode("utf-8", "replace")
            at = 2 + topic_len
            pid = body[at : at + 2] if qos else b""
            at += len(pid)
            if client.v5:
                props, used = _decode_length(body, at)
                at += used + props
            self.publishes.append((topic, body[at:]))
            if qos and self.ack_publishes:
                w.write(b"\x40\x02" + pid)
            if self.ack_publishes:
                # Routed to the subscribers (QoS 0), the publisher included: MQTT 3.1.1 has no
                # "no local", and the agent confirms its events by their echo there.
                for other in list(self._clients):
                    if any(_matches(f, topic) for f in other.filters):
                        other.writer.write(publish_packet(topic.encode(), body[at:], v5=other.v5))
        elif kind == 8 and self.ack_publishes:  # SUBSCRIBE
            pid = body[:2]
            at = 2
            if client.v5:
                props, used = _decode_length(body, at)
                at += used + props
            codes = bytearray()
            while at < len(body):
                (n,) = struct.unpack_from("!H", body, at)
                topic_filter = body[at + 2 : at + 2 + n].decode("utf-8", "replace")
                at += 2 + n + 1
                code = self.suback_code
                if code < 0x80:
                    client.filters.add(topic_filter)
                codes.append(code if client.v5 or code < 0x80 else 0x80)
            var = pid + (b"\x00" if client.v5 else b"") + bytes(codes)
            w.write(b"\x90" + encode_length(len(var)) + var)
        elif kind == 12 and self.ack_publishes:  # PINGREQ
            w.write(b"\xd0\x00")
        elif kind == 14:  # DISCONNECT
            raise ConnectionError("client disconnected")

    def _take_over(self, client: _Client) -> None:
        if client not in self._clients:
            return
        if client.v5:
            client.writer.write(DISCONNECT_SESSION_TAKEN_OVER)
        self._clients.discard(client)
        client.writer.close()


def _matches(topic_filter: str, topic: str) -> bool:
    """Exact topics and a trailing ``#`` (all this broker needs)."""
    if topic_filter.endswith("/#"):
        return topic.startswith(topic_filter[:-1]) or topic == topic_filter[:-2]
    return topic_filter == topic


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    for _ in range(4):
        digit = (await reader.readexactly(1))[0]
        length += (digit & 0x7F) * multiplier
        multiplier *= 128
        if not digit & 0x80:
            return first, await reader.readexactly(length)
    raise ValueError("malformed remaining length")


def _decode_length(buf: bytes, at: int) -> tuple[int, int]:
    """(value, bytes used) of a variable byte integer at ``buf[at:]``."""
    value, multiplier = 0, 1
    for i in range(4):
        digit = buf[at + i]
        value += (digit & 0x7F) * multiplier
        multiplier *= 128
        if not digit & 0x80:
            return value, i + 1
    raise ValueError("malformed variable byte integer")
