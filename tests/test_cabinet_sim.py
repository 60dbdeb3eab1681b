"""The cabinet scenario simulator without an agent: file format, artefacts, config, matching,
the runner's physical rules on real simulators, and the ``cabinet-sim cabinet`` command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.domain import events as ev
from agent.privacy.signed import DocumentVerifier
from backend.keys import generate_backend_keys
from simulators.badge import BadgeSimulator
from simulators.cabinet import (
    INSTALLER,
    Expected,
    Scenario,
    ScenarioError,
    ScenarioRunner,
    agent_config,
    build_artefacts,
    bundled_scenarios,
    load_scenario,
    match_events,
    parse_scenario,
    populate,
    to_toml,
    wire_door,
)
from simulators.llrp import LlrpSimulator

ROOT = Path(__file__).resolve().parent.parent

MINIMAL: dict[str, Any] = {
    "name": "t",
    "steps": ["badge alice", "wait_unlock", "open", "take wrench", "close", "settle"],
    "drawers": {"top": [1, 2], "bottom": [3]},
    "people": [
        {"name": "alice", "badge": "3F7A21C90B"},
        {"name": "mallory", "badge": "1B66D0C3A7", "listed": False},
    ],
    "items": [
        {
            "name": "wrench",
            "epc": "e2801160600002000000a001",
            "drawer": "top",
            "home_drawer": "top",
            "calibration_due": "2020-01-31",
        },
        {"name": "stray", "epc": "e2801160600002000000a009", "registered": False},
    ],
    "expect": [{"type": "session.opened", "actors": ["alice"]}],
}

# Event fields a scenario may name (plus the names the matcher adds).
_MODEL_FIELDS = {
    name: set(model.model_fields) | {"item"}
    for name, model in (
        (m.model_fields["type"].default, m)
        for m in ev.EventBase.__subclasses__()
        if "type" in m.model_fields
    )
}


def _scenario(**changes: Any) -> Scenario:
    return parse_scenario({**MINIMAL, **changes})


def _keys(tmp_path: Path) -> Any:
    return generate_backend_keys(tmp_path / "keys")


def _artefacts(scenario: Scenario, keys: Any, **kw: Any) -> Any:
    return build_artefacts(
        scenario,
        site=keys.site,
        signing_key=keys.signing_private,
        signing_kid=keys.signing_kid,
        **kw,
    )


# ---- the bundled scenarios -------------------------------------------------------------------


@pytest.mark.parametrize("path", bundled_scenarios(), ids=lambda p: p.stem)
def test_bundled_scenario_names_only_real_event_fields(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.expect
    for i, exp in enumerate(scenario.expect, 1):
        fields = exp.fields()
        assert fields["type"] in ev.EVENT_TYPES, f"{path.name} #{i}: {fields['type']}"
        unknown = set(fields) - _MODEL_FIELDS[fields["type"]]
        assert not unknown, f"{path.name} expect #{i} names fields {unknown}"
        if "item" in fields:
            scenario.item(fields["item"])
        for name in [*fields.get("actors", []), fields.get("actor", "unknown")]:
            assert name == "unknown" or scenario.person(name)


def test_the_bundle_covers_the_required_situations() -> None:
    names = {p.stem for p in bundled_scenarios()}
    assert len(names) >= 20
    for required in (
        "plain-checkout",
        "plain-return",
        "multi-drawer-checkout",
        "two-holders",
        "forced-door",
        "door-left-open",
        "lockout-supervisor",
        "unknown-badge",
        "expired-allow-list",
        "unknown-item",
        "misplaced-item",
        "calibration-overdue",
        "weak-tags",
        "reader-dies-during-settle",
        "relock-not-opened",
        "wrong-drawer-return",
        "mixed-take-return",
        "background-missing",
        "badge-while-open",
        "demo-loop",
    ):
        assert required in names


# ---- the file format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": ["badge bob"]}, "no person 'bob'"),
        ({"steps": ["take hammer"]}, "no item 'hammer'"),
        ({"steps": ["return wrench to attic"]}, "no drawer 'attic'"),
        ({"steps": ["dance"]}, "unknown step 'dance'"),
        ({"steps": ["wait"]}, "wrong number of arguments"),
        ({"steps": ["wait soon"]}, "is not a number of seconds"),
        ({"steps": ["move wrench into top"]}, "move ITEM to DRAWER"),
        ({"steps": ["add_unknown_tag e2801160600002000000a001 top"]}, "is a declared item"),
        ({"steps": ["expect_lock_state ajar"]}, "'locked' or 'unlocked'"),
        ({"steps": ["reader_fault melt"]}, "faults are silence"),
        ({"drawers": {"top": [1], "bottom": [1]}}, "antenna 1 is in drawers"),
        ({"drawers": {"top": [9]}}, "antenna 9 outside"),
        ({"domain": {"drawers": {}}}, "comes from [drawers]"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_scenarios_say_what_and_where(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        _scenario(**changes)
    assert message in str(info.value)


def test_a_bad_badge_number_is_refused_without_being_echoed() -> None:
    people = [{"name": "alice", "badge": "3F7A21C9ZZ"}]
    with pytest.raises(ScenarioError) as info:
        _scenario(people=people, steps=["badge alice"])
    assert "10 hex digits" in str(info.value)
    assert "3F7A21C9ZZ" not in str(info.value)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "x"\nsteps = [\n')
    with pytest.raises(ScenarioError, match=r"broken\.toml: not a TOML file"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")


# ---- artefacts and the agent config ------------------------------------------------------------


def test_artefacts_hold_pseudonyms_signed_documents_and_drawers(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    scenario = _scenario()
    art = _artefacts(scenario, keys, extra_people=[INSTALLER])
    now = datetime.now(UTC)
    verifier = DocumentVerifier({keys.signing_kid: keys.signing_public}, "hangar-3", "crib-07")
    allow = verifier.verify(art.allow_list, "allow-list", now)
    entries = dict(allow.body["entries"])
    assert sorted(art.names[p] for p in entries) == ["alice", "installer"]  # mallory unlisted
    assert sorted(art.names.values()) == ["alice", "installer", "mallory"]
    assert all(p.startswith("p2.s1.") for p in art.names)
    registry = verifier.verify(art.asset_registry, "asset-registry", now)
    (asset,) = registry.body["assets"]  # the unregistered tag stays out
    assert dict(asset) == {
        "epc": "e2801160600002000000a001",
        "asset_id": "wrench",
        "name": "wrench",
        "home_drawer": "top",
        "calibration_due": "2020-01-31",
    }
    for raw in ("3F7A21C90B", "1B66D0C3A7", INSTALLER.badge):
        for doc in (art.allow_list, art.asset_registry):
            assert raw.encode() not in doc.upper()
    assert art.domain["drawers"] == {"top": ["dock-1:1", "dock-1:2"], "bottom": ["dock-1:3"]}
    assert abs((art.allow_list_expires_at - now).total_seconds() - 30 * 86400) < 60


def test_generated_config_is_a_valid_agent_config(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    scenario = _scenario(domain={"left_open_s": 2.0})
    art = _artefacts(scenario, keys)
    cfg = agent_config(
        scenario,
        art,
        llrp_port=5084,
        badge_url="socket://127.0.0.1:7001",
        key_dir=tmp_path / "keys",
        state_dir=tmp_path / "state",
        mqtt_port=1883,
    )
    text = to_toml(cfg)
    parsed = parse_config(tomllib.loads(text))
    assert parsed.domain.left_open_s == 2.0
    assert parsed.domain.stable_ms == 300
    assert parsed.readers[0].antennas == [1, 2, 3]
    readers = {r.id: list(r.antennas) for r in parsed.readers}
    assert parsed.domain.check_readers(readers) == []
    assert parsed.door is not None
    assert parsed.door.sensor_gpi == 1
    assert parsed.mqtt is not None
    assert parsed.mqtt.port == 1883
    assert "3F7A21C90B" not in text


def test_toml_writer_round_trips_nested_tables_and_escapes() -> None:
    doc = {
        "a": 1,
        "b": 'quote " and \\ back',
        "c": [1.5, True, "x"],
        "t": {"k": "v", "sub": {"z": False}},
        "arr": [{"id": "one", "inner": {"q": 1}}, {"id": "two"}],
        "dotted.key": 3,
    }
    assert tomllib.loads(to_toml(doc)) == doc
    with pytest.raises(ValueError, match="finite"):
        to_toml({"x": float("nan")})


# ---- matching --------------------------------------------------------------------------------


def test_matching_is_exact_by_name_and_reports_each_difference(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    scenario = _scenario()
    art = _artefacts(scenario, keys)
    alice = next(p for p, n in art.names.items() if n == "alice")
    got = [
        {"type": "session.opened", "seq": 4, "actors": [alice], "trigger": "badge"},
        {
            "type": "item.checked_out",
            "seq": 5,
            "actors": [alice],
            "epc": "e2801160600002000000a001",
            "drawer": "top",
        },
    ]
    expected = [
        Expected.model_validate({"type": "session.opened", "actors": ["alice"]}),
        Expected.model_validate({"type": "item.checked_out", "item": "wrench", "drawer": "top"}),
    ]
    assert match_events(expected, got, art) == []
    wrong = [*expected[:1], Expected.model_validate({"type": "item.checked_out", "item": "x"})]
    assert match_events(wrong, got, art) == ["#2 item.checked_out: item = 'wrench', expected 'x'"]
    assert match_events(expected[:1], got, art)[0].startswith("#2: unexpected")
    assert match_events(expected, got[:1], art)[0].startswith("#2: missing")


# ---- the runner on real simulators, no agent ------------------------------------------------


async def test_runner_obeys_the_door_and_moves_tags() -> None:
    scenario = _scenario(
        steps=[
            "try_open",
            "force_open",
            "take wrench",
            "return wrench to bottom",
            "move wrench to top",
            "add_unknown_tag 3034000000000000000000ff to bottom",
            "close",
            "vanish wrench",
        ]
    )
    async with (
        LlrpSimulator(antennas=4, seed=1) as llrp,
        BadgeSimulator(transport="tcp") as badge,
    ):
        door = wire_door(scenario, llrp)
        populate(scenario, llrp)
        assert [t.epc for t in llrp.tags] == ["e2801160600002000000a001"]
        seen: list[str] = []
        runner = ScenarioRunner(scenario, llrp, badge, door, on_step=lambda s: seen.append(s.op))
        await runner.run()
        assert seen[:3] == ["try_open", "force_open", "take"]
        assert door.forced_openings == 1
        assert not door.is_open
        assert {t.epc: t.antenna for t in llrp.tags} == {"3034000000000000000000ff": 3}
        assert llrp.gpi_state[1] is False  # the sensor followed the door: open, then closed

        closed = _scenario(steps=["take wrench"])
        populate(closed, llrp)
        with pytest.raises(ScenarioError, match=r"step 1 'take wrench': the door is closed"):
            await ScenarioRunner(closed, llrp, badge, door).run()
        locked = _scenario(steps=["open"])
        with pytest.raises(ScenarioError, match="the door is locked"):
            await ScenarioRunner(locked, llrp, badge, door).run()
        not_locked = _scenario(steps=["force_open", "close", "try_open"])
        door.on_gpo(1, True)  # released by the controller
        with pytest.raises(ScenarioError, match="was not locked"):
            await ScenarioRunner(not_locked, llrp, badge, door).run()


async def test_waits_are_bounded() -> None:
    scenario = _scenario(steps=["wait_unlock"])
    async with (
        LlrpSimulator(antennas=4, seed=1) as llrp,
        BadgeSimulator(transport="tcp") as badge,
    ):
        door = wire_door(scenario, llrp)
        runner = ScenarioRunner(scenario, llrp, badge, door, timeout_s=0.2)
        with pytest.raises(ScenarioError, match=r"step 1 'wait_unlock' timed out after 0.2s"):
            await runner.run()


async def test_badges_reach_the_reader_paced_like_a_hand() -> None:
    scenario = _scenario(steps=["badge alice", "badge alice", "badge mallory"])
    async with (
        LlrpSimulator(antennas=4, seed=1) as llrp,
        BadgeSimulator(transport="tcp") as badge,
    ):
        door = wire_door(scenario, llrp)
        host, port = badge.url.removeprefix("socket://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await ScenarioRunner(scenario, llrp, badge, door, badge_gap_s=0.3).run()
            assert loop.time() - t0 >= 0.3  # alice's second card waited
            data = b""
            async with asyncio.timeout(5):
                while data.count(b"\x03") < 3:
                    data += await reader.read(100)
            assert data.count(b"3F7A21C90B") == 2
            assert data.count(b"1B66D0C3A7") == 1
        finally:
            writer.close()
            await writer.wait_closed()


async def test_allow_list_expiry_wait_uses_the_signed_expiry() -> None:
    scenario = _scenario(steps=["wait_allow_list_expired"])
    async with (
        LlrpSimulator(antennas=4, seed=1) as llrp,
        BadgeSimulator(transport="tcp") as badge,
    ):
        door = wire_door(scenario, llrp)
        with pytest.raises(ScenarioError, match="expiry time not given"):
            await ScenarioRunner(scenario, llrp, badge, door).run()
        soon = datetime.now(UTC) + timedelta(seconds=0.3)
        await ScenarioRunner(scenario, llrp, badge, door, allow_list_expires_at=soon).run()
        assert datetime.now(UTC) >= soon
        far = datetime.now(UTC) + timedelta(hours=1)
        with pytest.raises(ScenarioError, match="expires in"):
            await ScenarioRunner(
                scenario, llrp, badge, door, allow_list_expires_at=far, timeout_s=5
            ).run()


# ---- the command line ------------------------------------------------------------------------


def _sim(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulators.cli", "cabinet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_lists_the_bundled_scenarios() -> None:
    out = _sim("--list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(bundled_scenarios())
    assert any(line.startswith("plain-checkout ") for line in lines)


def test_cli_refuses_a_bad_scenario_with_exit_65(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nsteps = ["fly"]\n[drawers]\na = [1]\n')
    out = _sim("--scenario", str(bad))
    assert out.returncode == 65
    assert "unknown step 'fly'" in out.stderr
    assert _sim().returncode == 2
    assert _sim("--scenario", "no-such-scenario").returncode == 65


@pytest.mark.parametrize(("reason", "rc"), [("unknown badge", 0), ("role", 1)])
async def test_cli_exit_code_says_whether_the_round_matched(
    tmp_path: Path, reason: str, rc: int
) -> None:
    """The standalone simulator against a real agent and broker: a round whose events differ
    from the scenario's expectation exits 1 (as the demo does), a matching one exits 0."""
    from tests.daemon_rig import AgentProcess
    from tests.mqtt_fixtures import Mosquitto

    source = (ROOT / "simulators" / "scenarios" / "unknown-badge.toml").read_text()
    assert 'reason = "unknown badge"' in source
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(source.replace('reason = "unknown badge"', f'reason = "{reason}"'))
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    out = tmp_path / "run"
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.cli", "cabinet", "--scenario", str(scenario),
        "--write-config", str(out), "--mqtt-port", str(broker.port), "--connect-timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    transcript = b""
    try:
        assert sim.stdout is not None
        async with asyncio.timeout(30):
            while b"run the agent:" not in transcript:
                line = await sim.stdout.readline()
                assert line, transcript.decode()
                transcript += line
        async with AgentProcess(out / "agent.toml", tmp_path / "agent.log") as agent:
            async with asyncio.timeout(120):
                rest, _ = await sim.communicate()
            transcript += rest
            assert await agent.stop() == 0, agent.text()
    finally:
        if sim.returncode is None:
            sim.kill()
            await sim.wait()
        broker.stop()
    text = transcript.decode()
    assert sim.returncode == rc, text
    assert ("✓ 1 events as expected" in text) == (rc == 0), text
    assert ("events differ" in text) == (rc == 1), text


def test_a_scenario_at_night_gets_the_night_hours_around_now_on_the_sites_clocks(
    tmp_path: Path,
) -> None:
    from simulators.cabinet.provisioning import night_window

    # 10:30 UTC is 16:15 in Kathmandu (UTC+05:45).
    at = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    assert night_window(at, "Asia/Kathmandu") == {"night_start": "15:15", "night_end": "17:15"}
    # Over midnight on the site's clocks: the window wraps (the agent reads end < start so).
    late = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)  # 23:45 in Kathmandu
    assert night_window(late, "Asia/Kathmandu") == {"night_start": "22:45", "night_end": "00:45"}
    keys = _keys(tmp_path)
    scenario = _scenario(domain={"night_left_open_s": 2.0}, at_night=True)
    art = _artefacts(scenario, keys)
    assert {"night_start", "night_end"} <= set(art.domain)
    with pytest.raises(ScenarioError, match="at_night"):
        _scenario(at_night=True, domain={"night_start": "22:00"})


def test_calibration_due_in_days_counts_from_the_date_at_the_site(tmp_path: Path) -> None:
    import json as _json

    keys = _keys(tmp_path)
    wrench = {"name": "wrench", "epc": "e2801160600002000000a001", "drawer": "top"}
    scenario = _scenario(
        items=[{**wrench, "calibration_due_in_days": -1}],
        cabinet={"timezone": "Pacific/Kiritimati"},
    )
    # 10:30 UTC on 5 December is 00:30 on the 6th in Kiritimati (UTC+14): "yesterday" there
    # is the 5th, UTC's today.
    art = _artefacts(scenario, keys, now=datetime(2026, 12, 5, 10, 30, tzinfo=UTC))
    body = _json.loads(art.asset_registry)["doc"]["body"]
    assert body["assets"][0]["calibration_due"] == "2026-12-05"
    with pytest.raises(ScenarioError, match="not both"):
        _scenario(items=[{**wrench, "calibration_due": "2020-01-31", "calibration_due_in_days": 1}])
