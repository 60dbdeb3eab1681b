"""cabinet-agent: the daemon (``run``) and the bundled demo (``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent import __version__
from agent.cli.common import DEFAULT_CONFIG, load_controller_or_exit
from agent.config import EX_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.lifecycle import forbid_core_dumps

    forbid_core_dumps()  # before any key or badge is in memory
    ctrl = load_controller_or_exit(args.config)
    from agent.logging_setup import setup_logging

    setup_logging(args.log_level or ctrl.logging.level, ctrl.logging.format)
    import logging

    from agent.controller import Controller
    from agent.daemon import Daemon, run_until_signalled
    from agent.lifecycle import (
        EX_SOFTWARE,
        ExitGuard,
        NonWaitingExecutor,
        describe,
        leave,
        leaves,
    )
    from drivers.errors import PermanentError

    guard = ExitGuard()
    daemons: list[Daemon | Controller] = []

    async def _main() -> None:
        # asyncio.run would otherwise wait for the default executor's threads without a bound.
        asyncio.get_running_loop().set_default_executor(
            NonWaitingExecutor(thread_name_prefix="asyncio-worker")
        )
        daemon: Daemon | Controller
        if ctrl.multi:  # several cabinets on this controller: one process for all of them
            daemon = Controller(ctrl, config_path=args.config, guard=guard)
        else:
            daemon = Daemon(ctrl.cabinets[0], config_path=args.config, guard=guard)
        daemons.append(daemon)
        await run_until_signalled(daemon)

    rc = 0
    try:
        asyncio.run(_main())
    except* PermanentError as group:
        # Key files with loose permissions, unusable credentials, a control socket or state
        # database another agent holds…: a deployment problem, one line each, never a traceback.
        for err in leaves(group):
            print(f"cabinet-agent: {err}", file=sys.stderr)
        rc = EX_CONFIG
    except* Exception as group:  # noqa: BLE001 -- whatever else escaped: one line, exit 70
        if not daemons or daemons[0].failure is None:
            logging.getLogger("agent.daemon").critical(
                "fatal: %s (exit %d)", describe(group), EX_SOFTWARE
            )
        rc = EX_SOFTWARE
    else:
        if daemons and daemons[0].failure is not None:
            rc = daemons[0].exit_code  # the tree failed while it was stopping: still a failure
    return leave(rc)


def _cmd_demo(args: argparse.Namespace) -> int:
    from simulators.demo import run_demo

    return run_demo(
        seconds=args.seconds,
        tags=args.tags,
        antennas=args.antennas,
        keep=args.keep,
        rounds=args.rounds,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cabinet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (the systemd service runs this)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=_cmd_run)
    demo = sub.add_parser("demo", help="run the agent against the bundled simulator")
    demo.add_argument("--seconds", type=float, default=0, help="stop after N s (0: Ctrl-C)")
    demo.add_argument("--tags", type=int, default=60)
    demo.add_argument("--antennas", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=0, help="stop after N scenario rounds")
    demo.add_argument("--keep", action="store_true", help="keep the work directory (path printed)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
