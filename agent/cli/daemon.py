"""cabinet-agent: the daemon (``run``) and the bundled demo (``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent import __version__
from agent.cli.common import DEFAULT_CONFIG, load_or_exit
from agent.config import EX_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    from agent.logging_setup import setup_logging

    setup_logging(args.log_level or cfg.logging.level, cfg.logging.format)
    from agent.daemon import Daemon, run_until_signalled
    from drivers.errors import PermanentError

    async def _main() -> None:
        daemon = Daemon(cfg, config_path=args.config)
        await run_until_signalled(daemon)

    rc = 0
    try:
        asyncio.run(_main())
    except* PermanentError as group:
        # Key files with loose permissions, unusable credentials, a control socket or state
        # database another agent holds…: a deployment problem, one line each, never a traceback.
        for err in _leaves(group):
            print(f"cabinet-agent: {err}", file=sys.stderr)
        rc = EX_CONFIG
    return rc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for err in group.exceptions:
        out.extend(_leaves(err) if isinstance(err, BaseExceptionGroup) else [err])
    return out


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

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
