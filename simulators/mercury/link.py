"""Where the module's bytes go: one pseudo-terminal master (the module on a serial cable) or one
TCP connection (a serial-to-network bridge)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tty
from collections.abc import Callable
from pathlib import Path


class Link:
    """Where bytes go: one pty master or one TCP connection."""

    async def read(self) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PtyLink(Link):
    """A pty whose slave is reached by a stable symlink (the driver's device path)."""

    def __init__(self, link_path: Path) -> None:
        self.master, self.slave = os.openpty()
        # Raw on both ends: no echo, no CR/LF translation, no signals on 0x03.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_name = os.ttyname(self.slave)
        self._path = link_path
        with contextlib.suppress(FileNotFoundError):
            link_path.unlink()
        link_path.symlink_to(self.slave_name)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], object]) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self.master, ready)
        try:
            await fut
        finally:
            remove(self.master)

    async def read(self) -> bytes:
        while not self._closed:
            try:
                return os.read(self.master, 4096)
            except BlockingIOError:
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
            except OSError as err:
                if err.errno == errno.EIO:  # no slave open right now: nothing to read
                    await asyncio.sleep(0.05)
                    continue
                raise
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._closed:
            try:
                sent = os.write(self.master, view)
            except BlockingIOError:
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
                continue
            view = view[sent:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class TcpLink(Link):
    """One accepted TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(4096)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()
