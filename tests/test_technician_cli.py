"""cabinetctl's technician commands against a running daemon (real LLRP simulator, door on its
GPI/GPO): ``technician open|close|status``, ``inventory rebaseline``, ``door test``; with a
badge reader and the backend's documents (tests/scenario_harness.py), a door test that holds
the door against badges and an opening during it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from agent.domain.technician import DOOR_TEST_REASON
from simulators.cabinet import Scenario, bundled_scenarios, load_scenario
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import ctl as rig_ctl
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_cli_daemon import ROOT, TAGS, WAIT_S, _events, _until_event, ctl, daemon
from tests.test_cli_daemon import sockdir as sockdir  # the fixture


async def test_help_lists_the_technician_commands() -> None:
    top = await ctl("--help")
    assert top.rc == 0
    for name in ("technician", "inventory"):
        assert name in top.out
    door = await ctl("door", "--help")
    assert "test" in door.out
    tech = await ctl("technician", "--help")
    assert all(w in tech.out for w in ("open", "close", "status"))
    inv = await ctl("inventory", "--help")
    assert "rebaseline" in inv.out


async def test_a_technician_session_door_test_and_rebaseline_through_the_daemon(
    tmp_path: Path, sockdir: Path
) -> None:
    async with (
        LlrpSimulator(
            personality="impinj", antennas=4, port=0, seed=9, gpi_ports_enabled=True
        ) as sim,
        daemon(tmp_path, sockdir, sim) as d,
    ):
        sock = str(d.sock)
        for tag in TAGS:
            sim.add_tag(tag)

        # The door test: every step PASS, the lock moved three times.
        refused = await ctl("door", "test", "--json", "--socket", sock)
        assert refused.rc == 64
        writes = len(sim.gpo_history)
        test = await ctl("door", "test", "--yes-i-am-on-site", "--socket", sock)
        assert test.rc == 0, test.err
        lines = test.out.strip().splitlines()
        assert [line.split()[:2] for line in lines[:-1]] == [
            ["PASS", "sensor"],
            ["PASS", "lock"],
            ["PASS", "unlock"],
            ["PASS", "relock"],
            ["PASS", "sensor"],
        ], test.out
        assert lines[-1].startswith("PASS  door door")
        moves = [w[:2] for w in sim.gpo_history[writes:]]
        assert (1, True) in moves
        assert moves[-1] == (1, False), "the test leaves the door locked"

        # The daemon starts with no baseline: the first re-baseline takes stock.
        first = await ctl(
            "inventory", "rebaseline", "--reason", "stock", "--json", "--socket", sock
        )
        assert first.rc == 0, first.err
        assert (first.doc()["state"], first.doc()["added"], first.doc()["tags"]) == ("done", 3, 3)

        # A reason is required.
        blank = await ctl("technician", "open", "--reason", "  ", "--json", "--socket", sock)
        assert blank.rc == 64, blank.err
        nothing = await ctl("technician", "close", "--json", "--socket", sock)
        assert nothing.rc == 75
        assert "no technician session" in nothing.err

        # The technician session: unlocked, opened (not forced), a tag taken out, closed.
        opened = await ctl(
            "technician", "open", "--reason", "swap the meter", "--json", "--socket", sock
        )
        assert opened.rc == 0, opened.err
        doc = opened.doc()
        assert doc["technician"] == "uid:0"
        assert doc["via"] == "cli"
        assert sim.gpo_history[-1][:2] == (1, True), "lock released"
        # Opened at once: the unlock window (relock_after_s, 10 s) runs from the unlock, and a
        # cabinetctl on a loaded machine can take seconds to start.
        sim.set_gpi(1, True)
        async with asyncio.timeout(WAIT_S):  # the agent has seen the door open
            while True:
                status = (await ctl("technician", "status", "--json", "--socket", sock)).doc()
                if status["phase"] == "open":
                    break
                await asyncio.sleep(0.1)
        assert status["session"]["reason"] == "swap the meter"
        engine = (await ctl("status", "--json", "--socket", sock)).doc()["engine"]
        assert engine["technician"] == {"technician": "uid:0", "via": "cli"}
        sim.remove_tag(TAGS[2].epc)
        busy = await ctl("technician", "close", "--json", "--socket", sock)
        assert busy.rc == 75
        assert "the door has opened" in busy.err
        sim.set_gpi(1, False)
        closed = await _until_event(d.sock, "technician.closed")
        events = await _events(d.sock)
        began = next(e["seq"] for e in events if e["type"] == "technician.opened")
        kinds = [e["type"] for e in events if began < e["seq"] <= closed["seq"]]
        assert kinds == ["item.removed", "technician.closed"]  # no forced door, no check-out

        # Re-baseline: the inventory becomes the baseline.
        sim.remove_tag(TAGS[1].epc)
        rebase = await ctl(
            "inventory", "rebaseline", "--reason", "monthly count", "--json", "--socket", sock
        )
        assert rebase.rc == 0, rebase.err
        assert rebase.doc()["state"] == "done"
        assert (rebase.doc()["tags"], rebase.doc()["added"], rebase.doc()["removed"]) == (1, 0, 1)

        # The audit trail names the caller's uid, gid and reason.
        async with asyncio.timeout(WAIT_S):
            while True:
                tail = await ctl("audit", "tail", "-n", "200", "--json", "--socket", sock)
                records = tail.doc()["records"]
                actions = {r["action"]: r for r in records}
                if "inventory.rebaselined" in actions and "technician.closed" in actions:
                    break
                await asyncio.sleep(0.2)
        assert actions["technician.open"]["actor"] == "cli:uid=0"
        assert actions["technician.open"]["details"]["reason"] == "swap the meter"
        assert actions["technician.open"]["details"]["gid"] == 0
        assert actions["technician.opened"]["actor"] == "uid:0"
        assert actions["technician.closed"]["details"]["removed"] == 1
        assert actions["door.test"]["details"]["ok"] is True
        assert actions["inventory.rebaseline"]["details"]["reason"] == "monthly count"
        assert actions["inventory.rebaselined"]["details"]["removed"] == 1
        assert (await ctl("audit", "verify", "--json", "--socket", sock)).doc()["ok"] is True


async def test_the_door_test_says_fail_for_each_step_that_fails() -> None:
    from agent.control_tech import _door_steps
    from drivers.door import Door, DoorConfig
    from drivers.errors import CabinetError

    class Sink:
        async def door_edge(self, edge: object) -> None:
            return None

    async def gpo_refuses_release(port: int, high: bool) -> None:
        if high:
            raise CabinetError("GPO write refused by the reader")

    door = Door(
        DoorConfig.model_validate({"reader": "dock-1", "sensor_gpi": 1, "lock_gpo": 1}),
        gpo_refuses_release,
        Sink(),
    )
    try:
        steps = await _door_steps(door)  # the sensor never reported
    finally:
        await door.close()
    assert [(s["step"], s["ok"]) for s in steps] == [
        ("sensor", False),
        ("lock", True),
        ("unlock", False),
        ("relock", True),
        ("sensor after", False),
    ]
    assert "has not reported" in steps[0]["detail"]
    assert "refused" in steps[2]["detail"]


async def _awaiting_supervisor(sock: str) -> bool:
    status = await ctl("technician", "status", "--json", "--socket", sock)
    assert status.rc == 0, status.err
    return bool(status.doc()["awaiting_supervisor"])


async def test_an_interrupted_badge_wait_is_forgotten(tmp_path: Path, sockdir: Path) -> None:
    """``technician open --badge`` interrupted (Ctrl-C): the wait ends with it. Else the next
    supervisor badging within the wait (here 300 s) would open a technician session nobody
    attends, and what they take would be ``item.removed``, charged to nobody."""
    async with (
        LlrpSimulator(
            personality="impinj", antennas=4, port=0, seed=9, gpi_ports_enabled=True
        ) as sim,
        daemon(tmp_path, sockdir, sim) as d,
    ):
        sock = str(d.sock)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli.ctl",
            "technician",
            "open",
            "--badge",
            "--wait",
            "300",
            "--reason",
            "swap the meter",
            "--socket",
            sock,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(WAIT_S):
                while not await _awaiting_supervisor(sock):
                    await asyncio.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGINT)
            await proc.wait()
        async with asyncio.timeout(WAIT_S):  # far less than the 300 s the wait asked for
            while await _awaiting_supervisor(sock):
                await asyncio.sleep(0.2)


def _cabinet() -> Scenario:
    """The bundled technician scenario's cabinet, people and items, without its steps."""
    path = next(p for p in bundled_scenarios() if p.stem == "technician-session-badge-refused")
    return load_scenario(path).model_copy(update={"steps": [], "expect": []})


async def _door_test(rig: Rig) -> asyncio.Task[tuple[int, str, str]]:
    sock = str(rig.control_socket)
    return asyncio.create_task(
        rig_ctl("door", "test", "--yes-i-am-on-site", "--json", "--socket", sock)
    )


def _denied(rig: Rig, name: str, reason: str) -> Callable[[], bool]:
    who = rig.pseudonym(name)
    return lambda: any(
        e["type"] == "access.denied" and e["actor"] == who and e["reason"] == reason
        for e in rig.sink.log.since_mark()
    )


async def test_a_badge_during_the_door_test_is_refused_and_the_lock_stays_the_tests(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The door test runs through the engine: while it holds the door, Alice's badge gets no
    unlock (the test's relock would take it back, and the engine would think the door
    unlocked); ``access.denied``, reason ``door test``; the test passes; then her badge
    works as usual."""
    scenario = _cabinet()
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        rig.sink.log.mark(await rig.mark())
        writes = len(rig.llrp.gpo_history)
        gate = rig.llrp.hold_gpo_writes()
        test = await _door_test(rig)
        try:
            # The test's first lock write is in flight: the test holds the door now.
            await rig.llrp.wait_until(lambda: rig.llrp.gpo_held == 1, TIMEOUT_S)
            alice = scenario.person("alice")
            await rig.badge_read(lambda: rig.badge.present(alice.badge))
            await rig.sink.log.wait_for(_denied(rig, "alice", "door test"), TIMEOUT_S)
            assert len(rig.llrp.gpo_history) == writes, "nothing moved the lock meanwhile"
            assert not test.done()
        finally:
            gate.set()
        rc, out, err = await test
        assert rc == 0, err
        result = json.loads(out)
        assert [s["ok"] for s in result["steps"]] == [True] * 5, result["steps"]
        assert (result["badges_refused"], result["session_id"]) == (1, None)
        moves = [w[:2] for w in rig.llrp.gpo_history[writes:]]
        # lock, unlock, relock; then the engine's own relock: its view and the lock agree.
        assert moves == [(1, False), (1, True), (1, False), (1, False)]
        assert rig.door.locked
        status = await rig_ctl(
            "technician", "status", "--json", "--socket", str(rig.control_socket)
        )
        assert json.loads(status[1])["door_test"] is False
        assert [e["type"] for e in rig.sink.log.since_mark()] == ["access.denied"]
        # The audit says why, and the test's record counts the refusal without naming anyone.
        rc, out, err = await rig_ctl(
            "audit", "tail", "-n", "50", "--json", "--socket", str(rig.control_socket)
        )
        assert rc == 0, err
        records = json.loads(out)["records"]
        denied = [r for r in records if r["action"] == "access.denied"]
        assert denied[-1]["details"]["reason"] == "door test"
        tested = [r for r in records if r["action"] == "door.test"][-1]
        assert (tested["details"]["ok"], tested["details"]["badges_refused"]) == (True, 1)
        assert rig.pseudonym("alice") not in json.dumps(tested)
        assert rig.pseudonym("alice") not in rig.agent.log_text()
        # The door is the engine's again: her badge unlocks it.
        await rig.badge_read(lambda: rig.badge.present(alice.badge))
        await rig.llrp.wait_until(lambda: not rig.door.locked, TIMEOUT_S)
        rig.assert_no_pii()


async def test_a_door_opened_while_the_door_test_released_the_lock_is_the_testers(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The technician pulls the door while the test has the lock released: no forced door (no
    alert at 2 a.m. for a test they ran), the test reports the opening, and the door cycle
    is a technician session in their name: what they take out is their ``item.removed``."""
    scenario = _cabinet()
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        log = rig.sink.log
        log.mark(await rig.mark())
        gates: list[asyncio.Event] = []

        def released(port: int, high: bool) -> None:
            if high and not gates:  # the test's release: its relock is held in flight
                gates.append(rig.llrp.hold_gpo_writes())

        rig.llrp.gpo_listeners.append(released)
        test = await _door_test(rig)
        try:
            await rig.llrp.wait_until(lambda: rig.llrp.gpo_held == 1, TIMEOUT_S)
            await rig.door.open()  # the lock is released: it opens without force
            await log.wait_count("technician.opened", 1, TIMEOUT_S)
        finally:
            if gates:
                gates[0].set()
            rig.llrp.gpo_listeners.remove(released)
        rc, out, err = await test
        assert rc == 69, err  # the test failed: the door opened
        result = json.loads(out)
        last = result["steps"][-1]
        assert (last["step"], last["ok"]) == ("sensor after", False)
        assert "technician session" in last["detail"]
        rig.llrp.remove_tag(scenario.item("wrench").epc)
        bob = scenario.person("bob")
        await rig.badge_read(lambda: rig.badge.present(bob.badge))
        await log.wait_for(_denied(rig, "bob", "technician session"), TIMEOUT_S)
        await rig.door.close()
        await log.wait_count("technician.closed", 1, TIMEOUT_S)
        events = log.since_mark()
        assert [e["type"] for e in events] == [
            "technician.opened",
            "access.denied",
            "item.removed",
            "technician.closed",
        ], events
        opened, closed = events[0], events[-1]
        assert opened["technician"] == f"uid:{os.getuid()}"
        assert opened["reason"] == DOOR_TEST_REASON
        assert opened["session_id"] == result["session_id"] == closed["session_id"]
        assert events[2]["technician"] == opened["technician"]
        assert (closed["removed"], closed["actors"]) == (1, [])
        await rig.llrp.wait_until(lambda: rig.door.locked, TIMEOUT_S)


async def test_a_door_test_cut_short_by_a_stopping_daemon_is_in_the_audit_trail(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """SIGTERM while the door test's first lock write is in flight: the daemon stops cleanly,
    and the audit trail records a door test that began and did not finish (the lock may have
    moved) instead of nothing."""
    scenario = _cabinet()
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        gate = rig.llrp.hold_gpo_writes()
        test = await _door_test(rig)
        try:
            await rig.llrp.wait_until(lambda: rig.llrp.gpo_held == 1, TIMEOUT_S)
            assert await rig.agent.stop() == 0
        finally:
            gate.set()
        rc, _out, _err = await test
        assert rc != 0  # the daemon went away under the CLI
        db = sqlite3.connect(f"file:{tmp_path / 'agent' / 'state.db'}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT actor, details FROM audit WHERE action = 'door.test'"
            ).fetchall()
        finally:
            db.close()
        assert len(rows) == 1, rows
        actor, details = rows[0]
        assert actor.startswith("cli:uid=")
        record = json.loads(details)
        assert (record["ok"], record["failed"]) == (False, ["interrupted"]), record
