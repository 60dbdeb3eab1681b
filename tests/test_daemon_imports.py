"""What the daemon loads is what it uses: CLI-only libraries (rich), the reference backend and
the simulators stay out of ``cabinet-agent run``'s import graph (docs/performance.md, memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Everything `cabinet-agent run` imports on its way to a running cabinet: the entry point, the
# daemon and, lazily at run time, the publisher and every reader driver.
DAEMON_MODULES = (
    "agent.cli.cabinet_agent",
    "agent.daemon",
    "agent.mqtt.publisher",
    "drivers.llrp.reader",
    "drivers.mercury.reader",
    "drivers.badge.reader",
)
NOT_IN_THE_DAEMON = ("rich", "backend", "simulators", "pytest", "hypothesis")


def test_the_daemon_imports_no_cli_backend_or_simulator_code() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {DAEMON_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    loaded = set(json.loads(out.stdout))
    assert "agent" in loaded
    assert "paho" in loaded  # the probe saw the daemon's real graph
    assert not loaded & set(NOT_IN_THE_DAEMON), sorted(loaded & set(NOT_IN_THE_DAEMON))
