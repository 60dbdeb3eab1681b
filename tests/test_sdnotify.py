"""sd_notify against a real Unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Heartbeat, Notifier, WatchdogGate, run_watchdog

RECV_TIMEOUT_S = 10.0


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound SOCK_DGRAM socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(RECV_TIMEOUT_S)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    async def arecv(self) -> dict[str, str]:
        self.sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), RECV_TIMEOUT_S)
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def pending(self) -> list[dict[str, str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(4096).decode()
                except BlockingIOError:
                    return out
                out.append(dict(line.split("=", 1) for line in data.splitlines()))
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    fake = FakeSystemd(str(path))
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    try:
        yield fake, env
    finally:
        fake.sock.close()


def test_ready_status_stopping_reach_the_socket(
    systemd: tuple[FakeSystemd, dict[str, str]],
) -> None:
    fake, env = systemd
    n = Notifier.from_env(env)
    try:
        assert n.enabled
        assert n.ready("started: 2 readers")
        assert fake.recv() == {"READY": "1", "STATUS": "started: 2 readers"}
        assert n.status("line one\nWATCHDOG=1")
        # A newline in the status must not smuggle a second field.
        assert fake.recv() == {"STATUS": "line one WATCHDOG=1"}
        assert n.stopping()
        assert fake.recv() == {"STOPPING": "1"}
        assert n.extend_timeout(2.5)
        assert fake.recv() == {"EXTEND_TIMEOUT_USEC": "2500000"}
    finally:
        n.close()


def test_reloading_carries_monotonic_usec(systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, env = systemd
    n = Notifier.from_env(env)
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading()
        msg = fake.recv()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert msg["RELOADING"] == "1"
        assert before <= int(msg["MONOTONIC_USEC"]) <= after
    finally:
        n.close()


def test_abstract_socket_address() -> None:
    name = f"cabinet-agent-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.watchdog() is True
        assert fake.recv() == {"WATCHDOG": "1"}
    finally:
        n.close()
        fake.sock.close()


def test_watchdog_variables() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert not n.enabled
    assert n.watchdog_timeout() == 30.0
    assert n.watchdog_interval() == 15.0
    assert n.ready() is False  # no socket: a silent no-op, not an error
    # A watchdog inherited from a parent process is not ours to feed.
    other = Notifier.from_env({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None
    # Without WATCHDOG_PID the watchdog applies to us.
    assert Notifier.from_env({"WATCHDOG_USEC": "1000000"}).watchdog_interval() == 0.5
    assert Notifier.from_env({"WATCHDOG_USEC": "junk"}).watchdog_interval() is None


def test_unset_removes_variables_from_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "x.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.from_env(unset=True)
    assert n.enabled
    assert n.watchdog_interval() == 0.5
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ


def test_send_errors_are_logged_once_and_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    caplog.set_level(logging.DEBUG, logger="agent.sdnotify")
    try:
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("x") is False
    finally:
        n.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_gate_counter_and_time_sources() -> None:
    now = [100.0]
    gate = WatchdogGate(window_s=10, clock=lambda: now[0])
    reader = Heartbeat()
    last_publish = [100.0]
    gate.register("reader:r1", reader)
    gate.register("publisher", lambda: last_publish[0], kind="time")
    assert gate.stalled() == []
    now[0] = 109.0
    assert gate.stalled() == []
    reader.beat()
    assert gate.stalled() == []  # counter moved at 109
    now[0] = 112.0
    assert gate.stalled() == ["publisher"]
    last_publish[0] = 111.5
    assert gate.stalled() == []
    now[0] = 119.5
    assert gate.stalled() == ["reader:r1"]
    gate.unregister("reader:r1")
    assert gate.stalled() == []
    with pytest.raises(ValueError):
        gate.register("publisher", lambda: 0.0)


def test_gate_treats_a_failing_probe_as_stalled(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> float:
        raise RuntimeError("boom")

    gate = WatchdogGate(window_s=10)
    gate.register("ok", Heartbeat())
    gate._sources["ok"].probe = broken  # a probe that starts failing after registration
    assert gate.stalled() == ["ok"]
    assert "watchdog probe ok failed" in caplog.text


async def test_watchdog_stops_while_a_source_stalls_and_resumes(
    systemd: tuple[FakeSystemd, dict[str, str]],
) -> None:
    fake, env = systemd
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval() == 0.1
    now = [0.0]
    gate = WatchdogGate(window_s=5, clock=lambda: now[0])
    reader = Heartbeat()
    polls_while_stalled = 0
    polled_enough = asyncio.Event()

    def publisher_probe() -> float:
        nonlocal polls_while_stalled
        if now[0] >= 100:
            polls_while_stalled += 1
            if polls_while_stalled >= 4:
                polled_enough.set()
        return 7.0  # a counter that never moves

    gate.register("reader:r1", reader)
    gate.register("publisher", publisher_probe)
    notifier.status("running")
    assert fake.recv() == {"STATUS": "running"}
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(notifier, gate, stop), name="watchdog")
    try:
        assert await fake.arecv() == {"WATCHDOG": "1"}
        assert await fake.arecv() == {"WATCHDOG": "1"}
        # Time passes; the reader keeps beating, the publisher does not.
        reader.beat()
        now[0] = 100.0
        reader.beat()
        while (msg := await fake.arecv()) == {"WATCHDOG": "1"}:
            pass  # pings already in flight before the stall was seen
        assert msg == {"STATUS": "stalled: publisher"}
        await asyncio.wait_for(polled_enough.wait(), RECV_TIMEOUT_S)
        # Several gate checks happened while stalled: none of them fed the watchdog.
        assert fake.pending() == []
        # The publisher recovers: the previous status comes back, then the pings.
        gate.unregister("publisher")
        assert await fake.arecv() == {"STATUS": "running"}
        assert await fake.arecv() == {"WATCHDOG": "1"}
    finally:
        stop.set()
        await asyncio.wait_for(task, RECV_TIMEOUT_S)
        notifier.close()


async def test_run_watchdog_without_watchdog_just_waits_for_stop() -> None:
    notifier = Notifier.from_env({})
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_watchdog(notifier, WatchdogGate(window_s=1), stop), name="watchdog"
    )
    await asyncio.sleep(0)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, RECV_TIMEOUT_S)
