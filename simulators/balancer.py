"""A TCP load balancer on loopback: what a fleet's cabinets reach a clustered broker through.

Production cabinets know one broker address (a DNS name, a cloud load balancer); behind it sit
the cluster's nodes. ``TcpBalancer(upstream_ports)`` listens on one port and hands each new
connection to the next node in turn that accepts it (a node that refuses is skipped, as a
health-checking balancer does), then copies bytes both ways until either side closes; a node
that dies takes its connections with it and the clients reconnect — to a live node. It runs its
own event loop in a thread, so the clients' loop does not pay for the copying.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Sequence

from simulators.broker import free_port

CONNECT_TIMEOUT_S = 2.0
CHUNK = 64 * 1024


class TcpBalancer:
    """``with TcpBalancer([p1, p2, p3]) as lb:`` — clients connect to ``127.0.0.1:lb.port``."""

    def __init__(self, upstream_ports: Sequence[int], port: int = 0) -> None:
        self.upstreams = list(upstream_ports)
        self.port = port or free_port()
        self.connections: Counter[int] = Counter()  # upstream port -> connections handed to it
        self.accepted = 0
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-balancer", daemon=True)
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> TcpBalancer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("balancer did not start")
        if self._error is not None:
            raise RuntimeError(f"balancer did not start: {self._error}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()
            self._stopped.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        pipes: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            pipes.add(task)
            try:
                await self._pipe(reader, writer)
            finally:
                pipes.discard(task)

        try:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port, backlog=1024)
        except OSError as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in list(pipes):
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        upstream = await self._connect_upstream()
        if upstream is None:
            writer.close()
            return
        port, (up_reader, up_writer) = upstream
        self.connections[port] += 1
        try:
            async with asyncio.TaskGroup() as tg:
                a = tg.create_task(_copy(reader, up_writer))
                b = tg.create_task(_copy(up_reader, writer))
                await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
                # One side closed: close both (a broker node that died ends its clients' links).
                for t in (a, b):
                    t.cancel()
        except* (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                w.transport.abort()

    async def _connect_upstream(
        self,
    ) -> tuple[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None:
        for _ in range(len(self.upstreams)):
            port = self.upstreams[self._next % len(self.upstreams)]
            self._next += 1
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    return port, await asyncio.open_connection("127.0.0.1", port)
        return None


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
