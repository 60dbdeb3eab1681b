"""An asyncio adapter over pyserial, for devices addressed by URL.

``/dev/ttyUSB0?baud=115200`` opens a local port; any pyserial URL (``socket://host:port``,
``rfc2217://…``, ``loop://``) works too, which is how simulators stand in for hardware.

pyserial is blocking. One reader thread per open port does short blocking reads and hands
bytes to the loop with ``call_soon_threadsafe``; writes go through ``asyncio.to_thread``.
This works for every URL scheme alike (not all of them expose a pollable fd).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import serial

from drivers.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

_READ_CHUNK = 4096
_POLL_S = 0.05
_CLOSE_S = 2.0


@dataclass(frozen=True, slots=True)
class SerialTarget:
    """A parsed device URL: the pyserial URL plus the line settings."""

    url: str
    baudrate: int = 115200

    @classmethod
    def parse(cls, spec: str, default_baud: int = 115200) -> SerialTarget:
        """Accept ``/dev/ttyX?baud=N`` (our sugar) or any pyserial URL."""
        if not spec:
            raise PermanentError("empty serial device URL")
        if spec.startswith("/"):
            path, _, query = spec.partition("?")
            baud = default_baud
            if query:
                params = parse_qs(query)
                unknown = set(params) - {"baud"}
                if unknown:
                    raise PermanentError(f"unknown serial URL option(s): {sorted(unknown)}")
                try:
                    baud = int(params["baud"][0])
                except (KeyError, ValueError, IndexError):
                    raise PermanentError("baud must be an integer, e.g. ?baud=115200") from None
            return cls(path, baud)
        if not urlsplit(spec).scheme:
            raise PermanentError(f"not a device path or URL: {spec!r}")
        return cls(spec, default_baud)


class SerialConnection:
    """An open serial device: ``await read()`` returns bytes, ``await write(b)`` sends."""

    def __init__(self, port: serial.SerialBase, name: str) -> None:
        self._port = port
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=256)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"serial-rx:{name}", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, target: SerialTarget, timeout_s: float = 5.0) -> SerialConnection:
        """Open the device (in a thread: opening a socket:// URL blocks on connect)."""

        def _open() -> serial.SerialBase:
            return serial.serial_for_url(
                target.url, baudrate=target.baudrate, timeout=_POLL_S, write_timeout=timeout_s
            )

        try:
            async with asyncio.timeout(timeout_s):
                port = await asyncio.to_thread(_open)
        except TimeoutError:
            raise TransientError(f"opening {target.url} timed out after {timeout_s:g}s") from None
        except (serial.SerialException, OSError, ValueError) as err:
            raise TransientError(f"cannot open {target.url}: {err}") from None
        return cls(port, target.url)

    def _hand_over(self, item: bytes | BaseException) -> bool:
        """Queue ``item`` on the loop, blocking this thread while the queue is full."""
        while not self._stop.is_set():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._chunks.put(item), self._loop)
            except RuntimeError:  # loop closed under us
                return False
            try:
                fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                continue
            except (concurrent.futures.CancelledError, RuntimeError):
                return False
            return True
        return False

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._port.read(_READ_CHUNK)
            except (serial.SerialException, OSError, TypeError, AttributeError) as err:
                # pyserial raises TypeError/AttributeError when the port vanishes mid-read.
                if not self._stop.is_set():
                    self._hand_over(err)
                return
            if data and not self._hand_over(bytes(data)):
                return

    async def read(self) -> bytes:
        """The next chunk of bytes. Raises TransientError when the device goes away."""
        item = await self._chunks.get()
        if isinstance(item, BaseException):
            raise TransientError(f"{self._name}: device lost: {item}") from None
        return item

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._port.write, data)
        except (serial.SerialException, OSError) as err:
            raise TransientError(f"{self._name}: write failed: {err}") from None

    async def close(self) -> None:
        """Stop the reader thread and close the port (bounded); safe to call twice.

        ``close()`` blocks (pyserial's socket:// handler sleeps 0.3 s in it): never on the loop.
        It runs in its own daemon thread, awaited at most ``_CLOSE_S``, so a close that hangs
        can neither stall the loop nor keep the process alive at exit.
        """
        self._stop.set()
        await asyncio.to_thread(self._thread.join, _CLOSE_S)
        closer = threading.Thread(
            target=self._close_port, name=f"serial-close:{self._name}", daemon=True
        )
        closer.start()
        await asyncio.to_thread(closer.join, _CLOSE_S)
        if closer.is_alive():
            logger.warning("%s: port close did not finish within %.0f s", self._name, _CLOSE_S)

    def _close_port(self) -> None:
        with contextlib.suppress(serial.SerialException, OSError):
            self._port.close()
