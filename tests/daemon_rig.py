"""A real ``cabinet-agent run`` process for the field tests: keys, config, log, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from backend.keys import generate_backend_keys

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 30.0


def provision(tmp: Path) -> Path:
    """Backend keys in ``tmp/backend``; the cabinet's three key files in ``tmp/creds``; the
    time source of ``config_text`` (``tmp/time-synced``) says synchronised."""
    generate_backend_keys(tmp / "backend")
    (tmp / "time-synced").touch()  # config_text's time source: synchronised
    creds = tmp / "creds"
    creds.mkdir()
    for name in ("backend-hpke.pub", "signing.pub", "site.key"):
        shutil.copy(tmp / "backend" / name, creds / name)
    (creds / "site.key").chmod(0o600)
    return creds


def config_text(
    tmp: Path,
    port: int,
    *,
    level: str = "INFO",
    fmt: str = "text",
    keepalive_s: float = 1.0,
    domain: str = "",
    extra: str = "",
    store_path: Path | None = None,
    store: str = "",
) -> str:
    """One LLRP reader (4 antennas, GPI 1), store, control socket, metrics on a free port.

    ``store_path`` moves the database (default ``tmp/state.db``); ``store`` adds lines to
    ``[store]``, ``domain`` to ``[domain]``; ``extra`` appends whole sections.
    """
    creds = tmp / "creds"
    db = store_path or tmp / "state.db"
    return f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-07"

[logging]
level = "{level}"
format = "{fmt}"

[[readers]]
type = "llrp"
id = "dock-1"
host = "127.0.0.1"
port = {port}
antennas = [1, 2, 3, 4]
keepalive_s = {keepalive_s}
gpi_ports = [1]
backoff = {{ initial_s = 0.05, max_s = 0.5 }}

[privacy]
site_key = "{creds}/site.key"
seal_public_key = "{creds}/backend-hpke.pub"
signing_public_keys = ["{creds}/signing.pub"]

[store]
path = "{db}"
{store}

[control]
socket_path = "{tmp}/control.sock"
group = "root"

[metrics]
port = 0

[time]
sync_source = "file:{tmp}/time-synced"

[domain]
drawers = {{ top = ["dock-1:1", "dock-1:2"], bottom = ["dock-1:3", "dock-1:4"] }}
{domain}
{extra}
"""


class AgentProcess:
    """``python -m agent.cli.cabinet_agent run --config CFG`` with stdout+stderr into ``log``.

    ``module`` runs another entry point with the same arguments (``tests.fault_agent``: the
    same daemon with test-only faults injected).
    """

    def __init__(
        self,
        cfg: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        module: str = "agent.cli.cabinet_agent",
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.env = env
        self.module = module
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = dict(os.environ)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            env.pop(name, None)
        env.update(self.env or {})
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                "run",
                "--config",
                str(self.cfg),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_log(self, pattern: str, timeout: float = TIMEOUT_S) -> re.Match[str]:
        """Wait for a regex in the log; fail with the log if the process exits first."""
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                if (m := rx.search(self.text())) is not None:
                    return m
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"agent exited {self.proc.returncode} before {pattern!r}:\n{self.text()}"
                    )
                await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_exit(self, timeout: float = TIMEOUT_S) -> int:
        """Wait for the process to end by itself (bounded); its exit code."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, bounded wait, SIGKILL as the last resort; returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode

    async def __aenter__(self) -> AgentProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket collecting every notification in order,
    each with the monotonic time it arrived (to measure the gaps between WATCHDOG=1 pings)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def env(self, watchdog_usec: int) -> dict[str, str]:
        """The variables systemd sets for a Type=notify service with WatchdogSec=."""
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(watchdog_usec)}

    def start(self) -> None:
        """Receive in the background (so arrival times are taken as datagrams come in)."""
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="notify-rx")

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.times.append(time.monotonic())
            self.messages.append(
                dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            )

    async def wait_for(
        self, key: str, value: str | None = None, count: int = 1, timeout: float = TIMEOUT_S
    ) -> dict[str, str]:
        """Until ``count`` messages carry ``key`` (with ``value``); return the last of them."""
        if self._task is None:
            self.start()
        async with asyncio.timeout(timeout):
            while True:
                hits = [m for m in self.messages if key in m and value in (None, m[key])]
                if len(hits) >= count:
                    return hits[-1]
                if self._task is not None and self._task.done():
                    self._task.result()
                await asyncio.sleep(0.02)

    def ping_times(self, after: float = 0.0) -> list[float]:
        """Arrival times of the WATCHDOG=1 datagrams received after ``after``."""
        return [
            t
            for t, m in zip(self.times, self.messages, strict=True)
            if m.get("WATCHDOG") == "1" and t > after
        ]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()


async def ctl(*argv: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``cabinetctl ARGV…`` in a subprocess; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli.ctl",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
