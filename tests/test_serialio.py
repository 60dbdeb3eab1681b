"""The serial adapter: a port with an fd is read by the event loop (no reader thread, nothing
waking while the line is idle); a port without one still works through a reader thread."""

from __future__ import annotations

import asyncio
import os
import pty
import threading
import tty

import pytest

from drivers.errors import TransientError
from drivers.serialio import SerialConnection, SerialTarget

TIMEOUT_S = 10.0


def _rx_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("serial-rx")]


def _watched(fd: int) -> bool:
    """The running loop's selector watches ``fd`` for reading."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    try:
        key = selector.get_key(fd)
    except KeyError:
        return False
    return key.data[0] is not None  # (reader handle, writer handle)


async def _read_until_error(conn: SerialConnection) -> None:
    while True:
        await conn.read()


async def test_a_tty_is_read_by_the_loop_without_a_thread() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    conn = await SerialConnection.open(SerialTarget(os.ttyname(slave), 9600))
    try:
        assert _rx_threads() == []
        fd = conn._port.fileno()
        assert _watched(fd)
        assert conn._port.timeout == 0  # a read never waits: the loop said it is readable
        os.write(master, b"\x02hello\x03")
        got = b""
        async with asyncio.timeout(TIMEOUT_S):
            while len(got) < 7:
                got += await conn.read()
        assert got == b"\x02hello\x03"
        # The device goes away: the reader hears it and says so.
        os.close(master)
        os.close(slave)
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(TransientError, match="device lost"):
                await _read_until_error(conn)
        assert not _watched(fd)
    finally:
        await conn.close()


async def test_a_socket_url_is_read_by_the_loop_and_ends_on_eof() -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(w)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await SerialConnection.open(SerialTarget(f"socket://127.0.0.1:{port}"))
    try:
        assert _rx_threads() == []
        async with asyncio.timeout(TIMEOUT_S):
            peer = await accepted.get()
        peer.write(b"abc")
        await peer.drain()
        async with asyncio.timeout(TIMEOUT_S):
            assert await conn.read() == b"abc"
        peer.close()
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(TransientError, match="device lost"):
                await conn.read()
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()


async def test_a_slow_consumer_pauses_reading_and_loses_nothing() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    conn = await SerialConnection.open(SerialTarget(os.ttyname(slave), 9600))
    try:
        fd = conn._port.fileno()
        sent = bytearray()
        # More chunks than the queue holds, each taken by the loop before the next is written
        # (so each is one chunk); nobody consumes meanwhile.
        for i in range(300):
            chunk = bytes([i % 251]) * 3
            sent += chunk
            os.write(master, chunk)
            if conn._reading:
                async with asyncio.timeout(TIMEOUT_S):
                    while conn._reading and conn._chunks.qsize() <= i:
                        await asyncio.sleep(0)
        assert not _watched(fd), "the loop kept reading into a full queue"
        got = bytearray()
        async with asyncio.timeout(TIMEOUT_S):
            while len(got) < len(sent):
                got += await conn.read()
        assert bytes(got) == bytes(sent)
        assert _watched(fd)  # reading resumed once the consumer caught up
    finally:
        await conn.close()
        os.close(master)
        os.close(slave)


async def test_a_port_without_an_fd_is_read_by_a_thread() -> None:
    conn = await SerialConnection.open(SerialTarget("loop://"))
    try:
        assert len(_rx_threads()) == 1
        await conn.write(b"ping")
        got = b""
        async with asyncio.timeout(TIMEOUT_S):
            while len(got) < 4:
                got += await conn.read()
        assert got == b"ping"
    finally:
        await conn.close()
    assert _rx_threads() == []
