"""The audit policy (DESIGN §5): what goes into the audit trail, who did what to the cabinet.

The records are hash-chained in the state store (``agent/store/audit_chain.py``: canonical
bytes and verification; ``Store.audit_append`` writes them). Badge decisions (pseudonyms only;
grants under the expired-allow-list grace policy), lock-outs, forced doors, clock steps,
documents installed or refused, door commands, config reloads and every control-socket command
end up here. Appends never block the caller: each is a named task in a supervised set, and
``flush()`` awaits them before the store closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.domain import events as ev
from agent.store.store import Store
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

MAX_PENDING = 256  # appends in flight; beyond this the store is stuck and we say so


class AuditTrail:
    """Turns committed domain events and operator actions into audit records."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self._store = store
        self._pending: set[asyncio.Task[int]] = set()
        self.dropped = 0
        self.failed = 0

    def record(self, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Append one record in the background (the order of calls is the chain's order)."""
        store = self._store()
        if store is None:
            return
        if len(self._pending) >= MAX_PENDING:
            # Never unbounded: count it, log it (no details: they may name a pseudonym).
            self.dropped += 1
            logger.error("audit: %d appends pending; %s not recorded", MAX_PENDING, action)
            return
        # Store.audit_append submits to the ordered write queue on its first step, so records
        # are chained in the order record() was called.
        task = asyncio.get_running_loop().create_task(
            store.audit_append(actor, action, details), name=f"audit:{action}"
        )
        self._pending.add(task)
        task.add_done_callback(self._done)

    async def append(self, actor: str, action: str, details: Mapping[str, Any]) -> int:
        """Append one record and wait until it is durable; returns its seq."""
        store = self._store()
        if store is None:
            raise CabinetError("the state store is not open")
        return await store.audit_append(actor, action, details)

    def on_events(self, events: Sequence[ev.Event]) -> None:
        """EngineRunner.on_committed listener: the events that concern people and the door."""
        for e in events:
            if isinstance(e, ev.AccessDenied):
                self.record(
                    e.actor, "access.denied", {"badge_reader": e.badge_reader, "reason": e.reason}
                )
            elif isinstance(e, ev.SessionOpened):
                actor = e.actors[0] if e.trigger == "badge" else "system"
                self.record(
                    actor,
                    "access.granted" if e.trigger == "badge" else "session.forced",
                    {"door_id": e.door_id, "session_id": str(e.session_id)},
                )
            elif isinstance(e, ev.TechnicianOpened | ev.TechnicianClosed):
                details: dict[str, Any] = {"session_id": str(e.session_id), "via": e.via}
                if isinstance(e, ev.TechnicianOpened):
                    details["reason"] = e.reason
                else:
                    details.update(ended=e.ended, restocked=e.restocked, removed=e.removed)
                self.record(e.technician, e.type, details)
            elif isinstance(e, ev.InventoryRebaselined):
                self.record(
                    e.technician,
                    e.type,
                    {"reason": e.reason, "added": e.added, "removed": e.removed, "tags": e.tags},
                )
            elif isinstance(e, ev.AccessLockout):
                self.record(
                    e.actor or "system",
                    f"access.lockout.{e.state}",
                    {"badge_reader": e.badge_reader, "denials": e.denials},
                )
            elif isinstance(e, ev.AccessGraceGranted):
                self.record(
                    e.actor,
                    "access.grace_granted",
                    {
                        "badge_reader": e.badge_reader,
                        "roles": list(e.roles),
                        "allow_list_version": e.allow_list_version,
                        "expired_at": e.expired_at.isoformat(),
                    },
                )
            elif isinstance(e, ev.AgentClockStep):
                self.record(
                    "system",
                    "clock.step",
                    {
                        "step_s": e.step_s,
                        "wall": e.wall.isoformat(),
                        "trusted": e.trusted,
                        "at_start": e.at_start,
                        "cause": e.cause,
                    },
                )
            elif isinstance(e, ev.DoorForced):
                self.record(
                    "system", "door.forced", {"door_id": e.door_id, "session_id": str(e.session_id)}
                )

    async def settle(self, timeout_s: float) -> None:
        """Wait (bounded, cancelling nothing) until the appends in flight now are written."""
        pending = list(self._pending)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for the appends in flight; called before the store closes."""
        pending = list(self._pending)
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                logger.error("audit: %d append(s) not finished before shutdown", len(late))
                await asyncio.wait(late, timeout=timeout_s)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            self.failed += 1
            logger.error("audit: append %s failed: %s", task.get_name(), type(err).__name__)
