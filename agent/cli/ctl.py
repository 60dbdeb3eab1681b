"""cabinetctl: the technician's tool."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.common import DEFAULT_CONFIG, preflight
from agent.config import EX_CONFIG, ConfigError, load_config
from agent.store.location import location_problems


def _cmd_config_check(args: argparse.Namespace) -> int:
    """The file, then what the daemon would refuse at start (keys, TLS files, socket place)."""
    try:
        cfg = load_config(args.path)
    except ConfigError as err:
        return _config_verdict(args, err.problems, [])
    # Where the store lives, then keys, TLS files and the socket's place.
    problems, notes = preflight(cfg)
    problems = [*location_problems(cfg.store), *problems]
    return _config_verdict(args, problems, notes, readers=len(cfg.readers))


def _config_verdict(
    args: argparse.Namespace, problems: list[str], notes: list[str], readers: int = 0
) -> int:
    for line in problems:  # people read stderr, one line per problem
        print(f"{args.path}: {line}", file=sys.stderr)
    if args.json:  # scripts read stdout: the verdict and the problems
        doc: dict[str, object] = {"ok": not problems, "path": str(args.path)}
        doc.update({"problems": problems} if problems else {"readers": readers})
        if notes:
            doc["notes"] = notes
        print(json.dumps(doc))
    elif problems:
        print(f"{args.path}: {len(problems)} problem(s); nothing started", file=sys.stderr)
    else:
        for line in notes:
            print(f"{args.path}: note: {line}")
        print(f"{args.path}: ok ({readers} reader(s))")
    return EX_CONFIG if problems else 0


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
    from agent.cli import tpm_cmd

    tpm_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
