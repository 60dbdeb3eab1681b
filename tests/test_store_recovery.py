"""A corrupt or missing database, through the real agent, broker and reference consumer.

The real ``cabinet-agent run`` process builds up undelivered events (the broker is cut off by a
fault proxy), is stopped, and its state database is broken the way the field breaks it. The
agent must start again, tell the backend (a critical ``agent.alert``), deliver the undelivered
events it could salvage, and never give one (epoch, seq) two event ids.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from simulators.cabinet import load_scenario
from simulators.faultproxy import FaultProxy
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import MARKER, TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

PAGE = 4096


def _zero_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:100] = bytes(100)
    db.write_bytes(bytes(data))


def _random_first_page(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:PAGE] = os.urandom(PAGE)
    db.write_bytes(bytes(data))


def _truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2 // PAGE * PAGE])


def _random_middle(db: Path) -> None:
    data = bytearray(db.read_bytes())
    pages = len(data) // PAGE
    for page in range(pages // 3, 2 * pages // 3):
        data[page * PAGE + 8 : (page + 1) * PAGE] = os.urandom(PAGE - 8)
    db.write_bytes(bytes(data))


def _zero_bytes(db: Path) -> None:
    db.write_bytes(b"")


def _deleted(db: Path) -> None:
    db.unlink()


def _random_wal(db: Path) -> None:
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 0, "kill -9 leaves the WAL behind"
    wal.write_bytes(os.urandom(wal.stat().st_size))


# damage, the alert the backend gets, whether every undelivered event must come back
CASES: list[tuple[Callable[[Path], None], str, bool]] = [
    (_zero_header, "store.corrupt_quarantined", True),
    (_random_first_page, "store.corrupt_quarantined", True),
    (_truncated, "store.corrupt_quarantined", False),
    (_random_middle, "store.corrupt_quarantined", False),
    (_zero_bytes, "store.database_lost", False),
    (_deleted, "store.database_lost", False),
    (_random_wal, "store.wal_quarantined", False),
]


def marker_denials(rig: Rig) -> list[dict[str, Any]]:
    who = rig.pseudonym(MARKER.name)
    return rig.sink.log.find(lambda e: e.get("type") == "access.denied" and e.get("actor") == who)


async def show_marker(rig: Rig, times: int) -> None:
    for _ in range(times):
        seen = rig.agent.log_text().count("badge presented at marker")
        await asyncio.sleep(0.35)  # the marker reader drops a card shown twice within 0.3 s
        await rig.marker.present(MARKER.badge)
        await rig.agent.wait_log("badge presented at marker", count=seen + 1)


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("damage", "kind", "all_back"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_the_agent_recovers_from_a_broken_database(
    tmp_path: Path,
    mosquitto: Mosquitto,
    damage: Callable[[Path], None],
    kind: str,
    all_back: bool,
) -> None:
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(
            scenario, tmp_path, mosquitto, agent_extra={"mqtt": {"port": proxy.port}}
        ) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        delivered_before = {(d.header.epoch, d.header.seq) for d in rig.sink.delivered}
        (old_epoch,) = {epoch for epoch, _ in delivered_before}
        # The broker is cut off: these events stay in the outbox, undelivered.
        proxy.refuse(True)
        proxy.cut()
        committed = agent.log_text().count("event access.denied")
        await show_marker(rig, 4)
        await agent.wait_log("event access.denied", count=committed + 4)
        if damage is _random_wal:
            agent.kill9()  # the newest commits stay in the WAL
        else:
            assert await agent.stop() == 0
        damage(db)
        proxy.refuse(False)
        agent.start()
        await agent.wait_log(" ready:", count=2)

        await until(lambda: bool(_alerts(rig, kind)))
        (alert,) = _alerts(rig, kind)
        # The agent runs on: a new event is committed and delivered under the new epoch.
        await show_marker(rig, 1)
        await until(lambda: len(marker_denials(rig)) >= 1 + (4 if all_back else 0) + 1)
        if all_back:
            # Every undelivered event was salvaged from the quarantined file and delivered.
            assert len(marker_denials(rig)) == 1 + 4 + 1
            assert "salvaged" in alert["detail"]
        assert rig.sink.consumer is not None
        assert rig.sink.consumer.decoder.stats.seq_conflicts == 0
    seen: dict[tuple[bytes | None, int], Any] = {}
    for d in rig.sink.delivered:
        slot = (d.header.epoch, d.header.seq)
        assert seen.setdefault(slot, d.header.event_id) == d.header.event_id, slot
    new_epochs = {d.header.epoch for d in rig.sink.delivered} - {old_epoch}
    assert len(new_epochs) == 1, "one new epoch after the damage"
    old_top = max(seq for epoch, seq in seen if epoch == old_epoch)
    assert all(seq > old_top for epoch, seq in seen if epoch in new_epochs)


async def test_a_damaged_frame_in_the_middle_of_the_wal_loses_nothing_silently(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """One damaged WAL frame plus a crash: SQLite's recovery would stop at the frame and drop
    every later commit without a word (undelivered events gone, delivered seqs reissued with
    new event ids). The agent finds the damage before SQLite opens the file, keeps the WAL,
    salvages the rows written after it, says so, and continues under a new epoch."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    wal = db.with_name(db.name + "-wal")
    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(
            scenario, tmp_path, mosquitto, agent_extra={"mqtt": {"port": proxy.port}}
        ) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        # Delivered events in the WAL too (their seqs must never come back with other ids).
        await show_marker(rig, 3)
        await until(lambda: len(marker_denials(rig)) >= 1 + 3)
        (old_epoch,) = {d.header.epoch for d in rig.sink.delivered}
        proxy.refuse(True)
        proxy.cut()
        committed = agent.log_text().count("event access.denied")
        await show_marker(rig, 20)
        await agent.wait_log("event access.denied", count=committed + 20)
        undelivered = {
            int(m)
            for m in re.findall(r"event access\.denied seq=(\d+) committed", agent.log_text())
        } - {int(e["seq"]) for e in marker_denials(rig)}
        assert len(undelivered) == 20
        agent.kill9()
        size = wal.stat().st_size
        assert size > 64 * PAGE, "kill -9 leaves the commits in the WAL"
        with wal.open("r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(64))
        proxy.refuse(False)
        agent.start()
        await agent.wait_log(" ready:", count=2)

        await until(lambda: bool(_alerts(rig, "store.wal_quarantined")))
        (alert,) = _alerts(rig, "store.wal_quarantined")
        assert "damaged at frame" in alert["detail"], alert
        assert alert["seqs"], alert
        assert "salvaged" in alert["detail"], alert
        assert list((tmp_path / "agent").glob("state.db-wal.corrupt-*")), "the WAL is kept"
        # The undelivered events come back: all of them, or all but the rows that lived only
        # in the one damaged transaction (at most one marker: each is its own commit).
        await show_marker(rig, 1)
        delivered = {(d.header.epoch, d.header.seq) for d in rig.sink.delivered}
        await until(
            lambda: (
                len(undelivered - {s for e, s in delivered_now(rig) if e == old_epoch}) <= 1
                and any(e != old_epoch for e, _ in delivered_now(rig))
            )
        )
        assert rig.sink.consumer is not None
        assert rig.sink.consumer.decoder.stats.seq_conflicts == 0
        assert delivered <= delivered_now(rig)
    seen: dict[tuple[bytes | None, int], Any] = {}
    for d in rig.sink.delivered:
        slot = (d.header.epoch, d.header.seq)
        assert seen.setdefault(slot, d.header.event_id) == d.header.event_id, slot
    new_epochs = {d.header.epoch for d in rig.sink.delivered} - {old_epoch}
    assert len(new_epochs) == 1, "a new epoch: seqs that left may have been lost with the WAL"
    old_top = max(seq for epoch, seq in seen if epoch == old_epoch)
    assert all(seq > old_top for epoch, seq in seen if epoch in new_epochs)


def delivered_now(rig: Rig) -> set[tuple[bytes | None, int]]:
    return {(d.header.epoch, d.header.seq) for d in rig.sink.delivered}


async def test_a_rollback_within_a_reservation_block_is_detected(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A copy of the database taken while the agent ran, put back after a crash: the events
    delivered since the copy must not have their seqs issued again with other event ids. The
    sequence sidecar's floor follows every delivery, so the restored counter is found behind
    it even within one reservation block (1000 seqs), and the agent moves to a new epoch."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    copy = tmp_path / "copy.db"
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        agent = rig.agent
        await rig.mark()
        (old_epoch,) = {d.header.epoch for d in rig.sink.delivered}
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)  # a consistent snapshot, as a backup tool takes it
        finally:
            dst.close()
            src.close()
        delivered_before = len(marker_denials(rig))
        await show_marker(rig, 3)
        await until(lambda: len(marker_denials(rig)) >= delivered_before + 3)
        agent.kill9()
        for suffix in ("-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        copy.replace(db)
        agent.start()
        await agent.wait_log(" ready:", count=2)

        await until(lambda: bool(_alerts(rig, "store.seq_rollback")))
        await show_marker(rig, 1)
        await until(lambda: len(marker_denials(rig)) >= delivered_before + 3 + 1)
        assert rig.sink.consumer is not None
        assert rig.sink.consumer.decoder.stats.seq_conflicts == 0
    seen: dict[tuple[bytes | None, int], Any] = {}
    for d in rig.sink.delivered:
        slot = (d.header.epoch, d.header.seq)
        assert seen.setdefault(slot, d.header.event_id) == d.header.event_id, slot
    assert {d.header.epoch for d in rig.sink.delivered} - {old_epoch}, "a new epoch"


async def test_a_close_right_after_the_database_was_deleted_rewrites_it_first(
    tmp_path: Path,
) -> None:
    """``rm state.db`` and a stop at once (hostile re-test N3: SIGTERM within a second of the
    ``rm``, before the periodic check): with nothing left to make durable, the close went
    straight to its final checkpoint, folding every undelivered row into the unlinked file.
    The close looks first, and writes the database back under its name."""
    from agent.store import Store, StoreConfig
    from tests.store_helpers import next_rows

    path = tmp_path / "state.db"
    store = await Store.open(StoreConfig(path=path), age_clock=lambda: None)
    await store.append_events(next_rows(store, 5))
    conn = sqlite3.connect(path, timeout=10)  # the rows move into the file itself
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        conn.close()
    path.unlink()
    await store.close()
    assert path.exists(), "the close wrote the database back under its name"
    store = await Store.open(StoreConfig(path=path), age_clock=lambda: None)
    try:
        stats = await store.stats()
        assert (stats.depth, stats.next_seq) == (5, 6)
        assert not [a for a in store.open_alerts if a.kind == "store.database_lost"]
    finally:
        await store.close()


async def test_a_database_deleted_while_the_agent_runs_is_rewritten_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """``rm state.db`` under a running agent: rows already checkpointed into the file would be
    lost at the next start. The agent notices within seconds, writes its open database back
    under the name (a consistent copy through its connection), and a restart then finds every
    undelivered event, in the same epoch."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(
            scenario, tmp_path, mosquitto, agent_extra={"mqtt": {"port": proxy.port}}
        ) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        (old_epoch,) = {d.header.epoch for d in rig.sink.delivered}
        delivered_before = len(marker_denials(rig))
        proxy.refuse(True)
        proxy.cut()
        committed = agent.log_text().count("event access.denied")
        await show_marker(rig, 4)
        await agent.wait_log("event access.denied", count=committed + 4)
        # Fold the WAL into the file (as an autocheckpoint does): the 4 rows now live in
        # state.db itself, and the next commit starts the WAL over.
        conn = sqlite3.connect(db, timeout=10)
        try:
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            conn.close()
        # The last connection to close deletes the WAL by name: the agent's connection holds
        # its lock, so another process's session ending (an operator's sqlite3) leaves it be.
        assert db.with_name("state.db-wal").exists(), "the agent's WAL survives our session"
        await show_marker(rig, 1)
        await agent.wait_log("event access.denied", count=committed + 5)
        db.unlink()
        await agent.wait_log("store alert store.database_deleted")
        assert db.exists(), "the database is back under its name"
        await show_marker(rig, 1)
        await agent.wait_log("event access.denied", count=committed + 6)
        # A restart (what used to lose the checkpointed rows) finds every one of them.
        assert await agent.stop() == 0
        proxy.refuse(False)
        agent.start()
        await agent.wait_log(" ready:", count=2)
        await until(lambda: len(marker_denials(rig)) >= delivered_before + 6)
        assert "store.database_lost" not in agent.log_text()
        assert agent.log_text().count(" ready:") == 2
        assert rig.sink.consumer is not None
        assert rig.sink.consumer.decoder.stats.seq_conflicts == 0
    epochs = {d.header.epoch for d in rig.sink.delivered}
    assert epochs == {old_epoch}, "continuity is proven: the same epoch"
    seqs = sorted({d.header.seq for d in rig.sink.delivered})
    assert seqs == list(range(1, seqs[-1] + 1)), "no gap"


def _damage_audit_table(db: Path) -> None:
    """Garbage over the audit table's root page: quick_check fails (the file is quarantined)
    while the baseline and kv tables, on pages of their own, stay readable by SQL."""
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit'").fetchone()
    finally:
        conn.close()
    assert root > 1
    with db.open("r+b") as f:
        f.seek((root - 1) * PAGE)
        f.write(os.urandom(PAGE))


async def test_a_quarantine_keeps_the_baseline_and_the_document_version_floors(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A corrupt database is quarantined; its baseline and kv state (documents, their version
    floors, the time floor) are read back from the quarantined file. The first door session
    after it reports the tool taken (not a return of the tools that never left), and an older
    allow-list replayed at the agent is still refused."""
    from simulators.cabinet import build_artefacts
    from tests.scenario_harness import INSTALLER

    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        agent = rig.agent
        await rig.mark()
        newer = build_artefacts(
            scenario,
            site=rig.keys.site,
            signing_key=rig.keys.signing_private,
            signing_kid=rig.keys.signing_kid,
            allow_list_version=scenario.allow_list.version + 1,
            extra_people=[INSTALLER, MARKER],
        )
        rig.publish_document("allow-list", newer.allow_list)
        await agent.wait_log(f"installed allow-list version {scenario.allow_list.version + 1}")
        assert await agent.stop() == 0
        _damage_audit_table(db)
        # Replayed while the agent is down: the only allow-list it is offered at start.
        rig.publish_document("allow-list", rig.artefacts.allow_list)
        agent.start()
        await agent.wait_log(" ready:", count=2)
        await agent.wait_log("store alert store.corrupt_quarantined")
        assert "baseline (2 tags, current) recovered" in agent.log_text()
        await agent.wait_log("backend allow-list refused")
        assert agent.log_text().count("installed allow-list version") == 2
        # (The harness's marker assumes one epoch: read the new epoch's events directly.)
        log = rig.sink.log
        log.mark()
        await rig.runner().run()
        await log.wait_for(lambda: log.count("session.closed") == 1, TIMEOUT_S)
        (closed,) = [e for e in log.since_mark() if e["type"] == "session.closed"]
        items = [e for e in log.since_mark() if e["type"].startswith("item.")]
        wrench = next(i.epc for i in scenario.items if i.name == "wrench")
        assert [(e["type"], e["epc"]) for e in items] == [("item.checked_out", wrench)], items
        assert (closed["checked_out"], closed["returned"]) == (1, 0)


async def test_a_lost_database_makes_the_agent_reinventory_before_it_blames_anyone(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The database is gone while the agent is stopped (a bad flash, an operator's ``rm``): its
    baseline is empty, unproven. The agent inventories at once, without naming anyone for what
    it finds, and only then holds people to it: the next session checks out the wrench and
    returns nothing (before: every tool that never left was "returned" by whoever opened)."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = tmp_path / "agent" / "state.db"
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        agent = rig.agent
        await rig.mark()
        assert await agent.stop() == 0
        for path in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
            path.unlink(missing_ok=True)
        log = rig.sink.log
        log.mark()
        agent.start()
        await agent.wait_log(" ready:", count=2)
        await agent.wait_log("store alert store.database_lost")
        # The verification inventory, with nobody at the door.
        await log.wait_for(lambda: log.count("inventory.snapshot") >= 1, TIMEOUT_S)
        assert "the baseline may be stale" in agent.log_text()
        (snapshot,) = [e for e in log.since_mark() if e["type"] == "inventory.snapshot"]
        assert set(snapshot["items"]) == {i.epc for i in scenario.items}
        assert not [e for e in log.since_mark() if e["type"] in _BLAME], log.since_mark()
        log.mark()
        await rig.runner().run()
        await log.wait_for(lambda: log.count("session.closed") == 1, TIMEOUT_S)
        (closed,) = [e for e in log.since_mark() if e["type"] == "session.closed"]
        items = [e for e in log.since_mark() if e["type"].startswith("item.")]
        wrench = next(i.epc for i in scenario.items if i.name == "wrench")
        assert [(e["type"], e["epc"]) for e in items] == [("item.checked_out", wrench)], items
        assert (closed["checked_out"], closed["returned"]) == (1, 0)


_BLAME = {"item.checked_out", "item.returned"}


def _alerts(rig: Rig, kind: str) -> list[dict[str, Any]]:
    """The ``agent.alert`` events of ``kind`` the backend has received."""
    return [e for e in rig.sink.log.events if e["type"] == "agent.alert" and e["kind"] == kind]
