"""An asyncio adapter over pyserial, for devices addressed by URL.

``/dev/ttyUSB0?baud=115200`` opens a local port; any pyserial URL (``socket://host:port``,
``rfc2217://…``, ``loop://``) works too, which is how simulators stand in for hardware.

pyserial is blocking. A port with a pollable fd (a local tty, ``socket://``: the cases a
cabinet has) is read by the event loop itself: ``add_reader`` on the fd, a non-blocking read
when it is readable, so an idle port costs no thread and no wake-up. A scheme without an fd
(``rfc2217://``, ``loop://``) gets one reader thread doing short blocking reads instead. Writes
go through ``asyncio.to_thread`` either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import serial

from drivers.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

_READ_CHUNK = 4096
_POLL_S = 0.05  # the thread reader's read timeout (ports without an fd only)
_MAX_CHUNKS = 256
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


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes taken from the device in one read.

    ``taken`` is the connection clock's time just before that read. ``whole`` says the read
    was short, so it emptied what the device had: every byte received before ``taken`` is in
    this chunk or an earlier one.
    """

    data: bytes
    taken: float
    whole: bool


class SerialConnection:
    """An open serial device: ``await read()`` returns bytes, ``await write(b)`` sends."""

    def __init__(
        self,
        port: serial.SerialBase,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._port = port
        self._name = name
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[Chunk | BaseException] = asyncio.Queue(maxsize=_MAX_CHUNKS)
        self._stop = threading.Event()
        self._fd = _pollable_fd(port)
        self._thread: threading.Thread | None = None
        self._reading = False
        if self._fd is not None:
            # Reads never block now: they take what the kernel holds, when the loop says so.
            port.timeout = 0
            self._resume()
        else:
            self._thread = threading.Thread(
                target=self._pump, name=f"serial-rx:{name}", daemon=True
            )
            self._thread.start()

    @classmethod
    async def open(
        cls,
        target: SerialTarget,
        timeout_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> SerialConnection:
        """Open the device (in a thread: opening a socket:// URL blocks on connect).

        ``clock`` (monotonic, safe to call from a thread) times each chunk's read."""

        def _open() -> serial.SerialBase:
            return serial.serial_for_url(
                target.url, baudrate=target.baudrate, timeout=_POLL_S, write_timeout=timeout_s
            )

        try:
            async with asyncio.timeout(timeout_s):
                port = await asyncio.to_thread(_open)
        except TimeoutError:
            raise TransientError(f"opening {target.url} timed out after {timeout_s:g}s") from None
        except (serial.SerialException, OSError, ValueError, termios.error) as err:
            # termios.error (not an OSError): pyserial configures the port with tcsetattr after
            # opening it, unwrapped; a device that vanishes in between (a pty whose other side
            # closed, a USB reader pulled) fails there with EIO.
            raise TransientError(f"cannot open {target.url}: {err}") from None
        return cls(port, target.url, clock=clock)

    async def read(self) -> bytes:
        """The next chunk of bytes. Raises TransientError when the device goes away."""
        return (await self.read_chunk()).data

    async def read_chunk(self) -> Chunk:
        """The next chunk with the time it was read. Raises TransientError when the device
        goes away."""
        item = await self._chunks.get()
        self._resume()
        if isinstance(item, BaseException):
            raise TransientError(f"{self._name}: device lost: {item}") from None
        return item

    # -- the loop reader (ports with an fd) ----------------------------------------------------

    def _resume(self) -> None:
        if self._fd is not None and not self._reading and not self._stop.is_set():
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _pause(self) -> None:
        if self._fd is not None and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _readable(self) -> None:
        """The fd is readable: take what is there (never blocks: the port's timeout is 0)."""
        taken = self._clock()
        try:
            data = self._port.read(_READ_CHUNK)
        except (serial.SerialException, OSError, TypeError, AttributeError) as err:
            # A vanished device reads as "ready, but no data" (pyserial raises): the end.
            self._stop.set()
            self._pause()
            self._chunks.put_nowait(err)  # there is room: reading pauses one chunk early
            return
        if data:
            self._chunks.put_nowait(Chunk(bytes(data), taken, len(data) < _READ_CHUNK))
            if self._chunks.qsize() >= _MAX_CHUNKS - 1:
                self._pause()  # the consumer is behind: the kernel buffers (backpressure)

    # -- the thread reader (ports without an fd) -----------------------------------------------

    def _hand_over(self, item: Chunk | BaseException) -> bool:
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
            taken = self._clock()
            try:
                # Returns at _READ_CHUNK bytes or at the timeout: short, it took all there was.
                data = self._port.read(_READ_CHUNK)
            except (serial.SerialException, OSError, TypeError, AttributeError) as err:
                # pyserial raises TypeError/AttributeError when the port vanishes mid-read.
                if not self._stop.is_set():
                    self._hand_over(err)
                return
            if data and not self._hand_over(Chunk(bytes(data), taken, len(data) < _READ_CHUNK)):
                return

    # -- both ----------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._port.write, data)
        except (serial.SerialException, OSError) as err:
            raise TransientError(f"{self._name}: write failed: {err}") from None

    async def close(self) -> None:
        """Stop reading and close the port (bounded); safe to call twice.

        ``close()`` blocks (pyserial's socket:// handler sleeps 0.3 s in it): never on the loop.
        It runs in its own daemon thread, awaited at most ``_CLOSE_S``, so a close that hangs
        can neither stall the loop nor keep the process alive at exit.
        """
        self._stop.set()
        self._pause()
        if self._thread is not None:
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


def _pollable_fd(port: serial.SerialBase) -> int | None:
    """The fd the loop can watch for ``port`` (a local tty, a ``socket://`` URL), else None."""
    try:
        fd = port.fileno()
    except (AttributeError, NotImplementedError, OSError, serial.SerialException):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None
