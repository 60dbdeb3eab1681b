"""What a self-test check answers (``Check``, the exit codes) and how the checks ask the running
agent: it holds the readers' sessions and the store, so when it answers, the checks ask it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent.config import EX_CONFIG, AgentConfig

EX_OK = 0
EX_UNAVAILABLE = 69  # sysexits.h: a service (reader, broker, disk, clock) is unavailable

Status = Literal["PASS", "WARN", "FAIL"]

DAEMON_TIMEOUT_S = 5.0
# A system command (timedatectl, journalctl) the diagnostics run is given this long.
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """One self-test line."""

    status: Status
    check: str
    reason: str
    config_problem: bool = False  # a FAIL that is the operator's configuration (exit 78)

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.reason}"


def exit_code(checks: Sequence[Check]) -> int:
    """0 unless something failed: 78 for a configuration problem, else 69."""
    failed = [c for c in checks if c.status == "FAIL"]
    if not failed:
        return EX_OK
    return EX_CONFIG if any(c.config_problem for c in failed) else EX_UNAVAILABLE


async def daemon_call(cfg: AgentConfig, cmd: str) -> object:
    """One control-socket command; raises ControlClientError (not running, unknown command...)."""
    from agent.control.client import ControlClient

    async with ControlClient(cfg.control.socket_path, timeout_s=DAEMON_TIMEOUT_S) as client:
        return await client.call(cmd, timeout_s=DAEMON_TIMEOUT_S)


async def daemon_status(cfg: AgentConfig) -> dict[str, Any] | None:
    """The running daemon's status, or None when it does not answer."""
    from agent.control.client import ControlClientError

    if not cfg.control.enabled:
        return None
    try:
        result = await daemon_call(cfg, "status")
    except (ControlClientError, OSError):
        return None
    return result if isinstance(result, dict) else None
