"""Issue 9, items 2 and 11, through the real agent: a board without RTC, an expired allow-list.

The agent is the real ``cabinet-agent run`` process around simulated readers, badge readers and a
real mosquitto (tests/scenario_harness.py). A board without RTC is played with libfaketime: the
wall clock reads 1970 while the monotonic clock stays real (``FAKETIME_DONT_FAKE_MONOTONIC``),
and the clock is "fixed" by rewriting the faketime file while the agent runs, as NTP would.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import re
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.control.client import ControlClient
from agent.privacy.signed import canonical_json
from agent.store import Store, StoreConfig
from agent.trusted_time import KV_KEY as TIME_KEY
from agent.trusted_time import FloorRecord
from agent.trusted_time import decode_floor as decode_time_floor
from agent.trusted_time import encode_floor as encode_time_floor
from backend.signing import allow_list_doc, sign_document
from simulators.cabinet import (
    Scenario,
    ScenarioRunner,
    describe_event,
    describe_events,
    load_scenario,
)
from simulators.faultproxy import FaultProxy
from tests.daemon_rig import ctl
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

BOOT_WALL = datetime(1970, 1, 1, 0, 5, tzinfo=UTC)
# libfaketime moves the clock the agent reads, not the kernel's: no clock-set notification
# comes, so these agents read the wall clock every second (docs/decisions.md, "Small boards").
POLL_CLOCK = {"time": {"clock_watch": "poll"}}


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: apt-get install faketime (tests/run does)"
    return found[0]


def _faketime_env(clock_file: Path) -> dict[str, str]:
    """The wall clock from ``clock_file`` (an offset such as ``-1700000000s``); monotonic real."""
    return {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(clock_file),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_CACHE_DURATION": "1",  # re-read the file every second: the clock can be "fixed"
    }


def _set_wall(clock_file: Path, wall: datetime | None) -> None:
    """Make the faked wall clock read ``wall`` now (None: the real time)."""
    offset = 0 if wall is None else int((wall - datetime.now(UTC)).total_seconds())
    clock_file.write_text(f"{offset:+d}s\n")


async def _clocks_under(env: dict[str, str]) -> tuple[float, float]:
    """(wall, monotonic) as a process under ``env`` sees them."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; print(time.time(), time.monotonic())",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    wall, mono = (float(x) for x in out.split())
    return wall, mono


async def _status(rig: Rig) -> dict[str, Any]:
    async with ControlClient(rig.dir / "agent" / "ctl.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("status")
        return result


async def _audit(rig: Rig) -> list[dict[str, Any]]:
    async with ControlClient(rig.dir / "agent" / "ctl.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("audit.tail", {"n": 200})
        return list(result["records"])


def _scenario(name: str, steps: list[str], **update: Any) -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == name))
    return base.model_copy(update={"steps": steps, "expect": [], **update})


def _signed_allow_list(rig: Rig, version: int) -> bytes:
    scenario, keys = rig.scenario, rig.keys
    lay = scenario.cabinet
    now = datetime.now(UTC).replace(microsecond=0)
    entries = {rig.pseudonym(p.name): list(p.roles) for p in scenario.people if p.listed}
    doc = allow_list_doc(
        lay.site_id, lay.cabinet_id, version, now + timedelta(days=30), entries, issued_at=now
    )
    return sign_document(keys.signing_private, keys.signing_kid, doc)


async def test_a_board_without_rtc_keeps_its_documents_its_version_floor_and_reports_the_fix(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "calibration-overdue"))
    due = (datetime.now(UTC) - timedelta(days=1)).date()  # overdue today, not in 1970
    items = [
        i.model_copy(update={"calibration_due": due}) if i.name == "caliper" else i
        for i in base.items
    ]
    steps = ["badge alice", "wait_unlock", "open", "take caliper", "close", "settle"]
    scenario = _scenario("calibration-overdue", steps, items=items)
    clock_file = tmp_path / "faketime"
    _set_wall(clock_file, None)
    env = _faketime_env(clock_file)

    async with cabinet_rig(scenario, tmp_path, mosquitto, agent_extra=POLL_CLOCK) as rig:
        # Provisioned at real time: allow-list v1 (from the rig), then v2 from the backend.
        v2 = _signed_allow_list(rig, 2)
        rig.publish_document("allow-list", v2)
        await rig.agent.wait_log("installed allow-list version 2")
        assert await rig.agent.stop() == 0

        # Power cut, no RTC: the board comes back at 1970; its monotonic clock is real.
        _set_wall(clock_file, BOOT_WALL)
        wall, mono = await _clocks_under(env)
        assert wall < datetime(1971, 1, 1, tzinfo=UTC).timestamp(), "faketime did not apply"
        assert abs(mono - time.monotonic()) < 10, "the monotonic clock must stay real"
        rig.agent.env = env
        rig.agent.start()
        await rig.agent.wait_log("disagrees with the agent's time")
        await rig.wait_connected()
        for reader in (scenario.cabinet.badge_reader_id, "marker"):  # this start's connections
            await rig.agent.wait_log(f"badge reader {reader}: connected", count=2)

        # Alice is let in on the stored allow-list; the caliper is overdue by trusted time.
        events = await rig.play()
        described = [describe_event(e, rig.artefacts) for e in events]
        assert [(d["type"], d.get("item")) for d in described] == [
            ("session.opened", None),
            ("item.checked_out", "caliper"),
            ("item.calibration_overdue", "caliper"),
            ("session.closed", None),
        ], describe_events(events, rig.artefacts)
        assert {e["clock"] for e in events} == {"untrusted"}
        stamped = [datetime.fromisoformat(e["time"]) for e in events]
        assert min(stamped) > datetime.now(UTC) - timedelta(hours=1), "time kept from the floor"

        # A replayed older allow-list is a rollback, not merely "not yet valid".
        rig.publish_document("allow-list", rig.artefacts.allow_list)  # v1
        await rig.agent.wait_log("refused allow-list document: rollback")
        status = await _status(rig)
        assert status["clock"]["trusted"] is False
        assert status["documents"]["allow-list"]["version"] == 2
        assert status["documents"]["allow-list"]["refused"]["reason"] == "rollback"

        # NTP fixes the clock: the step is reported once, and events are trusted again.
        _set_wall(clock_file, None)
        await rig.agent.wait_log("clock step: wall clock moved")
        log = rig.sink.log

        def steps_seen() -> list[dict[str, Any]]:
            return log.find(lambda e: e.get("type") == "agent.clock_step")

        await log.wait_for(lambda: len(steps_seen()) >= 2, TIMEOUT_S)
        after = await rig.mark()
        marker = next(e for e in log.events if int(e["seq"]) == after)
        assert marker["clock"] == "trusted"
        reported = [(e["at_start"], e["trusted"]) for e in steps_seen()]
        assert reported == [(True, False), (False, True)], reported
        assert steps_seen()[1]["step_s"] > 50 * 365 * 86400
        status = await _status(rig)
        assert status["clock"]["trusted"] is True
        audit = [r["action"] for r in await _audit(rig)]
        assert audit.count("clock.step") == 2
        assert "document.refused" in audit
    text = rig.agent.log_text()
    assert text.count("clock step: wall clock moved") == 1, "reported once"


async def test_expired_allow_list_grace_lets_a_supervisor_in_and_says_so(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    steps = [
        "wait_allow_list_expired",
        "badge alice",
        "wait_event access.denied",
        "badge sam",
        "wait_unlock",
        "open",
        "close",
        "settle",
    ]
    scenario = _scenario("expired-allow-list", steps)
    domain = {"expired_allow_list_grace_h": 1.0, "allow_list_expiry_warning_days": 2.0}
    async with cabinet_rig(scenario, tmp_path, mosquitto, domain=domain) as rig:
        status = await _status(rig)
        assert "expires in" in status["documents"]["allow-list"]["warning"]
        assert any("allow-list expires in" in a for a in status["alerts"])
        events = await rig.play()
        described = [describe_event(e, rig.artefacts) for e in events]
        assert [(d["type"], d.get("actor") or d.get("actors")) for d in described] == [
            ("access.denied", "alice"),
            ("access.grace_granted", "sam"),
            ("session.opened", ["sam"]),
            ("session.closed", ["sam"]),
        ], describe_events(events, rig.artefacts)
        assert described[0]["reason"] == "allow-list expired"
        grant = described[1]
        assert grant["roles"] == ["supervisor"]
        expired_at = datetime.fromisoformat(grant["expired_at"])
        assert datetime.fromisoformat(grant["grace_until"]) == expired_at + timedelta(hours=1)
        records = await _audit(rig)
        grants = [r for r in records if r["action"] == "access.grace_granted"]
        assert len(grants) == 1
        assert grants[0]["actor"] == rig.pseudonym("sam")
        status = await _status(rig)
        assert status["documents"]["allow-list"]["state"] == "expired"
        assert "EXPIRED" in status["documents"]["allow-list"]["warning"]
    assert json.dumps(status)  # plain JSON


# ---- hostile report F1-F3: wall-clock glitches and absurd signed times ---------------------------


def _hand_signed(rig: Rig, version: int, issued_at: str, expires_at: str) -> bytes:
    """An allow-list validly signed with the backend's key, its times exactly as given."""
    lay = rig.scenario.cabinet
    entries = {rig.pseudonym(p.name): sorted(p.roles) for p in rig.scenario.people if p.listed}
    doc = {
        "kind": "allow-list",
        "site_id": lay.site_id,
        "cabinet_id": lay.cabinet_id,
        "version": version,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "body": {"entries": entries},
    }
    canonical = canonical_json(doc)
    sig = base64.b64encode(rig.keys.signing_private.sign(canonical)).decode()
    return canonical_json({"doc": doc, "kid": rig.keys.signing_kid, "sig": sig})


async def _door_cycle(rig: Rig, person: str = "alice") -> None:
    """A listed person badges, the lock opens (granted), the door opens and closes; committed."""
    steps = [f"badge {person}", "wait_unlock", "open", "close"]
    cycle = rig.scenario.model_copy(update={"steps": steps, "expect": []})
    closed = rig.agent.log_text().count("event session.closed")
    await asyncio.sleep(0.35)  # a badge reader drops a card shown twice within 0.3 s
    await ScenarioRunner(cycle, rig.llrp, rig.badge, rig.door, timeout_s=TIMEOUT_S).run()
    await rig.agent.wait_log("event session.closed", count=closed + 1)


async def _audit_verify(rig: Rig) -> dict[str, Any]:
    async with ControlClient(rig.dir / "agent" / "ctl.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("audit.verify")
        return result


def _opened_by(rig: Rig, person: str) -> list[dict[str, Any]]:
    who = rig.pseudonym(person)
    return rig.sink.log.find(
        lambda e: e.get("type") == "session.opened" and who in e.get("actors", [])
    )


async def test_a_wall_clock_glitch_forward_and_back_locks_nobody_out_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """F1: the wall clock jumps two years ahead (bad NTP/GPS) for a while, then is corrected.

    Meanwhile the broker is unreachable, so the events wait in the outbox; housekeeping runs
    every second. Before, the forward step was trusted: the allow-list expired, the outbox rows
    were dropped as "older than 30 days", the audit log was pruned, and after the correction
    the poisoned time floor refused every fresh allow-list as expired.
    """
    scenario = _scenario(
        "plain-checkout", ["badge alice", "wait_unlock", "open", "close", "settle"]
    )
    clock_file = tmp_path / "faketime"
    _set_wall(clock_file, None)
    env = _faketime_env(clock_file)

    def under_faketime(rig: Rig) -> None:
        rig.agent.env = env

    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(
            scenario,
            tmp_path,
            mosquitto,
            before_start=under_faketime,
            agent_extra={
                "mqtt": {"port": proxy.port},
                "store": {"housekeeping_interval_s": 1},
                **POLL_CLOCK,
            },
        ) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        # The broker goes out of reach: what follows waits in the outbox.
        proxy.refuse(True)
        proxy.cut()
        await _door_cycle(rig)  # A: before the glitch
        real_before = datetime.now(UTC)

        _set_wall(clock_file, real_before + timedelta(days=730))
        await agent.wait_log("NOT trusted (disagrees with the agent's time)")
        await agent.wait_log("age-based pruning postponed while the clock is untrusted")
        status = await _status(rig)
        assert status["clock"]["trusted"] is False
        assert datetime.fromisoformat(status["clock"]["wall"]).year >= real_before.year + 2
        assert datetime.fromisoformat(status["clock"]["time"]) < datetime.now(UTC) + timedelta(
            minutes=5
        )
        assert status["documents"]["allow-list"]["state"] == "valid"
        assert any(a.startswith("clock untrusted since") for a in status["alerts"])
        # What a technician sees: cabinetctl status and selftest against the running agent.
        rc, out, _ = await ctl("status", "--config", str(agent.config))
        assert rc == 0
        line = next(x for x in out.splitlines() if x.strip().startswith("clock"))
        assert re.search(r"UNTRUSTED for \d+ s \(since agent time ", line), line
        assert f"wall clock reads {real_before.year + 2}" in line, line
        assert "agent time " in line, line
        rc, out, _ = await ctl(
            "selftest", "--config", str(agent.config), "--json", "--timeout", "5"
        )
        checks = {c["check"]: c for c in json.loads(out)["checks"]}
        trust = checks["trusted time"]
        assert trust["status"] == "WARN"
        assert "ahead of the agent's time" in trust["reason"], trust
        assert "publish a fresh signed allow-list" in trust["reason"], trust
        await _door_cycle(rig)  # B: during the glitch, alice is let in
        during = datetime.now(UTC)

        _set_wall(clock_file, None)  # NTP corrects it
        await agent.wait_log("trusted (agrees with the agent's time)")
        await agent.wait_log("age-based pruning resumed (clock trusted)")
        proxy.refuse(False)
        await rig.mark()  # everything committed so far is delivered, contiguously

        steps = [e for e in rig.sink.log.events if e["type"] == "agent.clock_step"]
        assert [(e["trusted"], e["at_start"], e["cause"]) for e in steps] == [
            (False, False, "wall"),
            (True, False, "wall"),
        ]
        opened = _opened_by(rig, "alice")
        assert len(opened) == 2, "cycles A and B both granted, neither event dropped"
        assert [e["clock"] for e in opened] == ["trusted", "untrusted"]
        glitch_time = datetime.fromisoformat(opened[1]["time"])
        assert real_before - timedelta(seconds=5) < glitch_time < during + timedelta(seconds=5)
        alerts = [e for e in rig.sink.log.events if e["type"] == "agent.alert"]
        assert not [a for a in alerts if a["kind"] == "store.age_dropped"], alerts
        assert "age_dropped" not in agent.log_text()
        audit = await _audit_verify(rig)
        assert audit["ok"]
        assert audit["anchor_seq"] == 0, "the audit log was not pruned"

        # A fresh allow-list is installed after the correction, and alice is let in again.
        rig.publish_document("allow-list", _signed_allow_list(rig, 2))
        await agent.wait_log("installed allow-list version 2")
        events = await rig.play()
        assert [e["type"] for e in events] == ["session.opened", "session.closed"], events
        assert {e["clock"] for e in events} == {"trusted"}
        status = await _status(rig)
        assert status["clock"]["trusted"] is True
        assert status["documents"]["allow-list"]["version"] == 2


async def test_a_signed_document_issued_in_year_1_is_refused_and_the_agent_runs_on(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """F2: it used to be stored, then crash the agent (OverflowError) at every start."""
    scenario = _scenario(
        "plain-checkout", ["badge alice", "wait_unlock", "open", "close", "settle"]
    )
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        bad = _hand_signed(rig, 2, "0001-01-01T00:00:00Z", "2027-12-31T23:59:59Z")
        rig.publish_document("allow-list", bad)  # retained: it comes back at every start
        await rig.agent.wait_log("refused allow-list document: malformed")
        status = await _status(rig)
        refused = status["documents"]["allow-list"]["refused"]
        assert refused["reason"] == "malformed"
        assert "issued_at 0001-01-01T00:00:00Z" in refused["detail"]
        assert status["documents"]["allow-list"]["version"] == 1
        events = await rig.play()
        assert [e["type"] for e in events] == ["session.opened", "session.closed"], events

        assert await rig.agent.stop() == 0
        rig.agent.start()
        await rig.agent.wait_log("refused allow-list document: malformed", count=2)
        await rig.wait_connected()
        for reader in (scenario.cabinet.badge_reader_id, "marker"):  # this start's connections
            await rig.agent.wait_log(f"badge reader {reader}: connected", count=2)
        events = await rig.play()
        assert [e["type"] for e in events] == ["session.opened", "session.closed"], events
        status = await _status(rig)
        assert status["documents"]["allow-list"]["version"] == 1
        assert status["documents"]["allow-list"]["refused"]["reason"] == "malformed"


async def test_a_1970_boot_refuses_documents_from_the_far_future_and_keeps_its_time(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """F3: at 1970 a document issued in 9999 used to be accepted and to become the time floor;
    minutes later the agent died of an OverflowError, and at every start after."""
    scenario = _scenario(
        "plain-checkout", ["badge alice", "wait_unlock", "open", "close", "settle"]
    )
    clock_file = tmp_path / "faketime"
    env = _faketime_env(clock_file)
    async with cabinet_rig(scenario, tmp_path, mosquitto, agent_extra=POLL_CLOCK) as rig:
        assert await rig.agent.stop() == 0
        # A reboot: the saved floor no longer continues on this boot's monotonic clock.
        store = await Store.open(StoreConfig(path=tmp_path / "agent" / "state.db"))
        try:
            raw = await store.kv_get(TIME_KEY)
            assert raw is not None
            saved = decode_time_floor(raw)
            await store.kv_put(TIME_KEY, encode_time_floor(FloorRecord(saved.floor, True)))
        finally:
            await store.close()
        _set_wall(clock_file, BOOT_WALL)
        rig.agent.env = env
        rig.agent.start()
        await rig.agent.wait_log("disagrees with the agent's time")
        await rig.wait_connected()
        for reader in (scenario.cabinet.badge_reader_id, "marker"):
            await rig.agent.wait_log(f"badge reader {reader}: connected", count=2)
        status = await _status(rig)
        assert (status["clock"]["trusted"], status["clock"]["basis"]) == (False, "floor")

        rig.publish_document(
            "allow-list", _hand_signed(rig, 2, "9999-12-31T23:56:00Z", "9999-12-31T23:59:59Z")
        )
        await rig.agent.wait_log("refused allow-list document: malformed")
        # Two years after the agent's time: more than max_document_ahead_days (366).
        agent_time = datetime.fromisoformat(status["clock"]["time"])
        far = allow_list_doc(
            scenario.cabinet.site_id,
            scenario.cabinet.cabinet_id,
            3,
            agent_time + timedelta(days=760),
            {rig.pseudonym(p.name): list(p.roles) for p in scenario.people if p.listed},
            issued_at=(agent_time + timedelta(days=730)).replace(microsecond=0),
        )
        rig.publish_document(
            "allow-list", sign_document(rig.keys.signing_private, rig.keys.signing_kid, far)
        )
        await rig.agent.wait_log("refused allow-list document: not-yet-valid")
        status = await _status(rig)
        assert status["documents"]["allow-list"]["version"] == 1
        assert "366 days" in status["documents"]["allow-list"]["refused"]["detail"]
        assert datetime.fromisoformat(status["clock"]["time"]) < datetime.now(UTC) + timedelta(
            hours=1
        ), "the agent's time was not moved by either document"

        events = await rig.play()  # alice is let in on the stored allow-list
        assert [e["type"] for e in events] == ["session.opened", "session.closed"], events
        assert {e["clock"] for e in events} == {"untrusted"}
        assert max(datetime.fromisoformat(e["time"]) for e in events) < datetime.now(UTC)

        # And it starts again cleanly, its time still sane.
        assert await rig.agent.stop() == 0
        rig.agent.start()
        await rig.agent.wait_log("refused allow-list document: not-yet-valid", count=2)
        await rig.wait_connected()
        status = await _status(rig)
        assert datetime.fromisoformat(status["clock"]["time"]) < datetime.now(UTC)
        assert status["documents"]["allow-list"]["version"] == 1
    text = rig.agent.log_text()
    assert "OverflowError" not in text
    assert "fatal:" not in text


async def _as_if_rebooted(rig: Rig) -> None:
    """The agent is stopped; make its saved time floor look saved in an earlier boot (a fresh
    kernel boot id is what tells the agent a reboot from a restart: its monotonic clock then
    no longer continues the saved one)."""
    store = await Store.open(StoreConfig(path=rig.dir / "agent" / "state.db"))
    try:
        raw = await store.kv_get(TIME_KEY)
        assert raw is not None
        saved = decode_time_floor(raw)
        assert saved.boot is not None
        await store.kv_put(TIME_KEY, encode_time_floor(FloorRecord(saved.floor, saved.trusted)))
    finally:
        await store.close()


async def test_a_reboot_into_a_wrong_forward_clock_is_provisional_and_destroys_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Hostile report 2, F1: the board reboots while its RTC (or a time source) reads two years
    ahead, before NTP has synchronised. Before, that reading was trusted on faith: undelivered
    rows were dropped by age, the audit log pruned, the allow-list expired (everyone locked
    out), no clock step reported, and after NTP's correction the agent's time stayed in 2028."""
    scenario = _scenario(
        "plain-checkout", ["badge alice", "wait_unlock", "open", "close", "settle"]
    )
    clock_file = tmp_path / "faketime"
    _set_wall(clock_file, None)
    env = _faketime_env(clock_file)

    def under_faketime(rig: Rig) -> None:
        rig.agent.env = env

    async with (
        FaultProxy(mosquitto.port) as proxy,
        cabinet_rig(
            scenario,
            tmp_path,
            mosquitto,
            before_start=under_faketime,
            agent_extra={
                "mqtt": {"port": proxy.port},
                "store": {"housekeeping_interval_s": 1},
                **POLL_CLOCK,
            },
        ) as rig,
    ):
        agent = rig.agent
        await rig.mark()
        proxy.refuse(True)
        proxy.cut()
        await _door_cycle(rig)  # A: waits in the outbox
        assert await agent.stop() == 0

        # Reboot: the RTC reads two years ahead and NTP has not synchronised yet.
        await _as_if_rebooted(rig)
        rig.time_synced.unlink()
        glitch = datetime.now(UTC) + timedelta(days=730)
        _set_wall(clock_file, glitch)
        agent.start()
        await agent.wait_log("clock jump at start: wall clock")
        await agent.wait_log("taken provisionally (no time sync yet")
        await agent.wait_log("age-based pruning postponed while the clock is untrusted")
        await rig.wait_connected()
        for reader in (scenario.cabinet.badge_reader_id, "marker"):
            await agent.wait_log(f"badge reader {reader}: connected", count=2)
        status = await _status(rig)
        clock = status["clock"]
        assert (clock["trusted"], clock["provisional"]) == (False, True), clock
        assert datetime.fromisoformat(clock["time"]).year == glitch.year
        assert datetime.fromisoformat(clock["proven"]) < datetime.now(UTC), "the proven floor"
        assert status["documents"]["allow-list"]["state"] == "valid"
        rc, out, _ = await ctl("status", "--config", str(agent.config))
        assert rc == 0
        line = next(x for x in out.splitlines() if x.strip().startswith("clock"))
        assert re.search(r"PROVISIONAL for \d+ s \(since agent time ", line), line
        assert "no time sync yet" in line, line
        await _door_cycle(rig)  # B: alice is let in, whatever the provisional clock says

        # NTP steps the clock back to the truth, then reports it synchronised.
        _set_wall(clock_file, None)
        await agent.wait_log("clock step: wall clock moved")
        rig.time_synced.touch()
        await agent.wait_log("clock: time synchronised (file:")
        await agent.wait_log("age-based pruning resumed (clock trusted)")
        status = await _status(rig)
        assert status["clock"]["trusted"] is True
        assert abs(datetime.fromisoformat(status["clock"]["time"]) - datetime.now(UTC)) < (
            timedelta(seconds=30)
        ), "the agent's time is not stuck in 2028"
        assert not [a for a in status["alerts"] if a.startswith("clock")], status["alerts"]
        proxy.refuse(False)
        await rig.mark()  # everything committed so far is delivered, contiguously

        steps = [e for e in rig.sink.log.events if e["type"] == "agent.clock_step"]
        assert [(e["at_start"], e["trusted"], e["cause"]) for e in steps] == [
            (True, False, "wall"),  # the jump at boot, reported at once
            (False, False, "wall"),  # NTP's step back
            (False, True, "sync"),  # synchronised: proven
        ], steps
        assert steps[0]["step_s"] > 700 * 86400
        opened = _opened_by(rig, "alice")
        assert len(opened) == 2, "cycles A and B both granted, neither event dropped"
        assert [e["clock"] for e in opened] == ["trusted", "untrusted"]
        alerts = [e for e in rig.sink.log.events if e["type"] == "agent.alert"]
        assert not [a for a in alerts if a["kind"] == "store.age_dropped"], alerts
        assert "age_dropped" not in agent.log_text()
        audit = await _audit_verify(rig)
        assert audit["ok"]
        assert audit["anchor_seq"] == 0, "the audit log was not pruned"
        # The floor saved meanwhile never held 2028.
        events = await rig.play()
        assert [e["type"] for e in events] == ["session.opened", "session.closed"], events
    store = await Store.open(StoreConfig(path=tmp_path / "agent" / "state.db"))
    try:
        raw = await store.kv_get(TIME_KEY)
        assert raw is not None
        assert decode_time_floor(raw).floor < datetime.now(UTC) + timedelta(minutes=5)
    finally:
        await store.close()


async def test_a_document_refused_as_not_yet_valid_is_installed_when_its_time_comes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Hostile report 2, F4: the backend's clock runs 12 s beyond the accepted skew. Before, the
    retained document stayed refused until the next MQTT reconnect (days on a healthy link)."""
    scenario = _scenario(
        "plain-checkout", ["badge alice", "wait_unlock", "open", "close", "settle"]
    )
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        agent = rig.agent
        now = datetime.now(UTC).replace(microsecond=0)
        lay = scenario.cabinet
        entries = {rig.pseudonym(p.name): list(p.roles) for p in scenario.people if p.listed}

        def signed(version: int, issued_at: datetime) -> bytes:
            doc = allow_list_doc(
                lay.site_id,
                lay.cabinet_id,
                version,
                issued_at + timedelta(days=30),
                entries,
                issued_at=issued_at,
            )
            return sign_document(rig.keys.signing_private, rig.keys.signing_kid, doc)

        rig.publish_document("allow-list", signed(2, now + timedelta(seconds=312)))
        await agent.wait_log("refused allow-list document: not-yet-valid")
        status = await _status(rig)
        assert status["documents"]["allow-list"]["version"] == 1
        await agent.wait_log("judging again allow-list version 2")
        await agent.wait_log("installed allow-list version 2")
        assert datetime.now(UTC) >= now + timedelta(seconds=11), "not before its time"
        status = await _status(rig)
        assert status["documents"]["allow-list"]["version"] == 2
        assert "refused" not in status["documents"]["allow-list"], status["documents"]
        stale = [a for a in status["alerts"] if a.startswith("allow-list refused")]
        assert not stale, "the refusal is history once a document is in force"

        # An hour ahead: judged again at once on SIGHUP (and refused again, with the reason).
        rig.publish_document("allow-list", signed(3, now + timedelta(hours=1)))
        await agent.wait_log("refused allow-list document: not-yet-valid", count=2)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        await agent.wait_log("judging again allow-list version 3")
        await agent.wait_log("reload: documents re-verified")
        status = await _status(rig)
        assert status["documents"]["allow-list"]["version"] == 2
        assert status["documents"]["allow-list"]["refused"]["reason"] == "not-yet-valid"
