"""End-to-end: every bundled scenario through the real wire paths, events compared exactly.

LLRP simulator (door on GPI/GPO) + badge simulators in this process → ``cabinet-agent run`` as a
child process → sealed events in SQLite → MQTT (real mosquitto) → consumer opening them with the
backend key. After each scenario the agent's files, logs and the broker's store are scanned for
raw badge ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backend.signing import allow_list_doc, sign_document
from simulators.cabinet import (
    Scenario,
    bundled_scenarios,
    describe_event,
    describe_events,
    load_scenario,
)
from tests.daemon_rig import ctl
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids
from tests.scenario_harness import TIMEOUT_S, AgentProcess, Rig, cabinet_rig

SCENARIOS = bundled_scenarios()
# Scenarios that state the right behaviour but fail today: strict, so a fix makes them pass loud.
KNOWN_BUGS: dict[str, str] = {}


def _param(path: Path) -> object:
    reason = KNOWN_BUGS.get(path.stem)
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
    return pytest.param(path, id=path.stem, marks=marks)


def test_at_least_twenty_scenarios_ship() -> None:
    assert len(SCENARIOS) >= 20
    for path in SCENARIOS:
        scenario = load_scenario(path)
        assert scenario.expect, f"{path.name} states no expected events"


@pytest.mark.parametrize("path", [_param(p) for p in SCENARIOS])
async def test_scenario(path: Path, tmp_path: Path, mosquitto: Mosquitto) -> None:
    scenario = load_scenario(path)
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        events = await rig.play()
        rig.assert_no_pii(expect_wal=True)  # while the agent runs: database, WAL, log
        rig.check(events)
    rig.assert_no_pii()  # after the shutdown checkpoint


def _variant(name: str, steps: list[str]) -> Scenario:
    """A bundled scenario's cabinet and people with other steps (and no expected list)."""
    base = load_scenario(next(p for p in SCENARIOS if p.stem == name))
    return base.model_copy(update={"steps": steps, "expect": []})


async def test_kill_9_with_the_door_open_loses_nothing_and_repeats_nothing(
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    scenario = _variant("plain-checkout", ["badge alice", "wait_unlock", "open", "take wrench"])
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        log = rig.sink.log
        start = await rig.mark()
        log.mark(start)
        await rig.runner().run()
        # Killed as soon as the opening is committed: maybe published already, maybe not.
        await rig.agent.wait_log("event session.opened", count=2)  # 1: commissioning
        rig.agent.kill9()
        # While the agent is dead the technician goes on: another tool leaves the cabinet.
        rig.llrp.remove_tag(scenario.item("drill").epc)
        rig.agent.start()
        await rig.agent.wait_log("ready:", count=2)
        await rig.agent.wait_log("reader dock-1 configured", count=2)
        await rig.door.close()
        await log.wait_count("session.closed", 1, TIMEOUT_S)
        await asyncio.sleep(0.35)
        end = await rig.mark()
        events = log.since_mark(before_seq=end)

    delivered = rig.sink.delivered
    seqs = sorted(d.header.seq for d in delivered)
    assert seqs == list(range(1, len(seqs) + 1)), f"seq not contiguous from 1: {seqs}"
    ids = [d.header.event_id for d in delivered]
    assert len(set(ids)) == len(ids), "an event id was delivered twice"
    bodies = [json.loads(d.plaintext) for d in delivered]
    assert len({b["event_id"] for b in bodies}) == len(bodies)

    opened = [e for e in events if e["type"] == "session.opened"]
    closed = [e for e in events if e["type"] == "session.closed"]
    assert len(opened) == 1, describe_events(events, rig.artefacts)
    assert len(closed) == 1, describe_events(events, rig.artefacts)
    session = opened[0]["session_id"]
    assert closed[0]["session_id"] == session
    assert closed[0]["quality"] == "complete"
    out = [e for e in events if e["type"] == "item.checked_out"]
    assert sorted(rig.artefacts.items[e["epc"]] for e in out) == ["drill", "wrench"]
    assert all(e["session_id"] == session for e in out)
    assert [rig.artefacts.name_of(a) for a in out[0]["actors"]] == ["alice"]
    assert closed[0]["checked_out"] == 2
    rig.assert_no_pii()


async def test_documents_tampered_replayed_or_expired_over_mqtt_are_refused(
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    scenario = _variant(
        "plain-checkout",
        [
            *("badge mallory", "wait_event access.denied"),
            *("badge alice", "wait_unlock", "open", "close", "settle"),
        ],
    )
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        keys, art = rig.keys, rig.artefacts
        lay = scenario.cabinet
        now = datetime.now(UTC).replace(microsecond=0)
        hostile = {rig.pseudonym("mallory"): ["user"]}  # every refused list lets mallory in

        def signed(version: int, issued: datetime, expires: datetime) -> bytes:
            doc = allow_list_doc(
                lay.site_id, lay.cabinet_id, version, expires, hostile, issued_at=issued
            )
            return sign_document(keys.signing_private, keys.signing_kid, doc)

        good_v2 = signed(2, now, now + timedelta(days=1))
        wire = json.loads(good_v2)
        wire["doc"]["version"] = 3  # the signature no longer covers the content
        tampered = json.dumps(wire).encode()
        assert json.loads(art.allow_list)["doc"]["version"] == 1
        rollback = signed(0, now, now + timedelta(days=1))
        expired = signed(5, now - timedelta(hours=2), now - timedelta(hours=1))

        for payload, reason in (
            (tampered, "bad-signature"),
            (rollback, "rollback"),
            (expired, "expired"),
        ):
            rig.publish_document("allow-list", payload)
            await rig.agent.wait_log(f"refused allow-list document: {reason}")

        events = await rig.play()
        described = [describe_event(e, art) for e in events]
        assert [(d["type"], d.get("actor"), d.get("reason")) for d in described] == [
            ("access.denied", "mallory", "unknown badge"),
            ("session.opened", None, None),
            ("session.closed", None, None),
        ], describe_events(events, art)
        assert described[1]["actors"] == ["alice"]

        # The same channel does install a good document: mallory gets in with v2.
        rig.publish_document("allow-list", good_v2)
        await rig.agent.wait_log("installed allow-list version 2")
        await rig.badge.present(scenario.person("mallory").badge)
        await rig.llrp.wait_until(lambda: not rig.door.locked, TIMEOUT_S)
    rig.assert_no_pii()


async def test_cabinet_sim_command_plays_a_scenario_against_the_agent(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """``cabinet-sim cabinet --write-config`` output is all an operator needs to run the demo."""
    demo = tmp_path / "demo"
    out_path = tmp_path / "sim.out"
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    sim = _spawn(
        *("cabinet", "--scenario", "plain-checkout", "--write-config", str(demo)),
        *("--mqtt-port", str(mosquitto.port), "--step-timeout", "45", "--connect-timeout", "60"),
        out=out_path,
    )
    agent = AgentProcess(demo / "agent.toml", tmp_path / "agent.log")
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while "run the agent:" not in out_path.read_text():
                assert sim.poll() is None, out_path.read_text()
                await asyncio.sleep(0.05)
        text = out_path.read_text()
        assert f"cabinet-agent run --config {demo / 'agent.toml'}" in text
        assert "LLRP reader dock-1: 127.0.0.1:" in text
        assert "badge reader badge-1: socket://127.0.0.1:" in text
        agent.start()
        async with asyncio.timeout(90):
            while sim.poll() is None:
                await asyncio.sleep(0.1)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
        rc = await agent.stop()
    text = out_path.read_text()
    assert sim.returncode == 0, text
    assert rc == 0, agent.log_tail()
    assert "✓ 3 events as expected" in text, text
    assert "item.checked_out" in text
    assert '"item": "wrench"' in text
    assert_no_raw_ids([demo, tmp_path / "agent.log"], [p.badge for p in scenario.people])


def _spawn(*args: str, out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "simulators.cli", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_a_door_forced_while_the_agent_is_down_is_noticed_at_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    scenario = _variant("plain-checkout", ["wait 0"])
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        log = rig.sink.log
        log.mark(await rig.mark())
        await rig.agent.stop()
        await rig.door.force_open()
        rig.llrp.remove_tag(scenario.item("drill").epc)
        opened_before = rig.agent.log_text().count("door door open")
        rig.agent.start()
        await rig.agent.wait_log("ready:", count=2)
        await rig.wait_connected()
        # The agent must have read the sensor's level (open) before the door closes; an opening
        # and closing that both happen while nobody listens cannot be noticed by anyone.
        await rig.agent.wait_log("door door open", count=opened_before + 1)
        await rig.door.close()
        try:
            await log.wait_count("session.closed", 1, 8.0)
        except TimeoutError:
            raise AssertionError("the opening during the downtime was never noticed") from None
        end = await rig.mark()
        events = log.since_mark(before_seq=end)
    # The audit chain's head is published at every start (audit.anchor): bookkeeping, not the
    # cabinet's reaction to the door.
    kinds = [e["type"] for e in events if e["type"] != "audit.anchor"]
    assert kinds[0] == "door.forced", describe_events(events, rig.artefacts)
    assert "item.checked_out" in kinds, describe_events(events, rig.artefacts)


async def test_the_lock_is_engaged_at_start_up(tmp_path: Path, mosquitto: Mosquitto) -> None:
    scenario = _variant("plain-checkout", ["wait 0"])

    def released(rig: Rig) -> None:
        rig.door.on_gpo(scenario.cabinet.lock_gpo, True)  # left released by the last run

    async with cabinet_rig(
        scenario, tmp_path, mosquitto, commission=False, before_start=released
    ) as rig:
        # The start-up Relock may already have landed; either way the lock must end engaged
        # through a GPO write from the agent (not the one made before it started).
        try:
            await rig.llrp.wait_until(lambda: rig.door.locked, 8.0)
        except TimeoutError:
            raise AssertionError("the lock is still released after start-up") from None


async def test_item_overdue_is_raised_once_across_kill_9(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Issue 13 item 5: the cabinet raises item.overdue itself, after a kill -9 that came before
    it was due (the timer is persisted), and never again after a kill -9 that came after."""
    base = _variant(
        "item-overdue", ["badge alice", "wait_unlock", "open", "take wrench", "close", "settle"]
    )
    items = [
        i.model_copy(update={"overdue_after_s": 6}) if i.name == "wrench" else i for i in base.items
    ]
    scenario = base.model_copy(update={"items": items})
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        log = rig.sink.log
        start = await rig.mark()
        log.mark(start)
        await rig.runner().run()  # the check-out is committed: session.closed was published
        rig.agent.kill9()  # well before the 6 s limit
        rig.agent.start()
        await rig.agent.wait_log("ready:", count=2)
        await log.wait_count("item.overdue", 1, TIMEOUT_S)
        rig.agent.kill9()  # after it was committed: a restart must not repeat it
        rig.agent.start()
        await rig.agent.wait_log("ready:", count=3)
        await rig.agent.wait_log("reader dock-1 configured", count=3)
        # The restarted engine ticks at once; the marker's denial is committed after that tick,
        # so a repeated item.overdue would have a lower seq and be among these events.
        end = await rig.mark()
        events = log.since_mark(before_seq=end)
        # The technician at the crib sees it too, without the backend.
        rc, out_text, err = await ctl("status", "--json", "--config", str(rig.agent.config))
        assert rc == 0, err
        alerts = json.loads(out_text)["alerts"]
        assert any(a.startswith("item overdue: TW-0001 out since") for a in alerts), alerts
    late = [e for e in events if e["type"] == "item.overdue"]
    assert len(late) == 1, describe_events(events, rig.artefacts)
    [out] = [e for e in events if e["type"] == "item.checked_out"]
    assert late[0]["session_id"] == out["session_id"]
    assert late[0]["checked_out_at"] == out["time"]
    assert [rig.artefacts.name_of(a) for a in late[0]["held_by"]] == ["alice"]
    assert late[0]["out_s"] >= 6
    rig.assert_no_pii()
