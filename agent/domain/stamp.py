"""The fields every event carries, stamped at one instant: id, time, clock trust, cabinet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict
from uuid import UUID

from agent.domain.ids import Uuid7Generator
from agent.domain.now import ClockTrust, Now


class EventStamp(TypedDict):
    """``EventBase``'s fields an emitter fills in: unpack into an event model (``**stamp``)."""

    event_id: UUID
    time: datetime
    clock: ClockTrust
    site_id: str
    cabinet_id: str


@dataclass(frozen=True, slots=True)
class Stamper:
    """Stamps events of one cabinet; each stamp takes a fresh UUIDv7."""

    site_id: str
    cabinet_id: str
    ids: Uuid7Generator

    def __call__(self, now: Now) -> EventStamp:
        return EventStamp(
            event_id=self.ids(now.wall),
            time=now.wall,
            clock=now.clock,
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
        )
