"""The door session (cycle): who opened, since when, and how its closing scan is going."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from agent.domain import resume
from agent.domain.now import Now


@dataclass
class Session:
    session_id: UUID
    actors: list[str]
    opened_wall: datetime
    elapsed_base: float  # seconds elapsed before ``since_mono`` (survives a restart)
    since_mono: float
    door_opened_mono: float = 0.0
    left_open_alerts: int = 0
    left_open_due_s: float = 0.0  # door open time at which the last left-open alert fell due
    door_closed_mono: float = 0.0
    unlocked_after_close: bool = False  # a holder badged during the scan
    passes: int = 0
    scan_ms: int = 0
    attempts: int = 0  # failed (incomplete) passes in this closing

    def elapsed(self, now: Now) -> float:
        return self.elapsed_base + max(0.0, now.mono - self.since_mono)

    def add_actor(self, actor: str) -> bool:
        if actor in self.actors:
            return False
        self.actors.append(actor)
        return True

    def snapshot(self, now: Now) -> dict[str, Any]:
        """For resume: timers as time elapsed at ``now``."""
        at = now.mono
        return {
            "id": str(self.session_id),
            "actors": list(self.actors),
            "opened": self.opened_wall.isoformat(),
            "elapsed_s": self.elapsed(now),
            "door_open_s": max(0.0, at - self.door_opened_mono),
            "left_open_alerts": self.left_open_alerts,
            "left_open_due_s": self.left_open_due_s,
            "door_closed_s": max(0.0, at - self.door_closed_mono),
            "unlocked_after_close": self.unlocked_after_close,
            "passes": self.passes,
            "scan_ms": self.scan_ms,
            "attempts": self.attempts,
        }

    @classmethod
    def restore(cls, s: Mapping[str, Any], base: Now) -> Session:
        """Inverse of ``snapshot``, re-based on ``base`` (resume.rebase)."""
        return cls(
            session_id=UUID(s["id"]),
            actors=[resume.actor(a) for a in s["actors"]],
            opened_wall=datetime.fromisoformat(s["opened"]),
            elapsed_base=float(s["elapsed_s"]),
            since_mono=base.mono,
            door_opened_mono=base.mono - float(s["door_open_s"]),
            left_open_alerts=int(s["left_open_alerts"]),
            left_open_due_s=max(0.0, float(s.get("left_open_due_s", 0.0))),
            door_closed_mono=base.mono - float(s["door_closed_s"]),
            unlocked_after_close=bool(s["unlocked_after_close"]),
            passes=int(s["passes"]),
            scan_ms=int(s["scan_ms"]),
            attempts=int(s["attempts"]),
        )
