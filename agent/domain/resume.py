"""The engine's persisted state: versioned JSON, timers kept as remaining time and re-based on
the instant the state was saved, so time spent down (staleness, an outage) counts against them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from agent.domain import events as ev
from agent.domain.now import Now

STATE_VERSION = 1
MAX_CREDIBLE_DOWNTIME_S = 30 * 86_400

_ACTOR_RE = re.compile(ev.ACTOR_PATTERN)


class EngineStateError(ValueError):
    """Serialized engine state is unreadable (wrong version, malformed)."""


def dump(state: dict[str, Any], saved: Now) -> bytes:
    """The state's bytes (compact, sorted keys), saved at ``saved``."""
    state = {"v": STATE_VERSION, "saved_at": saved.wall.isoformat(), **state}
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


def load(data: bytes) -> dict[str, Any]:
    """The state ``dump`` wrote (raises EngineStateError when it is not of this version; a
    malformed one raises what reading it does, for the caller to turn into one)."""
    state = json.loads(data)
    if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
        raise EngineStateError(f"engine state is not version {STATE_VERSION}")
    return state


def rebase(state: dict[str, Any], now: Now) -> Now:
    """``now`` moved back on the monotonic clock by the time since the state was saved."""
    down = downtime(datetime.fromisoformat(state["saved_at"]), now.wall)
    return Now(now.wall, now.mono - down, now.trusted, now.proven)


def downtime(saved_at: datetime, now: datetime) -> float:
    """Wall time since the state was saved; 0 if the wall clock is not credible (no RTC, NTP step)."""
    if saved_at.tzinfo is None:
        raise ValueError("saved_at must be timezone-aware")
    delta = (now - saved_at).total_seconds()
    return delta if 0 <= delta <= MAX_CREDIBLE_DOWNTIME_S else 0.0


def actor(value: object) -> str:
    """A persisted actor: a pseudonym, "unknown" or "erased", never anything else."""
    if not isinstance(value, str) or not _ACTOR_RE.fullmatch(value):
        raise EngineStateError("engine state holds an actor that is not a pseudonym")
    return value
