"""Disk full, through the real agent on a small tmpfs: fill it, free it, and everything recovers.

The real ``cabinet-agent run`` process (cabinet simulators, mosquitto through a fault proxy, a
consumer opening the events) keeps its state on a 24 MiB tmpfs this test mounts. Something else
fills the disk; badges keep coming; the broker comes back while the disk is still full; then the
space is freed. Required: acknowledged rows are deleted even while the disk is full, new events
commit once space is back, every event is delivered once, the WAL stays within its budget, no
restart, and SIGTERM stops within its budget without losing the writes it held.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.cabinet import ScenarioRunner, load_scenario
from simulators.faultproxy import FaultProxy
from simulators.tmpfs import tmpfs
from tests.daemon_rig import NotifyListener, ctl
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import MARKER, TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

MiB = 1024 * 1024
DISK = 24 * MiB
WAL_BUDGET = DISK // 8  # max_wal_bytes (8 MiB) capped at 1/8 of the filesystem


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB tmpfs mounted for the test (root only, as CI runs)."""
    with tmpfs(tmp_path / "disk", DISK) as mnt:
        yield mnt


def fill(path: Path) -> None:
    """Write until the filesystem refuses (ENOSPC), down to the last block."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(path.parent).f_bavail == 0


def outbox_seqs(db: Path) -> list[int]:
    """The agent's outbox as a reader sees it (read-only, WAL readers never block the writer)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [int(r[0]) for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        conn.close()


def marker_denials(rig: Rig) -> list[dict[str, Any]]:
    who = rig.pseudonym(MARKER.name)
    return rig.sink.log.find(lambda e: e.get("type") == "access.denied" and e.get("actor") == who)


async def show_marker(rig: Rig, times: int) -> None:
    """The (unlisted) marker card, ``times`` times: one access.denied event each."""
    for _ in range(times):
        seen = rig.agent.log_text().count("badge presented at marker")
        await asyncio.sleep(0.35)  # the marker reader drops a card shown twice within 0.3 s
        await rig.marker.present(MARKER.badge)
        await rig.agent.wait_log("badge presented at marker", count=seen + 1)


async def until(predicate: Any, timeout: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def store_config(db: Path, proxy_port: int) -> dict[str, Any]:
    return {
        "store": {
            "path": str(db),
            "min_free_disk_bytes": MiB,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.5,
        },
        "mqtt": {"port": proxy_port},
    }


def delivered_once(rig: Rig) -> None:
    """No (epoch, seq) carries two event ids; seqs contiguous from 1 within the epoch."""
    by_slot: dict[tuple[bytes | None, int], Any] = {}
    for d in rig.sink.delivered:
        slot = (d.header.epoch, d.header.seq)
        assert by_slot.setdefault(slot, d.header.event_id) == d.header.event_id, slot
    seqs = sorted(seq for _, seq in by_slot)
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def test_disk_full_then_space_returns_everything_recovers(
    tmp_path: Path, mosquitto: Mosquitto, small_disk: Path
) -> None:
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = small_disk / "state.db"
    filler = small_disk / "filler"
    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(scenario, tmp_path, mosquitto, agent_extra=store_config(db, proxy.port)) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        # The link to the broker goes down: a backlog builds up in the outbox.
        proxy.refuse(True)
        proxy.cut()
        committed = agent.log_text().count("event access.denied")
        await show_marker(rig, 5)
        await agent.wait_log("event access.denied", count=committed + 5)
        backlog = outbox_seqs(db)
        assert len(backlog) >= 5
        # Something else fills the disk. New events are held in memory, not lost.
        fill(filler)
        await show_marker(rig, 3)
        await agent.wait_log("store alert store.disk_full:")
        # The broker comes back while the disk is still full: the backlog is delivered and
        # its rows deleted (the store's reserve pays for the deletes).
        proxy.refuse(False)
        await until(lambda: {e["seq"] for e in rig.sink.log.events} >= set(backlog))
        await until(lambda: not set(outbox_seqs(db)) & set(backlog))
        assert agent.log_text().count("store alert store.disk_full_cleared") == 0
        # Space comes back: the held events commit and are delivered, the WAL is reclaimed.
        filler.unlink()
        await agent.wait_log("store.disk_full_cleared")
        await until(lambda: len(marker_denials(rig)) >= 1 + 5 + 3)
        await show_marker(rig, 2)  # and new ones go through as usual
        await until(lambda: len(marker_denials(rig)) >= 1 + 5 + 3 + 2)
        await until(lambda: outbox_seqs(db) == [])
        assert (small_disk / "state.db-wal").stat().st_size <= WAL_BUDGET
        assert (small_disk / "state.db.reserve").exists(), "the reserve is back"
        assert agent.log_text().count(" ready:") == 1, "the agent never restarted"
        t0 = time.monotonic()
        rc = await agent.stop()
        stop_s = time.monotonic() - t0
    assert rc == 0
    assert stop_s < 5.0
    delivered_once(rig)


async def test_sigterm_on_a_full_disk_stops_in_budget_and_keeps_what_it_held(
    tmp_path: Path, mosquitto: Mosquitto, small_disk: Path
) -> None:
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = small_disk / "state.db"
    filler = small_disk / "filler"
    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(scenario, tmp_path, mosquitto, agent_extra=store_config(db, proxy.port)) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        proxy.refuse(True)
        proxy.cut()
        fill(filler)
        shown_before = len(marker_denials(rig))
        await show_marker(rig, 4)
        await agent.wait_log("store alert store.disk_full:")
        t0 = time.monotonic()
        rc = await agent.stop()
        stop_s = time.monotonic() - t0
        assert rc == 0, agent.log_tail()
        assert stop_s < 5.0, agent.log_tail()
        assert "not durable" not in agent.log_text(), agent.log_tail()
        # Space back, broker back, agent back: what was shown before SIGTERM is delivered.
        filler.unlink()
        proxy.refuse(False)
        agent.start()
        await until(lambda: len(marker_denials(rig)) >= shown_before + 4)
    delivered_once(rig)


async def test_people_keep_working_while_the_disk_is_full(
    tmp_path: Path, mosquitto: Mosquitto, small_disk: Path
) -> None:
    """A full disk holds the events in memory; it does not lock people out of the cabinet.

    Alice badges, takes the wrench and closes the door while nothing can be written: the door
    unlocks, the scan runs, status says what is held; nothing of it is published before it is
    durable. Once space is back, her session's events are delivered exactly as expected.
    """
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = small_disk / "state.db"
    filler = small_disk / "filler"
    notify = NotifyListener(tmp_path / "notify.sock")
    notify.start()

    def with_systemd(rig: Rig) -> None:
        rig.agent.env.update(notify.env(10_000_000))

    try:
        async with cabinet_rig(
            scenario,
            tmp_path,
            mosquitto,
            agent_extra={"store": store_config(db, mosquitto.port)["store"]},
            before_start=with_systemd,
        ) as rig:
            agent = rig.agent
            start = await rig.mark()
            rig.sink.log.mark(start)
            fill(filler)
            # Until a write meets the full disk (the WAL may still have room for a few).
            async with asyncio.timeout(TIMEOUT_S):
                while "store alert store.disk_full:" not in agent.log_text():
                    await show_marker(rig, 1)
            denied = len(marker_denials(rig))
            # Alice's whole door cycle happens on the full disk, watched at the reader.
            runner = ScenarioRunner(scenario, rig.llrp, rig.badge, rig.door, timeout_s=TIMEOUT_S)
            await runner.run()
            await until(
                lambda: any("disk full since" in m.get("STATUS", "") for m in notify.messages)
            )
            status = next(
                m["STATUS"] for m in notify.messages if "disk full" in m.get("STATUS", "")
            )
            assert "writes held" in status, status
            rc, human, err = await ctl("status", "--socket", str(tmp_path / "agent" / "ctl.sock"))
            assert rc == 0, err
            assert "DISK FULL since" in human, human
            assert "writes held in memory" in human, human
            # Nothing above the durable watermark left the cabinet: the consumer has none of
            # Alice's events, nor the marker denials held since the disk filled.
            assert [e for e in rig.sink.log.since_mark() if e["type"] == "session.opened"] == []
            assert len(marker_denials(rig)) == denied
            assert agent.log_text().count(" ready:") == 1, "the agent never restarted"
            filler.unlink()
            await agent.wait_log("store.disk_full_cleared")
            await asyncio.sleep(0.35)  # the marker reader drops a card shown twice within 0.3 s
            end = await rig.mark()
            events = rig.sink.log.since_mark(before_seq=end)
            rig.check([e for e in events if not _marker_or_alert(rig, e)])
            assert agent.log_text().count(" ready:") == 1, "the agent never restarted"
    finally:
        await notify.close()
    delivered_once(rig)


def _marker_or_alert(rig: Rig, event: dict[str, Any]) -> bool:
    """The markers shown to find the full disk, and the store's own alerts about it."""
    if event.get("type") == "agent.alert":
        return True
    return event.get("type") == "access.denied" and event.get("actor") == rig.pseudonym(MARKER.name)


async def test_a_full_hold_makes_the_engine_wait_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, small_disk: Path
) -> None:
    """Memory stays bounded: once max_pending_writes are held the engine waits for the disk
    (alerted), and every input it waited with is committed, in order, when space returns."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = small_disk / "state.db"
    filler = small_disk / "filler"
    extra = store_config(db, mosquitto.port)["store"] | {"max_pending_writes": 10}
    async with cabinet_rig(scenario, tmp_path, mosquitto, agent_extra={"store": extra}) as rig:
        agent = rig.agent
        await rig.mark()
        before = len(marker_denials(rig))
        seen = agent.log_text().count("badge presented at marker")
        fill(filler)
        shown = 0
        async with asyncio.timeout(TIMEOUT_S):
            while "store alert store.hold_full:" not in agent.log_text():
                await asyncio.sleep(0.35)  # the marker reader drops a card shown twice in 0.3 s
                await rig.marker.present(MARKER.badge)
                shown += 1
        for _ in range(3):  # read while the engine waits: queued, not lost
            await asyncio.sleep(0.35)
            await rig.marker.present(MARKER.badge)
            shown += 1
        # Every card reached the agent while its engine waited: queued there, not lost.
        await agent.wait_log("badge presented at marker", count=seen + shown)
        assert "engine waits for the state store" in agent.log_text()
        filler.unlink()
        await until(lambda: len(marker_denials(rig)) >= before + shown)
        assert agent.log_text().count(" ready:") == 1, "the agent never restarted"
    delivered_once(rig)


async def test_a_reader_held_back_by_an_engine_waiting_for_the_disk_keeps_the_watchdog_fed(
    tmp_path: Path, mosquitto: Mosquitto, small_disk: Path
) -> None:
    """The engine waits for the disk once its hold is full (alive: restarting would lose the
    held writes). A reader inventorying meanwhile fills the engine's reads budget and waits for
    it: that wait is the engine's, so the watchdog stays fed (it was withheld after 20 s as
    the reader's stall, and systemd's restart lost every write the full disk held)."""
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    db = small_disk / "state.db"
    filler = small_disk / "filler"
    extra = store_config(db, mosquitto.port)["store"] | {"max_pending_writes": 10}
    notify = NotifyListener(tmp_path / "notify.sock")
    notify.start()

    def with_systemd(rig: Rig) -> None:
        rig.agent.env.update(notify.env(2_000_000))

    try:
        async with cabinet_rig(
            scenario,
            tmp_path,
            mosquitto,
            agent_extra={"store": extra},
            before_start=with_systemd,
        ) as rig:
            agent = rig.agent
            # From now on a scan outlasts the test: the reader inventories all along.
            text = agent.config.read_text()
            text = re.sub(r"(?m)^scan_min_ms = .*$", "scan_min_ms = 600000", text)
            text = re.sub(r"(?m)^scan_max_ms = .*$", "scan_max_ms = 600000", text)
            agent.config.write_text(text)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            await agent.wait_log("reload applied")
            rig.llrp.add_random_tags(n=800, antennas=[1, 2], seed=5)
            alice = scenario.person("alice")
            await rig.badge_read(lambda: rig.badge.present(alice.badge))
            await rig.llrp.wait_until(lambda: not rig.door.locked, TIMEOUT_S)
            await rig.door.open()
            await rig.door.close()
            await until(lambda: rig.llrp.stats.reports_sent > 0)
            fill(filler)
            async with asyncio.timeout(TIMEOUT_S):
                while "store alert store.hold_full:" not in agent.log_text():
                    await show_marker(rig, 1)
            # The engine waits for the disk; the reader's reports back up behind TCP.
            await rig.llrp.wait_until(lambda: rig.llrp.unsent_frames >= 20, TIMEOUT_S)
            held_at = time.monotonic()
            # Pings go on past the watchdog's window (WATCHDOG_WINDOW_S, 20 s).
            await until(
                lambda: any(t > held_at + 20.0 + 3.0 for t in notify.ping_times()),
                timeout=60.0,
            )
            assert "watchdog withheld" not in agent.log_text(), agent.log_tail()
            filler.unlink()
            await agent.wait_log("store.disk_full_cleared")
            assert agent.log_text().count(" ready:") == 1, "the agent never restarted"
    finally:
        await notify.close()
