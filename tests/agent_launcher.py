"""Run the composition root (``agent.app.CabinetApp``) from a config file, as a process.

``python -m tests.agent_launcher CONFIG`` does what ``cabinet-agent run --config CONFIG`` does
with the full daemon: validate the config (exit 78), log to stdout, run until SIGTERM/SIGINT.
The scenario harness uses it while the CLI's ``run`` still starts the reader-only daemon.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from agent.app import CabinetApp
from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config
from agent.logging_setup import setup_logging


async def _run(cfg: AgentConfig) -> None:
    app = CabinetApp(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    await app.run()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tests.agent_launcher CONFIG\n")
        return 2
    try:
        cfg = load_config(Path(argv[0]))
    except ConfigError as err:
        sys.stderr.write(f"{err}\n" + "".join(f"  {p}\n" for p in err.problems))
        return EX_CONFIG
    setup_logging(cfg.logging.level, cfg.logging.format)
    asyncio.run(_run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
