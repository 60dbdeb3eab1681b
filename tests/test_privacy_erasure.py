"""Issue 11, item 5: a backend-signed erasure document on a running agent.

The real ``cabinet-agent run`` process, simulated readers and door, a real mosquitto
(tests/scenario_harness.py). Alice opens the door (the audit chain names her pseudonym); the
backend erases her: refused while the allow-list still lists her, applied once an allow-list
without her is in force. Then her pseudonym is in no byte of the database, its WAL or its
-shm, and ``cabinetctl audit verify`` says the chain is intact with her records redacted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backend.signing import allow_list_doc, erasure_doc, sign_document
from simulators.cabinet import INSTALLER, Scenario, describe_events, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
CYCLE = ["wait_locked", "badge alice", "wait_unlock", "open", "close", "settle"]


def _scenario(steps: list[str]) -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": steps, "expect": []})


def _raw(rig: Rig) -> bytes:
    """The state database, its WAL and -shm, as someone who copies them sees them."""
    db = rig.dir / "agent" / "state.db"
    out = b""
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(db) + suffix)
        if path.exists():
            out += path.read_bytes()
    return out


def _sign(rig: Rig, doc: dict[str, object]) -> bytes:
    return sign_document(rig.keys.signing_private, rig.keys.signing_kid, doc)


def _allow_list_without(rig: Rig, version: int, gone: str) -> bytes:
    lay = rig.scenario.cabinet
    people = [p for p in (*rig.scenario.people, INSTALLER) if p.listed]
    entries = {
        rig.pseudonym(p.name): list(p.roles) for p in people if rig.pseudonym(p.name) != gone
    }
    now = datetime.now(UTC).replace(microsecond=0)
    return _sign(
        rig,
        allow_list_doc(
            lay.site_id, lay.cabinet_id, version, now + timedelta(days=30), entries, issued_at=now
        ),
    )


def _erasure(rig: Rig, version: int, *pseudonyms: str) -> bytes:
    lay = rig.scenario.cabinet
    now = datetime.now(UTC).replace(microsecond=0)
    return _sign(
        rig,
        erasure_doc(
            lay.site_id,
            lay.cabinet_id,
            version,
            now + timedelta(days=7),
            list(pseudonyms),
            issued_at=now,
        ),
    )


async def _ctl(rig: Rig, *argv: str) -> tuple[int, str, str]:
    cfg = tomllib.loads((rig.dir / "agent" / "agent.toml").read_text())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli.ctl",
        *argv,
        "--socket",
        cfg["control"]["socket_path"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_erasure_document_erases_a_person_from_the_running_cabinet(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with cabinet_rig(_scenario(CYCLE), tmp_path, mosquitto) as rig:
        # Assertions compare pseudonyms only: a failure must not print a badge number.
        alice, installer = rig.pseudonym("alice"), rig.pseudonym(INSTALLER.name)
        events = await rig.play()
        opened = [e for e in events if e["type"] == "session.opened"]
        assert [e["actors"] for e in opened] == [[alice]], describe_events(events, rig.artefacts)
        code, out, _ = await _ctl(rig, "audit", "tail", "--json", "-n", "200")
        assert code == 0
        assert alice in {r["actor"] for r in json.loads(out)["records"]}
        assert alice.encode() in _raw(rig)

        # While the allow-list in force still lists her, the erasure is refused (and says why).
        rig.publish_document("erasure", _erasure(rig, 1, alice))
        await rig.agent.wait_log("backend erasure refused (still-listed)")
        code, out, _ = await _ctl(rig, "audit", "verify", "--json")
        assert (code, json.loads(out)["redacted"]) == (0, 0)

        # The backend's order: an allow-list without her, then the erasure.
        rig.publish_document("allow-list", _allow_list_without(rig, 2, alice))
        await rig.agent.wait_log("installed allow-list version 2")
        rig.publish_document("erasure", _erasure(rig, 2, alice))
        await rig.agent.wait_log("erasure version 2 applied: 1 pseudonym(s)")

        raw = _raw(rig)
        assert raw.count(alice.encode()) == 0, "the erased pseudonym is still in the files"
        assert raw.count(installer.encode()) > 0  # the scan does see pseudonyms
        code, out, _ = await _ctl(rig, "audit", "verify", "--json")
        report = json.loads(out)
        assert code == 0, report
        assert report["ok"], report
        assert report["redacted"] >= 1, report
        code, human, _ = await _ctl(rig, "audit", "verify")
        assert code == 0
        assert f"{report['redacted']} record(s) redacted on an erasure request" in human
        code, out, _ = await _ctl(rig, "audit", "tail", "--json", "-n", "200")
        records = json.loads(out)["records"]
        assert alice not in {r["actor"] for r in records}
        applied = [r for r in records if r["action"] == "erasure.applied"]
        assert [r["details"]["pseudonyms"] for r in applied] == [1]
        assert applied[0]["details"]["audit_records_redacted"] == report["redacted"]
    # Stopped cleanly (the rig checks the exit code): nothing came back at shutdown.
    assert _raw(rig).count(alice.encode()) == 0
