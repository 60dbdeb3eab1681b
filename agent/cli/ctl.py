"""cabinetctl: the technician's tool."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.common import DEFAULT_CONFIG, load_or_exit
from agent.config import EX_CONFIG, ConfigError, load_config


def _cmd_config_check(args: argparse.Namespace) -> int:
    if args.json:
        try:
            cfg = load_config(args.path)
        except ConfigError as err:
            # Scripts read stdout: the problems go there too (and to stderr for people).
            for line in err.problems:
                print(f"{err.path}: {line}", file=sys.stderr)
            doc = {"ok": False, "path": str(args.path), "problems": err.problems}
            print(json.dumps(doc))
            return EX_CONFIG
    else:
        cfg = load_or_exit(args.path)
    if args.json:
        print(json.dumps({"ok": True, "path": str(args.path), "readers": len(cfg.readers)}))
    else:
        print(f"{args.path}: ok ({len(cfg.readers)} reader(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinetctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="configuration file checks")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file (exit 78 if invalid)")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_CONFIG)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=_cmd_config_check)

    from agent.cli import readers_cmd

    readers_cmd.register(sub)
    from agent.cli import diag

    diag.register(sub)

    from agent.cli import control_cmd

    control_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
