"""Badge reader simulator: EM4100 (RDM6300-style) or ASCII-line streams on a pty or TCP.

The pty transport exposes a stable symlink to the current pseudo-terminal slave (as udev's
``/dev/serial/by-id`` links do), so an unplugged and re-plugged device keeps its URL.
The wire encoding here is written independently of ``drivers/`` on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import shutil
import tempfile
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Transport = Literal["pty", "tcp"]
WireProtocol = Literal["em4100", "ascii-lines"]

_SEND_TIMEOUT_S = 2.0


def em4100_frame(card_hex: str, *, corrupt_checksum: bool = False) -> bytes:
    """STX, 10 upper-case hex digits, XOR checksum as 2 hex digits, ETX."""
    digits = card_hex.strip().upper()
    if len(digits) != 10 or any(c not in "0123456789ABCDEF" for c in digits):
        raise ValueError("an EM4100 card number is 10 hex digits")
    checksum = 0
    for i in range(0, 10, 2):
        checksum ^= int(digits[i : i + 2], 16)
    if corrupt_checksum:
        checksum ^= 0x5A
    return b"\x02" + digits.encode() + b"%02X" % checksum + b"\x03"


def ascii_line(card: str, line_end: bytes = b"\r\n") -> bytes:
    """The card number as one text line."""
    text = card.strip()
    if not text or any(c in "\r\n" for c in text) or not text.isascii():
        raise ValueError("a card line is non-empty single-line ASCII")
    return text.encode() + line_end


@dataclass
class BadgeFaults:
    """Fault switches, read on every frame sent."""

    split: bool = False  # send one byte at a time
    byte_delay_s: float = 0.002  # pause between single bytes when split
    bad_checksum: bool = False  # EM4100: every frame carries a wrong checksum
    garbage_before: int = 0  # random bytes sent before every frame


class BadgeSimulator:
    """A badge reader reachable at ``.url`` (a pty path or ``socket://127.0.0.1:port``)."""

    def __init__(
        self,
        *,
        transport: Transport = "pty",
        protocol: WireProtocol = "em4100",
        host: str = "127.0.0.1",
        port: int = 0,
        line_end: bytes = b"\r\n",
        seed: int | None = None,
    ) -> None:
        if transport not in ("pty", "tcp"):
            raise ValueError(f"unknown transport {transport!r}")
        if protocol not in ("em4100", "ascii-lines"):
            raise ValueError(f"unknown protocol {protocol!r}")
        self.transport: Transport = transport
        self.protocol: WireProtocol = protocol
        self.faults = BadgeFaults()
        self.frames_sent = 0
        self.bytes_dropped = 0  # written while nobody could receive them
        self._host = host
        self._port = port
        self._line_end = line_end
        self._rng = random.Random(seed)
        self._plugged = False
        self._send_lock = asyncio.Lock()
        # pty transport
        self._dir: Path | None = None
        self._master: int | None = None
        self._slave: int | None = None
        # tcp transport
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Event] = {}
        self._client_joined = asyncio.Event()

    @property
    def url(self) -> str:
        if self.transport == "pty":
            if self._dir is None:
                raise RuntimeError("simulator not started")
            return str(self._dir / "badge0")
        if self._port == 0:
            raise RuntimeError("simulator not started")
        return f"socket://{self._host}:{self._port}"

    @property
    def plugged(self) -> bool:
        return self._plugged

    @property
    def clients(self) -> int:
        """Connected TCP clients (always 0 for the pty transport)."""
        return len(self._clients)

    async def start(self) -> None:
        if self.transport == "pty":
            self._dir = Path(tempfile.mkdtemp(prefix="badge-sim-"))
        await self.replug()

    async def stop(self) -> None:
        await self.unplug()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> BadgeSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def unplug(self) -> None:
        """The device disappears: connections drop and new ones are refused."""
        self._plugged = False
        if self.transport == "pty":
            if self._dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / "badge0").unlink()
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = None
            return
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer, done in list(self._clients.items()):
            writer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SEND_TIMEOUT_S):
                    await done.wait()
        self._clients.clear()
        self._client_joined.clear()

    async def replug(self) -> None:
        """The device comes back at the same URL."""
        if self._plugged:
            return
        if self.transport == "pty":
            assert self._dir is not None
            master, slave = os.openpty()
            # Raw before anyone opens it: no echo, no line buffering, like a USB-serial chip.
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._master, self._slave = master, slave
            os.symlink(os.ttyname(slave), self._dir / "badge0")
        else:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
            self._port = self._server.sockets[0].getsockname()[1]
        self._plugged = True

    async def unplug_for(self, seconds: float) -> None:
        """Unplug, stay away ``seconds``, plug back in."""
        await self.unplug()
        await asyncio.sleep(seconds)
        await self.replug()

    async def wait_for_client(self, timeout_s: float = 10.0) -> None:
        """TCP: return once a client is connected (frames sent before that are lost)."""
        if self.transport == "pty":
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
        async with asyncio.timeout(timeout_s):
            await self._client_joined.wait()

    async def present(self, card: str, hold_s: float = 0.0, repeat_every_s: float = 0.1) -> int:
        """Show a card; while held, repeat its frame like an RDM6300 does. Returns frames sent."""
        if repeat_every_s <= 0:
            raise ValueError("repeat_every_s must be positive")
        loop = asyncio.get_running_loop()
        until = loop.time() + hold_s
        sent = 0
        while True:
            await self.send_frame(card)
            sent += 1
            if loop.time() + repeat_every_s > until:
                return sent
            await asyncio.sleep(repeat_every_s)

    async def send_frame(self, card: str, *, corrupt_checksum: bool | None = None) -> None:
        """One frame for ``card``, with the active fault switches applied."""
        bad = self.faults.bad_checksum if corrupt_checksum is None else corrupt_checksum
        if self.protocol == "em4100":
            frame = em4100_frame(card, corrupt_checksum=bad)
        else:
            frame = ascii_line(card, self._line_end)
        if self.faults.garbage_before:
            frame = self.garbage(self.faults.garbage_before) + frame
        await self.send_raw(frame)
        self.frames_sent += 1

    async def send_garbage(self, n: int = 16, *, end_line: bool = False) -> None:
        """``n`` random bytes (plus a line end for ASCII readers, if asked)."""
        await self.send_raw(self.garbage(n) + (self._line_end if end_line else b""))

    def garbage(self, n: int) -> bytes:
        return bytes(self._rng.randrange(256) for _ in range(n))

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are, split one at a time if the fault switch says so."""
        async with self._send_lock:
            if not self.faults.split:
                await self._write(data)
                return
            for i in range(len(data)):
                await self._write(data[i : i + 1])
                await asyncio.sleep(self.faults.byte_delay_s)

    async def _write(self, data: bytes) -> None:
        if not self._plugged:
            self.bytes_dropped += len(data)
            return
        if self.transport == "pty":
            self._write_pty(data)
            return
        for writer in list(self._clients):
            try:
                writer.write(data)
                async with asyncio.timeout(_SEND_TIMEOUT_S):
                    await writer.drain()
            except (OSError, TimeoutError):
                self.bytes_dropped += len(data)
                writer.close()

    def _write_pty(self, data: bytes) -> None:
        assert self._master is not None
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._master, view)
            except OSError as err:
                # A full line-discipline buffer means nobody reads: a real UART drops too.
                if err.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                self.bytes_dropped += len(view)
                return
            view = view[n:]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done = asyncio.Event()
        self._clients[writer] = done
        self._client_joined.set()
        try:
            # Badge readers ignore what they are sent; reading just notices the hang-up.
            while await reader.read(1024):
                pass
        except OSError:
            pass
        finally:
            self._clients.pop(writer, None)
            if not self._clients:
                self._client_joined.clear()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            done.set()
