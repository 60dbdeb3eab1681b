"""``cabinetctl readers ping|scan``: through the running daemon when its control socket answers,
otherwise directly to the configured readers (a reader accepts one client: never both)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cli import control_cmd
from agent.cli.common import DEFAULT_CONFIG, load_or_exit
from agent.cli.diag.connections import reader_advice
from agent.config import AgentConfig
from agent.control.client import StreamEvent
from drivers.registry import make_reader
from drivers.types import GpiEdge, ReaderDriver, ReaderHealth, ReaderState, SystemClock, TagRead

EX_OK = 0
EX_UNAVAILABLE = 69  # sysexits.h: a service (here: a reader) is unavailable


@dataclass
class TagRow:
    epc: str
    reader_id: str
    antenna: int
    peak_rssi_dbm: float | None
    reads: int = 0
    antennas: set[int] = field(default_factory=set)


class _CollectingSink:
    """ReaderSink for the CLI: aggregates reads per EPC and remembers every health change."""

    def __init__(self) -> None:
        self.rows: dict[str, TagRow] = {}
        self.health: dict[str, list[ReaderHealth]] = {}
        self.changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        for r in reads:
            row = self.rows.get(r.epc)
            if row is None:
                row = self.rows[r.epc] = TagRow(r.epc, r.reader_id, r.antenna, r.peak_rssi_dbm)
            row.reads += r.seen_count
            row.antennas.add(r.antenna)
            if r.peak_rssi_dbm is not None and (
                row.peak_rssi_dbm is None or r.peak_rssi_dbm > row.peak_rssi_dbm
            ):
                row.peak_rssi_dbm = r.peak_rssi_dbm
                row.antenna = r.antenna
                row.reader_id = r.reader_id
        self.changed.set()

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.setdefault(health.reader_id, []).append(health)
        self.changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        self.changed.set()


def _selected(cfg: AgentConfig, only: list[str] | None) -> list[Any]:
    readers = [r for r in cfg.readers if not only or r.id in only]
    if only:
        unknown = sorted(set(only) - {r.id for r in cfg.readers})
        if unknown:
            raise SystemExit(f"unknown reader id(s): {', '.join(unknown)}")
    return readers


async def _ping(cfg: AgentConfig, only: list[str] | None, timeout_s: float) -> list[dict[str, Any]]:
    sink = _CollectingSink()
    clock = SystemClock()
    drivers = [make_reader(rc, sink, clock) for rc in _selected(cfg, only)]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}

    def _verdict(d: ReaderDriver) -> dict[str, Any] | None:
        for h in sink.health.get(d.reader_id, []):
            if h.healthy:
                return {
                    "reader": d.reader_id,
                    "ok": True,
                    "detail": "configured and ready",
                    "seconds": round(time.monotonic() - started, 3),
                    "antennas_connected": sorted(h.antennas_connected)
                    if h.antennas_connected is not None
                    else None,
                }
            if h.state in (ReaderState.OFFLINE, ReaderState.FAILED) and h.session >= 1:
                return {
                    "reader": d.reader_id,
                    "ok": False,
                    "detail": f"{h.detail}; {reader_advice(h.state)}",
                }
        return None

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(), name=f"ping:{d.reader_id}") for d in drivers]
        deadline = time.monotonic() + timeout_s
        while len(results) < len(drivers) and time.monotonic() < deadline:
            for d in drivers:
                if d.reader_id not in results and (v := _verdict(d)) is not None:
                    results[d.reader_id] = v
            sink.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await sink.changed.wait()
        for t in tasks:
            t.cancel()
    for d in drivers:
        results.setdefault(
            d.reader_id,
            {"reader": d.reader_id, "ok": False, "detail": f"no answer within {timeout_s:g}s"},
        )
    return [results[d.reader_id] for d in drivers]


async def _scan(
    cfg: AgentConfig, only: list[str] | None, seconds: float, live: bool
) -> tuple[_CollectingSink, list[ReaderHealth]]:
    sink = _CollectingSink()
    clock = SystemClock()
    drivers = [make_reader(rc, sink, clock) for rc in _selected(cfg, only)]
    view = _LiveView(sink, seconds) if live else None
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(), name=f"scan:{d.reader_id}") for d in drivers]
        for d in drivers:
            await d.start_inventory()
        end = time.monotonic() + seconds
        try:
            if view:
                view.start()
            while (left := end - time.monotonic()) > 0:
                sink.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.25)):
                        await sink.changed.wait()
                if view:
                    view.update()
        finally:
            if view:
                view.stop()
            for t in tasks:
                t.cancel()
    return sink, [d.health for d in drivers]


class _LiveView:
    """A rich live table with a progress bar; only used on a terminal."""

    def __init__(self, sink: _CollectingSink, seconds: float) -> None:
        from rich.console import Console
        from rich.live import Live

        self.sink = sink
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.console = Console(stderr=False)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(title="cabinetctl readers scan", expand=False)
        for col in ("EPC", "reader", "antenna", "peak RSSI (dBm)", "reads"):
            table.add_column(col, justify="right" if col != "EPC" else "left")
        rows = sorted(self.sink.rows.values(), key=lambda r: (r.reader_id, r.antenna, r.epc))
        for r in rows[-40:]:
            rssi = f"{r.peak_rssi_dbm:.1f}" if r.peak_rssi_dbm is not None else "-"
            table.add_row(r.epc, r.reader_id, str(r.antenna), rssi, str(r.reads))
        elapsed = min(self.seconds, time.monotonic() - self.t0)
        bar = ProgressBar(total=self.seconds, completed=elapsed, width=40)
        summary = f"{len(self.sink.rows)} tags, {sum(r.reads for r in rows)} reads, {elapsed:.1f}/{self.seconds:g}s"
        return Group(table, bar, summary)

    def start(self) -> None:
        self.live.start()
        self.live.update(self._render())

    def update(self) -> None:
        self.live.update(self._render())

    def stop(self) -> None:
        self.live.update(self._render())
        self.live.stop()


def _daemon_args(args: argparse.Namespace) -> argparse.Namespace:
    # The config names the socket; a missing default config just means the default socket.
    config = args.config if args.socket is None and args.config.exists() else None
    return argparse.Namespace(
        socket=args.socket, config=config, timeout=min(args.timeout, 10.0), json=args.json
    )


def _ping_via_daemon(args: argparse.Namespace) -> int | None:
    """``readers.ping`` on the daemon; None if no daemon runs."""
    cmd_args: dict[str, Any] = {"readers": args.reader} if args.reader else {}
    try:
        result = control_cmd.call(_daemon_args(args), "readers.ping", cmd_args)
    except control_cmd.CliError as err:
        if err.code == "not_running":
            return None
        return control_cmd.fail(args, err)
    rows = [
        {
            "reader": r["id"],
            "ok": r["ok"],
            "detail": r["detail"] or str(r["state"]),
            "state": r["state"],
            "session": r["session"],
            "last_progress_age_s": r["last_progress_age_s"],
            "antennas_connected": r["antennas_connected"],
        }
        for r in result["readers"]
    ]
    if args.json:
        print(json.dumps({"readers": rows, "via": "daemon"}))
    else:
        for r in rows:
            age = r["last_progress_age_s"]
            # Clamped: a progress mark taken after the status (clocks read in other tasks) is
            # "now", not "-0.0s ago".
            progress = f", last progress {max(0.0, age):.1f}s ago" if age is not None else ""
            verdict = "OK" if r["ok"] else "FAILED"
            print(
                f"{r['reader']}: {verdict} ({r['state']}, session {r['session']}{progress}"
                f"{'' if r['ok'] else ' — ' + r['detail'] + '; ' + reader_advice(r['state'])})"
                " [via cabinet-agent]"
            )
    return EX_OK if all(r["ok"] for r in rows) else EX_UNAVAILABLE


def _scan_via_daemon(args: argparse.Namespace) -> int | None:
    """``readers.scan`` on the daemon; None if no daemon runs."""
    cmd_args: dict[str, Any] = {"seconds": args.seconds}
    if args.reader:
        cmd_args["readers"] = args.reader
    bar = _ScanBar(args.seconds) if not args.json and sys.stdout.isatty() else None
    result: dict[str, Any] = {}
    try:
        for item in control_cmd.stream(_daemon_args(args), "readers.scan", cmd_args):
            if isinstance(item, StreamEvent):
                if args.json:
                    print(json.dumps({"progress": item.data}), flush=True)
                elif bar is not None:
                    bar.update(item.data)
            else:
                result = item.result
    except control_cmd.CliError as err:
        if err.code == "not_running":
            return None
        return control_cmd.fail(args, err)
    finally:
        if bar is not None:
            bar.stop()
    failures = {r["id"]: r["detail"] or r["state"] for r in result["readers"] if not r["ok"]}
    if args.json:
        print(
            json.dumps(
                {
                    "seconds": result["seconds"],
                    "tags": result["tags"],
                    "readers_failed": failures,
                    "interrupted": result["interrupted"],
                    "via": "daemon",
                }
            )
        )
    else:
        print(f"{'EPC':<26} {'reader':<12} {'ant':>3} {'RSSI':>6} {'reads':>6}")
        for t in result["tags"]:
            rssi = f"{t['peak_rssi_dbm']:.1f}" if t["peak_rssi_dbm"] is not None else "-"
            print(f"{t['epc']:<26} {t['reader']:<12} {t['antenna']:>3} {rssi:>6} {t['reads']:>6}")
        print(f"{len(result['tags'])} tags (via cabinet-agent)")
    if result["interrupted"]:
        print(f"scan stopped early: {result['interrupted']}", file=sys.stderr)
    for rid, detail in failures.items():
        print(f"reader {rid}: {detail}", file=sys.stderr)
    if result["interrupted"]:
        return control_cmd.EX_TEMPFAIL
    return EX_UNAVAILABLE if failures else EX_OK


class _ScanBar:
    """Progress of a scan run by the daemon, on a terminal."""

    def __init__(self, seconds: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("scanning"), BarColumn(), TextColumn("{task.fields[tags]} tags")
        )
        self.task = self.progress.add_task("scan", total=seconds, tags=0)
        self.progress.start()

    def update(self, data: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=data["elapsed_s"], tags=data["tags"])

    def stop(self) -> None:
        self.progress.stop()


def _cmd_ping(args: argparse.Namespace) -> int:
    via_daemon = _ping_via_daemon(args)
    if via_daemon is not None:
        return via_daemon
    cfg = load_or_exit(args.config)
    results = asyncio.run(_ping(cfg, args.reader, args.timeout))
    if args.json:
        print(json.dumps({"readers": results}, indent=None))
    else:
        for r in results:
            if r["ok"]:
                ants = r.get("antennas_connected")
                extra = f", antennas connected {ants}" if ants is not None else ""
                print(f"{r['reader']}: OK ({r['seconds']:.2f}s{extra})")
            else:
                print(f"{r['reader']}: FAILED — {r['detail']}")
    return EX_OK if all(r["ok"] for r in results) else EX_UNAVAILABLE


def _cmd_scan(args: argparse.Namespace) -> int:
    via_daemon = _scan_via_daemon(args)
    if via_daemon is not None:
        return via_daemon
    cfg = load_or_exit(args.config)
    live = not args.json and sys.stdout.isatty()
    sink, health = asyncio.run(_scan(cfg, args.reader, args.seconds, live))
    rows = sorted(sink.rows.values(), key=lambda r: (r.reader_id, r.antenna, r.epc))
    ever_ok = {rid for rid, hs in sink.health.items() if any(h.healthy for h in hs)}
    failures = {
        h.reader_id: next(
            (x.detail for x in reversed(sink.health.get(h.reader_id, [])) if x.detail), ""
        )
        for h in health
        if h.reader_id not in ever_ok
    }
    if args.json:
        print(
            json.dumps(
                {
                    "seconds": args.seconds,
                    "tags": [
                        {
                            "epc": r.epc,
                            "reader": r.reader_id,
                            "antenna": r.antenna,
                            "peak_rssi_dbm": r.peak_rssi_dbm,
                            "reads": r.reads,
                        }
                        for r in rows
                    ],
                    "readers_failed": failures,
                }
            )
        )
    elif not live:
        print(f"{'EPC':<26} {'reader':<12} {'ant':>3} {'RSSI':>6} {'reads':>6}")
        for r in rows:
            rssi = f"{r.peak_rssi_dbm:.1f}" if r.peak_rssi_dbm is not None else "-"
            print(f"{r.epc:<26} {r.reader_id:<12} {r.antenna:>3} {rssi:>6} {r.reads:>6}")
        print(f"{len(rows)} tags")
    for rid, detail in failures.items():
        print(f"reader {rid}: no reads — {detail or 'never came online'}", file=sys.stderr)
    return EX_UNAVAILABLE if failures else EX_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``readers ping`` and ``readers scan`` to cabinetctl."""
    readers = sub.add_parser("readers", help="talk to the configured RFID readers")
    rsub = readers.add_subparsers(dest="readers_command", required=True)

    ping = rsub.add_parser("ping", help="connect to each reader and report whether it is ready")
    ping.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ping.add_argument("--reader", action="append", help="only this reader id (repeatable)")
    ping.add_argument("--timeout", type=float, default=20.0, help="seconds per attempt")
    ping.add_argument("--json", action="store_true")
    ping.add_argument("--socket", type=Path, help="the daemon's control socket (see --config)")
    ping.set_defaults(func=_cmd_ping)

    scan = rsub.add_parser("scan", help="inventory for N seconds and list the tags seen")
    scan.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    scan.add_argument("--reader", action="append", help="only this reader id (repeatable)")
    scan.add_argument("--seconds", type=float, default=5.0)
    scan.add_argument("--json", action="store_true")
    scan.add_argument("--socket", type=Path, help="the daemon's control socket (see --config)")
    scan.set_defaults(timeout=10.0)
    scan.set_defaults(func=_cmd_scan)
