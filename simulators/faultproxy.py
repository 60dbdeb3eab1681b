"""A fault-injecting TCP proxy: cut the link, blackhole it, delay it.

It sits between a client and a server on loopback (``FaultProxy(upstream_port)``) and forwards
bytes both ways. Fault switches act on live connections:

- ``cut()`` closes every open connection at once (both sides see a reset/EOF);
- ``blackhole(True)`` keeps connections open but silently drops every byte (a dead NAT / Wi-Fi);
  new connections are accepted and go nowhere;
- ``delay_s`` adds latency to every forwarded chunk;
- ``refuse(True)`` closes new connections immediately (server down).

``client_tap(connection_no, chunk)`` sees every client→server chunk and ``server_tap`` every
server→client one (tests parse MQTT PUBLISH flags from it with ``MqttPublishTap``;
``MqttAckTap`` pairs PUBLISHes with the broker's PUBACKs: what the broker acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

CHUNK = 65536


class FaultProxy:
    """Loopback TCP proxy with fault switches; use as ``async with FaultProxy(port) as p``."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        client_tap: Callable[[int, bytes], None] | None = None,
        server_tap: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.client_tap = client_tap
        self.server_tap = server_tap
        self.delay_s = 0.0
        self.port = 0
        self.connections = 0
        self.cuts = 0
        self._blackhole = False
        self._refuse = False
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> int:
        """Close every live connection; return how many were cut."""
        links = list(self._links)
        self._links.clear()
        for a, b in links:
            for w in (a, b):
                with contextlib.suppress(Exception):
                    # Abort, not close: the peer must see the link die, not a polite FIN.
                    w.transport.abort()
        if links:
            self.cuts += 1
        return len(links)

    def blackhole(self, on: bool) -> None:
        self._blackhole = on

    def refuse(self, on: bool) -> None:
        self._refuse = on

    @property
    def live_connections(self) -> int:
        return len(self._links)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refuse:
            c_writer.transport.abort()
            return
        try:
            async with asyncio.timeout(5.0):
                u_reader, u_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
        except (OSError, TimeoutError):
            c_writer.transport.abort()
            return
        link = (c_writer, u_writer)
        self._links.add(link)
        conn_no = self.connections
        up = asyncio.create_task(
            self._pump(c_reader, u_writer, link, conn_no, self.client_tap), name="proxy-up"
        )
        down = asyncio.create_task(
            self._pump(u_reader, c_writer, link, conn_no, self.server_tap), name="proxy-down"
        )
        for t in (up, down):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        conn_no: int,
        tap: Callable[[int, bytes], None] | None,
    ) -> None:
        """Forward one direction, showing each chunk to ``tap`` first."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._blackhole:
                    continue
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                if link not in self._links:
                    break
                if tap is not None:
                    tap(conn_no, data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end the other so the link dies as a whole.
            self._links.discard(link)
            for w in link:
                with contextlib.suppress(Exception):
                    w.transport.abort()


def mqtt_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Split complete MQTT packets off the front of ``buf``: (first header byte, body)."""
    out: list[tuple[int, bytes]] = []
    while len(buf) >= 2:
        length = 0
        mult = 1
        pos = 1
        while True:
            if pos >= len(buf):
                return out
            byte = buf[pos]
            length += (byte & 0x7F) * mult
            mult *= 128
            pos += 1
            if not byte & 0x80 or pos > 4:
                break
        if len(buf) < pos + length:
            return out
        out.append((buf[0], bytes(buf[pos : pos + length])))
        del buf[: pos + length]
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            return value, pos


class MqttAckTap:
    """Pairs each connection's QoS 1 PUBLISHes (client→broker) with the broker's PUBACKs.

    Give ``client`` and ``server`` to a FaultProxy as ``client_tap``/``server_tap``;
    ``on_ack(topic, payload)`` is called for every publish the broker acknowledged with a
    success reason (MQTT 5 reason < 0x80; 3.1.1 has no reason: every PUBACK counts).
    """

    def __init__(self, on_ack: Callable[[str, bytes], None]) -> None:
        self._on_ack = on_ack
        self._up: dict[int, bytearray] = {}
        self._down: dict[int, bytearray] = {}
        self._v5: dict[int, bool] = {}
        self._pending: dict[tuple[int, int], tuple[str, bytes]] = {}
        self.acked = 0
        self.refused = 0
        self.connections = 0

    def client(self, conn_no: int, data: bytes) -> None:
        buf = self._up.setdefault(conn_no, bytearray())
        buf += data
        for first, body in mqtt_packets(buf):
            kind = first >> 4
            if kind == 1 and len(body) >= 7:  # CONNECT: protocol name, then the level
                name_len = int.from_bytes(body[0:2], "big")
                self._v5[conn_no] = body[2 + name_len] == 5
                self.connections += 1
            elif kind == 3 and (first >> 1) & 0x03:  # PUBLISH with QoS > 0
                topic_len = int.from_bytes(body[0:2], "big")
                topic = body[2 : 2 + topic_len].decode("utf-8", "replace")
                pos = 2 + topic_len
                packet_id = int.from_bytes(body[pos : pos + 2], "big")
                pos += 2
                if self._v5.get(conn_no, True):
                    props, pos = _varint(body, pos)
                    pos += props
                self._pending[(conn_no, packet_id)] = (topic, body[pos:])

    def server(self, conn_no: int, data: bytes) -> None:
        buf = self._down.setdefault(conn_no, bytearray())
        buf += data
        for first, body in mqtt_packets(buf):
            if first >> 4 != 4 or len(body) < 2:  # PUBACK
                continue
            packet_id = int.from_bytes(body[0:2], "big")
            sent = self._pending.pop((conn_no, packet_id), None)
            if sent is None:
                continue
            if len(body) >= 3 and body[2] >= 0x80:
                self.refused += 1
                continue
            self.acked += 1
            self._on_ack(*sent)


class MqttPublishTap:
    """Parses each client→broker MQTT byte stream; counts PUBLISH packets and DUP flags."""

    def __init__(self) -> None:
        self._bufs: dict[int, bytearray] = {}
        self.publishes = 0
        self.dup_publishes = 0

    def __call__(self, conn_no: int, data: bytes) -> None:
        buf = self._bufs.setdefault(conn_no, bytearray())
        buf += data
        while len(buf) >= 2:
            length = 0
            mult = 1
            pos = 1
            while True:
                if pos >= len(buf):
                    return
                byte = buf[pos]
                length += (byte & 0x7F) * mult
                mult *= 128
                pos += 1
                if not byte & 0x80 or pos > 4:
                    break
            if len(buf) < pos + length:
                return
            header = buf[0]
            if header >> 4 == 3:
                self.publishes += 1
                if header & 0x08:
                    self.dup_publishes += 1
            del buf[: pos + length]
