"""The technician's control-socket commands: technician sessions, re-baselines, the door test.

``technician.open`` / ``technician.close`` / ``technician.status``, ``inventory.rebaseline``
and ``door.test``. The technician is the caller's local account as the kernel reports it
(SO_PEERCRED: ``uid:<n>``; the gid and groups go to the audit record), or, with
``technician.open`` ``badge: true``, the supervisor whose badge answers. Engine requests run on
the engine loop (``engine_call``); every action is audited before the reply, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from agent.audit_policy import AuditTrail
from agent.control.protocol import BUSY, INVALID_ARGS, CommandError
from agent.control.server import ControlServer, RequestContext
from agent.domain import events as ev
from agent.domain.engine import CabinetEngine, EngineOutput, TechnicianRefused
from agent.domain.now import Now
from agent.domain.technician import (
    DOOR_TEST_REQUEST_S,
    MAX_BADGE_WAIT_S,
    DoorTest,
    check_reason,
    uid_technician,
)
from drivers.door import Door, DoorCommandError
from drivers.errors import CabinetError
from drivers.types import DoorState

logger = logging.getLogger(__name__)

# Error codes of this module (cabinetctl maps them to sysexits).
REFUSED = "refused"  # the engine cannot do it now (busy, nothing to close)
NO_BADGE = "no_badge"  # no supervisor badge within the wait
NOT_STARTED = "not_started"
DOOR_TEST_PULSE_S = 1.0
# After the relock, the door test waits this long before it reads the sensor again: a door the
# release let spring open has said so by then (and it is still the test's opening).
DOOR_TEST_SETTLE_S = 1.0
REBASELINE_MAX_S = 300.0


class TechnicianAgent(Protocol):
    """What these commands need of the running agent (``CabinetApp`` provides it)."""

    @property
    def engine(self) -> CabinetEngine | None: ...

    @property
    def door(self) -> Door | None: ...

    @property
    def audit(self) -> AuditTrail: ...

    @property
    def committed(self) -> asyncio.Condition: ...

    async def engine_call(
        self, call: Callable[[CabinetEngine, Now], EngineOutput], timeout_s: float = 10.0
    ) -> list[ev.Event]: ...


def register_technician_handlers(server: ControlServer, app: TechnicianAgent) -> None:
    """Register the technician's commands on ``server``."""

    async def technician_open(ctx: RequestContext) -> dict[str, object]:
        reason = _reason(ctx.args.get("reason"))
        who = uid_technician(ctx.peer.uid)
        engine = _engine(app)
        caller = _caller(ctx)
        if ctx.args.get("badge") is True:
            wait_s = _number(ctx.args.get("wait_s", 60.0), "wait_s", 1.0, MAX_BADGE_WAIT_S)
            await _call(app, lambda e, now: e.await_supervisor(who, reason, wait_s, now))
            await _audit(app, ctx, "technician.await_badge", {**caller, "reason": reason})
            # The supervisor's technician.opened is a commit; the wait's lapse is not (the
            # timeout, a second longer than the engine's, covers it). Every second the caller
            # is told it still waits: a caller gone (cabinetctl interrupted) ends the wait,
            # else the next supervisor's badge would open a session nobody asked for any more.
            try:
                await _await_supervisor(app, ctx, engine, wait_s)
            except Exception:  # the caller gone; a cancel (the daemon stopping) keeps the wait
                if engine.awaiting_supervisor:
                    with contextlib.suppress(CommandError):
                        await _call(app, lambda e, now: e.cancel_supervisor_wait(now))
                raise
            tech = engine.technician
            if tech is None or tech.via != "badge":
                raise CommandError(
                    NO_BADGE, f"no supervisor badge within {wait_s:g} s; nothing was opened"
                )
            return _session_reply(engine, tech.session_id, tech.via, tech.who)
        events = await _call(app, lambda e, now: e.open_technician(who, reason, now))
        opened = next(e for e in events if isinstance(e, ev.TechnicianOpened))
        seq = await _audit(
            app,
            ctx,
            "technician.open",
            {**caller, "reason": reason, "session_id": str(opened.session_id)},
        )
        return {**_session_reply(engine, opened.session_id, "cli", who), "audit_seq": seq}

    async def technician_close(ctx: RequestContext) -> dict[str, object]:
        events = await _call(app, lambda e, now: e.close_technician(now))
        closed = next((e for e in events if isinstance(e, ev.TechnicianClosed)), None)
        details: dict[str, Any] = dict(_caller(ctx))
        if closed is not None:
            details["session_id"] = str(closed.session_id)
        seq = await _audit(app, ctx, "technician.close", details)
        return {
            "closed": closed is not None,
            "session_id": None if closed is None else str(closed.session_id),
            "audit_seq": seq,
        }

    async def technician_status(ctx: RequestContext) -> dict[str, object]:
        engine = _engine(app)
        tech = engine.technician
        return {
            "phase": str(engine.phase),
            "awaiting_supervisor": engine.awaiting_supervisor,
            "door_test": engine.door_test is not None,
            "session": None
            if tech is None
            else {
                "session_id": str(tech.session_id),
                "technician": tech.who,
                "via": tech.via,
                "reason": tech.reason,
            },
        }

    async def inventory_rebaseline(ctx: RequestContext) -> dict[str, object]:
        reason = _reason(ctx.args.get("reason"))
        who = uid_technician(ctx.peer.uid)
        engine = _engine(app)
        await _call(app, lambda e, now: e.rebaseline(who, reason, now))
        wanted = engine.rebaselines
        seq = await _audit(app, ctx, "inventory.rebaseline", {**_caller(ctx), "reason": reason})
        started = time.monotonic()
        while engine.rebaseline_state == "running" and engine.rebaselines == wanted:
            elapsed = time.monotonic() - started
            if elapsed > REBASELINE_MAX_S:
                raise CommandError(BUSY, "the re-baseline inventory is still running; see status")
            await ctx.emit({"elapsed_s": round(elapsed, 1), "phase": str(engine.phase)})
            await asyncio.sleep(0.5)
        state = engine.rebaseline_state
        result = engine.rebaseline_result
        reply: dict[str, object] = {"state": state, "audit_seq": seq}
        if state == "done" and result is not None:
            reply.update(added=result.added, removed=result.removed, tags=result.tags)
        elif state == "incomplete":
            reply["detail"] = "the inventory was incomplete (a reader?): the baseline is unchanged"
        elif state == "interrupted":
            reply["detail"] = "a badge opened the cabinet meanwhile: the baseline is unchanged"
        return reply

    async def door_test(ctx: RequestContext) -> dict[str, object]:
        if ctx.args.get("confirm") is not True:
            raise CommandError(
                INVALID_ARGS,
                "door.test needs confirm=true (cabinetctl: --yes-i-am-on-site): it moves the "
                "lock of a real cabinet",
            )
        door = app.door
        if door is None:
            raise CommandError("no_door", "no [door] section in the config: nothing to test")
        engine = _engine(app)
        who = uid_technician(ctx.peer.uid)
        # The test runs through the engine: it holds the door (no badge granted, no session
        # or inventory started) from here to end_door_test, so the lock is the test's alone.
        try:
            await _call(app, lambda e, now: e.begin_door_test(who, now))
        except CommandError as err:
            raise CommandError(BUSY, err.message) from None
        test = engine.door_test
        assert test is not None

        async def release() -> None:
            await _call(app, lambda e, now: e.door_test_release(now))

        try:
            steps = await _door_steps(door, before_release=release, settle_s=DOOR_TEST_SETTLE_S)
        except asyncio.CancelledError:
            # The daemon is stopping, or the request ran out of time, mid-test: the lock may
            # have moved, so the trail says a test began and did not finish.
            interrupted = {
                **_caller(ctx),
                "door_id": door.door_id,
                "ok": False,
                "failed": ["interrupted"],
                "badges_refused": test.refused,
            }
            await _audit(app, ctx, "door.test", interrupted)
            raise
        finally:
            # Else it lapses by itself (DOOR_TEST_MAX_S), and the engine relocks then.
            with contextlib.suppress(CommandError):
                await _call(app, lambda e, now: e.end_door_test(now))
        _door_opened(steps, test)
        ok = all(s["ok"] for s in steps)
        details = {
            **_caller(ctx),
            "door_id": door.door_id,
            "ok": ok,
            "failed": _failed(steps),
            "badges_refused": test.refused,
        }
        if test.session_id is not None:
            details["session_id"] = str(test.session_id)
        seq = await _audit(app, ctx, "door.test", details)
        return {
            "door_id": door.door_id,
            "ok": ok,
            "steps": steps,
            "badges_refused": test.refused,
            "session_id": None if test.session_id is None else str(test.session_id),
            "audit_seq": seq,
        }

    server.register("technician.open", technician_open, timeout_s=MAX_BADGE_WAIT_S + 30.0)
    server.register("technician.close", technician_close)
    server.register("technician.status", technician_status)
    server.register("inventory.rebaseline", inventory_rebaseline, timeout_s=REBASELINE_MAX_S + 30)
    server.register("door.test", door_test, timeout_s=DOOR_TEST_REQUEST_S)


async def _door_steps(
    door: Door,
    *,
    before_release: Callable[[], Awaitable[None]] | None = None,
    settle_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Sensor, lock, unlock, relock, sensor (``settle_s`` after the relock): one verdict per
    step; every step runs. ``before_release`` tells the engine the lock is about to be
    released (a CommandError from it fails the unlock step without moving the lock)."""
    steps: list[dict[str, Any]] = []

    def sensor(name: str) -> None:
        state = door.state
        if state is None:
            steps.append(_step(name, ok=False, detail="the door sensor has not reported"))
        else:
            steps.append(
                _step(name, ok=state is DoorState.CLOSED, detail=f"door sensor reads {state}")
            )

    async def move(name: str, *, release: bool) -> None:
        if release and before_release is not None:
            try:
                await before_release()
            except CommandError as err:
                steps.append(_step(name, ok=False, detail=f"not released: {err.message}"))
                return
        try:
            if release:
                await door.unlock(DOOR_TEST_PULSE_S)
            else:
                await door.lock()
        except (DoorCommandError, CabinetError, OSError) as err:
            steps.append(_step(name, ok=False, detail=str(err)))
            return
        want = not release
        steps.append(
            _step(
                name,
                ok=door.locked is want,
                detail=("locked" if want else "released")
                if door.locked is want
                else f"lock state {door.locked} after the command",
            )
        )

    sensor("sensor")
    await move("lock", release=False)
    await move("unlock", release=True)
    await move("relock", release=False)
    if settle_s > 0:
        await asyncio.sleep(settle_s)
    sensor("sensor after")
    return steps


def _door_opened(steps: list[dict[str, Any]], test: DoorTest) -> None:
    """The last step says so when the door opened during the test (the sensor may read closed
    again by then): the technician session it started, or the forced door."""
    last = steps[-1]
    if test.session_id is not None:
        last.update(
            ok=False,
            detail=f"the door was opened during the test: technician session {test.session_id} "
            "is in your name; shut the door, its scan books what moved",
        )
    elif test.forced:
        last.update(
            ok=False,
            detail="the door opened while the lock was engaged: reported as forced (door.forced)",
        )


def _step(name: str, *, ok: bool, detail: str) -> dict[str, Any]:
    return {"step": name, "ok": ok, "detail": detail[:200]}


def _failed(steps: Sequence[dict[str, Any]]) -> list[str]:
    return [str(s["step"]) for s in steps if not s["ok"]]


def _session_reply(engine: CabinetEngine, session_id: object, via: str, who: str) -> dict[str, Any]:
    return {
        "session_id": str(session_id),
        "technician": who,
        "via": via,
        "phase": str(engine.phase),
        "unlock_s": engine.config.technician_unlock_s,
    }


def _caller(ctx: RequestContext) -> dict[str, Any]:
    """Who asked, as the kernel says (the audit record's details)."""
    return {"uid": ctx.peer.uid, "gid": ctx.peer.gid, "groups": list(ctx.peer.groups)[:32]}


def _reason(value: object) -> str:
    try:
        return check_reason(value)
    except TechnicianRefused as err:
        raise CommandError(INVALID_ARGS, str(err)) from None


def _number(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(INVALID_ARGS, f"{name} must be a number")
    if not low <= value <= high:
        raise CommandError(INVALID_ARGS, f"{name} must be within {low:g}..{high:g}")
    return float(value)


def _engine(app: TechnicianAgent) -> CabinetEngine:
    engine = app.engine
    if engine is None:
        raise CommandError(NOT_STARTED, "the agent is still starting; retry in a moment")
    return engine


async def _await_supervisor(
    app: TechnicianAgent, ctx: RequestContext, engine: CabinetEngine, wait_s: float
) -> None:
    """Until the supervisor's badge opened the session or ``wait_s`` (plus a second) passed;
    a progress line to the caller every second (raises once the caller is gone)."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s + 1.0):
            while engine.awaiting_supervisor:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0), app.committed:
                        await app.committed.wait_for(lambda: not engine.awaiting_supervisor)
                if engine.awaiting_supervisor:
                    await ctx.emit(
                        {
                            "awaiting_supervisor": True,
                            "elapsed_s": round(time.monotonic() - started),
                        }
                    )


async def _call(
    app: TechnicianAgent, call: Callable[[CabinetEngine, Now], EngineOutput]
) -> list[ev.Event]:
    try:
        return await app.engine_call(call)
    except TechnicianRefused as err:
        raise CommandError(REFUSED, str(err)) from None
    except TimeoutError:
        raise CommandError(BUSY, "the engine did not take the request in time; retry") from None


async def _audit(
    app: TechnicianAgent, ctx: RequestContext, action: str, details: dict[str, Any]
) -> int:
    try:
        return await app.audit.append(f"cli:uid={ctx.peer.uid}", action, details)
    except (CabinetError, ValueError) as err:
        logger.error("audit: %s not recorded: %s", action, err)
        return -1
