"""cabinetctl commands of a technician's visit: ``technician open|close|status``, ``inventory
rebaseline`` and ``door test`` (through the daemon's control socket; audited with your uid)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.cli.control_cmd import (
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CliError,
    add_connection_args,
    call,
    emit_json,
    guarded,
    stream,
)
from agent.control import protocol
from agent.control.client import StreamEvent

REBASELINE_WAIT_S = 330.0


def _cmd_open(args: argparse.Namespace) -> int:
    cmd_args: dict[str, Any] = {"reason": args.reason}
    wait = None
    if args.badge:
        cmd_args.update(badge=True, wait_s=args.wait)
        wait = args.wait + args.timeout
        if not args.json:
            print(f"present a supervisor badge at the cabinet within {args.wait:g} s …", flush=True)
    result = _last(stream(args, "technician.open", cmd_args, timeout_s=wait))
    if args.json:
        emit_json(result)
        return EX_OK
    by = "supervisor badge" if result["via"] == "badge" else result["technician"]
    audit = f" (audit #{result['audit_seq']})" if "audit_seq" in result else ""
    print(
        f"technician session {result['session_id']} open by {by}{audit}: the door is unlocked "
        f"for {result['unlock_s']:g} s; what you take out or put in is reported as "
        "removed/restocked; the session ends once the door is closed and the scan is over"
    )
    return EX_OK


def _cmd_close(args: argparse.Namespace) -> int:
    result = call(args, "technician.close")
    if args.json:
        emit_json(result)
    elif result["closed"]:
        print(f"technician session {result['session_id']} closed; the door is locked")
    else:
        print("no supervisor badge is awaited any more")
    return EX_OK


def _cmd_status(args: argparse.Namespace) -> int:
    result = call(args, "technician.status")
    if args.json:
        emit_json(result)
        return EX_OK
    session = result["session"]
    if session is not None:
        print(
            f"technician session {session['session_id']} by {session['technician']} "
            f"({session['via']}): {session['reason']} — cabinet {result['phase']}"
        )
    elif result["awaiting_supervisor"]:
        print("waiting for a supervisor badge to open a technician session")
    elif result.get("door_test"):
        print(f"a door test holds the door (cabinet {result['phase']})")
    else:
        print(f"no technician session (cabinet {result['phase']})")
    return EX_OK


def _cmd_rebaseline(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}
    for item in stream(
        args, "inventory.rebaseline", {"reason": args.reason}, timeout_s=REBASELINE_WAIT_S
    ):
        if isinstance(item, StreamEvent):
            if not args.json and sys.stdout.isatty():
                print(f"\rinventory running … {item.data['elapsed_s']:.0f} s", end="", flush=True)
        else:
            result = item.result
    if not args.json and sys.stdout.isatty():
        print()
    if args.json:
        emit_json(result)
    elif result["state"] == "done":
        print(
            f"baseline replaced (audit #{result['audit_seq']}): {result['tags']} tag(s), "
            f"{result['added']} added, {result['removed']} removed"
        )
    else:
        print(f"re-baseline {result['state']}: {result.get('detail', '')}", file=sys.stderr)
    return EX_OK if result.get("state") == "done" else EX_TEMPFAIL


def _cmd_door_test(args: argparse.Namespace) -> int:
    if not args.yes_i_am_on_site:
        raise CliError(
            EX_USAGE,
            "refusing to test the cabinet door from a shell without --yes-i-am-on-site (it "
            "moves the lock; someone must be at the cabinet; the test is audited)",
            protocol.INVALID_ARGS,
        )
    result = call(args, "door.test", {"confirm": True})
    if args.json:
        emit_json(result)
    else:
        for step in result["steps"]:
            verdict = "PASS" if step["ok"] else "FAIL"
            print(f"{verdict}  {step['step']:<13} {step['detail']}")
        total = "PASS" if result["ok"] else "FAIL"
        print(f"{total}  door {result['door_id']} (audit #{result['audit_seq']})")
    return EX_OK if result["ok"] else EX_UNAVAILABLE


def _last(items: Any) -> Any:
    result: Any = None
    for item in items:
        if not isinstance(item, StreamEvent):
            result = item.result
    return result


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``technician`` and ``inventory`` to cabinetctl."""
    tech = sub.add_parser(
        "technician", help="a technician session: maintenance without check-outs (audited)"
    )
    tsub = tech.add_subparsers(dest="technician_command", required=True)
    p = tsub.add_parser(
        "open",
        help="unlock for maintenance: items moved are restocked/removed, the opening is not forced",
    )
    add_connection_args(p)
    p.add_argument(
        "--reason",
        required=True,
        help="why (1-200 characters; recorded, audited, sent to the backend: name tools, not people)",
    )
    p.add_argument(
        "--badge",
        action="store_true",
        help="a supervisor's badge opens it (the supervisor is the technician)",
    )
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the badge")
    p.set_defaults(func=guarded(_cmd_open))
    p = tsub.add_parser("close", help="end a technician session whose door has not opened")
    add_connection_args(p)
    p.set_defaults(func=guarded(_cmd_close))
    p = tsub.add_parser("status", help="the technician session in progress, if any")
    add_connection_args(p)
    p.set_defaults(func=guarded(_cmd_status))

    inv = sub.add_parser("inventory", help="the cabinet's contents")
    isub = inv.add_subparsers(dest="inventory_command", required=True)
    p = isub.add_parser(
        "rebaseline",
        help="inventory now and make it the baseline: nobody charged, nothing missing (audited)",
    )
    add_connection_args(p)
    p.add_argument(
        "--reason",
        required=True,
        help="why (1-200 characters; recorded, audited, sent to the backend: name tools, not people)",
    )
    p.set_defaults(func=guarded(_cmd_rebaseline))


def register_door_test(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``door test`` beside ``door unlock|lock``."""
    p = dsub.add_parser("test", help="lock, unlock, relock and sensor check: PASS/FAIL per step")
    add_connection_args(p)
    p.add_argument(
        "--yes-i-am-on-site",
        action="store_true",
        help="confirm that someone is at the cabinet (required)",
    )
    p.set_defaults(func=guarded(_cmd_door_test))
