"""The daemon side of the control socket: JSON lines over a group-restricted Unix socket.

Two locks on the door: the socket file is mode 0660 and owned by the technicians' group, and every
connection's peer credentials (SO_PEERCRED, SO_PEERGROUPS) are checked again, so loosened file
permissions alone never open the API. The caller's identity reaches every handler for the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.control import protocol
from agent.control.config import ControlConfig
from agent.control.protocol import CommandError, Request, RequestError, RequestId
from drivers.errors import PermanentError

logger = logging.getLogger(__name__)

SOCKET_MODE: Final = 0o660
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_MAX_PEER_GROUPS: Final = 65536
_SHUTDOWN_WRITE_S: Final = 1.0


class ControlSocketError(PermanentError):
    """The control socket cannot be set up (path, permissions, another daemon)."""


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def describe(self) -> str:
        """``uid=1000(alice) gid=1000 pid=4242`` for logs and the audit trail."""
        try:
            name = f"({pwd.getpwuid(self.uid).pw_name})"
        except KeyError:
            name = ""
        return f"uid={self.uid}{name} gid={self.gid} pid={self.pid}"


@dataclass(frozen=True)
class AccessPolicy:
    """Which peers may use the API: listed uids, or members of listed gids."""

    uids: frozenset[int]
    gids: frozenset[int]
    hint: str = ""

    def allows(self, peer: PeerCred) -> bool:
        """True if the peer's uid, primary gid or any supplementary group is allowed."""
        if peer.uid in self.uids or peer.gid in self.gids:
            return True
        return any(g in self.gids for g in peer.groups)

    @classmethod
    def from_config(cls, cfg: ControlConfig) -> AccessPolicy:
        """Root (if allowed), the daemon's own uid, the socket group and the extra names."""
        uids = {os.getuid()}
        if cfg.allow_root:
            uids.add(0)
        for user in cfg.allowed_users:
            try:
                uids.add(pwd.getpwnam(user).pw_uid)
            except KeyError:
                logger.warning("control: allowed user %r does not exist; ignored", user)
        gids: set[int] = set()
        group_names = [*([cfg.group] if cfg.group else []), *cfg.allowed_groups]
        for group in group_names:
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                logger.warning("control: group %r does not exist; its name grants nothing", group)
        hint = f"add the user to group {cfg.group}" if cfg.group else "ask an administrator"
        return cls(frozenset(uids), frozenset(gids), hint)


class RequestContext:
    """What a handler gets: the arguments, the caller, and ``emit`` for streamed events."""

    def __init__(
        self,
        request: Request,
        peer: PeerCred,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.request_id: RequestId = request.id
        self.cmd = request.cmd
        self.args: dict[str, Any] = request.args
        self.peer = peer
        self._send = send
        self.events_sent = 0

    async def emit(self, event: Any) -> None:
        """Stream one event line to the caller (waits while the caller is slow to read)."""
        await self._send(protocol.event_reply(self.request_id, event))
        self.events_sent += 1


Handler = Callable[[RequestContext], Awaitable[Any]]
AuditHook = Callable[[PeerCred, str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class _Command:
    handler: Handler
    timeout_s: float | None


class _UseDefault:
    pass


_DEFAULT = _UseDefault()


class ControlServer:
    """Serves registered commands on the control socket; start() / stop(), or ``async with``."""

    def __init__(
        self,
        cfg: ControlConfig,
        *,
        policy: AccessPolicy | None = None,
        audit: AuditHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.path = cfg.socket_path
        self._policy = policy
        self._audit = audit
        self._commands: dict[str, _Command] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._bound_inode: tuple[int, int] | None = None
        self._closing = False
        self.refused = 0

    # -- public API ----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        timeout_s: float | _UseDefault | None = _DEFAULT,
    ) -> None:
        """Serve ``name`` with ``handler``; ``timeout_s=None`` for streams that end when the
        caller disconnects or the daemon stops (e.g. ``events.tail``)."""
        if name in self._commands:
            raise ValueError(f"control command {name!r} already registered")
        timeout = self.cfg.request_timeout_s if isinstance(timeout_s, _UseDefault) else timeout_s
        self._commands[name] = _Command(handler, timeout)

    @property
    def commands(self) -> list[str]:
        """Registered command names, sorted."""
        return sorted(self._commands)

    @property
    def connection_count(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind the socket (mode 0660, technicians' group) and start accepting."""
        if self._policy is None:
            self._policy = AccessPolicy.from_config(self.cfg)
        sock = await self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, limit=self.cfg.max_line_bytes
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        logger.info("control socket listening on %s", self.path)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, end every request with ``shutting_down``, close, remove the socket."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._unlink()
        conns = list(self._connections)
        for task in conns:
            task.cancel()
        if conns:
            _, pending = await asyncio.wait(conns, timeout=grace_s)
            if pending:
                logger.warning("control: %d connection(s) did not close in time", len(pending))
                await asyncio.wait(pending, timeout=grace_s)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await server.wait_closed()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self, stop_event: asyncio.Event) -> None:
        """Run until ``stop_event`` is set (for use as one task of the daemon's TaskGroup)."""
        await self.start()
        try:
            await stop_event.wait()
        finally:
            await self.stop()

    # -- socket setup --------------------------------------------------------------------------

    async def _bind(self) -> socket.socket:
        path = self.path
        if not path.parent.is_dir():
            raise ControlSocketError(
                f"control socket directory {path.parent} does not exist "
                "(systemd creates it with RuntimeDirectory=; create it or change control.socket_path)"
            )
        await self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Linux creates the socket file with the socket inode's mode: 0600 until the group
            # is set, so no one else can connect in between (and no process-wide umask dance).
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(str(path))
            st = os.stat(path)
            self._bound_inode = (st.st_dev, st.st_ino)
            gid = self._socket_gid()
            if gid is not None and st.st_gid != gid:
                try:
                    os.chown(path, -1, gid)
                except PermissionError:
                    # The API still works for root and the daemon's user: degrade, don't die.
                    logger.error(
                        "control: cannot give %s to group %s (is the daemon a member? "
                        "SupplementaryGroups= in the unit): technicians cannot connect",
                        path,
                        self.cfg.group,
                    )
            os.chmod(path, SOCKET_MODE)
            sock.listen(min(self.cfg.max_connections * 2, socket.SOMAXCONN))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._unlink()
            raise ControlSocketError(f"cannot set up control socket {path}: {err}") from err
        return sock

    def _socket_gid(self) -> int | None:
        if not self.cfg.group:
            return None
        try:
            return grp.getgrnam(self.cfg.group).gr_gid
        except KeyError:
            logger.warning(
                "control: group %r does not exist: only root and the daemon's user can connect "
                "(create it: systemd-sysusers, or groupadd --system %s)",
                self.cfg.group,
                self.cfg.group,
            )
            return None

    async def _clear_stale(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            async with asyncio.timeout(2.0):
                await asyncio.get_running_loop().sock_connect(probe, str(path))
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            logger.info("control: removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as err:
            raise ControlSocketError(f"cannot probe existing socket {path}: {err}") from err
        finally:
            probe.close()
        raise ControlSocketError(f"another cabinet-agent is already serving {path}")

    def _unlink(self) -> None:
        if self._bound_inode is None:
            return
        # Only remove the file we created: a newer daemon may already own the path.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound_inode:
                os.unlink(self.path)
        self._bound_inode = None

    # -- connections ---------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.close()
            return
        task.set_name("control:connection")
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            if not self._closing or task.cancelling() > 1:
                raise
            # stop() ended it (the client was told): it ends here. Ended cancelled, Python
            # 3.11's stream callback would log it as an ERROR with a traceback at every stop
            # with a cabinetctl connected (`events tail --follow`).
            task.uncancel()
        finally:
            self._connections.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(_SHUTDOWN_WRITE_S):
                    await writer.wait_closed()


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _ConnectionGone(Exception):
    """The peer stopped reading or hung up; the connection is being torn down."""


class _Connection:
    """One client: reads requests, runs each as a named task, writes replies one line at a time."""

    def __init__(
        self, server: ControlServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.cfg = server.cfg
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.inflight: dict[RequestId, asyncio.Task[None]] = {}
        self.timeouts: dict[RequestId, float | None] = {}
        self.bucket = _TokenBucket(self.cfg.rate_per_s, self.cfg.rate_burst)
        self.peer = PeerCred(pid=0, uid=-1, gid=-1)
        self.broken = False

    async def run(self) -> None:
        try:
            self.peer = _peer_credentials(self.writer.get_extra_info("socket"))
        except OSError as err:
            logger.warning("control: cannot read peer credentials, closing: %s", err)
            return
        policy = self.server._policy
        assert policy is not None
        if not policy.allows(self.peer):
            self.server.refused += 1
            logger.warning(
                "control: refused %s: not an allowed user or group", self.peer.describe()
            )
            await self._send_quietly(
                protocol.error_reply(
                    None,
                    protocol.FORBIDDEN,
                    f"permission denied: uid {self.peer.uid} may not use the cabinet-agent "
                    f"control socket ({policy.hint})",
                )
            )
            return
        if self.server.connection_count > self.cfg.max_connections:
            logger.warning("control: too many connections, refusing %s", self.peer.describe())
            await self._send_quietly(
                protocol.error_reply(None, protocol.BUSY, "too many control connections; retry")
            )
            return
        logger.debug("control: connection from %s", self.peer.describe())
        try:
            if await self._read_loop():
                await self._finish_bounded()
        finally:
            await self._cancel_inflight()

    async def _read_loop(self) -> bool:
        """Serve request lines; True on a clean EOF from the client."""
        while not self.broken:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
                async with asyncio.timeout(self.cfg.idle_timeout_s):
                    line = await self.reader.readline()
            except TimeoutError:
                if self.inflight:
                    continue  # a stream is running; silence from the client is expected
                logger.info("control: closing idle connection from %s", self.peer.describe())
                return False
            except ValueError:
                # StreamReader's limit: the line can't be trusted to resynchronize; hang up.
                logger.warning(
                    "control: request line over %d bytes from %s; closing",
                    self.cfg.max_line_bytes,
                    self.peer.describe(),
                )
                await self._send_quietly(
                    protocol.error_reply(
                        None,
                        protocol.TOO_LARGE,
                        f"request line longer than {self.cfg.max_line_bytes} bytes; closing",
                    )
                )
                return False
            except (ConnectionError, OSError):
                return False
            if not line:
                return True
            if not line.strip():
                continue
            await self._dispatch(line)
        return False

    async def _finish_bounded(self) -> None:
        # EOF may be a half-close (`socat`, `nc -N`: send, shut down writing, read the answer):
        # requests with a timeout may still finish; open-ended streams are cancelled after this.
        bounded = {rid: t for rid, t in self.timeouts.items() if t is not None}
        tasks = [self.inflight[rid] for rid in bounded if rid in self.inflight]
        if tasks:
            limit = max(bounded.values()) + self.cfg.write_timeout_s
            await asyncio.wait(tasks, timeout=limit)

    async def _dispatch(self, line: bytes) -> None:
        if not self.bucket.take():
            request_id = _peek_id(line)
            await self._send_quietly(
                protocol.error_reply(
                    request_id, protocol.RATE_LIMITED, "too many requests; slow down"
                )
            )
            return
        try:
            request = protocol.parse_request(line)
        except RequestError as err:
            logger.info("control: bad request from %s: %s", self.peer.describe(), err.message)
            await self._send_quietly(protocol.error_reply(err.request_id, err.code, err.message))
            return
        command = self.server._commands.get(request.cmd)
        if command is None:
            known = ", ".join(self.server.commands) or "none"
            await self._send_quietly(
                protocol.error_reply(
                    request.id,
                    protocol.UNKNOWN_COMMAND,
                    f"unknown command {request.cmd!r} (known: {known})",
                )
            )
            return
        if request.id in self.inflight:
            await self._send_quietly(
                protocol.error_reply(
                    request.id, protocol.BAD_REQUEST, f"request id {request.id!r} is still running"
                )
            )
            return
        if len(self.inflight) >= self.cfg.max_inflight_per_connection:
            await self._send_quietly(
                protocol.error_reply(
                    request.id, protocol.BUSY, "too many requests in flight on this connection"
                )
            )
            return
        if self.server._audit is not None:
            try:
                self.server._audit(self.peer, request.cmd, request.args)
            except Exception:  # auditing must not take the API down with it
                logger.exception("control: audit hook failed for %s", request.cmd)
        logger.debug("control: %s runs %s (id %r)", self.peer.describe(), request.cmd, request.id)
        task = asyncio.create_task(
            self._run_request(request, command), name=f"control:{request.cmd}#{request.id}"
        )
        self.inflight[request.id] = task
        self.timeouts[request.id] = command.timeout_s
        task.add_done_callback(functools.partial(self._request_done, request.id))

    def _request_done(self, request_id: RequestId, task: asyncio.Task[None]) -> None:
        if self.inflight.get(request_id) is task:
            del self.inflight[request_id]
            self.timeouts.pop(request_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("control: request task failed", exc_info=task.exception())

    async def _run_request(self, request: Request, command: _Command) -> None:
        ctx = RequestContext(request, self.peer, self._send)
        try:
            try:
                async with asyncio.timeout(command.timeout_s) as scope:
                    result = await command.handler(ctx)
            except TimeoutError:
                if not scope.expired():
                    raise
                await self._send(
                    protocol.error_reply(
                        request.id,
                        protocol.TIMEOUT,
                        f"{request.cmd} did not finish within {command.timeout_s:g} s",
                    )
                )
                return
            try:
                line = protocol.encode(protocol.ok_reply(request.id, result))
            except (TypeError, ValueError) as err:
                logger.error("control: %s returned an unserializable result: %s", request.cmd, err)
                await self._send(
                    protocol.error_reply(request.id, protocol.INTERNAL, "internal error")
                )
                return
            await self._send_line(line)
        except CommandError as err:
            await self._send(protocol.error_reply(request.id, err.code, err.message))
        except _ConnectionGone:
            return
        except asyncio.CancelledError:
            # Daemon stopping or client gone: tell a still-listening client, then unwind.
            await self._send_quietly(
                protocol.error_reply(
                    request.id,
                    protocol.SHUTTING_DOWN,
                    f"{request.cmd} interrupted: the daemon is stopping or the connection closing",
                ),
                timeout_s=_SHUTDOWN_WRITE_S,
            )
            raise
        except Exception:
            logger.exception("control: %s failed", request.cmd)
            with contextlib.suppress(_ConnectionGone):
                await self._send(
                    protocol.error_reply(
                        request.id, protocol.INTERNAL, "internal error (see the daemon's log)"
                    )
                )

    async def _cancel_inflight(self) -> None:
        tasks = list(self.inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.cfg.write_timeout_s + _SHUTDOWN_WRITE_S)

    async def _send(self, message: dict[str, Any]) -> None:
        await self._send_line(protocol.encode(message))

    async def _send_line(self, line: bytes, timeout_s: float | None = None) -> None:
        if self.broken:
            raise _ConnectionGone
        async with self.write_lock:
            try:
                self.writer.write(line)
                async with asyncio.timeout(timeout_s or self.cfg.write_timeout_s):
                    await self.writer.drain()
            except TimeoutError as err:
                # A client that stops reading must not pin memory: drop it.
                self.broken = True
                self.writer.transport.abort()
                logger.warning(
                    "control: dropping %s: not reading replies for %.1f s",
                    self.peer.describe(),
                    timeout_s or self.cfg.write_timeout_s,
                )
                raise _ConnectionGone from err
            except (ConnectionError, OSError) as err:
                self.broken = True
                self.writer.transport.abort()
                logger.info("control: %s hung up: %s", self.peer.describe(), err)
                raise _ConnectionGone from err

    async def _send_quietly(self, message: dict[str, Any], timeout_s: float | None = None) -> None:
        with contextlib.suppress(_ConnectionGone):
            await self._send_line(protocol.encode(message), timeout_s)


def _peek_id(line: bytes) -> RequestId | None:
    try:
        return protocol.parse_request(line).id
    except RequestError as err:
        return err.request_id


def _peer_credentials(sock: Any) -> PeerCred:
    """SO_PEERCRED (pid, uid, gid) plus SO_PEERGROUPS; groups fall back to the user database."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock, uid, gid))


def _peer_groups(sock: Any, uid: int, gid: int) -> tuple[int, ...]:
    size = 64 * 4
    while size <= _MAX_PEER_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as err:
            if err.errno == errno.ERANGE:
                size *= 4
                continue
            break
        count = len(raw) // 4
        return tuple(struct.unpack(f"{count}I", raw[: count * 4]))
    # Old kernels: the database view, which misses groups granted after login but is safe.
    try:
        name = pwd.getpwuid(uid).pw_name
        return tuple(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        return ()
