"""Shared bits for the state-store tests: a settable clock and row builders."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.store import OutboxRow, Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class FakeClock:
    """Wall clock the test moves by hand (monotonic follows it)."""

    at: datetime = T0
    _mono: float = field(default=1000.0)

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self._mono

    def advance(self, delta: timedelta) -> None:
        self.at += delta
        self._mono += delta.total_seconds()


def rows_from(
    first_seq: int,
    n: int,
    *,
    priority: int = 0,
    kind: str = "item.checked_out",
    size: int = 64,
    created_at: datetime = T0,
) -> list[OutboxRow]:
    """n rows with seqs first_seq.. and random (opaque, sealed-looking) envelopes."""
    return [
        OutboxRow(
            seq=first_seq + i,
            event_id=uuid.uuid4(),
            priority=priority,
            kind=kind,
            created_at=created_at,
            envelope=os.urandom(size),
        )
        for i in range(n)
    ]


def next_rows(store: Store, n: int, **kw: object) -> list[OutboxRow]:
    """Rows continuing the store's sequence (single writer: no await between this and submit)."""
    return rows_from(store.next_seq_nowait(), n, **kw)  # type: ignore[arg-type]


def db_files(directory: Path, name: str = "state.db") -> list[Path]:
    """The database file and its -wal/-shm companions that exist right now."""
    return sorted(directory.glob(name + "*"))
