"""Synchronous database operations; only the store's worker thread ever calls these."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import uuid
from collections.abc import Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.store import audit_chain, schema
from agent.store.config import StoreConfig
from agent.store.salvage import SalvagedRow
from agent.store.types import (
    AlertKind,
    AuditReport,
    BaselineEntry,
    OutboxRow,
    SeqConflictError,
    StoreAlert,
    StoreError,
)

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# Before this the wall clock is not trustworthy (boards without RTC boot in 1970):
# never prune anything by age on such a clock.
SANE_CLOCK_US = 1_577_836_800_000_000  # 2020-01-01T00:00:00Z
_HEAD_KEY = "store.audit_head"
EPOCH_KEY = "store.epoch"
RESERVED_KV_PREFIX = "store."
_DROPPED_KEY = "dropped.p"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MIN_WAL_BYTES = 128 * 1024
_BUSY_MS = 5000
_CHECKPOINT_BUSY_MS = 250


def to_us(dt: datetime) -> int:
    """Microseconds since the Unix epoch (exact integer arithmetic)."""
    return (dt - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True, slots=True)
class HousekeepingResult:
    outbox_age_dropped: int
    audit_pruned: int
    max_page_count: int


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def wal_budget(path: Path, cfg: StoreConfig) -> int:
    """Bytes the WAL may occupy: max_wal_bytes, but never more than 1/8 of the filesystem."""
    try:
        st = os.statvfs(path.parent)
        disk = st.f_blocks * st.f_frsize
    except OSError:
        disk = 8 * cfg.max_wal_bytes
    return max(_MIN_WAL_BYTES, min(cfg.max_wal_bytes, disk // 8))


def connect(path: Path, cfg: StoreConfig) -> sqlite3.Connection:
    """Open the database with the store's pragmas (autocommit: transactions are explicit)."""
    if not path.exists():
        # Only the agent's user may read its state, whatever the umask says; SQLite gives
        # the -wal and -shm files the database file's permissions.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=True)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot enable WAL on {path} (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={cfg.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        # The WAL is bounded (docs/store.md, "Disk space"): a checkpoint once it holds half its
        # budget, and truncated back to half after a checkpoint; the page cap leaves room for
        # the whole budget.
        budget = wal_budget(path, cfg)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, budget // 2 // (page_size + 24))}")
        conn.execute(f"PRAGMA journal_size_limit={budget // 2}")
        conn.execute("PRAGMA secure_delete=FAST")  # deleted rows do not linger in free pages
    except BaseException:
        conn.close()
        raise
    return conn


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """Problems reported by PRAGMA quick_check (empty when the file is sound)."""
    rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)").fetchall()]
    return [] if rows == ["ok"] else rows


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Reserve:
    """Preallocated disk blocks (``<db>.reserve``) the store gives back when the disk is full.

    The page cap keeps the store itself from filling the disk; this covers something else
    filling it. Released, its blocks let a checkpoint finish and acknowledged rows be deleted
    (and the last writes commit at shutdown); recreated once the space is back.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.wanted = True  # False while stopping: its room may then be used for writes

    def present(self) -> bool:
        return self.path.exists()

    def create(self) -> bool:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            logger.warning("cannot reserve %d bytes of disk for the store: %s", self.size, err)
            return False
        os.close(fd)
        os.replace(tmp, self.path)
        return True

    def release(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


class Database:
    """The state database behind one connection. Not thread-safe: one thread owns it."""

    def __init__(self, conn: sqlite3.Connection, cfg: StoreConfig, found_version: int) -> None:
        self.conn = conn
        self.cfg = cfg
        self.found_version = found_version  # schema version before migrating (0: empty file)
        self.alerts: list[StoreAlert] = []  # raised by the current job; sent after COMMIT
        self.over_cap = False
        self.max_page_count = 0
        path = Path(cfg.path)
        self.wal_budget = wal_budget(path, cfg)
        self.reserve = Reserve(path.with_name(path.name + ".reserve"), self.wal_budget // 2)

    # -- sizing -----------------------------------------------------------------------------

    def apply_page_limit(self) -> int:
        """Cap the file so that it *and its WAL budget* fit below free disk space minus
        min_free_disk_bytes, and below max_db_bytes: the store hits SQLITE_FULL (and keeps
        room to delete acknowledged rows and to checkpoint) before the filesystem hits ENOSPC."""
        path = Path(self.cfg.path)
        page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        pages_now = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = free_bytes(path.parent)
        if free is None:
            free = self.cfg.max_db_bytes
        # What the files occupy now plus what is free, minus the WAL's whole budget (pages that
        # live only in the WAL still need their place in the database file at the checkpoint)
        # and minus the reserve if it has to be made again.
        room = file_size(path) + file_size(wal_path(path)) + free
        room -= self.cfg.min_free_disk_bytes + self.wal_budget
        if self.reserve.wanted and not self.reserve.present():
            room -= self.reserve.size
        limit = min(self.cfg.max_db_bytes, max(0, room))
        pages = max(limit // page_size, pages_now)
        self.max_page_count = int(
            self.conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]
        )
        return self.max_page_count

    def checkpoint(self, mode: str = "PASSIVE") -> bool:
        """Copy the WAL into the database file; True if every frame was (TRUNCATE: and the WAL
        file was cut to zero bytes, giving its blocks back)."""
        if mode == "PASSIVE":
            busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(busy) == 0
        # The other modes wait for readers (another process reading the file): briefly only,
        # this runs on the store's one thread and in the stop budget.
        self.conn.execute(f"PRAGMA busy_timeout={_CHECKPOINT_BUSY_MS}")
        try:
            busy, _log, _done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return int(busy) == 0

    def wal_bytes(self) -> int:
        return file_size(wal_path(Path(self.cfg.path)))

    # -- meta -------------------------------------------------------------------------------

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

    def restore_state(self, state: SalvagedState) -> None:
        """Put a quarantined file's baseline and kv state into this (fresh) database."""
        if state.baseline is not None:
            self.conn.execute("DELETE FROM baseline")
            self.conn.executemany(
                "INSERT INTO baseline (epc, location, last_seen_us) VALUES (?, ?, ?)",
                state.baseline,
            )
        for key, value, at in state.kv:
            self.kv_put(key, value, at)

    def epoch(self) -> bytes | None:
        raw = self.kv_get(EPOCH_KEY)
        return raw if raw is not None and len(raw) == 8 else None

    def set_epoch(self, epoch: bytes, now_us: int) -> None:
        self.kv_put(EPOCH_KEY, epoch, now_us)

    def outbox_bytes(self) -> int:
        return self._meta("outbox_bytes")

    def dropped_counts(self) -> dict[int, int]:
        rows = self.conn.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'dropped.p%'"
        ).fetchall()
        return {int(k[len(_DROPPED_KEY) :]): int(v) for k, v in rows}

    # -- outbox writes ------------------------------------------------------------------------

    def insert_rows(self, rows: Sequence[OutboxRow]) -> None:
        """Append rows that must continue the sequence exactly (checked against the database)."""
        if not rows:
            return
        expected = self.next_seq()
        if rows[0].seq != expected:
            raise SeqConflictError(expected, rows[0].seq)
        self.conn.executemany(
            "INSERT INTO outbox (seq, event_id, priority, kind, created_us, size, envelope) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.seq,
                    r.event_id.bytes,
                    r.priority,
                    r.kind,
                    to_us(r.created_at),
                    len(r.envelope),
                    r.envelope,
                )
                for r in rows
            ],
        )
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

    def enforce_bytes(self) -> None:
        """Drop the lowest-priority, oldest droppable rows until the outbox fits max_bytes."""
        total = self.outbox_bytes()
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
        deleted = 0
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            marks = ",".join("?" * len(chunk))
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

    # -- outbox reads -----------------------------------------------------------------------

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

    def outbox_summary(self) -> tuple[int, int, int | None, int]:
        """(deliverable rows, total bytes, oldest deliverable created_us, dead rows)."""
        depth, oldest = self.conn.execute(
            "SELECT count(*), min(created_us) FROM outbox WHERE dead = 0"
        ).fetchone()
        dead = self.conn.execute("SELECT count(*) FROM outbox WHERE dead = 1").fetchone()[0]
        return int(depth), self.outbox_bytes(), None if oldest is None else int(oldest), int(dead)

    # -- baseline and session -----------------------------------------------------------------

    def replace_baseline(self, baseline: Mapping[str, BaselineEntry]) -> None:
        self.conn.execute("DELETE FROM baseline")
        self.conn.executemany(
            "INSERT INTO baseline (epc, location, last_seen_us) VALUES (?, ?, ?)",
            [(epc, e.location, to_us(e.last_seen)) for epc, e in baseline.items()],
        )

    def load_baseline(self) -> dict[str, BaselineEntry]:
        return {
            str(epc): BaselineEntry(str(loc), from_us(int(seen)))
            for epc, loc, seen in self.conn.execute(
                "SELECT epc, location, last_seen_us FROM baseline"
            )
        }

    def save_session(self, blob: bytes | None, now_us: int) -> None:
        if blob is None:
            self.conn.execute("DELETE FROM session")
        else:
            self.conn.execute(
                "INSERT INTO session (id, blob, updated_us) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET blob = excluded.blob, updated_us = excluded.updated_us",
                (blob, now_us),
            )

    def load_session(self) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM session WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    # -- kv ---------------------------------------------------------------------------------

    def kv_get(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def kv_put(self, key: str, value: bytes | None, now_us: int) -> None:
        if value is None:
            self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            return
        self.conn.execute(
            "INSERT INTO kv (key, value, updated_us) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_us = excluded.updated_us",
            (key, value, now_us),
        )

    # -- audit ------------------------------------------------------------------------------

    def audit_head(self) -> tuple[int, bytes]:
        raw = self.kv_get(_HEAD_KEY)
        if raw is not None and len(raw) == 40:
            (seq,) = struct.unpack(">Q", raw[:8])
            return int(seq), raw[8:]
        return self._anchor()

    def _anchor(self) -> tuple[int, bytes]:
        row = self.conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
        return (0, audit_chain.GENESIS) if row is None else (int(row[0]), bytes(row[1]))

    def audit_append(self, actor: str, action: str, details_json: str, now_us: int) -> int:
        # The head (not the last row) is the chain's tip, so a truncated tail stays visible
        # as a gap even after new records are appended.
        head_seq, head_hash = self.audit_head()
        seq = head_seq + 1
        digest = audit_chain.record_hash(seq, now_us, actor, action, details_json, head_hash)
        self.conn.execute(
            "INSERT INTO audit (seq, at_us, actor, action, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, now_us, actor, action, details_json, head_hash, digest),
        )
        self.kv_put(_HEAD_KEY, struct.pack(">Q", seq) + digest, now_us)
        return seq

    def audit_rows(self) -> Generator[tuple[int, int, str, str, str, bytes, bytes]]:
        cur = self.conn.execute(
            "SELECT seq, at_us, actor, action, details, prev_hash, hash FROM audit ORDER BY seq"
        )
        try:
            for seq, at_us, actor, action, details, prev, digest in cur:
                yield (
                    int(seq),
                    int(at_us),
                    str(actor),
                    str(action),
                    str(details),
                    bytes(prev),
                    bytes(digest),
                )
        finally:
            cur.close()

    def audit_verify(self) -> AuditReport:
        anchor_seq, anchor_hash = self._anchor()
        raw = self.kv_get(_HEAD_KEY)
        head = None
        if raw is not None and len(raw) == 40:
            head = (int(struct.unpack(">Q", raw[:8])[0]), raw[8:])
        with contextlib.closing(self.audit_rows()) as rows:
            checked, first, last, problems = audit_chain.verify_chain(
                rows, anchor_seq=anchor_seq, anchor_hash=anchor_hash, head=head
            )
        if head is None and checked:
            problems.append("audit head record is missing")
        return AuditReport(
            ok=not problems,
            checked=checked,
            first_seq=first,
            last_seq=last,
            anchor_seq=anchor_seq,
            problems=tuple(problems),
        )

    def audit_records(self, limit: int) -> list[tuple[int, int, str, str, str, bytes, bytes]]:
        rows = self.conn.execute(
            "SELECT seq, at_us, actor, action, details, prev_hash, hash FROM audit "
            "ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            (int(a), int(b), str(c), str(d), str(e), bytes(f), bytes(g))
            for a, b, c, d, e, f, g in reversed(rows)
        ]

    def prune_audit(self, now_us: int) -> int:
        """Delete the prefix older than retention, keeping its last hash as the anchor."""
        if now_us < SANE_CLOCK_US:
            return 0
        cutoff = now_us - int(self.cfg.audit_retention_days * 86_400 * 1_000_000)
        # Only a contiguous prefix: a record with a skewed clock must not punch a hole.
        row = self.conn.execute("SELECT min(seq) FROM audit WHERE at_us >= ?", (cutoff,)).fetchone()
        if row[0] is None:
            top = self.conn.execute("SELECT max(seq) FROM audit").fetchone()[0]
            if top is None:
                return 0
            last = int(top)
        else:
            last = int(row[0]) - 1
        anchor_seq, _ = self._anchor()
        if last <= anchor_seq:
            return 0
        hit = self.conn.execute("SELECT hash FROM audit WHERE seq = ?", (last,)).fetchone()
        if hit is None:
            return 0
        self.conn.execute(
            "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (last, bytes(hit[0])),
        )
        return int(self.conn.execute("DELETE FROM audit WHERE seq <= ?", (last,)).rowcount)

    # -- diagnostics ------------------------------------------------------------------------

    def diagnostics(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for pragma in (
            "journal_mode",
            "synchronous",
            "foreign_keys",
            "page_size",
            "page_count",
            "freelist_count",
            "max_page_count",
        ):
            value = self.conn.execute(f"PRAGMA {pragma}").fetchone()[0]
            out[pragma] = value if isinstance(value, int) else str(value)
        out["schema_version"] = schema.current_version(self.conn)
        for suffix in ("", "-wal", "-shm"):
            try:
                out[f"file_bytes{suffix}"] = os.stat(str(self.cfg.path) + suffix).st_size
            except OSError:
                out[f"file_bytes{suffix}"] = 0
        return out

    # -- housekeeping -------------------------------------------------------------------------

    def housekeeping(self, now_us: int | None) -> HousekeepingResult:
        """Age-prune the outbox and the audit log (not when ``now_us`` is None: the clock is
        not trusted), re-fit the page cap."""
        aged = 0 if now_us is None else self.prune_age(now_us)
        pruned = 0 if now_us is None else self.prune_audit(now_us)
        pages = self.apply_page_limit()
        return HousekeepingResult(aged, pruned, pages)


def check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite opens it (and maybe deletes its -wal)."""
    try:
        with path.open("rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    if head and (len(head) < 100 or not head.startswith(_SQLITE_MAGIC)):
        raise CorruptDatabaseError("file is not an SQLite database (bad header)")


def open_database(path: Path, cfg: StoreConfig) -> Database:
    """Connect, check integrity and migrate; corruption surfaces as sqlite3.DatabaseError."""
    check_header(path)
    conn = connect(path, cfg)
    try:
        problems = quick_check(conn)
        if problems:
            raise CorruptDatabaseError("; ".join(problems[:5]))
        found = schema.current_version(conn)
        schema.migrate(conn)
        db = Database(conn, cfg, found)
        db.apply_page_limit()
    except BaseException:
        conn.close()
        raise
    return db


class CorruptDatabaseError(StoreError):
    """PRAGMA quick_check found damage."""


@dataclass(frozen=True, slots=True)
class SalvagedState:
    """What a quarantined file still tells by SQL, read in one snapshot."""

    next_seq: int | None
    epoch: bytes | None
    # None: the table could not be read (whole) -- never half a baseline.
    baseline: list[tuple[str, str, int]] | None
    kv: list[tuple[str, bytes, int]]  # the agent's state (``store.*`` keys left out)


def salvage_state(path: Path) -> SalvagedState | None:
    """Best effort: the baseline and kv state of a quarantined file (and its WAL), if readable.

    The store's own keys (epoch, audit head) stay behind: the new database has its own epoch
    and audit chain. Rows that fail their type checks are skipped; a baseline that cannot be
    read whole is not returned at all."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        conn.execute("BEGIN")  # one snapshot: baseline, kv and counter of the same commit
        next_seq: int | None = None
        with contextlib.suppress(sqlite3.Error):
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            if row is not None and isinstance(row[0], int) and 1 <= row[0] < 2**62:
                next_seq = row[0]
        kv: list[tuple[str, bytes, int]] = []
        epoch: bytes | None = None
        with contextlib.suppress(sqlite3.Error):
            for key, value, at in conn.execute("SELECT key, value, updated_us FROM kv"):
                if not (isinstance(key, str) and isinstance(value, bytes) and isinstance(at, int)):
                    continue
                if key == EPOCH_KEY:
                    epoch = value if len(value) == 8 else None
                elif not key.startswith("store."):
                    kv.append((key, value, at))
        baseline: list[tuple[str, str, int]] | None = None
        with contextlib.suppress(sqlite3.Error):
            rows = conn.execute("SELECT epc, location, last_seen_us FROM baseline").fetchall()
            if all(
                isinstance(e, str) and isinstance(loc, str) and isinstance(at, int)
                for e, loc, at in rows
            ):
                baseline = [(str(e), str(loc), int(at)) for e, loc, at in rows]
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return SalvagedState(next_seq, epoch, baseline, kv)


def salvage_next_seq(path: Path) -> int | None:
    """Best effort: the committed sequence counter of a quarantined file, if still readable."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    found: list[int] = []
    try:
        for sql in (
            "SELECT value FROM meta WHERE key = 'next_seq'",
            "SELECT max(seq) + 1 FROM outbox",
        ):
            try:
                row = conn.execute(sql).fetchone()
            except sqlite3.Error:
                continue
            value: Any = row[0] if row else None
            if isinstance(value, int) and 1 <= value < 2**62:
                found.append(value)
    finally:
        conn.close()
    return max(found) if found else None
