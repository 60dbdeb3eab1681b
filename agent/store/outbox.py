"""The outbox table: sealed events in sequence, their byte and age budgets, delivery marks.

Only the store's worker thread calls these, inside the transactions it opens.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Collection, Sequence

from agent.store.config import StoreConfig
from agent.store.salvage import SalvagedRow
from agent.store.types import (
    SANE_CLOCK_US,
    AlertKind,
    OutboxRow,
    SeqConflictError,
    StoreAlert,
    from_us,
    to_us,
)

_DROPPED_KEY = "dropped.p"
# Rows per INSERT statement: 7 parameters each stays under SQLite's oldest default limit of 999
# host parameters per statement (a power of two: see insert_rows).
_INSERT_CHUNK = 128
_ACK_CHUNK = 512  # seqs per DELETE (a power of two: see ack)


class Outbox:
    """The outbox and its counters (``meta``) behind one connection."""

    def __init__(self, conn: sqlite3.Connection, cfg: StoreConfig) -> None:
        self.conn = conn
        self.cfg = cfg
        self.alerts: list[StoreAlert] = []  # raised by the current job; sent after COMMIT
        self.over_cap = False

    # -- counters -----------------------------------------------------------------------------

    def _meta(self, key: str, default: int = 0) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _meta_add(self, key: str, delta: int) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, delta),
        )

    def next_seq(self) -> int:
        return self._meta("next_seq", 1)

    def set_next_seq(self, value: int) -> None:
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (value,))

    def total_bytes(self) -> int:
        return self._meta("outbox_bytes")

    def dropped_counts(self) -> dict[int, int]:
        rows = self.conn.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'dropped.p%'"
        ).fetchall()
        return {int(k[len(_DROPPED_KEY) :]): int(v) for k, v in rows}

    # -- writes -------------------------------------------------------------------------------

    def insert_rows(self, rows: Sequence[OutboxRow]) -> None:
        """Append rows that must continue the sequence exactly (checked against the database)."""
        if not rows:
            return
        expected = self.next_seq()
        if rows[0].seq != expected:
            raise SeqConflictError(expected, rows[0].seq)
        # One statement per chunk, not one step per row: CPython's sqlite3 releases and retakes
        # the GIL around every step, and each retake can wait out a whole switch interval
        # behind the thread that seals the next events (docs/performance.md, "A small board").
        # Chunks of a power of two rows (100 = 64 + 32 + 4): the connection caches every
        # statement it prepared, and one per row count held ~9 MiB once commits of every size
        # up to 128 had been seen; at most eight shapes now.
        at = added = 0
        while at < len(rows):
            size = min(_INSERT_CHUNK, 1 << ((len(rows) - at).bit_length() - 1))
            chunk = rows[at : at + size]
            at += size
            params: list[object] = []
            for r in chunk:
                added += len(r.envelope)
                params += (
                    r.seq,
                    r.event_id.bytes,
                    r.priority,
                    r.kind,
                    to_us(r.created_at),
                    len(r.envelope),
                    r.envelope,
                )
            self.conn.execute(
                "INSERT INTO outbox (seq, event_id, priority, kind, created_us, size, envelope) "
                "VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                params,
            )
        # The running total, once per call rather than a trigger per row (schema migration 4).
        self._meta_add("outbox_bytes", added)
        self.set_next_seq(rows[-1].seq + 1)
        self.enforce_bytes()

    def insert_salvaged(self, rows: Sequence[SalvagedRow]) -> None:
        """Rows read from a quarantined file, kept under their original seqs (sealed with them)."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO outbox (seq, event_id, priority, kind, created_us, size, "
            "envelope, attempts, dead) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.seq,
                    r.event_id.bytes,
                    r.priority,
                    r.kind,
                    r.created_us,
                    len(r.envelope),
                    r.envelope,
                    r.attempts,
                    int(r.dead),
                )
                for r in rows
            ],
        )
        # Some rows may have been ignored (already there): count what the table holds. A
        # salvage is rare and one-off, so the scan is no cost that matters.
        self.conn.execute(
            "UPDATE meta SET value = (SELECT coalesce(sum(size), 0) FROM outbox) "
            "WHERE key = 'outbox_bytes'"
        )

    def enforce_bytes(self) -> None:
        """Drop the lowest-priority, oldest droppable rows until the outbox fits max_bytes."""
        total = self.total_bytes()
        cap = self.cfg.max_bytes
        if total <= cap:
            self.over_cap = False
            return
        droppable = self.cfg.overflow.droppable_priorities
        victims: list[tuple[int, int, int]] = []
        if droppable:
            marks = ",".join("?" * len(droppable))
            cur = self.conn.execute(
                f"SELECT seq, priority, size FROM outbox WHERE priority IN ({marks}) "  # noqa: S608 -- placeholders only
                "ORDER BY priority DESC, seq ASC",
                droppable,
            )
            excess = total - cap
            for seq, prio, size in cur:
                victims.append((int(seq), int(prio), int(size)))
                excess -= int(size)
                if excess <= 0:
                    break
            cur.close()
        if victims:
            self._drop(victims, AlertKind.OVERFLOW_DROPPED, f"outbox above {cap} bytes")
            total -= sum(v[2] for v in victims)
        if total > cap:
            if not self.over_cap:
                self.alerts.append(
                    StoreAlert(
                        AlertKind.OVER_CAP,
                        f"outbox holds {total} bytes > max_bytes {cap}; "
                        "only undroppable rows are left, keeping them",
                    )
                )
            self.over_cap = True
        else:
            self.over_cap = False

    def _drop(self, victims: Sequence[tuple[int, int, int]], kind: AlertKind, why: str) -> None:
        self.conn.executemany("DELETE FROM outbox WHERE seq = ?", [(v[0],) for v in victims])
        counts: dict[int, int] = {}
        for _, prio, _ in victims:
            counts[prio] = counts.get(prio, 0) + 1
        for prio, n in counts.items():
            self._meta_add(f"{_DROPPED_KEY}{prio}", n)
        nbytes = sum(v[2] for v in victims)
        self.alerts.append(
            StoreAlert(
                kind,
                f"{why}: dropped {len(victims)} undelivered rows ({nbytes} bytes) by policy",
                dropped=counts,
                dropped_bytes=nbytes,
                seqs=tuple(sorted(v[0] for v in victims)),
            )
        )

    def prune_age(self, now_us: int) -> int:
        """Drop droppable rows older than max_age_days; returns how many."""
        droppable = self.cfg.overflow.droppable_priorities
        if now_us < SANE_CLOCK_US or not droppable:
            return 0
        cutoff = now_us - int(self.cfg.max_age_days * 86_400 * 1_000_000)
        marks = ",".join("?" * len(droppable))
        victims = [
            (int(s), int(p), int(z))
            for s, p, z in self.conn.execute(
                f"SELECT seq, priority, size FROM outbox WHERE created_us < ? "  # noqa: S608 -- placeholders only
                f"AND priority IN ({marks})",
                (cutoff, *droppable),
            ).fetchall()
        ]
        if victims:
            self._drop(
                victims, AlertKind.AGE_DROPPED, f"rows older than {self.cfg.max_age_days:g} days"
            )
        return len(victims)

    def ack(self, seqs: Sequence[int]) -> int:
        # One DELETE per chunk, its IN list padded to a power of two (the last seq repeated):
        # a statement per batch length piled up in the connection's statement cache (~4 MiB
        # during a backlog drain), and one statement per row made the job's savepoint journal
        # every touched page again for each row (~5 MiB in memory for 256 rows).
        deleted = 0
        for i in range(0, len(seqs), _ACK_CHUNK):
            chunk = list(seqs[i : i + _ACK_CHUNK])
            width = 1 << (len(chunk) - 1).bit_length()
            chunk += chunk[-1:] * (width - len(chunk))
            marks = ",".join("?" * width)
            cur = self.conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)  # noqa: S608 -- placeholders only
            deleted += cur.rowcount
        if deleted:
            self.over_cap = False
        return deleted

    def mark_failed(self, seq: int, reason: str) -> bool:
        rows = self.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ? "
            "RETURNING attempts, dead, priority, kind",
            (reason[:200], seq),
        ).fetchall()  # fetch all: a half-read RETURNING statement stays open
        if not rows:
            return False
        row = rows[0]
        attempts, dead, priority, kind = int(row[0]), int(row[1]), int(row[2]), str(row[3])
        if dead or attempts < self.cfg.dead_letter_after:
            return False
        self.conn.execute("UPDATE outbox SET dead = 1 WHERE seq = ?", (seq,))
        self.alerts.append(
            StoreAlert(
                AlertKind.DEAD_LETTERED,
                f"seq {seq} ({kind}, priority {priority}) dead-lettered after {attempts} "
                f"failed deliveries: {reason[:200]}",
                seqs=(seq,),
            )
        )
        return True

    def revive_dead(self, seqs: Sequence[int] | None) -> int:
        if seqs is None:
            return self.conn.execute(
                "UPDATE outbox SET dead = 0, attempts = 0 WHERE dead = 1"
            ).rowcount
        return sum(
            self.conn.execute(
                "UPDATE outbox SET dead = 0, attempts = 0 WHERE dead = 1 AND seq = ?", (s,)
            ).rowcount
            for s in seqs
        )

    # -- reads ------------------------------------------------------------------------------

    def peek(
        self,
        limit: int,
        exclude: Collection[int],
        after_seq: int | None,
        live_first: bool,
        max_seq: int | None = None,
    ) -> list[OutboxRow]:
        order = "DESC" if live_first else "ASC"
        where = "dead = 0"
        params: list[int] = []
        if after_seq is not None:
            where += " AND seq > ?" if not live_first else " AND seq < ?"
            params.append(after_seq)
        if max_seq is not None:
            where += " AND seq <= ?"
            params.append(max_seq)
        params.append(limit + len(exclude))
        out: list[OutboxRow] = []
        cur = self.conn.execute(
            "SELECT seq, event_id, priority, kind, created_us, envelope, attempts "  # noqa: S608 -- fixed fragments only
            f"FROM outbox WHERE {where} ORDER BY seq {order} LIMIT ?",
            params,
        )
        for seq, eid, prio, kind, created, env, attempts in cur:
            if seq in exclude:
                continue
            out.append(
                OutboxRow(
                    seq=int(seq),
                    event_id=uuid.UUID(bytes=bytes(eid)),
                    priority=int(prio),
                    kind=str(kind),
                    created_at=from_us(int(created)),
                    envelope=bytes(env),
                    attempts=int(attempts),
                )
            )
            if len(out) >= limit:
                break
        cur.close()
        return out

    def summary(self) -> tuple[int, int, int | None, int]:
        """(deliverable rows, total bytes, oldest deliverable created_us, dead rows)."""
        depth, oldest = self.conn.execute(
            "SELECT count(*), min(created_us) FROM outbox WHERE dead = 0"
        ).fetchone()
        dead = self.conn.execute("SELECT count(*) FROM outbox WHERE dead = 1").fetchone()[0]
        return int(depth), self.total_bytes(), None if oldest is None else int(oldest), int(dead)
