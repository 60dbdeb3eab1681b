"""``cabinetctl selftest`` and ``cabinetctl bundle``: is this cabinet fit to run, and what to send
support when it is not.

The self-test never competes with a running agent: readers allow one LLRP session and the state
database one writer, so when the daemon answers on its control socket the reader and store checks
ask it instead of connecting themselves. The bundle holds no key material, no key path, no secret
and no raw badge id (those never reach logs or the store in the first place; the config is
redacted field by field).

The package: ``check`` (what a check answers, the running agent's answers), the checks by
subject (``clock``, ``connections``, ``state``), ``selftest`` (their order) and ``bundle``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.cli.common import DEFAULT_CONFIG
from agent.cli.diag.bundle import build_bundle, cmd_bundle, redact, redacted_config
from agent.cli.diag.check import EX_OK, EX_UNAVAILABLE, Check, Status, exit_code
from agent.cli.diag.clock import check_clock, check_ntp, check_trusted_clock
from agent.cli.diag.connections import READER_TIMEOUT_S, check_broker, check_readers
from agent.cli.diag.selftest import cmd_selftest, run_selftest
from agent.cli.diag.state import allow_list_verdict, check_allow_list, check_disk, check_store

__all__ = [
    "EX_OK",
    "EX_UNAVAILABLE",
    "Check",
    "Status",
    "allow_list_verdict",
    "build_bundle",
    "check_allow_list",
    "check_broker",
    "check_clock",
    "check_disk",
    "check_ntp",
    "check_readers",
    "check_store",
    "check_trusted_clock",
    "exit_code",
    "redact",
    "redacted_config",
    "register",
    "run_selftest",
]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``selftest`` and ``bundle`` to cabinetctl."""
    selftest = subparsers.add_parser(
        "selftest", help="check readers, broker, clock, disk, keys and config (exit 0/69/78)"
    )
    selftest.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    selftest.add_argument("--json", action="store_true", help="machine-readable output")
    selftest.add_argument(
        "--timeout", type=float, default=READER_TIMEOUT_S, help="per-reader connect limit (s)"
    )
    selftest.set_defaults(func=cmd_selftest)

    bundle = subparsers.add_parser(
        "bundle", help="write a diagnostics tar.gz for support (no keys, secrets or badge ids)"
    )
    bundle.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    bundle.add_argument("-o", "--output", type=Path, help="archive path (default: ./cabinet-…)")
    bundle.add_argument("--log", type=Path, help="log file to include when there is no journal")
    bundle.add_argument(
        "--timeout", type=float, default=READER_TIMEOUT_S, help="per-reader connect limit (s)"
    )
    bundle.set_defaults(func=cmd_bundle)
