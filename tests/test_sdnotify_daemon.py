"""sd_notify from a real daemon process: READY=1, WATCHDOG=1 pings, RELOADING=1, STOPPING=1."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
from pathlib import Path

from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision


class _NotifyListener:
    """The systemd side: a datagram socket collecting every notification, in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait_for(self, key: str, value: str | None = None, count: int = 1) -> dict[str, str]:
        """Receive until ``count`` messages carry ``key`` (with ``value``); return the last."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30.0):
            while True:
                hits = [m for m in self.messages if key in m and value in (None, m[key])]
                if len(hits) >= count:
                    return hits[-1]
                data = await loop.sock_recv(self.sock, 4096)
                fields = dict(
                    line.split("=", 1) for line in data.decode().splitlines() if "=" in line
                )
                self.messages.append(fields)

    def close(self) -> None:
        self.sock.close()


async def test_daemon_reports_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    listener = _NotifyListener(tmp_path / "notify.sock")
    try:
        async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=9) as sim:
            cfg.write_text(config_text(tmp_path, sim.port))
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
            async with AgentProcess(cfg, tmp_path / "agent.log", env=env) as agent:
                ready = await listener.wait_for("READY", "1")
                assert "readers online" in ready["STATUS"], ready
                # Pings every half timeout (1 s) while every part makes progress; count those
                # after READY=1, when the gate watches the engine and the reader.
                first_ready = next(i for i, m in enumerate(listener.messages) if "READY" in m)
                before = sum(1 for m in listener.messages[:first_ready] if "WATCHDOG" in m)
                await listener.wait_for("WATCHDOG", "1", count=before + 3)
                # SIGHUP: RELOADING=1 with the monotonic time systemd asks for, then READY=1.
                agent.signal(signal.SIGHUP)
                reloading = await listener.wait_for("RELOADING", "1")
                assert int(reloading["MONOTONIC_USEC"]) > 0
                await listener.wait_for("READY", "1", count=2)
                at = next(i for i, m in enumerate(listener.messages) if "RELOADING" in m)
                assert any("READY" in m for m in listener.messages[at + 1 :])
                agent.signal(signal.SIGTERM)
                stopping = await listener.wait_for("STOPPING", "1")
                assert stopping.get("STATUS") == "stopping"
                rc = await agent.stop()
            assert rc == 0, agent.text()
    finally:
        listener.close()


async def test_status_is_sent_when_it_changes_not_on_a_timer(tmp_path: Path) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    listener = _NotifyListener(tmp_path / "notify.sock")
    try:
        sim = LlrpSimulator(personality="impinj", antennas=4, port=0, seed=9)
        await sim.start()
        try:
            cfg.write_text(config_text(tmp_path, sim.port))
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
            async with AgentProcess(cfg, tmp_path / "agent.log", env=env) as agent:
                await listener.wait_for("READY", "1")
                await listener.wait_for("STATUS", "1/1 readers online, engine idle")
                # Four pings a second apart: long enough for the former 2 s refresh to have
                # repeated the line.
                seen = len(listener.messages)
                await listener.wait_for("WATCHDOG", "1", count=_count(listener, "WATCHDOG") + 4)
                await sim.stop()  # the reader goes away: the line changes at once
                await listener.wait_for("STATUS", "0/1 readers online, engine idle")
                lines = [m["STATUS"] for m in listener.messages[seen - 1 :] if "STATUS" in m]
                assert all(a != b for a, b in itertools.pairwise(lines)), lines
                agent.signal(signal.SIGTERM)
                assert await agent.stop() == 0, agent.text()
        finally:
            await sim.stop()
    finally:
        listener.close()


def _count(listener: _NotifyListener, key: str) -> int:
    return sum(1 for m in listener.messages if key in m)
