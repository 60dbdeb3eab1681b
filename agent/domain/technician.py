"""Technician sessions and re-baselines: maintenance work that moves items without anyone
checking them out (docs/domain.md, "Technician sessions").

A technician session is opened by ``cabinetctl technician open --reason …`` (the technician is
the local account, ``uid:<n>``, the control socket's SO_PEERCRED names) or, after
``cabinetctl technician open --badge``, by the next supervisor badge (the technician is its
pseudonym). It unlocks the door like a badge; the door opening during it is not forced; it ends
with the closing scan of that door cycle, where what appeared is ``item.restocked`` and what
left is ``item.removed``; until then anyone else's badge is refused. ``cabinetctl door test``
holds the door the same way while it runs. Pure: the engine owns the state machine, this
module the value types.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from uuid import UUID

from agent.domain import events as ev

TECHNICIAN_RE = re.compile(ev.TECHNICIAN_PATTERN)
_REASON_RE = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
# A badge number (EM4100: 10 hex digits; Wiegand and others: long decimals) must never be
# recorded: a reason is free text that reaches the audit log and the backend.
_LONG_NUMBER_RE = re.compile(r"[0-9A-Fa-f]{8,}")
MAX_REASON = 200
# How long a ``technician open --badge`` waits for a supervisor's badge, at most.
MAX_BADGE_WAIT_S = 300.0
# How long the control socket lets a ``door.test`` request run (its steps take seconds; each
# lock write is bounded by ``door.command_timeout_s``, at most 60 s).
DOOR_TEST_REQUEST_S = 60.0
# A door test holds the door at most this long: a cabinetctl or a control handler that dies
# mid-test cannot keep badges out for longer. It outlives the request, whose end (done,
# failed or cut off by its time limit) ends the hold: a hold that lapsed first would let a
# badge unlock the door while the test still moves the lock.
DOOR_TEST_MAX_S = DOOR_TEST_REQUEST_S + 15.0
# The reason of the technician session a door opened during a door test starts.
DOOR_TEST_REASON = "door test: the door was opened while the test released the lock"


class TechnicianRefused(ValueError):
    """The engine cannot do that now (busy, bad reason, nothing to close); says why."""


def _ascii_digits(text: str) -> str:
    """``text`` with every decimal digit of any script (fullwidth, Arabic-Indic, ...) and
    fullwidth letters as their ASCII forms: a badge number typed in them is still one."""
    folded = unicodedata.normalize("NFKC", text)
    return "".join(str(d) if (d := unicodedata.decimal(c, None)) is not None else c for c in folded)


def check_reason(reason: object) -> str:
    """A reason as events carry it: 1-200 characters, no control or format characters."""
    if not isinstance(reason, str):
        raise TechnicianRefused("a reason is required (1-200 characters)")
    text = reason.strip()
    if not _REASON_RE.fullmatch(text) or ev.unprintable(text):
        raise TechnicianRefused("the reason must be 1-200 characters without control characters")
    folded = _ascii_digits(text)
    if any(any(c.isdigit() for c in m.group()) for m in _LONG_NUMBER_RE.finditer(folded)):
        # Never echo it: it may be a badge number.
        raise TechnicianRefused(
            "the reason must not contain a long number (8 or more digits): a badge number must "
            "never be recorded; name tools by asset id"
        )
    return text


def check_technician(value: object) -> str:
    """A technician id (``uid:<n>`` or a pseudonym), else TechnicianRefused."""
    if not isinstance(value, str) or not TECHNICIAN_RE.fullmatch(value):
        raise TechnicianRefused("not a technician id")
    return value


def uid_technician(uid: int) -> str:
    """The technician id of a local account: ``uid:<n>``."""
    if not 0 <= uid < 10**10:
        raise TechnicianRefused(f"uid {uid} cannot be recorded")
    return f"uid:{uid}"


@dataclass
class Technician:
    """A technician session, from the unlock until its closing scan is over."""

    session_id: UUID
    who: str  # "uid:<n>" or a supervisor's pseudonym
    via: ev.TechnicianVia
    reason: str
    since_mono: float  # opened (unlocked) at, on the monotonic clock
    elapsed_base: float = 0.0  # seconds before since_mono (survives a restart)

    def elapsed(self, mono: float) -> float:
        return self.elapsed_base + max(0.0, mono - self.since_mono)

    def snapshot(self, mono: float) -> dict[str, Any]:
        return {
            "id": str(self.session_id),
            "who": self.who,
            "via": self.via,
            "reason": self.reason,
            "elapsed_s": self.elapsed(mono),
        }

    @classmethod
    def restore(cls, s: Mapping[str, Any], mono: float) -> Technician:
        who = str(s["who"])
        if not TECHNICIAN_RE.fullmatch(who):
            raise ValueError("technician id")
        via = str(s["via"])
        if via not in ("cli", "badge"):
            raise ValueError("technician via")
        return cls(
            session_id=UUID(str(s["id"])),
            who=who,
            via=cast(ev.TechnicianVia, via),
            reason=check_reason(s["reason"]),
            since_mono=mono,
            elapsed_base=float(s["elapsed_s"]),
        )


@dataclass
class BadgeWait:
    """``technician open --badge``: the next supervisor badge opens a technician session."""

    reason: str
    requested_by: str  # "uid:<n>" of the cabinetctl caller (audit only)
    until_mono: float

    def snapshot(self, mono: float) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "requested_by": self.requested_by,
            "remaining_s": max(0.0, self.until_mono - mono),
        }

    @classmethod
    def restore(cls, s: Mapping[str, Any], mono: float) -> BadgeWait:
        by = str(s["requested_by"])
        if not TECHNICIAN_RE.fullmatch(by):
            raise ValueError("requested_by")
        return cls(check_reason(s["reason"]), by, mono + float(s["remaining_s"]))


@dataclass
class DoorTest:
    """``cabinetctl door test``: until it ends the door is the test's (no badge is granted, no
    technician session or inventory starts). Once it has released the lock, the door opening
    is the tester's: a technician session in their name, not a forced door."""

    who: str  # "uid:<n>" of the caller
    until_mono: float  # it lapses then, whatever became of its caller
    released: bool = False  # the test has released (or is releasing) the lock
    refused: int = 0  # badges refused while it ran
    session_id: UUID | None = None  # the technician session an opening during it started
    forced: bool = False  # the door opened while the lock was engaged: reported as forced


@dataclass
class Rebaseline:
    """``cabinetctl inventory rebaseline``: the next complete inventory becomes the baseline."""

    who: str
    reason: str


RebaselineState = Literal["running", "done", "incomplete", "interrupted"]
