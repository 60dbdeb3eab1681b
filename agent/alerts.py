"""The agent's own alerts: the lines ``cabinetctl status`` shows, store alerts throttled on
their way to the backend, problems the other parts report once per episode, and the events
(``agent.alert``, ``agent.clock_step``) they become.

Nothing here writes to the store: every alert reaches the backend as an event the engine loop
commits (it is the outbox's only sequence writer), so this module hands alerts to the engine's
input queue and builds the events the engine runner seals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.domain import events as ev
from agent.domain.ids import Uuid7Generator
from agent.domain.now import Now
from agent.domain.stamp import Stamper
from agent.store.types import StoreAlert
from agent.trusted_time import ClockStep

logger = logging.getLogger(__name__)

ALERT_INTERVAL_S = 10.0
STATUS_LINES = 50
# A store that failed for good cannot take the alert event either: those are only logged.
# OVER_CAP and WRITE_RETRYING repeat on every write while they last: status and logs show them.
_NOT_SENT = frozenset({"store.failed", "store.over_cap", "store.write_retrying"})
_QUEUED = 256  # store alerts waiting for the throttle; beyond this they are only in status


@dataclass(frozen=True, slots=True)
class PartAlert:
    """An alert from a part other than the store (the publisher: session taken over, command
    subscriptions refused), raised once per episode; goes out as an ``agent.alert`` event."""

    kind: str
    detail: str


class AlertLines:
    """The recent alert lines of ``cabinetctl status`` (bounded); resolved ones are removed."""

    def __init__(self, maxlen: int = STATUS_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=maxlen)

    def add(self, line: str) -> None:
        self._lines.append(line)

    def resolve(self, prefix: str) -> None:
        """Drop the lines that start with ``prefix`` (the condition they report is over)."""
        if any(line.startswith(prefix) for line in self._lines):
            kept = [line for line in self._lines if not line.startswith(prefix)]
            self._lines.clear()
            self._lines.extend(kept)

    def recent(self, n: int) -> list[str]:
        return list(self._lines)[-n:]


class Alerts:
    """Store alerts and part alerts on their way to the backend (through the engine loop).

    ``put`` and ``put_nowait`` enqueue into the engine's input queue.
    """

    def __init__(
        self,
        lines: AlertLines,
        put: Callable[[StoreAlert], Awaitable[None]],
        put_nowait: Callable[[PartAlert], None],
    ) -> None:
        self.lines = lines
        self._put = put
        self._put_nowait = put_nowait
        self._store_alerts: asyncio.Queue[StoreAlert] = asyncio.Queue(_QUEUED)

    def store_alert(self, alert: StoreAlert) -> None:
        """The store's ``on_alert``: status now, the backend once the throttle lets it go."""
        self.lines.add(f"{alert.kind}: {alert.detail}")
        with contextlib.suppress(asyncio.QueueFull):
            self._store_alerts.put_nowait(alert)

    def part_alert(self, kind: str, detail: str) -> None:
        """A part reports a problem (once per episode): status, log, and the backend."""
        self.lines.add(f"{kind}: {detail}")
        try:
            self._put_nowait(PartAlert(kind, detail))
        except asyncio.QueueFull:
            logger.error("alert %s not sent to the backend: the input queue is full", kind)

    async def run(self) -> None:
        """Log each store alert and send it to the backend as an ``agent.alert`` event.

        At most one event per kind every ALERT_INTERVAL_S; alerts in between are merged (drop
        counts summed), so an alert event that itself makes the outbox evict a row cannot
        start a cascade of alerts.
        """
        pending: dict[str, StoreAlert] = {}
        last_sent: dict[str, float] = {}
        while True:
            alert: StoreAlert | None = None
            # Asleep until an alert comes or a merged one may go: nothing to send, no timer.
            due = min(
                (last_sent.get(kind, float("-inf")) + ALERT_INTERVAL_S for kind in pending),
                default=None,
            )
            wait = None if due is None else max(0.0, due - time.monotonic())
            try:
                async with asyncio.timeout(wait):
                    alert = await self._store_alerts.get()
            except TimeoutError:
                pass
            if alert is not None:
                logger.warning("state store alert %s: %s", alert.kind, alert.detail)
                if alert.kind not in _NOT_SENT:
                    pending[alert.kind] = merge_alerts(pending.get(alert.kind), alert)
            mono = time.monotonic()
            for kind in list(pending):
                if mono - last_sent.get(kind, float("-inf")) >= ALERT_INTERVAL_S:
                    last_sent[kind] = mono
                    await self._put(pending.pop(kind))


class AgentEvents:
    """The agent's own events about itself, stamped like the engine's (ids, time, cabinet)."""

    def __init__(self, site_id: str, cabinet_id: str) -> None:
        self.site_id = site_id
        self.cabinet_id = cabinet_id
        self._stamp = Stamper(site_id, cabinet_id, Uuid7Generator())

    def store_alert(self, alert: StoreAlert, now: Now) -> ev.Event:
        return ev.AgentAlert(
            **self._stamp(now),
            kind=str(alert.kind),
            detail=alert.detail[:200],
            dropped={str(k): v for k, v in alert.dropped.items()},
            dropped_bytes=alert.dropped_bytes,
            seqs=list(alert.seqs[:1000]),
        )

    def part_alert(self, alert: PartAlert, now: Now) -> ev.Event:
        return ev.AgentAlert(
            **self._stamp(now),
            kind=alert.kind,
            detail=alert.detail[:200],
        )

    def audit_anchor(self, links: tuple[tuple[int, bytes, bytes], ...], now: Now) -> ev.Event:
        seq, _prev, head = links[-1]
        return ev.AuditAnchor(
            **self._stamp(now),
            head_seq=seq,
            head_hash=head.hex(),
            links=[ev.AuditLink(seq=s, prev_hash=p.hex(), hash=h.hex()) for s, p, h in links],
        )

    def clock_step(self, step: ClockStep, now: Now) -> ev.Event:
        return ev.AgentClockStep(
            **self._stamp(now),
            step_s=round(step.step_s, 3),
            wall=step.wall,
            trusted=step.trusted,
            at_start=step.at_start,
            cause=step.cause,
        )


def merge_alerts(old: StoreAlert | None, new: StoreAlert) -> StoreAlert:
    """One alert standing for several of the same kind (drop counts summed)."""
    if old is None:
        return new
    dropped = dict(old.dropped)
    for prio, n in new.dropped.items():
        dropped[prio] = dropped.get(prio, 0) + n
    return dataclasses.replace(
        new,
        dropped=dropped,
        dropped_bytes=old.dropped_bytes + new.dropped_bytes,
        seqs=(old.seqs + new.seqs)[:1000],
    )
