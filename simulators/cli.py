"""cabinet-sim: run a simulator from the command line."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers) and sets `func` (args -> int) on its parser.
SIMULATOR_MODULES = [
    "simulators.llrp.cli",
    "simulators.badge_cli",
    "simulators.mercury.cli",
    "simulators.cabinet_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinet-sim", description=__doc__)
    sub = parser.add_subparsers(dest="simulator", required=True)
    for name in SIMULATOR_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
