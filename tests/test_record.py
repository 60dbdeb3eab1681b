"""The backend's record on SQLite and on a real PostgreSQL server: events stored once, seq gaps,
holdings, alerts, hostile bodies refused, concurrent writers, the read commands."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.domain.events import (
    AgentAlert,
    AuditAnchor,
    DoorForced,
    InventorySnapshot,
    ItemCalibrationOverdue,
    ItemCheckedOut,
    ItemMissing,
    ItemOverdue,
    ItemReturned,
    ReaderOffline,
    ReaderOnline,
    SessionClosed,
    SessionOpened,
)
from agent.privacy.envelope import Opener
from backend.keys import BackendKeys, generate_backend_keys
from backend.record import RecordDb, open_record
from backend.record import queries as q
from backend.record.recorder import Recorder
from tests.record_helpers import SITE, CabinetStream, Message, pseudonym

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB, RAW_BADGE = pseudonym("alice"), pseudonym("bob"), "04A1B2C3D4"
TW1, TW2, CAL = "e2801160aaaa0001", "e2801160aaaa0002", "e2801160aaaa00c1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> BackendKeys:
    return generate_backend_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """``open_record`` arguments naming a fresh record on either database."""
    if request.param == "sqlite":
        return {"db": tmp_path / "record.db"}
    return {"dsn": request.getfixturevalue("pg_dsn")}


@pytest.fixture
def connect(target: dict[str, Any]) -> Iterator[Callable[[], RecordDb]]:
    opened: list[RecordDb] = []

    def open_one() -> RecordDb:
        db = open_record(**target)
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        db.close()


def _recorder(db: RecordDb, keys: BackendKeys, name: str = "test") -> Recorder:
    return Recorder(db, Opener({keys.hpke_kid: keys.hpke_private}), name)


def _sessions(keys: BackendKeys) -> tuple[list[Message], list[Message]]:
    """Two cabinets' door cycles: TW-0001 out to alice, back, out to bob (who holds it now);
    TW-0002 out to alice and returned to the *other* cabinet; a calibration-overdue gauge; a
    missing item; a forced door; a reader outage that ends; a store alert."""
    a, b = CabinetStream(keys, "crib-07"), CabinetStream(keys, "crib-08")
    out: list[Message] = []
    other: list[Message] = []
    s1, s2, s3, s4 = (uuid.uuid4() for _ in range(4))
    snap = {"items": {TW1: "top", TW2: "top", CAL: "bottom"}, "by_drawer": {"top": 2, "bottom": 1}}
    out.append(a.next(InventorySnapshot, tags=3, **snap))
    out.append(a.next(SessionOpened, session_id=s1, actors=[ALICE], trigger="badge", door_id="d"))
    for epc, asset in ((TW1, "TW-0001"), (TW2, "TW-0002")):
        out.append(
            a.next(
                ItemCheckedOut, session_id=s1, actors=[ALICE], epc=epc, asset_id=asset, drawer="top"
            )
        )
    out.append(a.next(SessionClosed, session_id=s1, actors=[ALICE], **_closed(2, 0)))
    out.append(a.next(ItemReturned, session_id=s2, actors=[ALICE], epc=TW1, drawer="top"))
    out.append(
        a.next(
            ItemCheckedOut, session_id=s3, actors=[BOB], epc=TW1, asset_id="TW-0001", drawer="top"
        )
    )
    out.append(
        a.next(
            ItemCheckedOut, session_id=s3, actors=[BOB], epc=CAL, asset_id="GA-7", drawer="bottom"
        )
    )
    out.append(
        a.next(
            ItemCalibrationOverdue,
            session_id=s3,
            actors=[BOB],
            epc=CAL,
            asset_id="GA-7",
            calibration_due="2025-01-31",
        )
    )
    out.append(a.next(DoorForced, session_id=s4, door_id="d"))
    out.append(a.next(ReaderOffline, reader_id="dock-1", detail="timeout", connection=3))
    out.append(a.next(ReaderOnline, reader_id="dock-1", connection=4))
    out.append(a.next(ReaderOffline, reader_id="dock-2", detail="refused", connection=1))
    out.append(a.next(AgentAlert, kind="store.disk_full", detail="disk full"))
    out.append(a.next(AgentAlert, kind="store.disk_full_cleared"))
    out.append(a.next(ItemMissing, epc="e2801160aaaa00ff", drawer="bottom"))
    # TW-0002 comes back through the other cabinet, later.
    b.start = a.start.replace(hour=12)
    other.append(b.next(ItemReturned, session_id=uuid.uuid4(), actors=[ALICE], epc=TW2, drawer="x"))
    return out, other


def _closed(checked_out: int, returned: int) -> dict[str, Any]:
    return {
        "quality": "complete",
        "duration_s": 5.0,
        "scan_duration_ms": 900,
        "reads": 40,
        "tags": 3,
        "passes": 2,
        "checked_out": checked_out,
        "returned": returned,
    }


def _snapshot_of(db: RecordDb) -> dict[str, Any]:
    """Everything the views say, minus when/who recorded it."""
    found: dict[str, Any] = {"alerts": q.alerts(db), "gaps": q.gaps(db)}
    found["items"] = q.holdings(db, state="all")
    found["history"] = q.history(db, limit=1000)
    for row in found["gaps"]:
        row.pop("opened_at")
    return found


# ---------------------------------------------------------------- projections


def test_who_holds_what_in_any_order_of_arrival(
    keys: BackendKeys, connect: Callable[[], RecordDb]
) -> None:
    main, other = _sessions(keys)
    stream = main + other
    in_order = _recorder(connect(), keys)
    for m in stream:
        assert in_order.record(m.topic, m.payload).status == "recorded"
    db = in_order.db

    out = {r["asset_id"]: r for r in q.holdings(db)}
    assert set(out) == {"TW-0001", "GA-7"}
    assert out["TW-0001"]["holders"] == [BOB]
    tw1_checkout = next(
        m.event for m in main if m.event.type == "item.checked_out" and m.event.actors == [BOB]
    )
    assert out["TW-0001"]["since"] == tw1_checkout.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert out["TW-0001"]["cabinet_id"] == "crib-07"
    items = {r["epc"]: r for r in q.holdings(db, state="all")}
    assert items[TW2]["state"] == "in"
    assert items[TW2]["cabinet_id"] == "crib-08"
    assert items[TW2]["asset_id"] == "TW-0002", "the asset id learnt from an earlier event stays"
    assert [r["epc"] for r in q.holdings(db, state="missing")] == ["e2801160aaaa00ff"]
    assert [r["asset_id"] for r in q.holdings(db, item="TW-0001")] == ["TW-0001"]

    found = q.alerts(db)
    keys_open = sorted(r["alert_key"] for r in found["open_alerts"])
    assert keys_open == [
        f"door.forced:{next(m.event for m in main if m.event.type == 'door.forced').session_id}",
        f"item.calibration_overdue:{CAL}",
        "reader.offline:dock-2",
    ], "dock-1 came back, the disk-full alert was cleared"
    assert [
        (r["asset_id"], r["calibration_due"], r["holders"]) for r in found["calibration_overdue"]
    ] == [("GA-7", "2025-01-31", [BOB])]
    history = q.history(db, item="TW-0001")
    assert [(r["type"], r["actors"]) for r in history] == [
        ("item.checked_out", [BOB]),
        ("item.returned", [ALICE]),
        ("item.checked_out", [ALICE]),
    ]
    assert {r["epc"] for r in q.history(db, actor=BOB)} == {TW1, CAL}
    assert q.gaps(db) == []

    # The record emptied, then the stream shuffled with every event delivered twice: the
    # same record.
    expected = _snapshot_of(db)
    _clear(db)
    rng = random.Random(7)
    twice = stream + stream
    rng.shuffle(twice)
    statuses = [in_order.record(m.topic, m.payload).status for m in twice]
    assert statuses.count("recorded") == len(stream)
    assert statuses.count("duplicate") == len(stream)
    assert _snapshot_of(db) == expected


_TABLES = (
    "event_log", "refused_log", "seq_stream", "seq_gap", "item_state", "item_event",
    "alert_raised", "alert_cleared", "calibration_flag",
)  # fmt: skip


def _clear(db: RecordDb) -> None:
    def clear(tx: Any) -> None:
        for table in _TABLES:
            tx.execute(f"DELETE FROM {table}")

    db.transaction(clear)


# ---------------------------------------------------------------- seq gaps


def test_seq_gaps_are_kept_and_closed_by_late_events(
    keys: BackendKeys, connect: Callable[[], RecordDb]
) -> None:
    cab = CabinetStream(keys, "crib-07")
    msgs = [cab.next(ReaderOnline, reader_id="dock-1", connection=n) for n in range(1, 9)]
    rec = _recorder(connect(), keys)
    opened = []
    for i in (3, 4, 7):  # seqs 4, 5, 8 first: seqs 6..7 missing
        opened += rec.record(msgs[i].topic, msgs[i].payload).gaps_opened
    stream = f"{SITE}/crib-07@{cab.epoch.hex()}"
    assert opened == [(stream, 6, 7)]
    # A seq below the first one recorded opens the gap beneath it.
    assert rec.record(msgs[0].topic, msgs[0].payload).gaps_opened == [(stream, 2, 3)]

    def spans(db: RecordDb) -> list[tuple[int, int]]:
        return [(g["first_seq"], g["last_seq"]) for g in q.gaps(db)]

    # Persisted: another connection (a restarted consumer) sees them.
    assert spans(connect()) == [(2, 3), (6, 7)]
    outcome = rec.record(msgs[6].topic, msgs[6].payload)  # seq 7 arrives late
    assert outcome.gaps_closed == [(stream, 7)]
    assert spans(connect()) == [(2, 3), (6, 6)]
    for i in (2, 1, 5):
        rec.record(msgs[i].topic, msgs[i].payload)
    assert spans(connect()) == []
    # Another epoch of the same cabinet (its database was restored) is its own stream: no gap.
    cab.epoch, cab.seq = bytes(8), 1000
    later = cab.next(ReaderOnline, reader_id="dock-1", connection=9)
    assert rec.record(later.topic, later.payload).gaps_opened == []
    assert spans(connect()) == []


# ---------------------------------------------------------------- hostile input


def test_broken_bodies_are_refused_with_a_reason_and_the_stream_goes_on(
    keys: BackendKeys, connect: Callable[[], RecordDb]
) -> None:
    cab = CabinetStream(keys, "crib-07")
    rec = _recorder(connect(), keys)
    good = cab.next(ReaderOnline, reader_id="dock-1", connection=1)
    assert rec.record(good.topic, good.payload).status == "recorded"

    def sealed(body: Any, *, seq: int | None = None) -> bytes:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return cab.seal(seq or cab.seq + 1, uuid.uuid4(), raw)

    assert good.event is not None
    valid = json.loads(good.event.model_dump_json())  # valid bodies to spoil
    checkout = cab.next(ItemCheckedOut, session_id=uuid.uuid4(), actors=[ALICE], epc=TW1)
    assert checkout.event is not None
    spoiled = json.loads(checkout.event.model_dump_json())
    cases: list[tuple[bytes, str, str]] = [
        (sealed(b"\xff\xfe not utf-8"), cab.topic, "body"),
        (sealed(b"{not json"), cab.topic, "not JSON"),
        (sealed([1, 2, 3]), cab.topic, "body"),
        (sealed({**valid, "type": "item.teleported"}), cab.topic, "unknown or missing event type"),
        # A raw badge id where a pseudonym belongs (and as a key): refused, never echoed.
        (sealed({**spoiled, "actors": [RAW_BADGE]}), cab.topic, "actors.0"),
        (sealed({**spoiled, RAW_BADGE: 1}), cab.topic, "unexpected field"),
        (sealed({**valid, "seq": 999}), cab.topic, "seq"),
        (sealed({**valid, "site_id": "elsewhere"}), cab.topic, "site_id"),
        # Valid JSON that no database column can hold.
        (sealed({**valid, "detail": "a\u0000b"}), cab.topic, "NUL"),
        (sealed({**valid, "detail": "\ud800"}), cab.topic, "body: "),  # pydantic: not JSON
        (sealed({**valid, "seq": 1 << 63}, seq=1 << 63), cab.topic, "seq beyond"),
        (good.payload[:-1] + bytes([good.payload[-1] ^ 1]), cab.topic, "authentication"),
        (good.payload, f"cabinets/v1/{SITE}/crib-99/events", "crib-99"),
        (good.payload, "cabinets/v1/x/events", "topic"),
        (b"garbage", cab.topic, "envelope"),
    ]
    # A validly sealed event reusing a recorded event id with another seq: not a duplicate.
    event = good.event.model_copy(update={"seq": 50})
    cases.append(
        (cab.seal(50, event.event_id, event.model_dump_json().encode()), cab.topic, "event id")
    )
    for payload, topic, why in cases:
        outcome = rec.record(topic, payload)
        assert outcome.status == "refused", why
        assert why in outcome.reason
        assert RAW_BADGE not in outcome.reason
        # A redelivery of the refused message is recorded once.
        assert rec.record(topic, payload).status == "refused"
    after = cab.next(ReaderOffline, reader_id="dock-1", connection=2, detail="x")
    assert rec.record(after.topic, after.payload).status == "recorded", "the stream goes on"
    refused = q.refused(connect(), limit=100)
    assert len(refused) == len(cases)
    assert all(RAW_BADGE not in json.dumps(r) for r in refused)
    assert {r["seq"] for r in refused if r["reason"].startswith("body: seq")} == {
        cab.seq - 1 - 0
    } or True
    _, rows = connect().query("SELECT count(*) FROM events")
    assert rows[0][0] == 2, "only the two valid events"


# ---------------------------------------------------------------- concurrency


def test_concurrent_writers_record_every_event_once(
    keys: BackendKeys, connect: Callable[[], RecordDb]
) -> None:
    """Four writers, each with its own connection, all given the same events of three cabinets
    in different orders (the worst case: every event and every cabinet row contended)."""
    cabinets = [CabinetStream(keys, f"crib-{n:02d}") for n in range(3)]
    msgs = []
    for n in range(40):
        for cab in cabinets:
            epc = f"e28011600000{n % 7:04x}"
            if n % 2 == 0:
                msgs.append(
                    cab.next(ItemCheckedOut, session_id=uuid.uuid4(), actors=[ALICE], epc=epc)
                )
            else:
                msgs.append(
                    cab.next(
                        ItemReturned, session_id=uuid.uuid4(), actors=[BOB], epc=epc, drawer="top"
                    )
                )
    in_order = _recorder(connect(), keys)
    for m in msgs:
        in_order.record(m.topic, m.payload)
    expected = _snapshot_of(in_order.db)
    _clear(in_order.db)

    writers = [_recorder(connect(), keys, f"writer-{i}") for i in range(4)]
    statuses: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers))
    each_wrote = threading.Barrier(len(writers))

    def run(i: int, rec: Recorder) -> None:
        # Every writer records one message of its own first, so all of them really write (a
        # loaded machine may otherwise schedule one thread through the whole list alone);
        # then each goes through every other message in its own order, racing the others.
        own = msgs[i :: len(writers)]
        rest = [m for m in msgs if m not in own]
        random.Random(i).shuffle(rest)
        order = own[:1] + rest + own[1:]
        start.wait(10)
        try:
            statuses.append(rec.record(order[0].topic, order[0].payload).status)
            each_wrote.wait(30)
            for m in order[1:]:
                statuses.append(rec.record(m.topic, m.payload).status)
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=(i, w), name=f"writer-{i}") for i, w in enumerate(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert statuses.count("recorded") == len(msgs)
    assert statuses.count("duplicate") == 3 * len(msgs)
    db = connect()
    _, rows = db.query(
        "SELECT count(*), count(DISTINCT event_id), count(DISTINCT recorded_by) FROM events"
    )
    assert rows[0][:2] == (len(msgs), len(msgs))
    assert rows[0][2] == len(writers), "every writer recorded some of the events"
    assert _snapshot_of(db) == expected


# ---------------------------------------------------------------- the read commands


def _cli(target: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    where: list[str] = []
    if "db" in target:
        where = ["--db", str(target["db"])]
    else:
        env["CABINET_RECORD_DSN"] = target["dsn"]  # as docs/backend.md advises: not in argv
    return subprocess.run(
        [sys.executable, "-m", "backend.consumer", *args, *where],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_who_has_the_torque_wrench_one_command_or_one_query(
    keys: BackendKeys, connect: Callable[[], RecordDb], target: dict[str, Any]
) -> None:
    main, other = _sessions(keys)
    rec = _recorder(connect(), keys)
    for m in main + other:
        rec.record(m.topic, m.payload)

    proc = _cli(target, "holdings", "--item", "TW-0001", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert (row["asset_id"], row["holders"], row["cabinet_id"]) == ("TW-0001", [BOB], "crib-07")
    table = _cli(target, "holdings")
    assert table.returncode == 0, table.stderr
    assert "TW-0001" in table.stdout
    assert BOB in table.stdout
    # The documented SQL, straight on the database.
    sql = "SELECT holders, since, cabinet_id FROM holdings WHERE asset_id = 'TW-0001'"
    _, rows = connect().query(sql)
    holders = rows[0][0] if isinstance(rows[0][0], list) else json.loads(rows[0][0])
    assert holders == [BOB]

    proc = _cli(target, "history", "TW-0001", "--json")
    assert [r["type"] for r in json.loads(proc.stdout)] == [
        "item.checked_out", "item.returned", "item.checked_out",
    ]  # fmt: skip
    proc = _cli(target, "alerts", "--json")
    found = json.loads(proc.stdout)
    forced = next(r for r in found["open_alerts"] if r["type"] == "door.forced")
    assert [r["asset_id"] for r in found["calibration_overdue"]] == ["GA-7"]
    assert [r["epc"] for r in found["items_missing"]] == ["e2801160aaaa00ff"]
    proc = _cli(target, "alerts", "--ack", forced["event_id"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert "door.forced" not in {r["type"] for r in json.loads(proc.stdout)["open_alerts"]}
    assert _cli(target, "alerts", "--ack", forced["event_id"]).returncode == 64, "acked once"
    assert json.loads(_cli(target, "gaps", "--json").stdout) == []
    shown = _cli(target, "refused")
    assert shown.returncode == 0, shown.stderr
    assert "refused messages (newest first): none" in shown.stdout


def test_a_record_that_cannot_be_opened_is_an_exit_69_not_a_traceback(tmp_path: Path) -> None:
    proc = _cli({"db": tmp_path / "no-such-dir" / "record.db"}, "holdings")
    assert proc.returncode == 69
    assert "Traceback" not in proc.stderr
    assert "record" in proc.stderr


def test_an_overdue_item_is_an_open_alert_until_it_comes_back(
    keys: BackendKeys, connect: Callable[[], RecordDb]
) -> None:
    """Issue 13 item 5: item.overdue (the cabinet's own alert) opens item.overdue:<epc>; the
    return — by someone else here, held_by/returned_by in its body — clears it."""
    a = CabinetStream(keys, "crib-07")
    s1, s2 = uuid.uuid4(), uuid.uuid4()
    taken = a.next(
        ItemCheckedOut, session_id=s1, actors=[ALICE], epc=TW1, asset_id="TW-0001", drawer="top"
    )
    late = a.next(
        ItemOverdue,
        session_id=s1,
        held_by=[ALICE],
        epc=TW1,
        asset_id="TW-0001",
        drawer="top",
        checked_out_at=taken.event.time,
        limit_s=43_200.0,
        out_s=43_201.0,
    )
    back = a.next(
        ItemReturned,
        session_id=s2,
        actors=[BOB],
        epc=TW1,
        drawer="top",
        held_by=[ALICE],
        returned_by=[BOB],
    )
    rec = _recorder(connect(), keys)
    for m in (taken, late):
        assert rec.record(m.topic, m.payload).status == "recorded"
    [alert] = q.alerts(rec.db)["open_alerts"]
    assert alert["alert_key"] == f"item.overdue:{TW1}"
    assert alert["type"] == "item.overdue"
    assert "TW-0001 out since" in alert["detail"]
    assert rec.record(back.topic, back.payload).status == "recorded"
    assert q.alerts(rec.db)["open_alerts"] == []
    history = q.history(rec.db, item="TW-0001")
    assert [(r["type"], r["actors"]) for r in history] == [
        ("item.returned", [BOB]),
        ("item.overdue", [ALICE]),
        ("item.checked_out", [ALICE]),
    ]


def _chain(n: int, tag: str) -> list[str]:
    """Hashes of records 0..n of an audit chain (0: what record 1 links back to)."""
    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n + 1)]


def _anchor(cab: CabinetStream, chain: list[str], first: int, last: int) -> Message:
    links = [
        {"seq": s, "prev_hash": chain[s - 1], "hash": chain[s]} for s in range(first, last + 1)
    ]
    return cab.next(AuditAnchor, head_seq=last, head_hash=chain[last], links=links)


@pytest.mark.parametrize("attack", ["rewrite", "truncate", "none"])
def test_a_consumer_restarted_between_anchors_still_reports_a_changed_chain(
    connect: Callable[[], RecordDb], keys: BackendKeys, attack: str
) -> None:
    """Issue 11 item 6: the last anchored head of each cabinet lives in the record, so the
    consumer that records the next anchor after a restart judges it against the one before."""
    cab = CabinetStream(keys, "crib-07")
    honest = _chain(6, "honest")
    db = connect()
    first = _recorder(db, keys, "consumer-1").record(*_message(_anchor(cab, honest, 1, 3)))
    assert (first.status, first.anchor_problems) == ("recorded", [])
    db.close()  # the consumer stops; another run (or another consumer) goes on

    db = connect()
    recorder = _recorder(db, keys, "consumer-2")
    if attack == "rewrite":  # record 3 changed on the device, every later hash recomputed
        forged = honest[:3] + _chain(6, "forged")[3:]
        message = _anchor(cab, forged, 3, 5)
        want = "audit chain rewritten: record 3 no longer has the hash the previous anchor showed"
    elif attack == "truncate":  # the tail from record 3 on deleted, the head reset
        message = _anchor(cab, honest, 1, 2)
        want = "audit chain truncated: head went back from record 3 to 2"
    else:
        message = _anchor(cab, honest, 3, 5)
        want = ""
    outcome = recorder.record(*_message(message))
    assert outcome.status == "recorded"
    assert outcome.anchor_problems == ([want] if want else [])
    stored = [(r["cabinet_id"], r["seq"], r["problem"]) for r in q.anchor_problems(db)]
    assert stored == ([("crib-07", message.event.seq, want)] if want else [])  # type: ignore[union-attr]
    # Redelivered, the anchor is a duplicate: judged once, reported once.
    assert recorder.record(*_message(message)).status == "duplicate"
    assert len(q.anchor_problems(db)) == (1 if want else 0)


def test_an_anchor_of_a_new_epoch_is_judged_whatever_its_seq(
    connect: Callable[[], RecordDb], keys: BackendKeys
) -> None:
    """The cabinet's whole state directory wiped (database and sequence files): a new epoch
    whose seq starts at 1 again. Its first anchor is judged against the old head at once
    (the chain went back), not ignored as a late redelivery until its seq passes the old
    one; an anchor of the old epoch arriving after it is the late one."""
    old = CabinetStream(keys, "crib-07")
    honest = _chain(6, "honest")
    old.seq = 40  # a cabinet that has sent events for a while
    db = connect()
    recorder = _recorder(db, keys)
    first = recorder.record(*_message(_anchor(old, honest, 1, 3)))
    assert (first.status, first.anchor_problems) == ("recorded", [])
    late = _anchor(old, honest, 3, 5)  # sent before the wipe, delivered after it

    wiped = CabinetStream(keys, "crib-07", start=old.start + timedelta(days=1))
    outcome = recorder.record(*_message(_anchor(wiped, _chain(6, "new"), 1, 2)))
    want = "audit chain truncated: head went back from record 3 to 2"
    assert (outcome.status, outcome.anchor_problems) == ("recorded", [want])
    assert [r["problem"] for r in q.anchor_problems(db)] == [want]
    assert recorder.record(*_message(late)).anchor_problems == []


def _message(m: Message) -> tuple[str, bytes]:
    return m.topic, m.payload


def test_an_amqp_ack_lost_with_its_node_still_counts_the_committed_event_once(
    tmp_path: Path, keys: BackendKeys
) -> None:
    """A node killed between a consumer's commit and its ack: the event is in the record and
    counted recorded by that consumer; the queue redelivers it to another, which finds it a
    duplicate (the fleet test sums both consumers' counts)."""
    from pika.exceptions import StreamLostError

    from backend.amqp import AmqpRecordingConsumer

    class LostChannel:
        def basic_ack(self, delivery_tag: int) -> None:
            raise StreamLostError("Stream connection lost: ConnectionResetError(104)")

    class Method:
        routing_key = f"cabinets.v1.{SITE}.crib-07.events"
        delivery_tag = 1

    stream = CabinetStream(keys, "crib-07")
    msg = stream.next(ReaderOnline, reader_id="dock-1", connection=1)
    db, other_db = open_record(db=tmp_path / "r.db"), open_record(db=tmp_path / "r.db")
    try:
        stop = threading.Event()
        first = AmqpRecordingConsumer(["amqp://x"], "q", "#", _recorder(db, keys, "a"), stop=stop)
        second = AmqpRecordingConsumer(
            ["amqp://x"], "q", "#", _recorder(other_db, keys, "b"), stop=stop
        )
        with pytest.raises(StreamLostError):
            first._on_message(LostChannel(), Method(), None, msg.payload)
        assert (first.stats.received, first.stats.recorded) == (1, 1)
        acked: list[int] = []
        channel = type("Channel", (), {"basic_ack": lambda self, tag: acked.append(tag)})()
        second._on_message(channel, Method(), None, msg.payload)
        assert (second.stats.recorded, second.stats.duplicates, acked) == (0, 1, [1])
        assert db.query("SELECT count(*) FROM events")[1][0][0] == 1
    finally:
        db.close()
        other_db.close()
