"""The technician at the cabinet: ``cabinetctl`` run as a real process against the agent's
control socket (scenario steps ``technician``, ``rebaseline``, ``door_test``). A subprocess,
not an import: simulators reach the agent over real bytes only."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from simulators.cabinet.scenario import ScenarioError

Ctl = Callable[[Sequence[str]], Coroutine[Any, Any, dict[str, Any]]]
CTL_TIMEOUT_S = 90.0


def cabinetctl_command() -> list[str]:
    """``cabinetctl`` of this Python environment (or ``python -m agent.cli.ctl``)."""
    exe = Path(sys.executable).parent / "cabinetctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli.ctl"]


def cabinetctl(socket_path: Path, *, timeout_s: float = CTL_TIMEOUT_S) -> Ctl:
    """A ``Ctl``: runs ``cabinetctl WORDS… --socket PATH --json``; its JSON result, or
    ScenarioError naming the exit code and what cabinetctl said."""

    async def run(words: Sequence[str]) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            *cabinetctl_command(),
            *words,
            "--socket",
            str(socket_path),
            "--json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        said = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise ScenarioError(f"cabinetctl {' '.join(words)}: exit {proc.returncode}: {said}")
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise ScenarioError(f"cabinetctl {' '.join(words)}: no JSON result ({said})")
        return result

    return run
