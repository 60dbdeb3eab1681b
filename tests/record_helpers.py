"""Sealed domain events for the record tests: a cabinet's stream as the agent would seal it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.domain.events import Event, to_json
from agent.domain.ids import Uuid7Generator
from agent.privacy.envelope import EnvelopeHeader, Sealer
from backend.keys import BackendKeys

SITE = "hangar-3"
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def pseudonym(name: str) -> str:
    """A well-formed badge pseudonym (``p1.<kid>.<26 base32>``) for a test person."""
    body = "".join(c for c in name.lower() if c in "abcdefghijklmnopqrstuvwxyz234567")
    return "p1.s1." + (body + "a" * 26)[:26]


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    event: Event | None = None


@dataclass
class CabinetStream:
    """One cabinet's events, numbered and sealed in order (``seal`` for any body at all)."""

    keys: BackendKeys
    cabinet: str
    site: str = SITE
    epoch: bytes = field(default_factory=lambda: os.urandom(8))
    seq: int = 0
    start: datetime = T0
    ids: Uuid7Generator = field(default_factory=Uuid7Generator)

    @property
    def topic(self) -> str:
        return f"cabinets/v1/{self.site}/{self.cabinet}/events"

    def next(self, cls: type[Any], **fields: Any) -> Message:
        """The next event of this cabinet (seq + 1, one minute later), sealed."""
        self.seq += 1
        at = self.start + timedelta(minutes=self.seq)
        event = cls(
            event_id=self.ids(at),
            seq=self.seq,
            time=at,
            site_id=self.site,
            cabinet_id=self.cabinet,
            **fields,
        )
        return Message(self.topic, self.seal(event.seq, event.event_id, to_json(event)), event)

    def seal(self, seq: int, event_id: Any, body: bytes) -> bytes:
        header = EnvelopeHeader(self.keys.hpke_kid, self.cabinet, seq, event_id, 2, self.epoch)
        return Sealer(self.keys.hpke_public, self.keys.hpke_kid).seal(header, body)
