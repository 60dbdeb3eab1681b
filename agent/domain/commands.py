"""What the engine hands back for one input: events to commit, commands to carry out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from agent.domain import events as ev
from agent.domain.inventory import Baseline


@dataclass(frozen=True, slots=True)
class Unlock:
    """Release the lock for ``pulse_s`` seconds."""

    pulse_s: float


@dataclass(frozen=True, slots=True)
class Relock:
    """Engage the lock now (idempotent)."""


@dataclass(frozen=True, slots=True)
class StartScan:
    """Start (or keep) inventorying on every reader (idempotent)."""


@dataclass(frozen=True, slots=True)
class StopScan:
    """Stop inventorying."""


Command: TypeAlias = Unlock | Relock | StartScan | StopScan


@dataclass
class EngineOutput:
    """What one input produced. Commit events + baseline + session_state atomically."""

    events: list[ev.Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    baseline: Baseline | None = None  # set when a cycle completed: the new trusted contents
    session_state: bytes | None = None  # set when the resumable state changed
