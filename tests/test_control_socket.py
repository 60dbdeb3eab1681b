"""The control socket over real Unix sockets: protocol, peer credentials, authorization, limits."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError

from agent.config import parse_config
from agent.control.client import (
    ControlClient,
    ControlCommandError,
    ControlPermissionError,
    DaemonNotRunningError,
    StreamEvent,
    StreamResult,
    SyncControlClient,
)
from agent.control.config import ControlConfig
from agent.control.protocol import CommandError
from agent.control.server import (
    AccessPolicy,
    ControlServer,
    ControlSocketError,
    PeerCred,
    RequestContext,
)
from tests.conftest import ROOT

WAIT_S = 10.0
NOBODY = 65534


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short (sun_path is 108 bytes) and traversable by other uids (pytest's tmp_path is 0700).
    d = Path(tempfile.mkdtemp(prefix="cab-ctl-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cfg(sockdir: Path, **kw: Any) -> ControlConfig:
    kw.setdefault("group", None)
    return ControlConfig(socket_path=sockdir / "control.sock", **kw)


async def _status(ctx: RequestContext) -> dict[str, Any]:
    return {"state": "running", "echo": ctx.args.get("echo")}


async def _whoami(ctx: RequestContext) -> dict[str, int]:
    return {"pid": ctx.peer.pid, "uid": ctx.peer.uid, "gid": ctx.peer.gid}


async def _count(ctx: RequestContext) -> dict[str, int]:
    n = int(ctx.args["n"])
    for i in range(n):
        await ctx.emit({"i": i})
    return {"done": n}


@pytest_asyncio.fixture
async def server(sockdir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(_cfg(sockdir))
    srv.register("status", _status)
    srv.register("whoami", _whoami)
    srv.register("count", _count, timeout_s=None)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class RawConn:
    """A bare client socket to send arbitrary bytes and read raw reply lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> RawConn:
        r, w = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), WAIT_S)
        assert line.endswith(b"\n"), line
        data: dict[str, Any] = json.loads(line)
        return data

    async def eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), WAIT_S) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest_asyncio.fixture
async def raw(server: ControlServer) -> AsyncIterator[Callable[[], Any]]:
    conns: list[RawConn] = []

    async def make() -> RawConn:
        c = await RawConn.open(server.path)
        conns.append(c)
        return c

    yield make
    for c in conns:
        await c.close()


# -- protocol ------------------------------------------------------------------------------------


async def test_round_trip_and_peer_credentials(server: ControlServer) -> None:
    async with ControlClient(server.path, timeout_s=WAIT_S) as client:
        assert await client.call("status", {"echo": "hi"}) == {"state": "running", "echo": "hi"}
        who = await client.call("whoami")
    assert who == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


async def test_streaming_events_then_final_result(server: ControlServer) -> None:
    async with ControlClient(server.path, timeout_s=WAIT_S) as client:
        items = [item async for item in client.stream("count", {"n": 3})]
        assert items == [
            StreamEvent({"i": 0}),
            StreamEvent({"i": 1}),
            StreamEvent({"i": 2}),
            StreamResult({"done": 3}),
        ]
        # The connection stays usable after a stream.
        assert (await client.call("status"))["state"] == "running"


async def test_wire_format_of_a_stream(raw: Callable[[], Any]) -> None:
    conn = await raw()
    await conn.send(b'{"id": "s1", "cmd": "count", "args": {"n": 2}}\n')
    assert await conn.reply() == {"id": "s1", "event": {"i": 0}}
    assert await conn.reply() == {"id": "s1", "event": {"i": 1}}
    assert await conn.reply() == {"id": "s1", "ok": True, "result": {"done": 2}}


async def test_sync_client_round_trip(server: ControlServer) -> None:
    def blocking() -> tuple[Any, list[Any]]:
        with SyncControlClient(server.path, timeout_s=WAIT_S) as client:
            return client.call("status", {"echo": 1}), list(client.stream("count", {"n": 2}))

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        result, streamed = await asyncio.wait_for(loop.run_in_executor(pool, blocking), WAIT_S)
    assert result == {"state": "running", "echo": 1}
    assert streamed == [StreamEvent({"i": 0}), StreamEvent({"i": 1}), StreamResult({"done": 2})]


@pytest.mark.parametrize(
    ("line", "reply_id", "needle"),
    [
        (b"not json\n", None, "not JSON"),
        (b"[1, 2]\n", None, "expected a JSON object"),
        (b'{"cmd": "status"}\n', None, "'id'"),
        (b'{"id": true, "cmd": "status"}\n', None, "'id'"),
        (b'{"id": 4}\n', 4, "'cmd'"),
        (b'{"id": 5, "cmd": "status", "args": [1]}\n', 5, "'args'"),
        (b'{"id": 6, "cmd": "status", "extra": 1}\n', 6, "extra"),
        (b"\xff\xfe{}\n", None, "not JSON"),
        (b'{"id": ' + b"9" * 5000 + b', "cmd": "status"}\n', None, "too long"),
        (b'{"id": 8, "cmd": "status", "args": {"n": -' + b"7" * 5000 + b"}}\n", None, "too long"),
    ],
)
async def test_malformed_requests_get_an_error_and_the_connection_lives(
    raw: Callable[[], Any], line: bytes, reply_id: Any, needle: str
) -> None:
    conn = await raw()
    await conn.send(line)
    reply = await conn.reply()
    assert reply["ok"] is False
    assert reply["code"] == "bad_request"
    assert reply["id"] == reply_id
    assert needle in reply["error"]
    await conn.send(b'{"id": 9, "cmd": "status"}\n')
    assert (await conn.reply())["result"]["state"] == "running"


async def test_unknown_command_names_the_known_ones(server: ControlServer) -> None:
    async with ControlClient(server.path, timeout_s=WAIT_S) as client:
        with pytest.raises(ControlCommandError) as info:
            await client.call("reboot")
    assert info.value.code == "unknown_command"
    assert "'reboot'" in info.value.message
    assert "count, status, whoami" in info.value.message


async def test_oversized_line_is_refused_and_connection_closed(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with ControlServer(_cfg(sockdir, max_line_bytes=1024)) as srv:
        srv.register("status", _status)
        conn = await RawConn.open(srv.path)
        try:
            await conn.send(b'{"id": 1, "cmd": "status", "args": {"x": "' + b"a" * 5000 + b'"}}\n')
            reply = await conn.reply()
            assert reply["id"] is None
            assert reply["code"] == "too_large"
            assert await conn.eof()
        finally:
            await conn.close()
        # The daemon is unharmed: a fresh connection works.
        async with ControlClient(srv.path, timeout_s=WAIT_S) as client:
            assert (await client.call("status"))["state"] == "running"
    assert "over 1024 bytes" in caplog.text


async def test_handler_errors_and_timeouts(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def refuses(ctx: RequestContext) -> None:
        raise CommandError("not_found", "no reader named 'x'")

    async def crashes(ctx: RequestContext) -> None:
        raise RuntimeError("bug")

    async def hangs(ctx: RequestContext) -> None:
        await asyncio.Event().wait()

    async def unserializable(ctx: RequestContext) -> object:
        return {1, 2}

    async with ControlServer(_cfg(sockdir)) as srv:
        srv.register("refuses", refuses)
        srv.register("crashes", crashes)
        srv.register("hangs", hangs, timeout_s=0.05)
        srv.register("unserializable", unserializable)
        async with ControlClient(srv.path, timeout_s=WAIT_S) as client:
            codes = {}
            for cmd in ("refuses", "crashes", "hangs", "unserializable"):
                with pytest.raises(ControlCommandError) as info:
                    await client.call(cmd)
                codes[cmd] = (info.value.code, info.value.message)
    assert codes["refuses"] == ("not_found", "no reader named 'x'")
    assert codes["crashes"][0] == "internal"
    assert "bug" not in codes["crashes"][1]  # internals stay in the daemon's log
    assert codes["hangs"] == ("timeout", "hangs did not finish within 0.05 s")
    assert codes["unserializable"][0] == "internal"
    assert "control: crashes failed" in caplog.text


async def test_rate_limit(sockdir: Path) -> None:
    async with ControlServer(_cfg(sockdir, rate_per_s=0.001, rate_burst=2)) as srv:
        srv.register("status", _status)
        conn = await RawConn.open(srv.path)
        try:
            await conn.send(b"".join(b'{"id": %d, "cmd": "status"}\n' % i for i in range(4)))
            replies = {r["id"]: r for r in [await conn.reply() for _ in range(4)]}
        finally:
            await conn.close()
    assert replies[0]["ok"] is True
    assert replies[1]["ok"] is True
    assert replies[2]["code"] == "rate_limited"
    assert replies[3]["code"] == "rate_limited"


async def test_idle_connection_is_closed(sockdir: Path) -> None:
    async with ControlServer(_cfg(sockdir, idle_timeout_s=0.1)) as srv:
        conn = await RawConn.open(srv.path)
        try:
            assert await conn.eof()
        finally:
            await conn.close()


async def test_half_closed_client_still_gets_its_answer(server: ControlServer) -> None:
    conn = await RawConn.open(server.path)
    try:
        await conn.send(b'{"id": 1, "cmd": "status"}\n')
        conn.writer.write_eof()  # like `socat` or `nc -N`: send, shut down writing, read
        assert (await conn.reply())["result"]["state"] == "running"
        assert await conn.eof()
    finally:
        await conn.close()


async def test_client_that_stops_reading_is_dropped(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ended = asyncio.Event()
    sent = 0

    async def firehose(ctx: RequestContext) -> None:
        nonlocal sent
        try:
            for _ in range(10_000):  # far more than any socket buffer holds
                await ctx.emit("x" * 60_000)
                sent += 1
        finally:
            ended.set()

    async with ControlServer(_cfg(sockdir, write_timeout_s=0.2)) as srv:
        srv.register("firehose", firehose, timeout_s=None)
        conn = await RawConn.open(srv.path)
        try:
            await conn.send(b'{"id": 1, "cmd": "firehose"}\n')
            await asyncio.wait_for(ended.wait(), WAIT_S)  # never reading a byte
        finally:
            await conn.close()
    assert 0 < sent < 10_000
    assert "control: dropping" in caplog.text


async def test_client_hangup_cancels_its_stream(sockdir: Path) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def tail(ctx: RequestContext) -> None:
        await ctx.emit({"hello": True})
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with ControlServer(_cfg(sockdir)) as srv:
        srv.register("events.tail", tail, timeout_s=None)
        client = ControlClient(srv.path, timeout_s=WAIT_S)
        stream = client.stream("events.tail")
        assert await anext(stream) == StreamEvent({"hello": True})
        await asyncio.wait_for(started.wait(), WAIT_S)
        await stream.aclose()
        await client.close()
        await asyncio.wait_for(cancelled.wait(), WAIT_S)


async def test_graceful_shutdown_ends_streams_and_removes_socket(sockdir: Path) -> None:
    srv = ControlServer(_cfg(sockdir))

    async def tail(ctx: RequestContext) -> None:
        await ctx.emit("first")
        await asyncio.Event().wait()

    srv.register("events.tail", tail, timeout_s=None)
    await srv.start()
    path = srv.path
    assert path.exists()
    async with ControlClient(path, timeout_s=WAIT_S) as client:
        stream = client.stream("events.tail")
        assert await anext(stream) == StreamEvent("first")
        await srv.stop()
        with pytest.raises(ControlCommandError) as info:
            await anext(stream)
        assert info.value.code == "shutting_down"
        await stream.aclose()
    assert not path.exists()
    assert srv.connection_count == 0


async def test_audit_hook_sees_caller_and_command(sockdir: Path) -> None:
    seen: list[tuple[PeerCred, str, dict[str, Any]]] = []
    srv = ControlServer(_cfg(sockdir), audit=lambda p, c, a: seen.append((p, c, dict(a))))
    srv.register("status", _status)
    async with srv, ControlClient(srv.path, timeout_s=WAIT_S) as client:
        await client.call("status", {"echo": "x"})
    [(peer, cmd, args)] = seen
    assert (peer.uid, peer.pid, cmd, args) == (os.getuid(), os.getpid(), "status", {"echo": "x"})
    assert os.getgid() in (peer.gid, *peer.groups)


# -- socket file, authorization --------------------------------------------------------------------


def _some_other_group() -> grp.struct_group:
    return next(g for g in grp.getgrall() if g.gr_gid not in (os.getgid(), NOBODY))


async def test_socket_file_mode_and_group(sockdir: Path) -> None:
    group = _some_other_group()
    async with ControlServer(_cfg(sockdir, group=group.gr_name)) as srv:
        st = os.stat(srv.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid


async def test_socket_file_is_never_open_before_its_group_is_set(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Observe the file's mode at the moment the server first touches it after bind().
    seen: list[int] = []
    real_chmod = os.chmod

    def spy_chmod(path: Any, mode: int) -> None:
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chmod(path, mode)

    monkeypatch.setattr("agent.control.server.os.chmod", spy_chmod)
    old_umask = os.umask(0o000)  # the most permissive process umask possible
    try:
        async with ControlServer(_cfg(sockdir)) as srv:
            assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o660
    finally:
        os.umask(old_umask)
    assert seen == [0o600]


async def test_missing_group_falls_back_with_a_warning(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with ControlServer(_cfg(sockdir, group="no-such-group-xyz")) as srv:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o660
    assert "group 'no-such-group-xyz' does not exist" in caplog.text


async def test_refusal_when_policy_excludes_the_caller(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = AccessPolicy(uids=frozenset({12345}), gids=frozenset({23456}), hint="add to group x")
    srv = ControlServer(_cfg(sockdir), policy=policy)
    srv.register("status", _status)
    async with srv:
        with pytest.raises(ControlPermissionError) as info:
            async with ControlClient(srv.path, timeout_s=WAIT_S) as client:
                await client.call("status")
        assert srv.refused == 1
    assert f"permission denied: uid {os.getuid()}" in str(info.value)
    assert "add to group x" in str(info.value)
    assert any(
        r.levelno == logging.WARNING and f"refused uid={os.getuid()}" in r.getMessage()
        for r in caplog.records
    )


def test_policy_from_config_and_group_membership() -> None:
    group = _some_other_group()
    policy = AccessPolicy.from_config(ControlConfig(group=group.gr_name, allow_root=False))
    assert os.getuid() in policy.uids  # the daemon's own user
    assert policy.allows(PeerCred(pid=1, uid=4242, gid=4242, groups=(7, group.gr_gid)))
    assert policy.allows(PeerCred(pid=1, uid=4242, gid=group.gr_gid))
    assert not policy.allows(PeerCred(pid=1, uid=4242, gid=4242, groups=(7,)))
    assert f"group {group.gr_name}" in policy.hint


_AS_NOBODY = f"""
import json, os, sys
from agent.control.client import SyncControlClient, ControlClientError
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
try:
    SyncControlClient(sys.argv[1], timeout_s=10).call("whoami")
    print(json.dumps({{"outcome": "ok"}}))
except ControlClientError as err:
    print(json.dumps({{"outcome": type(err).__name__, "message": str(err)}}))
"""


async def _run_as_nobody(path: Path) -> dict[str, str]:
    assert os.getuid() == 0, "these tests switch to uid 65534 and must run as root (CI does)"
    # Imports happen as root (the venv lives under /root), then the process drops to nobody.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _AS_NOBODY,
        str(path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, str] = json.loads(out)
    return result


async def test_other_uid_is_refused_by_peer_credentials_even_if_file_is_open(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = ControlServer(_cfg(sockdir, allow_root=True))
    srv.register("whoami", _whoami)
    async with srv:
        # Loosen the file: only the SO_PEERCRED check now stands between nobody and the API.
        os.chmod(srv.path, 0o666)
        outcome = await _run_as_nobody(srv.path)
        assert srv.refused == 1
    assert outcome["outcome"] == "ControlPermissionError"
    assert f"uid {NOBODY}" in outcome["message"]
    assert f"refused uid={NOBODY}" in caplog.text


async def test_other_uid_blocked_by_file_mode_gets_group_hint(sockdir: Path) -> None:
    srv = ControlServer(_cfg(sockdir))
    async with srv:
        outcome = await _run_as_nobody(srv.path)
        assert srv.refused == 0  # never got as far as the daemon
    assert outcome["outcome"] == "ControlPermissionError"
    assert "permission denied on" in outcome["message"]
    assert "add yourself to group cabinet-tech" in outcome["message"]


_SERVE_AS_NOBODY = f"""
import asyncio, grp, json, logging, os, sys
from pathlib import Path
from agent.control.config import ControlConfig
from agent.control.server import ControlServer
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
logging.basicConfig(level=logging.ERROR, stream=sys.stderr)

async def main():
    cfg = ControlConfig(socket_path=Path(sys.argv[1]), group=sys.argv[2])
    async with ControlServer(cfg) as srv:
        st = os.stat(srv.path)
        print(json.dumps({{"mode": st.st_mode & 0o777, "gid": st.st_gid}}))

asyncio.run(main())
"""


async def test_daemon_not_in_the_group_degrades_with_an_error(sockdir: Path) -> None:
    assert os.getuid() == 0, "this test switches to uid 65534 and must run as root (CI does)"
    os.chown(sockdir, NOBODY, NOBODY)
    group = _some_other_group()  # root's other groups: nobody is not a member
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVE_AS_NOBODY,
        str(sockdir / "control.sock"),
        group.gr_name,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"mode": 0o660, "gid": NOBODY}
    assert f"cannot give {sockdir / 'control.sock'} to group {group.gr_name}" in err.decode()


# -- lifecycle and client errors -------------------------------------------------------------------


async def test_client_says_daemon_not_running(sockdir: Path) -> None:
    with pytest.raises(DaemonNotRunningError, match=r"not running \(no socket at "):
        await ControlClient(sockdir / "control.sock", timeout_s=WAIT_S).connect()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(str(sockdir / "stale.sock"))  # bound, never listening: a crashed daemon
        with pytest.raises(DaemonNotRunningError, match="stale socket"):
            SyncControlClient(sockdir / "stale.sock", timeout_s=WAIT_S).connect()
    finally:
        stale.close()


async def test_stale_socket_replaced_live_one_kept(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    async with ControlServer(_cfg(sockdir)) as first:
        first.register("status", _status)
        with pytest.raises(ControlSocketError, match="already serving"):
            await ControlServer(_cfg(sockdir)).start()
        async with ControlClient(path, timeout_s=WAIT_S) as client:
            assert (await client.call("status"))["state"] == "running"
    path.write_text("not a socket")
    with pytest.raises(ControlSocketError, match="not a socket"):
        await ControlServer(_cfg(sockdir)).start()
    assert path.read_text() == "not a socket"


async def test_missing_directory_is_a_clear_error(sockdir: Path) -> None:
    cfg = ControlConfig(socket_path=sockdir / "nope" / "control.sock", group=None)
    with pytest.raises(ControlSocketError, match="RuntimeDirectory"):
        await ControlServer(cfg).start()


def test_register_twice_is_an_error(sockdir: Path) -> None:
    srv = ControlServer(_cfg(sockdir))
    srv.register("status", _status)
    with pytest.raises(ValueError):
        srv.register("status", _status)


def test_control_config_section() -> None:
    base: dict[str, Any] = {
        "cabinet": {"site_id": "s1", "cabinet_id": "c1"},
        "readers": [{"type": "llrp", "id": "r1", "host": "127.0.0.1"}],
    }
    cfg = parse_config(base)
    assert cfg.control.socket_path == Path("/run/cabinet-agent/control.sock")
    assert cfg.control.group == "cabinet-tech"
    with pytest.raises(ValidationError):
        ControlConfig(socket_path=Path("relative.sock"))
    with pytest.raises(ValidationError):
        ControlConfig(socket_path=Path("/" + "x" * 120))
    with pytest.raises(ValidationError):
        ControlConfig(allowed_groups=["Bad Name"])
