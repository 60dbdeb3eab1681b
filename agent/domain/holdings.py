"""Who holds what since when: the cabinet's own memory of its check-outs.

A check-out makes a *holding* (the session's actors, when, the limit); the item's return ends
it. Two rules read it: a return by someone other than the holder names both (``returned_by``,
``held_by`` on ``item.returned``), and an item out longer than its limit raises
``item.overdue`` once — from the cabinet itself, so a crib without a live backend still
alerts. The overdue timer is monotonic like every engine timer and is persisted as "remaining
at saved_at" with the engine state; the flag that it fired is committed with the event, so a
restart neither loses nor repeats it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from agent.domain import events as ev
from agent.domain import resume
from agent.domain.assets import AssetRegistry
from agent.domain.now import Now
from agent.domain.stamp import Stamper

# A holding comes from a baseline entry (itself bounded by the scan's tag limit); this bounds
# the persisted state whatever happens (the oldest holdings go first).
MAX_HOLDINGS = 50_000


@dataclass
class Holding:
    session_id: UUID
    held_by: list[str]
    checked_out_at: datetime
    asset_id: str | None
    drawer: str | None
    limit_s: float  # 0: never overdue
    deadline_mono: float
    overdue_reported: bool = False


class Holdings:
    """The open check-outs by EPC; ``changed`` when the persisted part changed."""

    def __init__(self, stamp: Stamper) -> None:
        self._stamp = stamp
        self._by_epc: dict[str, Holding] = {}
        # The earliest deadline still to fire: a tick before it walks no holding, and the
        # engine loop sleeps until it (next_deadline).
        self._next_due = math.inf
        self.changed = False

    def __len__(self) -> int:
        return len(self._by_epc)

    def get(self, epc: str) -> Holding | None:
        return self._by_epc.get(epc)

    def overdue(self) -> list[tuple[str, Holding]]:
        """The items out past their limit (``item.overdue`` raised), oldest check-out first."""
        late = [(e, h) for e, h in self._by_epc.items() if h.overdue_reported]
        return sorted(late, key=lambda item: (item[1].checked_out_at, item[0]))

    def after_session(
        self,
        events: Sequence[ev.Event],
        assets: AssetRegistry | None,
        default_limit_s: float,
        now: Now,
    ) -> list[ev.Event]:
        """The events of a closed session, returns annotated with their holders; the session's
        check-outs become holdings and its returns end theirs."""
        out: list[ev.Event] = []
        for event in events:
            if isinstance(event, ev.ItemCheckedOut):
                asset = assets.get(event.epc) if assets is not None else None
                limit = default_limit_s
                if asset is not None and asset.overdue_after_s is not None:
                    limit = asset.overdue_after_s
                self._add(
                    event.epc,
                    Holding(
                        session_id=event.session_id,
                        held_by=list(event.actors),
                        checked_out_at=event.time,
                        asset_id=event.asset_id,
                        drawer=event.drawer,
                        limit_s=limit,
                        deadline_mono=now.mono + limit,
                    ),
                )
            elif isinstance(event, ev.ItemReturned):
                holding = self._by_epc.pop(event.epc, None)
                if holding is not None:
                    self.changed = True
                    if not set(event.actors) & set(holding.held_by):
                        event = event.model_copy(
                            update={
                                "held_by": list(holding.held_by),
                                "returned_by": list(event.actors),
                            }
                        )
            out.append(event)
        return out

    def erase(self, erased: Collection[str]) -> int:
        """The backend erased these people: ``"erased"`` holds what they held (the item is
        still out, its limit still runs); how many holdings changed."""
        changed = sum(ev.erase_actors(h.held_by, erased) > 0 for h in self._by_epc.values())
        if changed:
            self.changed = True
        return changed

    def back(self, present: Mapping[str, str]) -> None:
        """Items found in the cabinet again without a session's return (a background
        inventory, an unproven baseline re-established): their holdings end silently."""
        for epc in [e for e in self._by_epc if e in present]:
            del self._by_epc[epc]
            self.changed = True
        self._reschedule()

    def next_deadline(self) -> float | None:
        """Monotonic time of the earliest ``item.overdue`` still to fire (None: none)."""
        return None if math.isinf(self._next_due) else self._next_due

    def timers(self, now: Now, events: list[ev.Event], present: Mapping[str, str]) -> None:
        """``item.overdue`` for every holding whose limit ran out, once each — unless the item
        is in the cabinet (``present``: the baseline) after all, whichever way it came back."""
        if now.mono < self._next_due:
            return
        for epc in [e for e, h in self._by_epc.items() if e in present]:
            del self._by_epc[epc]
            self.changed = True
        for epc, h in self._by_epc.items():
            if h.overdue_reported or h.limit_s <= 0 or now.mono < h.deadline_mono:
                continue
            h.overdue_reported = True
            self.changed = True
            events.append(
                ev.ItemOverdue(
                    **self._stamp(now),
                    session_id=h.session_id,
                    held_by=list(h.held_by),
                    epc=epc,
                    asset_id=h.asset_id,
                    drawer=h.drawer,
                    checked_out_at=h.checked_out_at,
                    limit_s=h.limit_s,
                    out_s=round(h.limit_s + (now.mono - h.deadline_mono), 3),
                )
            )
        self._reschedule()

    def snapshot(self, at: float) -> dict[str, Any]:
        """The persisted part: ``holdings``, each timer as the time left at ``at``."""
        return {
            "holdings": {
                epc: {
                    "session": str(h.session_id),
                    "held_by": list(h.held_by),
                    "at": h.checked_out_at.isoformat(),
                    "asset_id": h.asset_id,
                    "drawer": h.drawer,
                    "limit_s": h.limit_s,
                    "remaining_s": h.deadline_mono - at,
                    "reported": h.overdue_reported,
                }
                for epc, h in sorted(self._by_epc.items())
            }
        }

    def restore(self, state: Mapping[str, Any], base_mono: float) -> None:
        """Inverse of ``snapshot``, timers re-based on ``base_mono`` (absent in older states)."""
        raw = state.get("holdings") or {}
        if not isinstance(raw, dict):
            raise resume.EngineStateError("engine state holdings are malformed")
        for epc, h in raw.items():
            if not isinstance(epc, str) or not _EPC_RE.fullmatch(epc):
                raise resume.EngineStateError("engine state holds a malformed EPC")
            at = datetime.fromisoformat(str(h["at"]))
            if at.tzinfo is None:
                raise resume.EngineStateError("engine state holds a naive check-out time")
            asset_id, drawer = h.get("asset_id"), h.get("drawer")
            limit, remaining = float(h["limit_s"]), float(h["remaining_s"])
            if not (math.isfinite(limit) and math.isfinite(remaining)):
                raise resume.EngineStateError("engine state holds a timer that is not a number")
            self._add(
                epc,
                Holding(
                    session_id=UUID(str(h["session"])),
                    held_by=[resume.actor(a) for a in h["held_by"]] or [ev.UNKNOWN_ACTOR],
                    checked_out_at=at,
                    asset_id=None if asset_id is None else str(asset_id),
                    drawer=None if drawer is None else str(drawer),
                    limit_s=max(0.0, limit),
                    deadline_mono=base_mono + remaining,
                    overdue_reported=bool(h["reported"]),
                ),
            )
        self._reschedule()
        self.changed = False

    def _add(self, epc: str, holding: Holding) -> None:
        self._by_epc.pop(epc, None)
        self._by_epc[epc] = holding
        if len(self._by_epc) > MAX_HOLDINGS:
            oldest = min(self._by_epc, key=lambda e: self._by_epc[e].checked_out_at)
            del self._by_epc[oldest]
        if holding.limit_s > 0 and not holding.overdue_reported:
            # Earlier is harmless (a tick walks the holdings and reschedules), later never.
            self._next_due = min(self._next_due, holding.deadline_mono)
        self.changed = True

    def _reschedule(self) -> None:
        self._next_due = min(
            (
                h.deadline_mono
                for h in self._by_epc.values()
                if not h.overdue_reported and h.limit_s > 0
            ),
            default=math.inf,
        )


_EPC_RE = re.compile(ev.EPC_PATTERN)
