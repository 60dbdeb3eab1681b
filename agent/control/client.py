"""The caller side of the control socket, for cabinetctl: async ``ControlClient`` and a blocking
``SyncControlClient``. Errors say what to do: daemon not running vs. permission denied."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.control import protocol
from agent.control.protocol import DEFAULT_SOCKET_PATH, TECHNICIAN_GROUP, Reply

MAX_REPLY_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0


class ControlClientError(Exception):
    """Any failure talking to the daemon; ``str()`` is meant for the technician."""


class DaemonNotRunningError(ControlClientError):
    """No daemon behind the socket path."""


class ControlPermissionError(ControlClientError):
    """The socket or the daemon refused this user."""


class ControlTimeoutError(ControlClientError):
    """The daemon did not answer in time."""


class ControlProtocolError(ControlClientError):
    """The daemon sent something that is not a valid reply."""


class ControlCommandError(ControlClientError):
    """The daemon ran the command and reports a failure (``code`` says which kind)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StreamEvent:
    """One progress or data event of a streaming command."""

    data: Any


@dataclass(frozen=True)
class StreamResult:
    """The final result of a streaming command (always the last item)."""

    result: Any


class ControlClient:
    """Async client; one request at a time per connection."""

    def __init__(
        self,
        path: Path | str = DEFAULT_SOCKET_PATH,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: str = TECHNICIAN_GROUP,
    ) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.group = group
        self._ids = itertools.count(1)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection (raises DaemonNotRunningError / ControlPermissionError)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=MAX_REPLY_BYTES
                )
        except TimeoutError:
            raise ControlTimeoutError(
                f"cabinet-agent did not accept a connection on {self.path} within "
                f"{self.timeout_s:g} s"
            ) from None
        except OSError as err:
            raise connect_error(self.path, err, self.group) from None

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """Run a command and return its result (events, if any, are skipped)."""
        result: Any = None
        async for item in self.stream(cmd, args, timeout_s=timeout_s):
            if isinstance(item, StreamResult):
                result = item.result
        return result

    async def stream(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamEvent | StreamResult]:
        """Run a command; yield each StreamEvent, then one StreamResult.

        ``timeout_s`` bounds the wait for each line (default: the client's timeout).
        """
        if self._reader is None or self._writer is None:
            await self.connect()
        assert self._reader is not None
        assert self._writer is not None
        request_id = next(self._ids)
        wait = timeout_s if timeout_s is not None else self.timeout_s
        try:
            self._writer.write(_request_line(request_id, cmd, args))
            async with asyncio.timeout(wait):
                await self._writer.drain()
        except TimeoutError:
            raise ControlTimeoutError(f"cabinet-agent is not reading requests ({cmd})") from None
        except OSError as err:
            # The daemon may have refused us and hung up before our request went out: its
            # refusal line is still waiting to be read and says more than EPIPE does.
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                async with asyncio.timeout(wait):
                    said = await self._reader.readline()
                if said:
                    interpret_reply(said, request_id, self.group)
            raise ControlClientError(f"connection to cabinet-agent lost: {err}") from None
        while True:
            try:
                async with asyncio.timeout(wait):
                    line = await self._reader.readline()
            except TimeoutError:
                raise ControlTimeoutError(
                    f"cabinet-agent did not answer {cmd} within {wait:g} s"
                ) from None
            except ValueError:
                raise ControlProtocolError(
                    f"reply longer than {MAX_REPLY_BYTES} bytes from cabinet-agent"
                ) from None
            except OSError as err:
                raise ControlClientError(f"connection to cabinet-agent lost: {err}") from None
            item = interpret_reply(line, request_id, self.group)
            yield item
            if isinstance(item, StreamResult):
                return


class SyncControlClient:
    """Blocking client for the CLI (no event loop needed)."""

    def __init__(
        self,
        path: Path | str = DEFAULT_SOCKET_PATH,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: str = TECHNICIAN_GROUP,
    ) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.group = group
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._file: Any = None

    def connect(self) -> None:
        """Open the connection (raises DaemonNotRunningError / ControlPermissionError)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except TimeoutError:
            sock.close()
            raise ControlTimeoutError(
                f"cabinet-agent did not accept a connection on {self.path}"
            ) from None
        except OSError as err:
            sock.close()
            raise connect_error(self.path, err, self.group) from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SyncControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """Run a command and return its result."""
        result: Any = None
        for item in self.stream(cmd, args, timeout_s=timeout_s):
            if isinstance(item, StreamResult):
                result = item.result
        return result

    def stream(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Iterator[StreamEvent | StreamResult]:
        """Run a command; yield each StreamEvent, then one StreamResult."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        self._sock.settimeout(timeout_s if timeout_s is not None else self.timeout_s)
        try:
            self._sock.sendall(_request_line(request_id, cmd, args))
        except TimeoutError:
            raise ControlTimeoutError(f"cabinet-agent is not reading requests ({cmd})") from None
        except OSError as err:
            # See ControlClient.stream: a refusal line may be waiting behind the EPIPE.
            with contextlib.suppress(OSError):
                said = self._file.readline(MAX_REPLY_BYTES + 1)
                if said:
                    interpret_reply(said, request_id, self.group)
            raise ControlClientError(f"connection to cabinet-agent lost: {err}") from None
        while True:
            try:
                line = self._file.readline(MAX_REPLY_BYTES + 1)
            except TimeoutError:
                raise ControlTimeoutError(f"cabinet-agent did not answer {cmd} in time") from None
            except OSError as err:
                raise ControlClientError(f"connection to cabinet-agent lost: {err}") from None
            if len(line) > MAX_REPLY_BYTES:
                raise ControlProtocolError(f"reply longer than {MAX_REPLY_BYTES} bytes")
            item = interpret_reply(line, request_id, self.group)
            yield item
            if isinstance(item, StreamResult):
                return


def connect_error(path: Path, err: OSError, group: str = TECHNICIAN_GROUP) -> ControlClientError:
    """Turn a connect() failure into the message a technician can act on."""
    if isinstance(err, FileNotFoundError):
        return DaemonNotRunningError(f"cabinet-agent is not running (no socket at {path})")
    if isinstance(err, ConnectionRefusedError):
        return DaemonNotRunningError(
            f"cabinet-agent is not running (stale socket at {path}, nobody listening)"
        )
    if isinstance(err, PermissionError):
        return ControlPermissionError(
            f"permission denied on {path}: add yourself to group {group} "
            f"(sudo usermod -aG {group} $USER, then log in again)"
        )
    return ControlClientError(f"cannot connect to cabinet-agent at {path}: {err.strerror or err}")


def interpret_reply(line: bytes, request_id: int, group: str = TECHNICIAN_GROUP) -> Any:
    """Map one reply line to StreamEvent / StreamResult, or raise the matching error."""
    if not line:
        raise ControlClientError("cabinet-agent closed the connection before answering")
    try:
        reply: Reply = protocol.parse_reply(line)
    except ValueError as err:
        raise ControlProtocolError(str(err)) from None
    if not reply.ok:
        message = reply.error or "unspecified error"
        if reply.code == protocol.FORBIDDEN:
            raise ControlPermissionError(f"{message}; e.g. sudo usermod -aG {group} $USER")
        raise ControlCommandError(reply.code or protocol.INTERNAL, message)
    if reply.id != request_id:
        raise ControlProtocolError(f"reply for request {reply.id!r}, expected {request_id}")
    if not reply.final:
        return StreamEvent(reply.event)
    return StreamResult(reply.result)


def _request_line(request_id: int, cmd: str, args: Mapping[str, Any] | None) -> bytes:
    return protocol.encode({"id": request_id, "cmd": cmd, "args": dict(args or {})})
