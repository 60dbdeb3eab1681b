"""The audit table: a hash-chained log whose head lives in ``kv`` and whose pruned prefix
leaves an anchor. The chain's rules are agent/store/audit_chain.py; only the store's worker
thread calls these."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import struct
from collections.abc import Collection, Generator
from typing import Any, Protocol

from agent.domain.events import PSEUDONYM_BODY
from agent.store import audit_chain
from agent.store.config import StoreConfig
from agent.store.types import SANE_CLOCK_US, AuditReport

HEAD_KEY = "store.audit_head"


class _KeyValues(Protocol):
    def kv_get(self, key: str) -> bytes | None: ...

    def kv_put(self, key: str, value: bytes | None, now_us: int) -> None: ...


class AuditTable:
    """The audit chain behind one connection; its head is a ``kv`` entry of the same database."""

    def __init__(self, conn: sqlite3.Connection, cfg: StoreConfig, kv: _KeyValues) -> None:
        self.conn = conn
        self.cfg = cfg
        self._kv = kv

    def head(self) -> tuple[int, bytes]:
        raw = self._kv.kv_get(HEAD_KEY)
        if raw is not None and len(raw) == 40:
            (seq,) = struct.unpack(">Q", raw[:8])
            return int(seq), raw[8:]
        return self._anchor()

    def _anchor(self) -> tuple[int, bytes]:
        row = self.conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
        return (0, audit_chain.GENESIS) if row is None else (int(row[0]), bytes(row[1]))

    def append(self, actor: str, action: str, details_json: str, now_us: int) -> int:
        # The head (not the last row) is the chain's tip, so a truncated tail stays visible
        # as a gap even after new records are appended.
        head_seq, head_hash = self.head()
        seq = head_seq + 1
        salt = os.urandom(audit_chain.SALT_BYTES)
        personal = audit_chain.personal_digest(salt, actor, details_json)
        digest = audit_chain.record_hash_v2(seq, now_us, action, personal, head_hash)
        self.conn.execute(
            "INSERT INTO audit (seq, at_us, actor, action, details, prev_hash, hash, v, salt, "
            "personal) VALUES (?, ?, ?, ?, ?, ?, ?, 2, ?, ?)",
            (seq, now_us, actor, action, details_json, head_hash, digest, salt, personal),
        )
        self._kv.kv_put(HEAD_KEY, struct.pack(">Q", seq) + digest, now_us)
        return seq

    def rows(self) -> Generator[audit_chain.ChainRow]:
        cur = self.conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")  # noqa: S608 -- constant
        try:
            for raw in cur:
                yield _row(raw)
        finally:
            cur.close()

    def links(self, from_seq: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        """(seq, prev_hash, hash) of the records from ``from_seq`` on (the oldest kept one if
        that was pruned), at most ``limit``."""
        rows = self.conn.execute(
            "SELECT seq, prev_hash, hash FROM audit WHERE seq >= ? ORDER BY seq LIMIT ?",
            (from_seq, limit),
        ).fetchall()
        return [(int(s), bytes(p), bytes(h)) for s, p, h in rows]

    def redact(self, pseudonyms: Collection[str]) -> int:
        """Erase the personal fields of every record naming one of ``pseudonyms`` (as actor or
        as a JSON string in its details); the chain keeps their digests. Returns how many.

        One pass over the table whatever the number of pseudonyms (an erasure names up to
        1000): a query per pseudonym kept the store's thread busy for seconds per 20,000
        records, every write of the cabinet waiting behind it."""
        erased = frozenset(pseudonyms)

        def names_erased(actor: object, details: object) -> int:
            if actor in erased:
                return 1
            if isinstance(details, str) and '"p' in details:
                return int(any(m[1] in erased for m in _QUOTED_PSEUDONYM.finditer(details)))
            return 0

        self.conn.create_function("names_erased", 2, names_erased, deterministic=True)
        try:
            with secure_delete(self.conn):
                return int(
                    self.conn.execute(
                        "UPDATE audit SET actor = '', details = '', salt = NULL, redacted = 1 "
                        "WHERE redacted = 0 AND names_erased(actor, details)"
                    ).rowcount
                )
        finally:
            self.conn.create_function("names_erased", 2, None)

    def verify(self) -> AuditReport:
        anchor_seq, anchor_hash = self._anchor()
        raw = self._kv.kv_get(HEAD_KEY)
        head = None
        if raw is not None and len(raw) == 40:
            head = (int(struct.unpack(">Q", raw[:8])[0]), raw[8:])
        with contextlib.closing(self.rows()) as rows:
            found = audit_chain.verify_chain(
                rows, anchor_seq=anchor_seq, anchor_hash=anchor_hash, head=head
            )
        problems = found.problems
        if head is None and found.checked:
            problems.append("audit head record is missing")
        return AuditReport(
            ok=not problems,
            checked=found.checked,
            first_seq=found.first,
            last_seq=found.last,
            anchor_seq=anchor_seq,
            problems=tuple(problems),
            redacted=found.redacted,
            redacted_v1=found.opaque,
        )

    def records(self, limit: int) -> list[audit_chain.ChainRow]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?",  # noqa: S608 -- constant
            (limit,),
        ).fetchall()
        return [_row(r) for r in reversed(rows)]

    def prune(self, now_us: int) -> int:
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
        with secure_delete(self.conn):
            return int(self.conn.execute("DELETE FROM audit WHERE seq <= ?", (last,)).rowcount)


@contextlib.contextmanager
def secure_delete(conn: sqlite3.Connection) -> Generator[None]:
    """Deletes that zero every byte they free, freed pages included (the connection's
    ``secure_delete=FAST`` leaves whole freed pages as they were). The old content still sits
    in WAL frames until a TRUNCATE checkpoint (``Database.scrub_pending``)."""
    (before,) = conn.execute("PRAGMA secure_delete").fetchone()
    conn.execute("PRAGMA secure_delete=ON")
    try:
        yield
    finally:
        # The setting in force before (FAST on the agent's connection): nested uses stay ON.
        conn.execute(f"PRAGMA secure_delete={int(before)}")


_COLUMNS = "seq, at_us, actor, action, details, prev_hash, hash, v, salt, personal, redacted"
# A pseudonym as a JSON string (a value or a key) in a record's details.
_QUOTED_PSEUDONYM = re.compile(rf'"({PSEUDONYM_BODY})"')


def _row(raw: tuple[Any, ...]) -> audit_chain.ChainRow:
    seq, at_us, actor, action, details, prev, digest, v, salt, personal, redacted = raw
    gone = bool(redacted)
    return audit_chain.ChainRow(
        seq=int(seq),
        at_us=int(at_us),
        actor=None if gone else str(actor),
        action=str(action),
        details=None if gone else str(details),
        prev_hash=bytes(prev),
        hash=bytes(digest),
        v=int(v),
        salt=None if salt is None else bytes(salt),
        personal=None if personal is None else bytes(personal),
        redacted=gone,
    )
