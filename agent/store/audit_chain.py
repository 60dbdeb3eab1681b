"""Hash chain of the audit log: canonical record bytes and chain verification (pure).

What is recorded, and when, is decided in ``agent/audit_policy.py``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

GENESIS = bytes(32)
_DOMAIN = b"cabinet-agent/audit/v1\0"


def canonical_details(details: Mapping[str, Any]) -> str:
    """Details as canonical JSON text (sorted keys, no spaces); rejects non-JSON values."""
    return json.dumps(
        details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(
    seq: int, at_us: int, actor: str, action: str, details_json: str, prev_hash: bytes
) -> bytes:
    """SHA-256 over an unambiguous encoding of every field, prev_hash included."""
    body = json.dumps(
        [seq, at_us, actor, action, details_json, prev_hash.hex()],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    return hashlib.sha256(_DOMAIN + body).digest()


def verify_chain(
    rows: Iterable[tuple[int, int, str, str, str, bytes, bytes]],
    *,
    anchor_seq: int,
    anchor_hash: bytes,
    head: tuple[int, bytes] | None,
    max_problems: int = 20,
) -> tuple[int, int | None, int | None, list[str]]:
    """Walk records in seq order; return (checked, first_seq, last_seq, problems)."""
    problems: list[str] = []
    expected_seq = anchor_seq + 1
    prev = anchor_hash
    checked = 0
    first: int | None = None
    last: int | None = None
    for seq, at_us, actor, action, details, prev_hash, stored_hash in rows:
        checked += 1
        if first is None:
            first = seq
        last = seq
        if seq != expected_seq:
            problems.append(f"record {seq}: expected seq {expected_seq} (missing or reordered)")
        if prev_hash != prev:
            problems.append(f"record {seq}: prev_hash does not match the previous record")
        if record_hash(seq, at_us, actor, action, details, prev_hash) != stored_hash:
            problems.append(f"record {seq}: content does not match its hash (edited)")
        prev = stored_hash
        expected_seq = seq + 1
        if len(problems) >= max_problems:
            problems.append("too many problems; stopped")
            return checked, first, last, problems
    if head is not None:
        head_seq, head_hash = head
        if last is None and head_seq > anchor_seq:
            problems.append(f"log is empty but the head says {head_seq} records (truncated)")
        elif last is not None and (last, prev) != (head_seq, head_hash):
            if last < head_seq:
                problems.append(f"tail truncated: head is {head_seq}, last record is {last}")
            else:
                problems.append(f"head ({head_seq}) does not match the last record ({last})")
    return checked, first, last, problems
