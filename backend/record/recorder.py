"""From a broker message to the record: open, validate, store once, project — one transaction.

``Recorder.record(topic, payload)`` either records the event (and what it means: where its item
is, which alert it raises or clears, which seq gap it opens or closes), finds it already
recorded (a duplicate: nothing changes), or refuses it with a reason (recorded in
``refused_log`` with the payload still sealed). Every outcome is committed before it returns,
so the caller may acknowledge the message to the broker afterwards and lose nothing.

The projections are order-independent: an event updates an item only if it is newer than the
event the item's row came from (same cabinet: a higher seq; another cabinet: a later time), an
alert is open while no later event of its cabinet clears it, and a seq gap is split or closed by
the late event that falls into it. Replays, duplicates and several consumers writing at once
therefore give the same record as one consumer reading the stream in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ValidationError

from agent.domain.events import (
    AccessGraceGranted,
    AccessLockout,
    AgentAlert,
    AgentClockStep,
    AuditAnchor,
    DoorForced,
    DoorLeftOpen,
    Event,
    InventoryIncomplete,
    InventorySnapshot,
    InventorySuspect,
    ItemCalibrationOverdue,
    ItemCheckedOut,
    ItemCounterfeit,
    ItemMisplaced,
    ItemMissing,
    ItemOverdue,
    ItemRestocked,
    ItemReturned,
    ItemUnknown,
    ReaderFlapping,
    ReaderOffline,
    ReaderOnline,
    SessionClosed,
    event_adapter,
)
from agent.privacy.envelope import (
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    EnvelopeHeader,
    Opener,
    parse_header,
)
from backend.anchors import judge
from backend.record.db import RecordDb, Tx

logger = logging.getLogger(__name__)

__all__ = ["Outcome", "Recorder", "Refusal", "admit", "iso"]

MAX_SEQ = (1 << 63) - 1  # a signed 64-bit column on both databases


def iso(value: datetime) -> str:
    """An instant as the record stores it on SQLite (fixed width, so text order is time order)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Refusal(Exception):
    """A message that cannot be recorded as an event; ``reason`` is safe to store and show."""

    def __init__(self, reason: str, header: EnvelopeHeader | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header


@dataclass(frozen=True)
class Admitted:
    """An opened, validated event and where it came from."""

    site: str
    cabinet: str
    header: EnvelopeHeader
    event: Event
    plaintext: bytes

    @property
    def epoch(self) -> str:
        return "" if self.header.epoch is None else self.header.epoch.hex()


@dataclass
class Outcome:
    """What one message did to the record."""

    status: Literal["recorded", "duplicate", "refused"]
    admitted: Admitted | None = None
    reason: str = ""
    gaps_opened: list[tuple[str, int, int]] = field(default_factory=list)
    gaps_closed: list[tuple[str, int]] = field(default_factory=list)  # (stream, seq that filled)
    seq_conflict: bool = False
    anchor_problems: list[str] = field(default_factory=list)  # docs/privacy.md §9


# ---------------------------------------------------------------------- admission


def admit(opener: Opener, topic: str, payload: bytes) -> Admitted:
    """Open and validate one message; ``Refusal`` says why it is not an event."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[4] != "events":
        raise Refusal("unexpected topic shape")
    site, cabinet = parts[2], parts[3]
    header: EnvelopeHeader | None = None
    try:
        header = parse_header(payload)
        header, plaintext = opener.open(payload)
    except EnvelopeError as err:
        raise Refusal(f"envelope: {err}", header) from None
    if header.cabinet_id != cabinet:
        raise Refusal(f"envelope of cabinet {header.cabinet_id!r} on {cabinet!r}'s topic", header)
    if header.seq < 1:
        raise Refusal("seq 0 is never published", header)
    if header.seq > MAX_SEQ:
        raise Refusal("seq beyond what the record can hold", header)
    try:
        event = event_adapter.validate_json(plaintext)
    except ValidationError as err:
        raise Refusal(f"body: {_validation_reason(err)}", header) from None
    if not _storable(json.loads(plaintext)):
        # Valid JSON, but neither database's text (nor PostgreSQL's JSONB) can hold it.
        raise Refusal("body: a string holds NUL or an unpaired surrogate", header)
    mismatches = [
        name
        for name, ok in (
            ("event_id", event.event_id == header.event_id),
            ("seq", event.seq == header.seq),
            ("cabinet_id", event.cabinet_id == header.cabinet_id),
            ("site_id", event.site_id == site),
        )
        if not ok
    ]
    if mismatches:
        where = "header or topic"
        raise Refusal(f"body: {', '.join(mismatches)} differ(s) from the {where}", header)
    return Admitted(site, cabinet, header, event, plaintext)


def _storable(value: Any) -> bool:
    """No NUL and no lone surrogate in any string, key or value."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def _field_names() -> frozenset[str]:
    names: set[str] = set()
    union = get_args(get_args(Event)[0])
    for model in union:
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.update(model.model_fields)
            names.add(str(model.model_fields["type"].default))
    return frozenset(names)


_KNOWN_NAMES = _field_names()


def _validation_reason(err: ValidationError) -> str:
    """pydantic's complaint without any input value: a hostile body may carry a raw badge id
    anywhere, even as a key, so only known field names and indexes are shown."""
    parts: list[str] = []
    for e in err.errors(include_url=False, include_input=False, include_context=False)[:3]:
        kind = e["type"]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            parts.append("unknown or missing event type")
            continue
        if kind == "json_invalid":
            parts.append("not JSON")
            continue
        loc = ".".join(
            str(p) if isinstance(p, int) or p in _KNOWN_NAMES else "<key>" for p in e["loc"]
        )
        msg = e["msg"] if kind != "extra_forbidden" else "unexpected field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = err.error_count() - len(parts)
    text = "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
    return _SAFE_TEXT.sub("?", text)[:300]


_SAFE_TEXT = re.compile(r"[^\x20-\x7e]")


# ---------------------------------------------------------------------- recorder


class Recorder:
    """Records messages in one database connection (one thread)."""

    def __init__(self, db: RecordDb, opener: Opener, name: str) -> None:
        self.db = db
        self._opener = opener
        self.name = name  # recorded_by / refused_by: which consumer wrote the row

    def record(self, topic: str, payload: bytes, *, stop: threading.Event | None = None) -> Outcome:
        """Commit what this message means; raises RecordUnavailable if the database can't."""
        try:
            admitted = admit(self._opener, topic, payload)
        except Refusal as refusal:
            return self._refuse(topic, payload, refusal, stop)
        outcome = self.db.transaction(lambda tx: self._apply(tx, admitted), stop=stop)
        if outcome.status == "refused":
            return self._refuse(topic, payload, Refusal(outcome.reason, admitted.header), stop)
        return outcome

    def refuse(
        self, topic: str, payload: bytes, reason: str, *, stop: threading.Event | None = None
    ) -> Outcome:
        """Record a message as refused for ``reason`` (its header, if readable, is kept)."""
        try:
            header: EnvelopeHeader | None = parse_header(payload)
        except EnvelopeError:
            header = None
        return self._refuse(topic, payload, Refusal(reason, header), stop)

    # -- refusals

    def _refuse(
        self, topic: str, payload: bytes, refusal: Refusal, stop: threading.Event | None
    ) -> Outcome:
        # One row per message (topic and payload): its redeliveries are not recorded again.
        digest = hashlib.sha256(topic.encode("utf-8", "replace") + b"\0" + payload).hexdigest()
        h = refusal.header
        kept = payload if len(payload) <= MAX_ENVELOPE_BYTES else b""
        row = (
            digest,
            _printable(topic, 300),
            h.cabinet_id if h is not None else None,
            None if h is None or h.epoch is None else h.epoch.hex(),
            h.seq if h is not None and h.seq <= MAX_SEQ else None,
            str(h.event_id) if h is not None else None,
            h.key_id if h is not None else None,
            refusal.reason,
            kept,
            iso(datetime.now(UTC)),
            self.name,
        )
        site = topic.split("/")[2] if topic.count("/") == 4 else None

        def write(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO refused_log (digest, topic, cabinet_id, epoch, seq, event_id, "
                "key_id, reason, payload, refused_at, refused_by, site_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (*row, None if site is None else _printable(site, 64)),
            )

        self.db.transaction(write, stop=stop)
        logger.warning("refused a message on %s: %s", _printable(topic, 120), refusal.reason)
        return Outcome("refused", reason=refusal.reason)

    # -- one event

    def _apply(self, tx: Tx, a: Admitted) -> Outcome:
        ev = a.event
        eid = str(ev.event_id)
        inserted = tx.execute(
            "INSERT INTO event_log (event_id, site_id, cabinet_id, epoch, seq, type, time, "
            "clock, key_id, body, recorded_at, recorded_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
            (
                eid,
                a.site,
                a.cabinet,
                a.epoch,
                ev.seq,
                ev.type,
                iso(ev.time),
                ev.clock,
                a.header.key_id,
                a.plaintext.decode("utf-8"),
                iso(datetime.now(UTC)),
                self.name,
            ),
        )
        if inserted == 0:
            row = tx.one(
                "SELECT site_id, cabinet_id, epoch, seq FROM event_log WHERE event_id = ?", (eid,)
            )
            if row is not None and tuple(row) != (a.site, a.cabinet, a.epoch, ev.seq):
                # Not a redelivery: another event claims a recorded event id.
                return Outcome("refused", a, reason="event id already recorded for another event")
            return Outcome("duplicate", a)
        outcome = Outcome("recorded", a)
        self._track_seq(tx, a, outcome)
        _project_item(tx, a)
        _project_alerts(tx, a)
        if isinstance(ev, AuditAnchor):
            outcome.anchor_problems = self._check_anchor(tx, a, ev)
        return outcome

    def _check_anchor(self, tx: Tx, a: Admitted, ev: AuditAnchor) -> list[str]:
        """An anchor must extend the head the cabinet's previous one showed, as the record
        keeps it (a consumer restart forgets nothing). Anchors are ordered by their event seq:
        one that arrives after a newer one (a late redelivery) is recorded, but judged against
        nothing and moves nothing."""
        key = (a.site, a.cabinet)
        tx.execute(
            "INSERT INTO audit_anchor_head (site_id, cabinet_id, anchor_seq, head_seq, "
            "head_hash, event_id, time) VALUES (?, ?, 0, 0, '', '', ?) "
            "ON CONFLICT (site_id, cabinet_id) DO NOTHING",
            (*key, iso(ev.time)),
        )
        lock = self.db.dialect.lock_row  # the cabinet's row stays ours until commit
        sql = (
            "SELECT anchor_seq, head_seq, head_hash, event_id, time FROM audit_anchor_head "
            "WHERE site_id = ? "
        )
        row = tx.one(sql + "AND cabinet_id = ?" + lock, key)
        assert row is not None
        anchor_seq, head_seq, head_hash = int(row[0]), int(row[1]), str(row[2])
        later = self._later(tx, a, anchor_seq, str(row[3] or ""), row[4])
        if not later:
            return []
        prev = None if anchor_seq == 0 else (head_seq, head_hash)
        head, problems = judge(prev, ev.model_dump(mode="json"))
        tx.execute(
            "UPDATE audit_anchor_head SET anchor_seq = ?, head_seq = ?, head_hash = ?, "
            "event_id = ?, time = ? WHERE site_id = ? AND cabinet_id = ?",
            (ev.seq, head[0], head[1], str(ev.event_id), iso(ev.time), *key),
        )
        for n, problem in enumerate(problems):
            tx.execute(
                "INSERT INTO audit_anchor_problem (event_id, n, site_id, cabinet_id, seq, time, "
                "problem) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id, n) DO NOTHING",
                (str(ev.event_id), n, *key, ev.seq, iso(ev.time), problem),
            )
            logger.error("%s/%s: %s", a.site, a.cabinet, problem)
        return problems

    def _later(
        self, tx: Tx, a: Admitted, anchor_seq: int, head_event: str, head_time: object
    ) -> bool:
        """This anchor comes after the one that set the head. In the same epoch, by seq. Of
        another epoch (a database replaced: its seq started again, docs/store.md), by time:
        else a cabinet whose whole state directory was wiped would have its anchors ignored
        until its new seq passed the old one -- its chain's truncation reported months
        late, if ever -- and an anchor of the old epoch delivered late would be judged
        against the new chain."""
        if head_event:
            row = tx.one("SELECT epoch FROM event_log WHERE event_id = ?", (head_event,))
            if row is not None and str(row[0] or "") != a.epoch:
                if isinstance(head_time, datetime):  # PostgreSQL: timestamptz
                    return a.event.time > head_time
                return iso(a.event.time) > str(head_time)
        return a.event.seq > anchor_seq

    def _track_seq(self, tx: Tx, a: Admitted, outcome: Outcome) -> None:
        key = (a.site, a.cabinet, a.epoch)
        seq = a.event.seq
        now = iso(datetime.now(UTC))
        stream = f"{a.site}/{a.cabinet}" + (f"@{a.epoch}" if a.epoch else "")
        created = tx.execute(
            "INSERT INTO seq_stream (site_id, cabinet_id, epoch, low_seq, high_seq, events, "
            "first_recorded_at, last_recorded_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?) "
            "ON CONFLICT (site_id, cabinet_id, epoch) DO NOTHING",
            (*key, seq, seq, now, now),
        )
        if created:
            return
        lock = self.db.dialect.lock_row  # the stream's row stays ours until commit
        sql = "SELECT low_seq, high_seq FROM seq_stream WHERE site_id = ? AND cabinet_id = ? "
        row = tx.one(sql + "AND epoch = ?" + lock, key)
        assert row is not None
        low, high = int(row[0]), int(row[1])
        if seq > high:
            if seq > high + 1:
                self._open_gap(tx, key, high + 1, seq - 1, now)
                outcome.gaps_opened.append((stream, high + 1, seq - 1))
            high = seq
        elif seq < low:
            if seq < low - 1:
                self._open_gap(tx, key, seq + 1, low - 1, now)
                outcome.gaps_opened.append((stream, seq + 1, low - 1))
            low = seq
        elif self._fill_gap(tx, key, seq):
            outcome.gaps_closed.append((stream, seq))
        else:
            # Inside the recorded range and in no gap: this seq was recorded under another id.
            outcome.seq_conflict = True
            logger.error(
                "%s: seq %d carries a second event id (%s): the cabinet reused a sequence number",
                stream,
                seq,
                a.event.event_id,
            )
        tx.execute(
            "UPDATE seq_stream SET low_seq = ?, high_seq = ?, events = events + 1, "
            "conflicts = conflicts + ?, last_recorded_at = ? "
            "WHERE site_id = ? AND cabinet_id = ? AND epoch = ?",
            (low, high, int(outcome.seq_conflict), now, *key),
        )

    @staticmethod
    def _open_gap(tx: Tx, key: tuple[str, str, str], first: int, last: int, now: str) -> None:
        tx.execute(
            "INSERT INTO seq_gap (site_id, cabinet_id, epoch, first_seq, last_seq, opened_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (*key, first, last, now),
        )

    @staticmethod
    def _fill_gap(tx: Tx, key: tuple[str, str, str], seq: int) -> bool:
        """Take ``seq`` out of the gap holding it (split, shrink or close); False if none."""
        row = tx.one(
            "SELECT first_seq, last_seq, opened_at FROM seq_gap WHERE site_id = ? "
            "AND cabinet_id = ? AND epoch = ? AND first_seq <= ? AND last_seq >= ?",
            (*key, seq, seq),
        )
        if row is None:
            return False
        first, last, opened = int(row[0]), int(row[1]), row[2]
        tx.execute(
            "DELETE FROM seq_gap WHERE site_id = ? AND cabinet_id = ? AND epoch = ? "
            "AND first_seq = ?",
            (*key, first),
        )
        for lo, hi in ((first, seq - 1), (seq + 1, last)):
            if lo <= hi:
                tx.execute(
                    "INSERT INTO seq_gap (site_id, cabinet_id, epoch, first_seq, last_seq, "
                    "opened_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (*key, lo, hi, opened),
                )
        return True


def _printable(text: str, limit: int) -> str:
    return _SAFE_TEXT.sub("?", text)[:limit]


# ---------------------------------------------------------------------- items

# An item row moves only forward: an event replaces it if it is newer than the event the row
# came from, and ``since`` is that event's time (for an item out: when it was checked out; for
# an item in: when it was last returned or seen by an inventory) — keeping an older "since"
# for an unchanged state would depend on the order in which the events arrived. Same cabinet: seq order (exact, across epochs too: a new epoch continues above the
# old one); another cabinet (an item returned elsewhere): the events' times (ties: cabinet id).
_ITEM_UPSERT = """
INSERT INTO item_state (site_id, epc, asset_id, state, cabinet_id, drawer, holders, session_id,
                        since, event_id, event_type, seq, time)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (site_id, epc) DO UPDATE SET
    asset_id = COALESCE(excluded.asset_id, item_state.asset_id),
    since = excluded.since,
    state = excluded.state,
    cabinet_id = excluded.cabinet_id,
    drawer = excluded.drawer,
    holders = excluded.holders,
    session_id = excluded.session_id,
    event_id = excluded.event_id,
    event_type = excluded.event_type,
    seq = excluded.seq,
    time = excluded.time
WHERE (item_state.cabinet_id = excluded.cabinet_id AND excluded.seq > item_state.seq)
   OR (item_state.cabinet_id <> excluded.cabinet_id
       AND (excluded.time > item_state.time
            OR (excluded.time = item_state.time AND excluded.cabinet_id > item_state.cabinet_id)))
"""


def _item_row(
    a: Admitted,
    epc: str,
    asset_id: str | None,
    state: str,
    drawer: str | None,
    holders: list[str] | None,
    session_id: Any,
) -> tuple[Any, ...]:
    ev = a.event
    t = iso(ev.time)
    return (
        a.site,
        epc,
        asset_id,
        state,
        a.cabinet,
        drawer,
        None if holders is None else json.dumps(holders),
        None if session_id is None else str(session_id),
        t,
        str(ev.event_id),
        ev.type,
        ev.seq,
        t,
    )


def _project_item(tx: Tx, a: Admitted) -> None:
    ev = a.event
    rows: list[tuple[Any, ...]] = []
    if isinstance(ev, ItemCheckedOut):
        rows.append(_item_row(a, ev.epc, ev.asset_id, "out", ev.drawer, ev.actors, ev.session_id))
    elif isinstance(ev, ItemReturned | ItemMisplaced | ItemRestocked):
        rows.append(_item_row(a, ev.epc, ev.asset_id, "in", ev.drawer, None, ev.session_id))
    elif isinstance(ev, ItemMissing):
        rows.append(_item_row(a, ev.epc, ev.asset_id, "missing", ev.drawer, None, None))
    elif isinstance(ev, InventorySnapshot):
        # Sorted: concurrent writers lock item rows in one order (no deadlock between them).
        rows.extend(
            _item_row(a, epc, None, "in", drawer, None, None)
            for epc, drawer in sorted(ev.items.items())
        )
    for row in rows:
        tx.execute(_ITEM_UPSERT, row)
    epc = getattr(ev, "epc", None)
    if epc is None or not ev.type.startswith("item."):
        return
    asset_id: str | None = getattr(ev, "asset_id", None)
    if asset_id is not None:
        # An older event may know the asset id the newer one that made the row did not carry.
        tx.execute(
            "UPDATE item_state SET asset_id = ? WHERE site_id = ? AND epc = ? AND asset_id IS NULL",
            (asset_id, a.site, epc),
        )
    # An overdue item's history row names who holds it (the cabinet's own memory of the
    # check-out); a return by someone else keeps both in its event_log body.
    actors = ev.held_by if isinstance(ev, ItemOverdue) else getattr(ev, "actors", None)
    session_id = getattr(ev, "session_id", None)
    tx.execute(
        "INSERT INTO item_event (event_id, site_id, cabinet_id, seq, time, type, epc, asset_id, "
        "drawer, actors, session_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            str(ev.event_id),
            a.site,
            a.cabinet,
            ev.seq,
            iso(ev.time),
            ev.type,
            epc,
            asset_id,
            getattr(ev, "drawer", None),
            None if actors is None else json.dumps(actors),
            None if session_id is None else str(session_id),
        ),
    )
    if isinstance(ev, ItemCalibrationOverdue):
        tx.execute(
            "INSERT INTO calibration_flag (site_id, epc, asset_id, calibration_due, cabinet_id, "
            "seq, time, actors, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (site_id, epc) DO UPDATE SET asset_id = excluded.asset_id, "
            "calibration_due = excluded.calibration_due, cabinet_id = excluded.cabinet_id, "
            "seq = excluded.seq, time = excluded.time, actors = excluded.actors, "
            "event_id = excluded.event_id "
            "WHERE (calibration_flag.cabinet_id = excluded.cabinet_id "
            "       AND excluded.seq > calibration_flag.seq) "
            "   OR (calibration_flag.cabinet_id <> excluded.cabinet_id "
            "       AND (excluded.time > calibration_flag.time "
            "            OR (excluded.time = calibration_flag.time "
            "                AND excluded.cabinet_id > calibration_flag.cabinet_id)))",
            (
                a.site,
                epc,
                ev.asset_id,
                _date(ev.calibration_due),
                a.cabinet,
                ev.seq,
                iso(ev.time),
                json.dumps(ev.actors),
                str(ev.event_id),
            ),
        )


def _date(value: date) -> str:
    return value.isoformat()


# ---------------------------------------------------------------------- alerts


def alert_effects(ev: Event) -> tuple[list[tuple[str, str]], list[str]]:
    """The alerts an event raises ``(key, detail)`` and the keys it clears (docs/backend.md)."""
    raised: list[tuple[str, str]] = []
    cleared: list[str] = []
    handler = _ALERT_RULES.get(type(ev))
    if handler is not None:
        handler(ev, raised, cleared)
    return raised, cleared


_Rule = Callable[[Any, list[tuple[str, str]], list[str]], None]


def _door_forced(ev: DoorForced, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append((f"door.forced:{ev.session_id}", f"door {ev.door_id} opened without a valid badge"))


def _door_left_open(ev: DoorLeftOpen, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append((f"door.left_open:{ev.session_id}", f"door {ev.door_id} open for {ev.open_s:.0f} s"))


def _session_closed(ev: SessionClosed, r: list[tuple[str, str]], c: list[str]) -> None:
    c.append(f"door.left_open:{ev.session_id}")
    if ev.quality == "complete":
        c.append("inventory.incomplete")


def _lockout(ev: AccessLockout, r: list[tuple[str, str]], c: list[str]) -> None:
    key = f"access.lockout:{ev.badge_reader}"
    if ev.state == "locked":
        until = "" if ev.until is None else f" until {iso(ev.until)}"
        r.append((key, f"badge reader {ev.badge_reader} locked after {ev.denials} denials{until}"))
    else:
        c.append(key)


def _grace(ev: AccessGraceGranted, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"access.grace_granted:{ev.actor}",
            f"let in at {ev.badge_reader} under the grace of expired allow-list "
            f"v{ev.allow_list_version}",
        )
    )


def _reader_offline(ev: ReaderOffline, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append((f"reader.offline:{ev.reader_id}", f"reader {ev.reader_id} offline: {ev.detail}"))


def _reader_online(ev: ReaderOnline, r: list[tuple[str, str]], c: list[str]) -> None:
    c.append(f"reader.offline:{ev.reader_id}")


def _flapping(ev: ReaderFlapping, r: list[tuple[str, str]], c: list[str]) -> None:
    key = f"reader.flapping:{ev.reader_id}"
    if ev.state == "flapping":
        r.append((key, f"reader {ev.reader_id}: {ev.outages} outages in {ev.window_s:.0f} s"))
    else:
        c.append(key)


def _incomplete(ev: InventoryIncomplete, r: list[tuple[str, str]], c: list[str]) -> None:
    if not ev.will_retry:
        r.append(("inventory.incomplete", "inventory not trusted: " + "; ".join(ev.reasons)))


def _suspect(ev: InventorySuspect, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"inventory.suspect:{ev.drawer}",
            f"drawer {ev.drawer} reads nothing; {ev.held} tags held",
        )
    )


def _snapshot(ev: InventorySnapshot, r: list[tuple[str, str]], c: list[str]) -> None:
    c.append("inventory.incomplete")
    c.extend(f"inventory.suspect:{d}" for d, n in sorted(ev.by_drawer.items()) if n > 0)


def _unknown(ev: ItemUnknown, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append((f"item.unknown:{ev.epc}", f"unregistered tag {ev.epc} in drawer {ev.drawer}"))


def _misplaced(ev: ItemMisplaced, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"item.misplaced:{ev.epc}",
            f"{ev.asset_id} in drawer {ev.drawer}, its home is {ev.home_drawer}",
        )
    )


def _counterfeit(ev: ItemCounterfeit, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"item.counterfeit:{ev.epc}:{ev.tid}",
            f"a tag with {ev.asset_id}'s EPC but TID {ev.tid} in drawer {ev.drawer}",
        )
    )


def _item_left(ev: ItemCheckedOut | ItemMissing | ItemReturned, r: Any, c: list[str]) -> None:
    c.append(f"item.misplaced:{ev.epc}")
    c.append(f"item.overdue:{ev.epc}")  # back, gone or out again: that check-out is over


def _overdue(ev: ItemOverdue, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"item.overdue:{ev.epc}",
            f"{ev.asset_id or ev.epc} out since {iso(ev.checked_out_at)} "
            f"(limit {ev.limit_s:.0f} s)",
        )
    )


def _calibration(ev: ItemCalibrationOverdue, r: list[tuple[str, str]], c: list[str]) -> None:
    r.append(
        (
            f"item.calibration_overdue:{ev.epc}",
            f"{ev.asset_id} checked out with calibration due {_date(ev.calibration_due)}",
        )
    )


def _agent_alert(ev: AgentAlert, r: list[tuple[str, str]], c: list[str]) -> None:
    if ev.kind == "store.disk_full_cleared":
        c.append("agent.alert:store.disk_full")
    else:
        r.append((f"agent.alert:{ev.kind}", f"{ev.kind}: {ev.detail}" if ev.detail else ev.kind))


def _clock(ev: AgentClockStep, r: list[tuple[str, str]], c: list[str]) -> None:
    if ev.trusted:
        c.append("agent.clock_step")
    else:
        r.append(("agent.clock_step", f"clock stepped {ev.step_s:+.0f} s; time not trusted"))


_ALERT_RULES: dict[type, _Rule] = {
    DoorForced: _door_forced,
    DoorLeftOpen: _door_left_open,
    SessionClosed: _session_closed,
    AccessLockout: _lockout,
    AccessGraceGranted: _grace,
    ReaderOffline: _reader_offline,
    ReaderOnline: _reader_online,
    ReaderFlapping: _flapping,
    InventoryIncomplete: _incomplete,
    InventorySuspect: _suspect,
    InventorySnapshot: _snapshot,
    ItemUnknown: _unknown,
    ItemMisplaced: _misplaced,
    ItemCounterfeit: _counterfeit,
    ItemCheckedOut: _item_left,
    ItemMissing: _item_left,
    ItemReturned: _item_left,
    ItemCalibrationOverdue: _calibration,
    ItemOverdue: _overdue,
    AgentAlert: _agent_alert,
    AgentClockStep: _clock,
}


def _project_alerts(tx: Tx, a: Admitted) -> None:
    ev = a.event
    raised, cleared = alert_effects(ev)
    common = (a.site, a.cabinet, ev.seq, iso(ev.time))
    for key, detail in raised:
        tx.execute(
            "INSERT INTO alert_raised (event_id, alert_key, detail, type, site_id, cabinet_id, "
            "seq, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (str(ev.event_id), key, _printable(detail, 300), ev.type, *common),
        )
    for key in cleared:
        tx.execute(
            "INSERT INTO alert_cleared (event_id, alert_key, site_id, cabinet_id, seq, time) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (str(ev.event_id), key, *common),
        )
