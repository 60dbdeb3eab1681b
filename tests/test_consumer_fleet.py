"""Scale-out consumers: several ``cabinet-consumer consume`` processes share the stream (MQTT 5
shared subscription on a real mosquitto) and write one record (SQLite file or PostgreSQL); one is
killed -9 mid-stream, between a commit and its PUBACK, and comes back; the record has every
event exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.domain.events import ItemCheckedOut, ItemReturned, ReaderOnline
from agent.mqtt.publisher import Publisher
from agent.store import OutboxRow, Store
from backend.keys import BackendKeys, generate_backend_keys
from backend.record import open_record
from backend.record import queries as q
from tests.delivery_helpers import mqtt_cfg, open_store, running, until
from tests.mqtt_fixtures import Mosquitto
from tests.pg_fixtures import PostgresServer
from tests.record_helpers import SITE, CabinetStream, pseudonym

ROOT = Path(__file__).resolve().parent.parent
CABINETS = 3
EVENTS_PER_CABINET = 80
KILL_AFTER = 25  # the first member dies after its 25th recorded event, before that PUBACK
TIMEOUT_S = 90.0


class ConsumerProcess:
    """``cabinet-consumer consume`` (or the fault wrapper) as a child process."""

    def __init__(
        self, name: str, mosquitto: Mosquitto, keys_dir: Path, target: dict[str, Any], log: Path
    ) -> None:
        self.name = name
        self.mosquitto = mosquitto
        self.keys_dir = keys_dir
        self.target = target
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(
        self,
        *,
        module: str = "backend.consumer",
        env: dict[str, str] | None = None,
        out: Path | None = None,
    ) -> None:
        where = ["--db", str(self.target["db"])] if "db" in self.target else []
        full_env = {**os.environ, **(env or {})}
        if "dsn" in self.target:
            full_env["CABINET_RECORD_DSN"] = self.target["dsn"]
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, "consume",
                "--port", str(self.mosquitto.port), "--keys", str(self.keys_dir),
                "--share", "backend", "--client-id", self.name, *where,
                *(["--out", str(out)] if out is not None else ["--quiet"]),
                cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, bounded wait; the summary it printed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rc = await self.proc.wait()
        assert rc == 0, self.log.read_text()
        return json.loads(self.log.read_text().strip().splitlines()[-1])

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"db": tmp_path / "record.db"}
    return {"dsn": request.getfixturevalue("pg_dsn")}


@contextlib.asynccontextmanager
async def consumers(*members: ConsumerProcess) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for m in members:
            await m.kill()


async def _cabinet_rows(keys: BackendKeys, store: Store, cabinet: str) -> list[OutboxRow]:
    """A cabinet's door cycles as the agent seals them (v2 envelopes, the store's epoch)."""
    assert store.epoch is not None
    stream = CabinetStream(keys, cabinet, epoch=store.epoch, seq=store.next_seq_nowait() - 1)
    who = pseudonym(f"tech{cabinet}")
    rows = []
    for n in range(EVENTS_PER_CABINET):
        epc = f"e2801160{int(cabinet[-1]):04x}{n % 10:04x}"
        if n % 3 == 0:
            m = stream.next(ReaderOnline, reader_id="dock-1", connection=n)
        elif n % 3 == 1:
            m = stream.next(ItemCheckedOut, session_id=uuid.uuid4(), actors=[who], epc=epc)
        else:
            m = stream.next(
                ItemReturned, session_id=uuid.uuid4(), actors=[who], epc=epc, drawer="top"
            )
        assert m.event is not None
        rows.append(
            OutboxRow(
                seq=m.event.seq,
                event_id=m.event.event_id,
                priority=0,
                kind=m.event.type,
                created_at=m.event.time,
                envelope=m.payload,
            )
        )
    return rows


async def test_shared_consumers_record_every_event_once_through_a_kill_9(
    tmp_path: Path, mosquitto: Mosquitto, target: dict[str, Any]
) -> None:
    keys = generate_backend_keys(tmp_path / "keys")
    killed_note = tmp_path / "killed-event"
    a = ConsumerProcess("backend-a", mosquitto, tmp_path / "keys", target, tmp_path / "a.log")
    b = ConsumerProcess("backend-b", mosquitto, tmp_path / "keys", target, tmp_path / "b.log")
    async with consumers(a, b):
        await a.start(
            module="tests.fault_consumer",
            env={
                "CABINET_TEST_KILL_AFTER_RECORDED": str(KILL_AFTER),
                "CABINET_TEST_KILLED_EVENT": str(killed_note),
            },
        )
        await b.start()
        # Both members are subscribed before the first event is published.
        assert await until(lambda: mosquitto.log_tail(400).count("$share/backend/") >= 2, 30)

        expected: dict[str, tuple[str, int]] = {}
        async with contextlib.AsyncExitStack() as stack:
            publishers = []
            for n in range(CABINETS):
                cabinet = f"crib-{n:02d}"
                store = await stack.enter_async_context(open_store(tmp_path / f"{cabinet}.db"))
                rows = await _cabinet_rows(keys, store, cabinet)
                await store.append_events(rows)
                expected.update({str(r.event_id): (cabinet, r.seq) for r in rows})
                pub = Publisher(mqtt_cfg(mosquitto.port), SITE, cabinet, store)
                await stack.enter_async_context(running(pub))
                publishers.append(pub)

            # Member a dies -9 mid-stream, right after a commit and before its PUBACK ...
            assert a.proc is not None
            async with asyncio.timeout(TIMEOUT_S):
                assert await a.proc.wait() == -signal.SIGKILL, a.log.read_text()
            killed_event = killed_note.read_text()
            # ... and the service manager starts it again with its client id: its session (the
            # unacknowledged messages and what the broker queued for it meanwhile) resumes.
            await a.start()
            total = CABINETS * EVENTS_PER_CABINET
            assert await until(
                lambda: all(p.stats.acked == EVENTS_PER_CABINET for p in publishers), TIMEOUT_S
            )

        db = open_record(**target)
        try:

            def recorded() -> int:
                return int(db.query("SELECT count(*) FROM events")[1][0][0])

            assert await until(lambda: recorded() >= total, TIMEOUT_S), recorded()
            summaries = [await a.stop(), await b.stop()]
            _, rows = db.query("SELECT event_id, cabinet_id, seq, recorded_by FROM events")
            assert len(rows) == total, "every event exactly once"
            assert {r[0]: (r[1], r[2]) for r in rows} == expected
            by = {r[3] for r in rows}
            assert by == {"backend-a", "backend-b"}, f"both members took a share: {by}"
            assert q.gaps(db) == []
            assert q.refused(db) == []
            # The event committed just before the kill was never acknowledged: the broker sent it
            # again, and the record took it as a duplicate.
            assert killed_event in {r[0] for r in rows}
            assert sum(s["duplicates"] for s in summaries) >= 1, summaries
            assert all(s["refused"] == 0 for s in summaries)
        finally:
            db.close()


async def test_a_record_that_goes_away_holds_the_acknowledgements(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """PostgreSQL stops mid-stream: the consumer keeps the message in hand unacknowledged and
    retries; once the server is back the record has every event exactly once."""
    server = PostgresServer()  # its own server: this test stops it
    server.start()
    try:
        target = {"dsn": server.create_database("outage")}
        keys = generate_backend_keys(tmp_path / "keys")
        member = ConsumerProcess(
            "backend-a", mosquitto, tmp_path / "keys", target, tmp_path / "a.log"
        )
        async with consumers(member), open_store(tmp_path / "crib-00.db") as store:
            await member.start(out=tmp_path / "events.jsonl")
            assert await until(lambda: "$share/backend/" in mosquitto.log_tail(400), 30)
            rows = await _cabinet_rows(keys, store, "crib-00")
            first, rest = rows[:30], rows[30:]
            db = open_record(**target)
            try:
                pub = Publisher(mqtt_cfg(mosquitto.port), SITE, "crib-00", store)
                async with running(pub):
                    await store.append_events(first)
                    assert await until(lambda: _count(db) == len(first), TIMEOUT_S)
                    db.close()
                    server.stop(remove=False)
                    await store.append_events(rest)
                    # The broker took them all; the consumer has one in hand and cannot commit.
                    assert await until(lambda: pub.stats.acked == len(rows), TIMEOUT_S)
                    assert await until(
                        lambda: "not acknowledged, retrying" in member.log.read_text(), TIMEOUT_S
                    )
                    server.start()
                    db = open_record(**target)
                    assert await until(lambda: _count(db) == len(rows), TIMEOUT_S)
                summary = await member.stop()
                _, recorded = db.query("SELECT event_id FROM events")
                assert sorted(r[0] for r in recorded) == sorted(str(r.event_id) for r in rows)
                assert summary["recorded"] == len(rows)
                assert summary["refused"] == 0
                # Each newly recorded event was also printed once, as a JSON line.
                lines = [
                    json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()
                ]
                assert sorted(x["seq"] for x in lines) == [r.seq for r in rows]
                assert all(x["event"]["event_id"] == x["event_id"] for x in lines)
                assert {x["epoch"] for x in lines} == {store.epoch.hex() if store.epoch else None}
            finally:
                db.close()
    finally:
        server.stop()


def _count(db: Any) -> int:
    return int(db.query("SELECT count(*) FROM events")[1][0][0])
