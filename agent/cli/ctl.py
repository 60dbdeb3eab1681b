"""cabinetctl: the technician's tool."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli import common
from agent.cli.common import DEFAULT_CONFIG, preflight
from agent.config import EX_CONFIG, ConfigError, load_controller
from agent.store.location import location_problems


def _cmd_config_check(args: argparse.Namespace) -> int:
    """The file, then what the daemon would refuse at start (keys, TLS files, socket place)."""
    try:
        ctrl = load_controller(args.path)
        chosen = [common.load_selected(args.path)] if common.selected_cabinet else ctrl.cabinets
    except ConfigError as err:
        return _config_verdict(args, err.problems, [])
    problems: list[str] = []
    notes: list[str] = []
    for cfg in chosen:
        # Where the store lives, then keys, TLS files and the socket's place.
        found, noted = preflight(cfg)
        found = [*location_problems(cfg.store), *found]
        if ctrl.multi:  # each line names the cabinet it is about
            at = f"cabinets[{ctrl.names.index(cfg.cabinet.cabinet_id)}]."
            found = [at + line for line in found]
        problems += found
        notes += [n for n in noted if n not in notes]
    cabinets = [c.cabinet.cabinet_id for c in chosen] if ctrl.multi else []
    return _config_verdict(args, problems, notes, readers=len(ctrl.readers), cabinets=cabinets)


def _config_verdict(
    args: argparse.Namespace,
    problems: list[str],
    notes: list[str],
    readers: int = 0,
    cabinets: list[str] | None = None,
) -> int:
    for line in problems:  # people read stderr, one line per problem
        print(f"{args.path}: {line}", file=sys.stderr)
    if args.json:  # scripts read stdout: the verdict and the problems
        doc: dict[str, object] = {"ok": not problems, "path": str(args.path)}
        doc.update({"problems": problems} if problems else {"readers": readers})
        if cabinets and not problems:
            doc["cabinets"] = cabinets
        if notes:
            doc["notes"] = notes
        print(json.dumps(doc))
    elif problems:
        print(f"{args.path}: {len(problems)} problem(s); nothing started", file=sys.stderr)
    else:
        for line in notes:
            print(f"{args.path}: note: {line}")
        what = f"{readers} reader(s)"
        if cabinets:
            what += f", {len(cabinets)} cabinet(s): {', '.join(cabinets)}"
        print(f"{args.path}: ok ({what})")
    return EX_CONFIG if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinetctl", description=__doc__)
    parser.add_argument(
        "--cabinet",
        metavar="NAME",
        help="the cabinet (cabinet_id) to talk to when one controller drives several",
    )
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
    from agent.cli import technician_cmd

    technician_cmd.register(sub)
    from agent.cli import tpm_cmd

    tpm_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.selected_cabinet = args.cabinet
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
