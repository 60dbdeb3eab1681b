"""The state store: outbox, baseline, sequence counter, door session, kv state, audit chain."""

from agent.store.config import OverflowPolicy, StoreConfig
from agent.store.db import HousekeepingResult
from agent.store.store import KEEP, Keep, Sequencer, Store
from agent.store.types import (
    PRIORITY_CRITICAL,
    PRIORITY_NORMAL,
    PRIORITY_ROUTINE,
    AlertKind,
    AuditRecord,
    AuditReport,
    BaselineEntry,
    CommitResult,
    OutboxRow,
    OutboxStats,
    SchemaTooNewError,
    SeqConflictError,
    StoreAlert,
    StoreBackloggedError,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    StoreLockedError,
)

__all__ = [
    "KEEP",
    "PRIORITY_CRITICAL",
    "PRIORITY_NORMAL",
    "PRIORITY_ROUTINE",
    "AlertKind",
    "AuditRecord",
    "AuditReport",
    "BaselineEntry",
    "CommitResult",
    "HousekeepingResult",
    "Keep",
    "OutboxRow",
    "OutboxStats",
    "OverflowPolicy",
    "SchemaTooNewError",
    "SeqConflictError",
    "Sequencer",
    "Store",
    "StoreAlert",
    "StoreBackloggedError",
    "StoreClosedError",
    "StoreConfig",
    "StoreError",
    "StoreFailedError",
    "StoreLockedError",
]
