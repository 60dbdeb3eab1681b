"""The daemon's control-socket commands (what ``cabinetctl`` calls when the daemon runs).

Every reply is metadata only: no event contents, never a raw badge id. Commands that act on
the cabinet (door, scan) are audited with the caller's uid; every command is also audited as
``cli.command`` by the server's audit hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from agent.audit_policy import AuditTrail
from agent.control.protocol import BUSY, INVALID_ARGS, CommandError
from agent.control.server import ControlServer, RequestContext
from agent.domain.engine import CabinetEngine, Phase
from agent.engine_runner import AppStats, RecentEvent
from agent.store.store import Store
from agent.store.types import OutboxStats
from drivers.door import Door, DoorCommandError
from drivers.errors import CabinetError
from drivers.types import ReaderDriver, ReaderState, TagRead

if TYPE_CHECKING:
    # Only for types: the publisher (and paho) is loaded only when a broker is configured.
    from agent.mqtt.publisher import Publisher

logger = logging.getLogger(__name__)

SCAN_MAX_S = 60.0
SCAN_PROGRESS_S = 0.5
SCAN_MAX_TAGS = 10_000
DRAIN_MAX_S = 3600.0
DRAIN_PROGRESS_S = 0.5
TAIL_MAX = 200
AUDIT_TAIL_MAX = 500
FOLLOW_WAKE_S = 5.0

# Error codes of this module (cabinetctl maps them to sysexits).
NO_DOOR = "no_door"
DOOR_FAILED = "door_failed"
NO_PUBLISHER = "no_publisher"
UNKNOWN_READER = "unknown_reader"
STORE_FAILED = "store_failed"


class ControlledAgent(Protocol):
    """What the commands read and drive in the running agent (``CabinetApp`` provides it)."""

    @property
    def store(self) -> Store | None: ...

    @property
    def publisher(self) -> Publisher | None: ...

    @property
    def engine(self) -> CabinetEngine | None: ...

    @property
    def readers(self) -> Sequence[ReaderDriver]: ...

    @property
    def door(self) -> Door | None: ...

    @property
    def audit(self) -> AuditTrail: ...

    @property
    def stats(self) -> AppStats: ...

    @property
    def committed(self) -> asyncio.Condition: ...

    @property
    def tag_taps(self) -> list[Callable[[Sequence[TagRead]], None]]: ...

    def status(self) -> dict[str, object]: ...

    def store_status(self) -> dict[str, object] | None: ...


def register_handlers(
    server: ControlServer, app: ControlledAgent, *, reloads: Callable[[], int]
) -> None:
    """Register every command on ``server``; ``reloads()`` counts the SIGHUP reloads so far."""
    scan_lock = asyncio.Lock()

    async def status(ctx: RequestContext) -> dict[str, object]:
        result = app.status()
        if app.store is not None:
            st = await _store_stats(app)
            result["outbox"] = {
                "depth": st.depth,
                "bytes": st.bytes,
                "oldest_age_s": st.oldest_age_s,
                "dead": st.dead,
                "next_seq": st.next_seq,
                "disk_full": st.disk_full,
            }
        result["broker"] = _broker(app)
        result["reloads"] = reloads()
        return result

    async def queue_stats(ctx: RequestContext) -> dict[str, object]:
        st = await _store_stats(app)
        return {
            "depth": st.depth,
            "bytes": st.bytes,
            "oldest_age_s": st.oldest_age_s,
            "dead": st.dead,
            "next_seq": st.next_seq,
            "dropped": {str(k): v for k, v in st.dropped.items()},
            "disk_full": st.disk_full,
            **(app.store_status() or {}),
            "broker": _broker(app),
        }

    async def readers_status(ctx: RequestContext) -> dict[str, object]:
        return {"readers": _reader_rows(app), "badge_readers": app.status()["badge_readers"]}

    async def readers_ping(ctx: RequestContext) -> dict[str, object]:
        only = _reader_ids(app, ctx.args.get("readers"))
        rows = [r for r in _reader_rows(app) if not only or r["id"] in only]
        for row in rows:
            row["ok"] = row["state"] in (ReaderState.ONLINE, ReaderState.INVENTORYING)
        return {"readers": rows}

    async def readers_scan(ctx: RequestContext) -> dict[str, object]:
        seconds = _number(ctx.args.get("seconds", 5.0), "seconds", 0.1, SCAN_MAX_S)
        only = _reader_ids(app, ctx.args.get("readers"))
        if scan_lock.locked():
            raise CommandError(BUSY, "another readers scan is running; try again when it ends")
        async with scan_lock:
            _require_idle(app, "scan")
            readers = [r for r in app.readers if not only or r.reader_id in only]
            table = _TagTable()
            app.tag_taps.append(table.add)
            interrupted: str | None = None
            try:
                for reader in readers:
                    await reader.start_inventory()
                started = time.monotonic()
                while (elapsed := time.monotonic() - started) < seconds:
                    engine = app.engine
                    if engine is not None and engine.phase is not Phase.IDLE:
                        # The engine now owns the readers: leave them as they are.
                        interrupted = f"the cabinet became busy ({engine.phase})"
                        break
                    await ctx.emit(
                        {
                            "elapsed_s": round(elapsed, 2),
                            "seconds": seconds,
                            "tags": len(table.rows),
                            "reads": table.reads,
                        }
                    )
                    await asyncio.sleep(min(SCAN_PROGRESS_S, max(0.0, seconds - elapsed)))
            finally:
                app.tag_taps.remove(table.add)
                engine = app.engine
                # Only stop what this command started: the engine may have begun a pass.
                if engine is None or engine.phase in (Phase.IDLE, Phase.UNLOCKED, Phase.OPEN):
                    for reader in readers:
                        with contextlib.suppress(CabinetError, OSError):
                            await reader.stop_inventory()
            app.audit.record(
                f"cli:uid={ctx.peer.uid}",
                "readers.scan",
                {"seconds": seconds, "tags": len(table.rows)},
            )
            return {
                "seconds": seconds,
                "tags": table.snapshot(),
                "reads": table.reads,
                "readers": [
                    {
                        "id": r.reader_id,
                        "state": str(r.health.state),
                        "detail": r.health.detail,
                        "ok": r.health.healthy,
                    }
                    for r in readers
                ],
                "interrupted": interrupted,
            }

    async def door_command(ctx: RequestContext) -> dict[str, object]:
        unlock = ctx.cmd == "door.unlock"
        if ctx.args.get("confirm") is not True:
            raise CommandError(
                INVALID_ARGS,
                f"{ctx.cmd} needs confirm=true (cabinetctl: --yes-i-am-on-site): it moves the "
                "lock of a real cabinet",
            )
        door = app.door
        if door is None:
            raise CommandError(NO_DOOR, "no [door] section in the config: there is no lock to move")
        pulse: float | None = None
        if unlock and ctx.args.get("pulse_s") is not None:
            pulse = _number(ctx.args["pulse_s"], "pulse_s", 0.5, 600.0)
        actor = f"cli:uid={ctx.peer.uid}"
        details: dict[str, Any] = {"door_id": door.door_id}
        if pulse is not None:
            details["pulse_s"] = pulse
        try:
            if unlock:
                await door.unlock(pulse)
            else:
                await door.lock()
        except (DoorCommandError, CabinetError, OSError) as err:
            await _audit_now(app, actor, ctx.cmd, {**details, "ok": False, "error": str(err)})
            raise CommandError(DOOR_FAILED, f"{ctx.cmd} failed: {err}") from None
        seq = await _audit_now(app, actor, ctx.cmd, {**details, "ok": True})
        return {"door_id": door.door_id, "locked": door.locked, "audit_seq": seq, "pulse_s": pulse}

    async def queue_drain(ctx: RequestContext) -> dict[str, object]:
        timeout = _number(ctx.args.get("timeout_s", 60.0), "timeout_s", 0.0, DRAIN_MAX_S)
        pub = app.publisher
        if pub is None:
            st = await _store_stats(app)
            raise CommandError(
                NO_PUBLISHER,
                f"no [mqtt] section in the config: the outbox ({st.depth} event(s)) is kept, "
                "never delivered",
            )
        pub.notify()
        started = time.monotonic()
        first = await _store_stats(app)
        st = first
        if ctx.args.get("wait", True):
            while st.depth > 0 and time.monotonic() - started < timeout:
                await ctx.emit(
                    {
                        "depth": st.depth,
                        "start_depth": first.depth,
                        "elapsed_s": round(time.monotonic() - started, 2),
                        "connected": bool(pub.stats.connected),
                        "acked": pub.stats.acked,
                    }
                )
                await asyncio.sleep(DRAIN_PROGRESS_S)
                st = await _store_stats(app)
        return {
            "drained": st.depth == 0,
            "depth": st.depth,
            "start_depth": first.depth,
            "dead": st.dead,
            "elapsed_s": round(time.monotonic() - started, 2),
            "broker": _broker(app),
        }

    async def events_tail(ctx: RequestContext) -> dict[str, object]:
        n = int(_number(ctx.args.get("n", 20), "n", 0, TAIL_MAX))
        follow = bool(ctx.args.get("follow", False))
        backlog = list(app.stats.recent)[-n:] if n else []
        if not follow:
            return {"events": [_event_meta(e) for e in backlog]}
        last = app.stats.last_event.seq if app.stats.last_event is not None else -1
        for e in backlog:
            await ctx.emit(_event_meta(e))
        # Ends when the caller disconnects or the daemon stops (the server cancels us).
        while True:
            async with app.committed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FOLLOW_WAKE_S):
                        await app.committed.wait()
            fresh = [e for e in list(app.stats.recent) if e.seq > last]
            for e in fresh:
                await ctx.emit(_event_meta(e))
                last = e.seq

    async def audit_verify(ctx: RequestContext) -> dict[str, object]:
        store = _store(app)
        try:
            report = await store.audit_verify()
        except CabinetError as err:
            raise CommandError(STORE_FAILED, f"cannot read the audit log: {err}") from None
        return {
            "ok": report.ok,
            "checked": report.checked,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "anchor_seq": report.anchor_seq,
            "problems": list(report.problems),
            "redacted": report.redacted,
            "redacted_v1": report.redacted_v1,
        }

    async def audit_tail(ctx: RequestContext) -> dict[str, object]:
        n = int(_number(ctx.args.get("n", 20), "n", 1, AUDIT_TAIL_MAX))
        store = _store(app)
        try:
            records = await store.audit_tail(n)
        except CabinetError as err:
            raise CommandError(STORE_FAILED, f"cannot read the audit log: {err}") from None
        return {
            "records": [
                {
                    "seq": r.seq,
                    "at": r.at.isoformat(),
                    "actor": r.actor,
                    "action": r.action,
                    "details": dict(r.details),
                    "hash": r.hash.hex(),
                    "redacted": r.redacted,
                }
                for r in records
            ]
        }

    server.register("status", status)
    server.register("queue.stats", queue_stats)
    server.register("readers.status", readers_status)
    server.register("readers.ping", readers_ping)
    server.register("readers.scan", readers_scan, timeout_s=SCAN_MAX_S + 30.0)
    server.register("door.unlock", door_command)
    server.register("door.lock", door_command)
    # Bounded by its own timeout_s argument (checked above), not by the server default.
    server.register("queue.drain", queue_drain, timeout_s=DRAIN_MAX_S + 30.0)
    server.register("events.tail", events_tail, timeout_s=None)
    server.register("audit.verify", audit_verify, timeout_s=300.0)
    server.register("audit.tail", audit_tail)


class _TagTable:
    """What ``readers.scan`` saw: one row per EPC (strongest antenna), bounded."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.reads = 0
        self.dropped = 0

    def add(self, reads: Sequence[TagRead]) -> None:
        for r in reads:
            self.reads += r.seen_count
            row = self.rows.get(r.epc)
            if row is None:
                if len(self.rows) >= SCAN_MAX_TAGS:
                    self.dropped += 1
                    continue
                row = self.rows[r.epc] = {
                    "epc": r.epc,
                    "reader": r.reader_id,
                    "antenna": r.antenna,
                    "peak_rssi_dbm": r.peak_rssi_dbm,
                    "reads": 0,
                }
            row["reads"] += r.seen_count
            peak = row["peak_rssi_dbm"]
            if r.peak_rssi_dbm is not None and (peak is None or r.peak_rssi_dbm > peak):
                row.update(reader=r.reader_id, antenna=r.antenna, peak_rssi_dbm=r.peak_rssi_dbm)

    def snapshot(self) -> list[dict[str, Any]]:
        return sorted(
            (dict(r) for r in self.rows.values()),
            key=lambda r: (r["reader"], r["antenna"], r["epc"]),
        )


def _reader_rows(app: ControlledAgent) -> list[dict[str, Any]]:
    now = time.monotonic()
    rows = []
    for r in app.readers:
        h = r.health
        reads = sum(
            n for (rid, _ant), n in app.stats.reads_by_antenna.items() if rid == r.reader_id
        )
        rows.append(
            {
                "id": r.reader_id,
                "state": str(h.state),
                "detail": h.detail,
                "session": h.session,
                "since": h.at.isoformat(),
                "antennas_connected": None
                if h.antennas_connected is None
                else sorted(h.antennas_connected),
                # Driver progress is on time.monotonic() (SystemClock in the daemon).
                "last_progress_age_s": round(now - r.last_progress, 3),
                "reads": reads,
            }
        )
    return rows


def _reader_ids(app: ControlledAgent, value: object) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandError(INVALID_ARGS, "readers must be a list of reader ids")
    known = {r.reader_id for r in app.readers}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CommandError(
            UNKNOWN_READER,
            f"unknown reader id(s): {', '.join(unknown)} (configured: {', '.join(sorted(known))})",
        )
    return set(value)


def _require_idle(app: ControlledAgent, what: str) -> None:
    engine = app.engine
    if engine is None:
        raise CommandError(BUSY, f"cannot {what}: the agent is still starting")
    if engine.phase is not Phase.IDLE:
        raise CommandError(
            BUSY,
            f"cannot {what} now: the cabinet is {engine.phase} (a door session or inventory "
            "pass is in progress); try again when it is idle",
        )


def _number(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(INVALID_ARGS, f"{name} must be a number")
    if not low <= value <= high:
        raise CommandError(INVALID_ARGS, f"{name} must be within {low:g}..{high:g}")
    return float(value)


def _store(app: ControlledAgent) -> Store:
    if app.store is None:
        raise CommandError(BUSY, "the state store is not open yet; retry in a moment")
    return app.store


async def _store_stats(app: ControlledAgent) -> OutboxStats:
    try:
        return await _store(app).stats()
    except CabinetError as err:
        raise CommandError(STORE_FAILED, f"cannot read the outbox: {err}") from None


async def _audit_now(app: ControlledAgent, actor: str, action: str, details: dict[str, Any]) -> int:
    try:
        return await app.audit.append(actor, action, details)
    except (CabinetError, ValueError) as err:
        logger.error("audit: %s not recorded: %s", action, err)
        return -1


def _broker(app: ControlledAgent) -> dict[str, Any] | None:
    pub = app.publisher
    if pub is None:
        return None
    st = pub.stats
    down_for = st.unreachable_for()
    since = st.unreachable_since
    up_since = st.connected_since
    no_ack_for = st.not_acknowledging_for()
    no_ack_since = st.not_acknowledging_since
    taken_for = st.taken_over_for()
    taken_since = st.taken_over_since
    return {
        "connected": bool(st.connected),
        # connected | not_acknowledging | taken_over | unreachable | connecting
        "state": str(st.state),
        "unreachable_since": None if since is None else since.isoformat(),
        "unreachable_for_s": None if down_for is None else round(down_for, 1),
        "connected_since": None if up_since is None else up_since.isoformat(),
        "not_acknowledging_since": None if no_ack_since is None else no_ack_since.isoformat(),
        "not_acknowledging_for_s": None if no_ack_for is None else round(no_ack_for, 1),
        "taken_over_since": None if taken_since is None else taken_since.isoformat(),
        "taken_over_for_s": None if taken_for is None else round(taken_for, 1),
        "takeovers": st.takeovers,
        "takeovers_total": st.takeovers_total,
        "takeover_evidence": st.takeover_evidence,
        "client_id": pub.client_id,
        "last_error": st.last_error,
        "connect_attempts": st.connect_attempts,
        "failed_attempts": st.connect_failures,
        "published": st.published,
        "acked": st.acked,
        "reconnects": st.reconnects,
        # one event at a time, to find one the broker refuses silently (docs/delivery.md §2)
        "isolating": st.isolating,
        "commands": {
            # not_yet | subscribing | subscribed | refused
            "state": str(st.commands),
            "refused": dict(st.commands_refused),
            "filter": pub.command_filter,
            "refusals": st.commands_refusals,
            "accepted": st.commands_accepted,
            "rejected": st.commands_rejected,
            "dropped": st.commands_dropped,
        },
    }


def _event_meta(e: RecentEvent) -> dict[str, Any]:
    return {"seq": e.seq, "type": e.type, "time": e.time.isoformat(), "size": e.size}
