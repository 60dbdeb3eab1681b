"""Access control: who may open (allow-list of pseudonyms and roles) and badge-reader lock-outs."""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Literal, Protocol

from agent.domain import events as ev
from agent.domain.config import CabinetDomainConfig, GraceRole
from agent.domain.events import PSEUDONYM_PATTERN, DenyReason
from agent.domain.now import Now
from agent.domain.stamp import EventStamp, Stamper

_PSEUDONYM_RE = re.compile(PSEUDONYM_PATTERN)
MAX_ENTRIES = 100_000


class Role(enum.StrEnum):
    USER = "user"  # may open
    SUPERVISOR = "supervisor"  # may open and clear a lock-out
    AUDITOR = "auditor"  # may not open (badges are recorded as denied with reason "role")


_ROLE_VALUES = frozenset(r.value for r in Role)
OPEN_ROLES = frozenset({Role.USER, Role.SUPERVISOR})
_OPEN_ROLE_NAMES: dict[Role, GraceRole] = {Role.USER: "user", Role.SUPERVISOR: "supervisor"}
CLEAR_LOCKOUT_ROLES = frozenset({Role.SUPERVISOR})


class VerifiedDocument(Protocol):
    """What the domain needs of a verified signed document (privacy's SignedDocument fits)."""

    @property
    def version(self) -> int: ...

    @property
    def expires_at(self) -> datetime: ...

    @property
    def body(self) -> Mapping[str, Any]: ...


class AllowListError(ValueError):
    """The allow-list body is malformed."""


@dataclass(frozen=True)
class AllowList:
    """A verified allow-list: pseudonym → roles, valid until ``expires_at``.

    Signature, version (no rollback) and expiry of the signed document are checked by
    ``agent/privacy/signed.py``; this class only interprets the body. Roles this version does
    not know are kept out of ``entries`` (a newer backend may add some) and listed in
    ``unknown_roles``.
    """

    version: int
    expires_at: datetime
    entries: Mapping[str, frozenset[Role]]
    unknown_roles: frozenset[str] = frozenset()

    @classmethod
    def from_body(cls, version: int, expires_at: datetime, body: Mapping[str, Any]) -> AllowList:
        """Interpret ``{"entries": {pseudonym: [roles]}}``; raise AllowListError if malformed."""
        if expires_at.tzinfo is None:
            raise AllowListError("expires_at must be timezone-aware")
        entries_raw = body.get("entries") if isinstance(body, Mapping) else None
        if not isinstance(entries_raw, Mapping):
            raise AllowListError("allow-list body needs an 'entries' object")
        if len(entries_raw) > MAX_ENTRIES:
            raise AllowListError(f"allow-list has more than {MAX_ENTRIES} entries")
        entries: dict[str, frozenset[Role]] = {}
        unknown: set[str] = set()
        # Entries are named by their position, never quoted: a key may be a raw badge id, and
        # a pseudonym in a refusal (logged, audited as free text) is one an erasure cannot find.
        for i, (pseudonym, roles) in enumerate(entries_raw.items()):
            if not isinstance(pseudonym, str) or not _PSEUDONYM_RE.fullmatch(pseudonym):
                raise AllowListError(f"allow-list entry [{i}]: the key is not a badge pseudonym")
            if isinstance(roles, str | bytes) or not isinstance(roles, Sequence):
                raise AllowListError(f"allow-list entry [{i}]: roles must be a list of strings")
            known: set[Role] = set()
            for role in roles:
                if not isinstance(role, str):
                    raise AllowListError(f"allow-list entry [{i}]: roles must be strings")
                if role in _ROLE_VALUES:
                    known.add(Role(role))
                else:
                    unknown.add(role[:32])
            entries[pseudonym] = frozenset(known)
        return cls(version, expires_at, entries, frozenset(unknown))

    @classmethod
    def from_document(cls, doc: VerifiedDocument) -> AllowList:
        """From a verified signed document (``agent.privacy.signed.SignedDocument``)."""
        return cls.from_body(doc.version, doc.expires_at, doc.body)

    def expired(self, at: datetime) -> bool:
        """True once ``at`` reaches the expiry."""
        return at >= self.expires_at

    def roles(self, pseudonym: str) -> frozenset[Role]:
        """The roles of a pseudonym (empty if unknown)."""
        return self.entries.get(pseudonym, frozenset())

    @cached_property
    def prefixes(self) -> frozenset[str]:
        """``<scheme>.<kid>`` of the entries: which site keys (and schemes) the list names
        people by. The cabinet derives a badge under the live key the list uses."""
        return frozenset(p.rsplit(".", 1)[0] for p in self.entries)


@dataclass(frozen=True, slots=True)
class LockoutChange:
    """A lock-out started, was cleared by a supervisor, or ran out."""

    badge_reader: str
    state: Literal["locked", "cleared", "expired"]
    denials: int
    until: datetime | None = None
    actor: str | None = None

    def event(self, stamp: EventStamp) -> ev.AccessLockout:
        return ev.AccessLockout(
            **stamp,
            badge_reader=self.badge_reader,
            state=self.state,
            denials=self.denials,
            until=self.until,
            actor=self.actor,
        )


@dataclass(frozen=True, slots=True)
class GraceGrant:
    """A grant under the expired-allow-list grace policy: the backend must hear of each one."""

    roles: frozenset[Role]  # the actor's roles the policy admitted (roles that open)
    allow_list_version: int
    expired_at: datetime
    grace_until: datetime

    def role_names(self) -> list[GraceRole]:
        """The admitted roles by name, sorted."""
        return sorted(_OPEN_ROLE_NAMES[r] for r in self.roles)


@dataclass(frozen=True, slots=True)
class AccessOutcome:
    """The answer to one badge."""

    granted: bool
    reason: DenyReason | None
    roles: frozenset[Role]
    lockout: LockoutChange | None = None
    grace: GraceGrant | None = None  # set when only the grace policy let this badge in

    def events(self, actor: str, badge_reader: str, stamp: Stamper, now: Now) -> list[ev.Event]:
        """What the backend hears of this badge: a denial and the lock-out it started, or the
        lock-out it cleared and the grace it was let in under."""
        out: list[ev.Event] = []
        if not self.granted:
            assert self.reason is not None
            out.append(
                ev.AccessDenied(
                    **stamp(now), actor=actor, badge_reader=badge_reader, reason=self.reason
                )
            )
        if self.lockout is not None:
            out.append(self.lockout.event(stamp(now)))
        if self.granted and self.grace is not None:
            grace = self.grace
            out.append(
                ev.AccessGraceGranted(
                    **stamp(now),
                    actor=actor,
                    badge_reader=badge_reader,
                    roles=grace.role_names(),
                    allow_list_version=grace.allow_list_version,
                    expired_at=grace.expired_at,
                    grace_until=grace.grace_until,
                )
            )
        return out


@dataclass
class _Lockout:
    until_mono: float
    until_wall: datetime
    denials: int


class AccessControl:
    """Decides badges against the allow-list; locks a badge reader out after repeated denials."""

    def __init__(self, config: CabinetDomainConfig, allow_list: AllowList | None = None) -> None:
        self.allow_list = allow_list
        # Read at each decision (the grace policy reloads on SIGHUP); the lock-out numbers
        # below are fixed at start.
        self.config = config
        self._n = config.lockout_denials
        self._window = config.lockout_window_s
        self._duration = config.lockout_duration_s
        self._denials: dict[str, deque[float]] = {}
        self._lockouts: dict[str, _Lockout] = {}
        self.changed = False  # set when the state worth persisting changed; the owner resets it

    def decide(self, pseudonym: str, at: datetime) -> AccessOutcome:
        """The allow-list's answer alone (no lock-out logic)."""
        al = self.allow_list
        if al is None:
            return AccessOutcome(False, "no allow-list", frozenset())
        if al.expired(at):
            return self._grace(al, pseudonym, at)
        roles = al.roles(pseudonym)
        if pseudonym not in al.entries:
            return AccessOutcome(False, "unknown badge", roles)
        if not roles & OPEN_ROLES:
            return AccessOutcome(False, "role", roles)
        return AccessOutcome(True, None, roles)

    def _grace(self, al: AllowList, pseudonym: str, at: datetime) -> AccessOutcome:
        """Deny by default; the configured grace roles may still open for a while after expiry."""
        denied = AccessOutcome(False, "allow-list expired", frozenset())
        hours = self.config.expired_allow_list_grace_h
        if hours <= 0 or pseudonym not in al.entries:
            return denied
        until = al.expires_at + timedelta(hours=hours)
        if at >= until:
            return denied
        roles = al.roles(pseudonym)
        admitted = (
            roles & OPEN_ROLES & {Role(r) for r in self.config.expired_allow_list_grace_roles}
        )
        if not admitted:
            return denied
        grace = GraceGrant(frozenset(admitted), al.version, al.expires_at, until)
        return AccessOutcome(True, None, roles, grace=grace)

    def badge(self, badge_reader: str, pseudonym: str, now: Now) -> AccessOutcome:
        """Decide one badge at ``badge_reader``, updating denial windows and lock-outs."""
        decision = self.decide(pseudonym, now.judged)
        lock = self._lockouts.get(badge_reader)
        if lock is not None:
            if decision.granted and decision.roles & CLEAR_LOCKOUT_ROLES:
                del self._lockouts[badge_reader]
                change = LockoutChange(badge_reader, "cleared", lock.denials, actor=pseudonym)
                return AccessOutcome(True, None, decision.roles, change, decision.grace)
            # Denials while locked out do not extend it: the lock-out is already the answer.
            return AccessOutcome(False, "locked out", decision.roles)
        if decision.granted:
            return decision
        window = self._denials.setdefault(badge_reader, deque(maxlen=self._n))
        window.append(now.mono)
        self.changed = True
        while window and now.mono - window[0] >= self._window:
            window.popleft()
        if len(window) >= self._n:
            denials = len(window)
            window.clear()
            until_wall = now.wall + timedelta(seconds=self._duration)
            self._lockouts[badge_reader] = _Lockout(now.mono + self._duration, until_wall, denials)
            change = LockoutChange(badge_reader, "locked", denials, until=until_wall)
            return AccessOutcome(False, decision.reason, decision.roles, change)
        return decision

    def tick(self, now: Now) -> list[LockoutChange]:
        """Lock-outs that ran out by ``now``."""
        out = []
        for reader in sorted(self._lockouts):
            lock = self._lockouts[reader]
            if now.mono >= lock.until_mono:
                del self._lockouts[reader]
                out.append(LockoutChange(reader, "expired", lock.denials))
        return out

    def locked_out(self, badge_reader: str) -> bool:
        """True while ``badge_reader`` is locked out."""
        return badge_reader in self._lockouts

    def next_deadline(self) -> float | None:
        """Monotonic time of the next lock-out expiry."""
        return min((lk.until_mono for lk in self._lockouts.values()), default=None)

    def snapshot(self, now_mono: float) -> dict[str, Any]:
        """Lock-outs and denial windows, times relative to ``now_mono`` (for resume)."""
        return {
            "lockouts": {
                r: {
                    "remaining_s": max(0.0, lk.until_mono - now_mono),
                    "until": lk.until_wall.isoformat(),
                    "denials": lk.denials,
                }
                for r, lk in sorted(self._lockouts.items())
            },
            "denials": {
                r: [now_mono - t for t in w] for r, w in sorted(self._denials.items()) if w
            },
        }

    def restore(self, data: Mapping[str, Any], now: Now) -> None:
        """Inverse of ``snapshot``, re-based on ``now``."""
        self._lockouts = {
            str(r): _Lockout(
                now.mono + float(v["remaining_s"]),
                datetime.fromisoformat(str(v["until"])),
                int(v["denials"]),
            )
            for r, v in data.get("lockouts", {}).items()
        }
        self._denials = {
            str(r): deque((now.mono - float(age) for age in ages), maxlen=self._n)
            for r, ages in data.get("denials", {}).items()
        }
