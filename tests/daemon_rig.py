"""A real ``cabinet-agent run`` process for the field tests: keys, config, log, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from agent.privacy.keys import generate_backend_keys

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 30.0


def provision(tmp: Path) -> Path:
    """Backend keys in ``tmp/backend``; the cabinet's three key files in ``tmp/creds``."""
    generate_backend_keys(tmp / "backend")
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

[domain]
drawers = {{ top = ["dock-1:1", "dock-1:2"], bottom = ["dock-1:3", "dock-1:4"] }}
{domain}
{extra}
"""


class AgentProcess:
    """``python -m agent.cli.daemon run --config CFG`` with stdout+stderr into ``log``."""

    def __init__(self, cfg: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.env = env
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
                "agent.cli.daemon",
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
