"""The ``[store]`` config section: where the state database lives and how it is bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from drivers.config import StrictModel

MiB = 1024 * 1024
# The privacy notice: security/audit records are kept at most 12 months (docs/privacy.md).
AUDIT_RETENTION_CAP_DAYS = 365.0


class OverflowPolicy(StrictModel):
    """Which outbox rows may be dropped when a bound is hit (always alerted, never silent)."""

    droppable_priorities: list[int] = Field(
        default=[2, 1],
        description="priorities that may be dropped (0 critical, 1 normal, 2 routine); "
        "the lowest priority (highest number) and oldest rows go first",
    )

    @model_validator(mode="after")
    def _valid(self) -> OverflowPolicy:
        if any(p < 0 or p > 9 for p in self.droppable_priorities):
            raise ValueError("priorities are 0..9")
        if len(set(self.droppable_priorities)) != len(self.droppable_priorities):
            raise ValueError("droppable_priorities must not repeat")
        return self


class StoreConfig(StrictModel):
    path: Path = Field(
        Path("/var/lib/cabinet-agent/state.db"), description="SQLite database file (WAL mode)"
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="FULL: every commit is fsynced before it returns; NORMAL: commits return "
        "sooner and are fsynced within durability_delay_ms (a power cut may lose those last "
        "commits, but never an event that already left the cabinet)",
    )
    durability_delay_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="NORMAL only: how long a commit may wait for its fsync; events are "
        "published only once durable (at once when the publisher asks for them)",
    )
    max_bytes: int = Field(
        64 * MiB,
        ge=64 * 1024,
        description="outbox payload bytes before the overflow policy drops rows",
    )
    max_db_bytes: int = Field(
        256 * MiB, ge=MiB, description="hard cap on the database file (PRAGMA max_page_count)"
    )
    min_free_disk_bytes: int = Field(
        16 * MiB, ge=0, description="disk space the database and its WAL never eat into"
    )
    max_wal_bytes: int = Field(
        8 * MiB,
        ge=256 * 1024,
        le=1024 * MiB,
        description="disk space reserved for the WAL (at most 1/8 of the filesystem): "
        "checkpointed at half of it, truncated back after a full disk",
    )
    seq_reserve_block: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="seqs reserved in the sequence sidecar per write of it (docs/store.md)",
    )
    max_age_days: float = Field(
        30.0,
        gt=0,
        description="undelivered rows older than this are dropped if their priority allows",
    )
    overflow: OverflowPolicy = OverflowPolicy()
    dead_letter_after: int = Field(
        10, ge=1, le=1_000_000, description="failed deliveries before a row is dead-lettered"
    )
    audit_retention_days: float = Field(
        AUDIT_RETENTION_CAP_DAYS,
        gt=0,
        description="audit log retention in days: at most 365 (the privacy notice promises "
        "security records are kept no longer than 12 months); lower it per customer",
    )
    audit_anchor_interval_s: float = Field(
        3600.0,
        ge=1,
        le=86400,
        description="how often the audit chain's new records are published as an audit.anchor "
        "event (only when there are new ones), so the backend can tell a rewritten chain",
    )
    housekeeping_interval_s: float = Field(
        300.0,
        ge=1,
        le=86400,
        description="how often age-based pruning and the page cap run (also at start)",
    )
    group_commit_max_rows: int = Field(
        100, ge=1, le=100_000, description="outbox rows per group-commit transaction (1 disables)"
    )
    group_commit_window_ms: float = Field(
        10.0, ge=0, le=1000, description="how long a batch may wait for more writers under load"
    )
    max_pending_bytes: int = Field(
        16 * MiB, ge=64 * 1024, description="bytes of writes held in memory while the disk is full"
    )
    max_pending_writes: int = Field(
        10_000, ge=10, description="writes held in memory while the disk is full"
    )
    retry_initial_s: float = Field(0.2, gt=0, le=60, description="first retry after a failed write")
    retry_max_s: float = Field(10.0, gt=0, le=3600, description="longest retry delay")

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # systemd starts the agent in / (WorkingDirectory=): a relative path would land there,
        # or wherever a technician happened to start it by hand.
        if not path.is_absolute():
            raise ValueError(
                "must be an absolute path (the agent's working directory is not where you "
                "think, e.g. / under systemd): use e.g. /var/lib/cabinet-agent/state.db"
            )
        if path.name in ("", ".", ".."):
            raise ValueError("must name the database file, e.g. /var/lib/cabinet-agent/state.db")
        return path

    @field_validator("audit_retention_days")
    @classmethod
    def _capped(cls, days: float) -> float:
        if days > AUDIT_RETENTION_CAP_DAYS:
            raise ValueError(
                f"at most {AUDIT_RETENTION_CAP_DAYS:g} days: the privacy notice keeps "
                "security records no longer than 12 months (lower is allowed)"
            )
        return days

    @model_validator(mode="after")
    def _ordered(self) -> StoreConfig:
        if self.max_db_bytes < self.max_bytes:
            raise ValueError("max_db_bytes must be >= max_bytes")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        return self
