"""Value types and errors of the state store, and how it stores time."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from drivers.errors import CabinetError, PermanentError, TransientError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# Before this the wall clock is not trustworthy (boards without RTC boot in 1970):
# never prune anything by age on such a clock.
SANE_CLOCK_US = 1_577_836_800_000_000  # 2020-01-01T00:00:00Z


def to_us(dt: datetime) -> int:
    """Microseconds since the Unix epoch (exact integer arithmetic)."""
    return (dt - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


PRIORITY_CRITICAL = 0  # check-outs, returns, door.forced
PRIORITY_NORMAL = 1
PRIORITY_ROUTINE = 2  # inventory.snapshot and other periodic state


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One sealed event waiting for delivery. ``kind`` is the event type name, never personal."""

    seq: int
    event_id: uuid.UUID
    priority: int
    kind: str
    created_at: datetime  # timezone-aware
    envelope: bytes
    attempts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, uuid.UUID):
            raise TypeError("event_id must be a uuid.UUID")
        if not isinstance(self.envelope, bytes):
            raise TypeError("envelope must be bytes")
        if self.seq < 1:
            raise ValueError(f"seq must be >= 1, got {self.seq}")
        if not 0 <= self.priority <= 9:
            raise ValueError(f"priority must be 0..9, got {self.priority}")
        if not self.kind or len(self.kind) > 64:
            raise ValueError("kind must be 1..64 characters")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """Where a tag was last seen present, and when."""

    location: str
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int  # deliverable rows (not dead)
    bytes: int  # envelope bytes of every row, dead included
    oldest_created_at: datetime | None  # of the deliverable rows
    oldest_age_s: float | None
    dead: int
    next_seq: int
    dropped: Mapping[int, int]  # priority -> rows dropped by policy, ever (persisted)
    pending_writes: int  # submitted, not yet durable
    pending_bytes: int
    disk_full: bool
    transactions: int  # write transactions committed since open
    held_since: datetime | None = None  # writes are held in memory since (None: they are not)
    held_reason: str = ""  # why: "disk full", the store's space limit, a failing write


class AlertKind(enum.StrEnum):
    OVERFLOW_DROPPED = "store.overflow_dropped"
    AGE_DROPPED = "store.age_dropped"
    OVER_CAP = "store.over_cap"  # undroppable rows keep the outbox above max_bytes
    DEAD_LETTERED = "store.dead_lettered"
    DISK_FULL = "store.disk_full"
    DISK_FULL_CLEARED = "store.disk_full_cleared"
    WRITE_RETRYING = "store.write_retrying"
    CORRUPT_QUARANTINED = "store.corrupt_quarantined"
    WAL_QUARANTINED = "store.wal_quarantined"  # an unreadable -wal moved aside at start
    DATABASE_LOST = "store.database_lost"  # a database that existed is missing or empty
    DATABASE_DELETED = "store.database_deleted"  # deleted/replaced while running; rewritten
    SEQ_ROLLBACK = "store.seq_rollback"  # its counter is behind what may have been sent
    SEQ_STATE_LOST = "store.seq_state_lost"  # the sequence sidecar is unreadable
    FAILED = "store.failed"
    HOLD_FULL = "store.hold_full"  # the in-memory hold is full: new writes wait
    AUDIT_PRUNED = "store.audit_pruned"


@dataclass(frozen=True, slots=True)
class StoreAlert:
    """Something an operator must hear about. ``detail`` never holds personal data."""

    kind: AlertKind
    detail: str
    dropped: Mapping[int, int] = field(default_factory=dict)  # priority -> rows
    dropped_bytes: int = 0
    seqs: tuple[int, ...] = ()  # the rows concerned (dropped or dead-lettered)


@dataclass(frozen=True, slots=True)
class Hold:
    """The store holds accepted writes in memory: why, and since when (trusted time)."""

    reason: str  # short: "disk full", "store space limit", "database size limit", ...
    detail: str  # one line naming the numbers and the setting that bites
    since: datetime


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What a durable write did besides writing: alerts for rows dropped to make room."""

    alerts: tuple[StoreAlert, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at: datetime
    actor: str  # "" once redacted
    action: str
    details: Mapping[str, object]  # {} once redacted
    prev_hash: bytes
    hash: bytes
    redacted: bool = False  # the personal fields were erased (the chain still verifies)


@dataclass(frozen=True, slots=True)
class AuditReport:
    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    anchor_seq: int  # records up to this seq were pruned by retention (0: none)
    problems: tuple[str, ...] = ()
    redacted: int = 0  # records whose personal fields were erased on request
    redacted_v1: int = 0  # of those, v1 records (written before schema 3): only linked


class StoreError(CabinetError):
    """Root of state-store errors."""


class SeqConflictError(StoreError):
    """The rows do not start at the store's next sequence number (another writer got there)."""

    def __init__(self, expected: int, got: int, why: str = "") -> None:
        self.expected = expected
        self.got = got
        super().__init__(
            f"rows must start at seq {expected}, got {got}"
            + (f" ({why})" if why else "")
            + ": re-read next_seq and reseal"
        )


class StoreBackloggedError(StoreError, TransientError):
    """Too many writes are waiting in memory (the disk is full); nothing was accepted."""


class StoreClosedError(StoreError):
    """The store is closed or closing."""


class StoreFailedError(StoreError, PermanentError):
    """The database hit an unrecoverable error; restart the agent (the store re-checks at open)."""


class StoreLockedError(StoreError, PermanentError):
    """Another process (or another Store in this one) has the database open."""


class SchemaTooNewError(StoreError, PermanentError):
    """The database was written by a newer agent; refusing to downgrade it."""
