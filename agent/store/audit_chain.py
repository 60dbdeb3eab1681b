"""Hash chain of the audit log: canonical record bytes and chain verification (pure).

What is recorded, and when, is decided in ``agent/audit_policy.py``.

Two record versions (docs/store.md, "Audit log"). v1 (records written before schema 3) hashes
every field itself. v2 hashes the personal fields (``actor``, ``details``) only through a
salted digest, ``personal = SHA-256(salt || [actor, details])``, with a fresh random salt per
record: erasing a person deletes the fields and the salt and keeps ``personal``, so the chain
still verifies and what is left cannot be tested against a guessed pseudonym."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

GENESIS = bytes(32)
_DOMAIN = b"cabinet-agent/audit/v1\0"
_DOMAIN_V2 = b"cabinet-agent/audit/v2\0"
_PERSONAL = b"cabinet-agent/audit/personal\0"
SALT_BYTES = 16


class ChainRow(NamedTuple):
    """One stored record. A redacted record has ``actor``/``details``/``salt`` None."""

    seq: int
    at_us: int
    actor: str | None
    action: str
    details: str | None
    prev_hash: bytes
    hash: bytes
    v: int
    salt: bytes | None
    personal: bytes | None
    redacted: bool


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


def personal_digest(salt: bytes, actor: str, details_json: str) -> bytes:
    """The salted digest that stands for a v2 record's personal fields in its hash."""
    body = json.dumps([actor, details_json], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_PERSONAL + salt + body.encode("utf-8")).digest()


def record_hash_v2(seq: int, at_us: int, action: str, personal: bytes, prev_hash: bytes) -> bytes:
    """SHA-256 over the v2 fields: the personal ones only through their salted digest."""
    body = json.dumps(
        [seq, at_us, action, personal.hex(), prev_hash.hex()], separators=(",", ":")
    ).encode("utf-8")
    return hashlib.sha256(_DOMAIN_V2 + body).digest()


class ChainReport(NamedTuple):
    checked: int
    first: int | None
    last: int | None
    problems: list[str]
    redacted: int  # records whose personal fields were erased (the chain still links them)
    opaque: int  # of those, v1 records: their other fields are no longer covered either


def _content_ok(row: ChainRow) -> tuple[bool, str]:
    """Whether the record's content matches its hash ('' or a problem's wording)."""
    if row.v == 2:
        if row.personal is None or len(row.personal) != 32:
            return False, "personal digest missing"
        if not row.redacted:
            if row.salt is None or row.actor is None or row.details is None:
                return False, "personal fields missing but not marked redacted"
            if personal_digest(row.salt, row.actor, row.details) != row.personal:
                return False, "content does not match its hash (edited)"
        want = record_hash_v2(row.seq, row.at_us, row.action, row.personal, row.prev_hash)
        return want == row.hash, "content does not match its hash (edited)"
    if row.v == 1:
        if row.redacted:
            return True, ""  # only its link is left to check
        if row.actor is None or row.details is None:
            return False, "personal fields missing but not marked redacted"
        want = record_hash(row.seq, row.at_us, row.actor, row.action, row.details, row.prev_hash)
        return want == row.hash, "content does not match its hash (edited)"
    return False, f"unknown record version {row.v}"


def verify_chain(
    rows: Iterable[ChainRow],
    *,
    anchor_seq: int,
    anchor_hash: bytes,
    head: tuple[int, bytes] | None,
    max_problems: int = 20,
) -> ChainReport:
    """Walk records in seq order: gaps, broken links, edits, a truncated tail; redactions are
    counted, not problems."""
    problems: list[str] = []
    redacted = 0
    opaque = 0
    expected_seq = anchor_seq + 1
    prev = anchor_hash
    checked = 0
    first: int | None = None
    last: int | None = None
    for row in rows:
        seq, prev_hash, stored_hash = row.seq, row.prev_hash, row.hash
        checked += 1
        if row.redacted:
            redacted += 1
            opaque += row.v == 1
        if first is None:
            first = seq
        last = seq
        if seq != expected_seq:
            problems.append(f"record {seq}: expected seq {expected_seq} (missing or reordered)")
        if prev_hash != prev:
            problems.append(f"record {seq}: prev_hash does not match the previous record")
        ok, why = _content_ok(row)
        if not ok:
            problems.append(f"record {seq}: {why}")
        prev = stored_hash
        expected_seq = seq + 1
        if len(problems) >= max_problems:
            problems.append("too many problems; stopped")
            return ChainReport(checked, first, last, problems, redacted, opaque)
    if head is not None:
        head_seq, head_hash = head
        if last is None and head_seq > anchor_seq:
            problems.append(f"log is empty but the head says {head_seq} records (truncated)")
        elif last is not None and (last, prev) != (head_seq, head_hash):
            if last < head_seq:
                problems.append(f"tail truncated: head is {head_seq}, last record is {last}")
            else:
                problems.append(f"head ({head_seq}) does not match the last record ({last})")
    return ChainReport(checked, first, last, problems, redacted, opaque)
