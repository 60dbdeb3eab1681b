"""cabinetctl commands that talk to the running daemon over its control socket.

``status``, ``door unlock|lock``, ``queue stats|drain``, ``events tail``, ``audit verify|tail``.
Every command takes ``--json`` (one JSON document; streams print one JSON object per line) and
``--socket``/``--config`` to find the daemon. Failures read like advice and exit with sysexits.
"""

from __future__ import annotations

import argparse
import grp
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.control import protocol
from agent.control.client import (
    ControlClientError,
    ControlCommandError,
    ControlPermissionError,
    ControlProtocolError,
    ControlTimeoutError,
    DaemonNotRunningError,
    StreamEvent,
    StreamResult,
    SyncControlClient,
)
from agent.control.protocol import DEFAULT_SOCKET_PATH

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

FOLLOW_TIMEOUT_S = 30 * 86400.0  # `events tail --follow` waits for events as long as it runs
START_ADVICE = "start it with: systemctl start cabinet-agent"

_CODE_EXITS = {
    protocol.BUSY: EX_TEMPFAIL,
    protocol.RATE_LIMITED: EX_TEMPFAIL,
    protocol.TIMEOUT: EX_TEMPFAIL,
    protocol.SHUTTING_DOWN: EX_TEMPFAIL,
    protocol.FORBIDDEN: EX_NOPERM,
    protocol.INVALID_ARGS: EX_USAGE,
    protocol.BAD_REQUEST: EX_USAGE,
    protocol.UNKNOWN_COMMAND: EX_UNAVAILABLE,
    protocol.INTERNAL: EX_SOFTWARE,
    "unknown_reader": EX_USAGE,
    "door_failed": EX_TEMPFAIL,
    "store_failed": EX_TEMPFAIL,
    "no_door": EX_CONFIG,
    "no_publisher": EX_CONFIG,
    # agent/control_tech.py: the engine refused (busy), no supervisor badge, still starting
    "refused": EX_TEMPFAIL,
    "no_badge": EX_TEMPFAIL,
    "not_started": EX_TEMPFAIL,
}


class CliError(Exception):
    """A failure to report: ``message`` for the technician, ``exit_code`` from sysexits."""

    def __init__(self, exit_code: int, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.code = code


# -- connection helpers (also used by readers_cmd) ------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    """``--socket``, else ``[control] socket_path`` of ``--config``, else the packaged default."""
    explicit: Path | None = getattr(args, "socket", None)
    if explicit is not None:
        return explicit
    config: Path | None = getattr(args, "config", None)
    if config is not None:
        from agent.cli.common import load_or_exit

        cfg = load_or_exit(config)
        if not cfg.control.enabled:
            raise CliError(
                EX_UNAVAILABLE,
                f"{config}: [control] enabled = false: the daemon has no control socket",
                "control_disabled",
            )
        return cfg.control.socket_path
    from agent.cli.common import selected_cabinet

    if selected_cabinet is not None:  # no config file: the packaged per-cabinet default
        return DEFAULT_SOCKET_PATH.parent / f"{selected_cabinet}.sock"
    return DEFAULT_SOCKET_PATH


def translate(err: ControlClientError) -> CliError:
    """Map a client failure to advice and an exit status."""
    if isinstance(err, DaemonNotRunningError):
        return CliError(EX_UNAVAILABLE, f"{err} — {START_ADVICE}", "not_running")
    if isinstance(err, ControlPermissionError):
        return CliError(EX_NOPERM, str(err), protocol.FORBIDDEN)
    if isinstance(err, ControlTimeoutError):
        return CliError(EX_TEMPFAIL, f"{err}; it may be overloaded — retry", protocol.TIMEOUT)
    if isinstance(err, ControlProtocolError):
        return CliError(EX_PROTOCOL, f"unexpected answer from cabinet-agent: {err}", "protocol")
    if isinstance(err, ControlCommandError):
        return CliError(_CODE_EXITS.get(err.code, EX_SOFTWARE), err.message, err.code)
    return CliError(EX_TEMPFAIL, str(err), "connection")


def call(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None) -> Any:
    """One request/response; raises CliError."""
    for item in stream(args, cmd, cmd_args):
        if isinstance(item, StreamResult):
            return item.result
    return None


def stream(
    args: argparse.Namespace,
    cmd: str,
    cmd_args: dict[str, Any] | None = None,
    *,
    timeout_s: float | None = None,
) -> Iterator[StreamEvent | StreamResult]:
    """Yield a command's events and then its result; raises CliError."""
    path = socket_path(args)
    client = SyncControlClient(path, timeout_s=args.timeout, group=_socket_group(path))
    try:
        with client:
            yield from client.stream(cmd, cmd_args, timeout_s=timeout_s)
    except ControlClientError as err:
        raise translate(err) from None


def _socket_group(path: Path) -> str:
    """The group that owns the socket (what a refused user must join), else the usual name."""
    try:
        return grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        return protocol.TECHNICIAN_GROUP


def fail(args: argparse.Namespace, err: CliError) -> int:
    """Report a failure (stderr; plus a JSON document on stdout with --json); return its code."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": err.message, "code": err.code}))
    print(f"cabinetctl: {err.message}", file=sys.stderr)
    return err.exit_code


def guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command, turning CliError into its message and exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as err:
            return fail(args, err)
        except KeyboardInterrupt:
            return EX_OK if getattr(args, "follow", False) else 130

    return run


def emit_json(doc: Any) -> None:
    print(json.dumps(doc), flush=True)


# -- commands ----------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    st = call(args, "status")
    if args.json:
        emit_json(st)
        return EX_OK
    print(f"cabinet-agent {st['version']}  site {st['site_id']}  cabinet {st['cabinet_id']}")
    print(f"  started   {st['started_at']}   reloads {st.get('reloads', 0)}")
    engine = st.get("engine") or {}
    tech = engine.get("technician")
    during = f" — technician session by {tech['technician']} ({tech['via']})" if tech else ""
    print(f"  engine    {engine.get('phase', 'starting')}{during}")
    door = st.get("door")
    if door is not None:
        locked = {True: "locked", False: "released", None: "unknown"}[door["locked"]]
        fault = f"  FAULT: {door['fault']}" if door.get("fault") else ""
        print(f"  door      {door['state'] or 'unknown'}, lock {locked}{fault}")
    for r in st["readers"]:
        detail = f" — {r['detail']}" if r["detail"] else ""
        print(f"  reader    {r['id']:<12} {r['state']:<12} session {r['session']}{detail}")
    for b in st["badge_readers"]:
        detail = f" — {b['detail']}" if b["detail"] else ""
        print(f"  badge     {b['id']:<12} {b['state']}{detail}")
    ob = st.get("outbox")
    if ob is not None:
        age = "-" if ob["oldest_age_s"] is None else f"{ob['oldest_age_s']:.0f}s"
        print(f"  outbox    {ob['depth']} event(s), {ob['bytes']} bytes, oldest {age}")
    held = st.get("store") or {}
    if held.get("held_since"):
        print(f"  store     {held_text(held)}")
    broker = st.get("broker")
    if broker is None:
        print("  broker    not configured (no [mqtt] section)")
    else:
        print(f"  broker    {broker_line(broker, ob)}")
        commands = broker.get("commands")
        if isinstance(commands, dict):
            print(f"  commands  {commands_line(commands)}")
    last = st.get("last_event")
    if last is not None:
        print(f"  last      #{last['seq']} {last['type']} at {last['time']}")
    clock = st.get("clock")
    if clock is not None:
        print(f"  clock     {clock_line(clock)}")
    for kind, doc in (st.get("documents") or {}).items():
        print(f"  document  {_document_line(kind, doc)}")
    for alert in st.get("alerts", []):
        print(f"  alert     {alert}")
    return EX_OK


def _for(seconds: object) -> str:
    """``for 3 min 20 s`` (this run, on the monotonic clock), or nothing when unknown."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return ""
    s = int(seconds)
    if s < 60:
        text = f"{s} s"
    elif s < 3600:
        text = f"{s // 60} min {s % 60} s"
    else:
        text = f"{s // 3600} h {s % 3600 // 60} min"
    return f" for {text}"


def clock_line(clock: dict[str, Any]) -> str:
    """The agent's time and whether the wall clock agrees with it, in one line. How long it
    has been so comes from the monotonic clock: "since" is in the agent's time, which after a
    boot at 1970 is the build date carried on — read alone, it looks like an old fault."""
    if clock.get("trusted"):
        return f"{clock['time']} (wall clock trusted)"
    why = f" ({clock['reason']})" if clock.get("reason") else ""
    since = f"{_for(clock.get('for_s'))} (since agent time {clock.get('since') or '?'})"
    if clock.get("provisional"):
        return (
            f"PROVISIONAL{since}{why}: wall clock reads "
            f"{clock.get('wall')}, taken on faith, NOT trusted; expiry judged by the proven "
            f"time {clock.get('proven')} (time source {clock.get('sync_source')})"
        )
    if clock.get("basis") == "floor":
        how = (
            "from its persisted floor on the monotonic clock (a lower bound: downtime not counted)"
        )
    else:
        how = "carried on the monotonic clock from the last trusted reading"
    return (
        f"UNTRUSTED{since}{why}: wall clock reads {clock.get('wall')}, "
        f"agent time {clock['time']} ({how})"
    )


def _document_line(kind: str, doc: dict[str, Any]) -> str:
    if doc.get("state") == "none":
        line = f"{kind:<15} none installed"
    else:
        line = f"{kind:<15} v{doc['version']} {doc['state']}, expires {doc['expires_at']}"
        if doc.get("warning"):
            line += f"  WARNING: {doc['warning']}"
    refused = doc.get("refused")
    if refused:
        times = f" ({refused['count']}×)" if refused["count"] > 1 else ""
        line += f"  REFUSED{times} at {refused['at']}: {refused['reason']} — {refused['detail']}"
    return line


def broker_line(broker: dict[str, Any], outbox: dict[str, Any] | None) -> str:
    """One line on the broker connection: ``UNREACHABLE since …, N events waiting — why``."""
    waiting = "" if outbox is None else f", {outbox['depth']} event(s) waiting"
    state = broker.get("state") or ("connected" if broker.get("connected") else "connecting")
    why = f" — {broker['last_error']}" if broker.get("last_error") else ""
    if state == "connected":
        line = f"connected, {broker['acked']} acked, {broker['reconnects']} reconnects{waiting}"
        if broker.get("isolating"):
            line += (
                "; ISOLATING: one event at a time, the broker keeps refusing one without saying "
                "which (see the log)"
            )
        return line
    if state == "not_acknowledging":
        since = broker.get("not_acknowledging_since") or "?"
        span = _span_of(broker.get("not_acknowledging_for_s"))
        return (
            f"connected but NOT ACKNOWLEDGING since {since}{span}{waiting} — the broker accepts "
            f"the connection but acknowledges no publish (last: {broker.get('last_error')})"
        )
    if state == "taken_over":
        since = broker.get("taken_over_since") or "?"
        span = _span_of(broker.get("taken_over_for_s"))
        return (
            f"TAKEN OVER since {since}{span} — session taken over by another client with our "
            f"client id (cloned cabinet?): {broker.get('client_id', '?')}, "
            f"{broker.get('takeovers', 0)} takeover(s){waiting}; {broker.get('takeover_evidence')}"
        )
    if state == "unreachable":
        since = broker.get("unreachable_since") or "?"
        span = _span_of(broker.get("unreachable_for_s"))
        return f"UNREACHABLE since {since}{span}{waiting}{why}"
    return f"connecting{waiting}"


def commands_line(commands: dict[str, Any]) -> str:
    """The cmd-topic subscription: ``subscribed`` or ``not subscribed (broker refused: …)``."""
    counts = (
        f"{commands.get('accepted', 0)} accepted, {commands.get('rejected', 0)} refused, "
        f"{commands.get('dropped', 0)} dropped"
    )
    state = commands.get("state")
    if state == "refused":
        reasons = ", ".join(sorted(set((commands.get("refused") or {}).values()))) or "?"
        return (
            f"not subscribed (broker refused: {reasons}) — the cabinet cannot receive "
            f"allow-lists or asset registries; check the broker ACL for "
            f"{commands.get('filter', 'cmd/#')}; {counts}"
        )
    if state == "subscribed":
        return f"subscribed; {counts}"
    if state == "subscribing":
        return f"subscribing (no SUBACK yet); {counts}"
    return "not subscribed yet (no connection so far)"


def _span_of(seconds: object) -> str:
    return "" if not isinstance(seconds, int | float) else f" ({_span(float(seconds))})"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _cmd_door(args: argparse.Namespace) -> int:
    cmd = f"door.{args.door_command}"
    if not args.yes_i_am_on_site:
        raise CliError(
            EX_USAGE,
            f"refusing to {args.door_command} the cabinet door from a shell without "
            "--yes-i-am-on-site (someone must be at the cabinet; the action is audited)",
            protocol.INVALID_ARGS,
        )
    cmd_args: dict[str, Any] = {"confirm": True}
    if args.door_command == "unlock" and args.pulse is not None:
        cmd_args["pulse_s"] = args.pulse
    result = call(args, cmd, cmd_args)
    if args.json:
        emit_json(result)
    elif args.door_command == "unlock":
        pulse = f" for {result['pulse_s']:g}s" if result.get("pulse_s") else ""
        print(f"door {result['door_id']}: unlocked{pulse} (audit #{result['audit_seq']})")
        print(
            "note: the cabinet reports an opening now as a forced door; for maintenance, "
            "open a technician session: cabinetctl technician open --reason …",
            file=sys.stderr,
        )
    else:
        print(f"door {result['door_id']}: locked (audit #{result['audit_seq']})")
    return EX_OK


def _cmd_queue_stats(args: argparse.Namespace) -> int:
    st = call(args, "queue.stats")
    if args.json:
        emit_json(st)
        return EX_OK
    age = "-" if st["oldest_age_s"] is None else f"{st['oldest_age_s']:.0f}s"
    print(f"outbox: {st['depth']} event(s) waiting, {st['bytes']} bytes, oldest {age}")
    print(f"dead-lettered: {st['dead']}   next seq: {st['next_seq']}")
    if st["dropped"]:
        print("dropped by policy: " + ", ".join(f"p{k}={v}" for k, v in st["dropped"].items()))
    if st.get("held_since"):
        print(held_text(st))
    elif st["disk_full"]:
        print("DISK FULL: new events are held in memory until space is freed")
    return EX_OK


def held_text(held: dict[str, Any]) -> str:
    """``DISK FULL since …, N writes held in memory — why`` (status, queue stats)."""
    since = str(held["held_since"]).replace("+00:00", "Z")
    return (
        f"{str(held['held_reason']).upper()} since {since}, {held['held_writes']} writes held "
        f"in memory (a power loss would lose them) — {held['held_detail']}"
    )


def _cmd_queue_drain(args: argparse.Namespace) -> int:
    cmd_args = {"wait": args.wait, "timeout_s": args.timeout_drain}
    # The daemon emits progress every half second: a line wait of a few seconds is generous.
    items = stream(args, "queue.drain", cmd_args, timeout_s=args.timeout_drain + args.timeout)
    bar = _DrainBar() if args.wait and not args.json and sys.stdout.isatty() else None
    result: dict[str, Any] = {}
    try:
        for item in items:
            if isinstance(item, StreamEvent):
                if args.json:
                    emit_json({"progress": item.data})
                elif bar is not None:
                    bar.update(item.data)
            else:
                result = item.result
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        emit_json(result)
    elif result["drained"]:
        print(f"outbox drained: {result['start_depth']} event(s) in {result['elapsed_s']:.1f}s")
    elif args.wait:
        print(
            f"outbox not drained after {result['elapsed_s']:.1f}s: {result['depth']} event(s) "
            "left — check the broker (cabinetctl status)"
        )
    else:
        print(f"publisher nudged; {result['depth']} event(s) waiting")
    if args.wait and not result.get("drained"):
        return EX_TEMPFAIL
    return EX_OK


class _DrainBar:
    """A rich progress bar for ``queue drain --wait`` on a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("draining outbox"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} sent"),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("drain", total=1, state="")
        self.progress.start()

    def update(self, data: dict[str, Any]) -> None:
        total = max(1, int(data["start_depth"]))
        done = max(0, total - int(data["depth"]))
        state = "broker connected" if data["connected"] else "waiting for the broker"
        self.progress.update(self.task, total=total, completed=done, state=state)

    def stop(self) -> None:
        self.progress.stop()


def _cmd_events_tail(args: argparse.Namespace) -> int:
    cmd_args = {"n": args.n, "follow": args.follow}
    if not args.follow:
        events = call(args, "events.tail", cmd_args)["events"]
        if args.json:
            emit_json({"events": events})
        else:
            for e in events:
                _print_event(e)
        return EX_OK
    for item in stream(args, "events.tail", cmd_args, timeout_s=FOLLOW_TIMEOUT_S):
        if isinstance(item, StreamEvent):
            if args.json:
                emit_json(item.data)
            else:
                _print_event(item.data)
                sys.stdout.flush()
    return EX_OK


def _print_event(e: dict[str, Any]) -> None:
    print(f"#{e['seq']:<8} {e['time']}  {e['type']:<26} {e['size']} bytes")


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    report = call(args, "audit.verify")
    if args.json:
        emit_json(report)
    elif report["ok"]:
        span = (
            "empty"
            if report["first_seq"] is None
            else f"records {report['first_seq']}..{report['last_seq']}"
        )
        print(f"audit log intact: {report['checked']} record(s) checked ({span})")
        redacted = int(report.get("redacted", 0))
        if redacted:
            v1 = int(report.get("redacted_v1", 0))
            older = f"; {v1} written before v2 are kept as links only" if v1 else ""
            print(f"  {redacted} record(s) redacted on an erasure request (chain intact{older})")
    else:
        print("AUDIT LOG DAMAGED — keep this box as it is and tell the backend team:")
        for problem in report["problems"]:
            print(f"  {problem}")
    return EX_OK if report["ok"] else EX_DATAERR


def _cmd_audit_tail(args: argparse.Namespace) -> int:
    records = call(args, "audit.tail", {"n": args.n})["records"]
    if args.json:
        emit_json({"records": records})
        return EX_OK
    for r in records:
        details = json.dumps(r["details"], sort_keys=True, separators=(",", ":"))
        if r.get("redacted"):
            r = {**r, "actor": "[redacted]"}
            details = "[redacted]"
        print(f"#{r['seq']:<6} {r['at']}  {r['actor']:<16} {r['action']:<20} {details}")
    return EX_OK


# -- parser --------------------------------------------------------------------------------------


def add_connection_args(
    p: argparse.ArgumentParser, *, config_default: Path | None = None, timeout: bool = True
) -> None:
    """``--socket``, ``--config``, ``--timeout`` (unless the command has its own) and ``--json``."""
    p.add_argument(
        "--socket",
        type=Path,
        help=f"control socket (default: [control] socket_path of --config, else {DEFAULT_SOCKET_PATH})",
    )
    p.add_argument("--config", type=Path, default=config_default, help="agent config (TOML)")
    if timeout:
        p.add_argument(
            "--timeout", type=float, default=10.0, help="seconds to wait for the daemon to answer"
        )
    else:
        p.set_defaults(timeout=10.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the daemon commands to cabinetctl."""
    status = sub.add_parser("status", help="what the running agent is doing")
    add_connection_args(status)
    status.set_defaults(func=guarded(_cmd_status))

    door = sub.add_parser("door", help="move the door lock (on site only; audited)")
    dsub = door.add_subparsers(dest="door_command", required=True)
    for name, text in (("unlock", "release the lock (re-locks after the pulse)"), ("lock", "")):
        p = dsub.add_parser(name, help=text or "engage the lock now")
        add_connection_args(p)
        p.add_argument(
            "--yes-i-am-on-site",
            action="store_true",
            help="confirm that someone is at the cabinet (required)",
        )
        if name == "unlock":
            p.add_argument("--pulse", type=float, help="seconds before it re-locks")
        p.set_defaults(func=guarded(_cmd_door))
    from agent.cli import technician_cmd

    technician_cmd.register_door_test(dsub)

    queue = sub.add_parser("queue", help="the outbox of events waiting for the broker")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    qstats = qsub.add_parser("stats", help="depth, bytes, age of the outbox")
    add_connection_args(qstats)
    qstats.set_defaults(func=guarded(_cmd_queue_stats))
    drain = qsub.add_parser("drain", help="nudge the publisher; --wait until the outbox is empty")
    add_connection_args(drain, timeout=False)
    drain.add_argument("--wait", action="store_true", help="wait until the outbox is empty")
    drain.add_argument(
        "--timeout",
        dest="timeout_drain",
        type=float,
        default=60.0,
        help="give up waiting after S seconds (exit 75)",
    )
    drain.set_defaults(func=guarded(_cmd_queue_drain))

    events = sub.add_parser("events", help="committed events (metadata only, never contents)")
    esub = events.add_subparsers(dest="events_command", required=True)
    tail = esub.add_parser("tail", help="the latest events; --follow for new ones")
    add_connection_args(tail)
    tail.add_argument("-n", type=int, default=20, help="how many recent events (0..200)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.set_defaults(func=guarded(_cmd_events_tail))

    audit = sub.add_parser("audit", help="the hash-chained audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check the chain (exit 65 if tampered)")
    add_connection_args(verify)
    verify.set_defaults(func=guarded(_cmd_audit_verify))
    atail = asub.add_parser("tail", help="the latest audit records")
    add_connection_args(atail)
    atail.add_argument("-n", type=int, default=20, help="how many records (1..500)")
    atail.set_defaults(func=guarded(_cmd_audit_tail))
