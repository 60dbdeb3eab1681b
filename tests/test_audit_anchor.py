"""Issue 11, item 6: the audit chain's head is published as sealed ``audit.anchor`` events, and
the backend's consumer reports a chain rewritten or truncated on the device between anchors.

The real ``cabinet-agent run`` process, a real mosquitto and the real consumer
(tests/scenario_harness.py). The chain is changed on disk while the agent is stopped, the way
someone holding the controller would: consistently re-hashed, so the device's own
``audit verify`` finds nothing wrong; only the anchor the backend already holds tells.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
import sqlite3
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.store import audit_chain
from simulators.cabinet import Scenario, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
CYCLE = ["wait_locked", "badge alice", "wait_unlock", "open", "close", "settle"]


def _scenario() -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": CYCLE, "expect": []})


def _anchors(rig: Rig) -> list[dict[str, Any]]:
    return rig.sink.log.find(lambda e: e.get("type") == "audit.anchor")


def _problems(rig: Rig) -> int:
    assert rig.sink.consumer is not None
    return rig.sink.consumer.decoder.stats.anchor_problems


def _rewrite(db: Path, seq: int) -> None:
    """Change record ``seq``'s action and re-hash everything after it, head included."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT seq, at_us, action, personal, prev_hash FROM audit WHERE seq >= ? ORDER BY seq",
            (seq,),
        ).fetchall()
        prev = bytes(rows[0][4])
        digest = prev
        for s, at_us, action, personal, _ in rows:
            if s == seq:
                action = "note.rewritten"
            digest = audit_chain.record_hash_v2(s, at_us, action, bytes(personal), prev)
            conn.execute(
                "UPDATE audit SET action = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (action, prev, digest, s),
            )
            prev = digest
        conn.execute(
            "UPDATE kv SET value = ? WHERE key = 'store.audit_head'",
            (struct.pack(">Q", rows[-1][0]) + digest,),
        )
        conn.commit()
    finally:
        conn.close()


def _truncate(db: Path, keep: int) -> None:
    """Keep records up to ``keep``; the head says so (the tail looks as if never written)."""
    conn = sqlite3.connect(db)
    try:
        (digest,) = conn.execute("SELECT hash FROM audit WHERE seq = ?", (keep,)).fetchone()
        conn.execute("DELETE FROM audit WHERE seq > ?", (keep,))
        conn.execute(
            "UPDATE kv SET value = ? WHERE key = 'store.audit_head'",
            (struct.pack(">Q", keep) + bytes(digest),),
        )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("attack", ["rewrite", "truncate"])
async def test_the_consumer_reports_a_chain_changed_between_anchors(
    tmp_path: Path, mosquitto: Mosquitto, attack: str
) -> None:
    extra = {"store": {"audit_anchor_interval_s": 1}}
    async with cabinet_rig(_scenario(), tmp_path, mosquitto, agent_extra=extra) as rig:
        await rig.play()  # a door cycle: records for the chain
        log = rig.sink.log
        # Anchors follow the chain as it grows; none of them is a problem.
        head = int(rig.agent.log_text().count("audit anchor: records"))
        await rig.agent.wait_log("audit anchor: records", count=head + 1)
        await log.wait_for(lambda: len(_anchors(rig)) >= 1, TIMEOUT_S)
        assert _problems(rig) == 0
        anchored = int(_anchors(rig)[-1]["head_seq"])
        assert anchored >= 3

        assert await rig.agent.stop() == 0
        db = rig.dir / "agent" / "state.db"
        if attack == "rewrite":
            _rewrite(db, anchored - 1)
        else:
            _truncate(db, anchored - 2)
        before = len(_anchors(rig))
        rig.agent.start()
        await log.wait_for(lambda: len(_anchors(rig)) > before, TIMEOUT_S)
        await log.wait_for(lambda: _problems(rig) > 0, TIMEOUT_S)
        assert rig.sink.consumer is not None
        reported = rig.sink.consumer.decoder.anchors.recent
        # Records appended at the restart may reuse the truncated seqs: then the next anchor
        # shows the anchored record with another hash, which is reported as rewritten.
        want = ("rewritten",) if attack == "rewrite" else ("truncated", "rewritten")
        assert reported, reported
        assert any(w in reported[0] for w in want), reported


async def _consume(rig: Rig, db: Path, log: Path) -> asyncio.subprocess.Process:
    """``cabinet-consumer consume`` recording into ``db``: a persistent session under one client
    id, so what is published while it is down waits for it at the broker."""
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backend.consumer", "consume",
            "--port", str(rig.broker.port), "--keys", str(rig.dir / "keys"),
            "--client-id", "record-1", "--session-expiry", "300", "--db", str(db), "--quiet",
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


async def _subscribed(log: Path, count: int) -> None:
    """Until the consumer said ``count`` times that its subscription is in place."""
    async with asyncio.timeout(TIMEOUT_S):
        while log.read_text(errors="replace").count('"type": "subscribed"') < count:
            await asyncio.sleep(0.05)


async def _stop(proc: asyncio.subprocess.Process, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(TIMEOUT_S):
        rc = await proc.wait()
    assert rc == 0, log.read_text(errors="replace")[-3000:]


async def _poll(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the record once there are some (bounded)."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                try:
                    rows = conn.execute(sql).fetchall()
                except sqlite3.OperationalError:  # not created yet
                    rows = []
            if rows:
                return rows
            await asyncio.sleep(0.1)


async def test_the_recording_consumer_restarted_between_anchors_reports_a_rewritten_chain(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The recording consumer keeps the last anchored head in the record: stopped after one
    anchor and started again (a new process) before the next, it still reports the chain
    the device rewrote meanwhile."""
    extra = {"store": {"audit_anchor_interval_s": 1}}
    record, log = tmp_path / "record.db", tmp_path / "consumer.log"
    async with cabinet_rig(_scenario(), tmp_path, mosquitto, agent_extra=extra) as rig:
        consumer = await _consume(rig, record, log)
        try:
            await _subscribed(log, 1)
            await rig.play()
            head = rig.agent.log_text().count("audit anchor: records")
            await rig.agent.wait_log("audit anchor: records", count=head + 1)
            last = rig.agent.log_text().rsplit("audit anchor: records ", 1)[1]
            anchored = int(last.split("..", 1)[1].split()[0])
            await _poll(record, f"SELECT 1 FROM audit_anchor_head WHERE head_seq >= {anchored}")
        finally:
            await _stop(consumer, log)
        assert await rig.agent.stop() == 0
        _rewrite(rig.dir / "agent" / "state.db", anchored - 1)

        consumer = await _consume(rig, record, log)  # another run: nothing in its memory
        try:
            await _subscribed(log, 2)
            rig.agent.start()
            rows = await _poll(record, "SELECT problem FROM audit_anchor_problems")
            # The record the last anchor before the rewrite showed (an anchor the agent sent
            # meanwhile may have moved it past the log line read above).
            found = re.fullmatch(
                r"audit chain rewritten: record (\d+) no longer has the hash the previous "
                r"anchor showed",
                rows[0][0],
            )
            assert found is not None, rows
            assert int(found[1]) >= anchored, rows
            assert len(rows) == 1, rows
        finally:
            await _stop(consumer, log)
    reports = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [r["problem"] for r in reports if r["type"] == "audit-anchor"] == [rows[0][0]]
    assert reports[-1]["type"] == "summary"
    assert reports[-1]["anchor_problems"] == 1


async def test_a_full_anchor_is_followed_at_once_by_the_rest(tmp_path: Path) -> None:
    """More records than one anchor holds (a busy shift, a badge spammer): the next anchor
    follows at once, not an interval later -- else the chain the backend has seen falls
    further behind every interval and the window for an undetected rewrite has no bound."""
    from agent.audit_anchor import AnchorRequest, AuditAnchoring
    from agent.domain.events import MAX_ANCHOR_LINKS
    from agent.store import Store, StoreConfig
    from tests.store_helpers import FakeClock

    store = await Store.open(StoreConfig(path=tmp_path / "s.db"), clock=FakeClock())
    try:
        n = 2 * MAX_ANCHOR_LINKS + 10
        for i in range(n):
            await store.audit_append("system", "badge.denied", {"i": i})
        got: list[AnchorRequest] = []
        reached = asyncio.Event()

        async def put(req: AnchorRequest) -> None:
            got.append(req)
            if req.links[-1][0] == n:
                reached.set()

        # An interval no test waits out: only "at once" can reach the head.
        anchoring = AuditAnchoring(store, put, interval_s=86400.0)
        task = asyncio.create_task(anchoring.run())
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await reached.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Contiguous: each anchor starts with the previous one's head record.
        assert got[0].links[0][0] == 1
        for before, after in itertools.pairwise(got):
            assert after.links[0][0] == before.links[-1][0]
        assert all(len(r.links) <= MAX_ANCHOR_LINKS for r in got)
    finally:
        await store.close()
