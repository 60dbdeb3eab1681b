"""Issue 11, item 5: a backend-signed erasure document on a running agent.

The real ``cabinet-agent run`` process, simulated readers and door, a real mosquitto
(tests/scenario_harness.py). Alice opens the door (the audit chain names her pseudonym); the
backend erases her: refused while the allow-list still lists her, applied once an allow-list
without her is in force. Then her pseudonym is in no byte of the database, its WAL or its
-shm, and ``cabinetctl audit verify`` says the chain is intact with her records redacted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sqlite3
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.privacy.signed import canonical_json
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


def _every_file(rig: Rig) -> dict[str, bytes]:
    """Every regular file the agent has (database, WAL, -shm, log, config, reserve, ...)."""
    agent_dir = rig.dir / "agent"
    return {
        str(p.relative_to(agent_dir)): p.read_bytes()
        for p in sorted(agent_dir.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _where(files: dict[str, bytes], needle: bytes) -> list[str]:
    """``file@offset`` of every occurrence (names no person: the needle is a pseudonym)."""
    found = []
    for name, data in files.items():
        at = data.find(needle)
        while at >= 0:
            found.append(f"{name}@{at}")
            at = data.find(needle, at + 1)
    return found


def _engine_state(rig: Rig, into: Path) -> dict[str, object]:
    """The persisted engine state, read from a copy of the database and its WAL (the running
    agent's files are not touched)."""
    into.mkdir(exist_ok=True)
    db = rig.dir / "agent" / "state.db"
    for suffix in ("", "-wal"):
        src = Path(str(db) + suffix)
        if src.exists():
            Path(str(into / "state.db") + suffix).write_bytes(src.read_bytes())
    conn = sqlite3.connect(into / "state.db")
    try:
        (blob,) = conn.execute("SELECT blob FROM session WHERE id = 1").fetchone()
    finally:
        conn.close()
    state: dict[str, object] = json.loads(blob)
    return state


def _fillers(rig: Rig, n: int) -> dict[str, list[str]]:
    """``n`` made-up pseudonyms under the site's key id: an allow-list of a real site's size."""
    prefix = rig.pseudonym("alice").rsplit(".", 1)[0]
    return {
        f"{prefix}.{base64.b32encode(os.urandom(16)).decode().rstrip('=').lower()}": ["user"]
        for _ in range(n)
    }


def _sign(rig: Rig, doc: dict[str, object]) -> bytes:
    return sign_document(rig.keys.signing_private, rig.keys.signing_kid, doc)


def _allow_list_without(
    rig: Rig, version: int, gone: str, extra: dict[str, list[str]] | None = None
) -> bytes:
    lay = rig.scenario.cabinet
    people = [p for p in (*rig.scenario.people, INSTALLER) if p.listed]
    entries = {
        rig.pseudonym(p.name): list(p.roles) for p in people if rig.pseudonym(p.name) != gone
    }
    entries.update(extra or {})
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
        erasure = _erasure(rig, 2, alice)
        rig.publish_document("erasure", erasure)
        await rig.agent.wait_log("erasure version 2 applied: 1 pseudonym(s)")
        # Nor does its digest stay (the version floor outlives it): rebuilt from a guessed
        # badge, it would confirm whom the cabinet erased.
        digest = hashlib.sha256(canonical_json(json.loads(erasure)["doc"])).hexdigest()
        assert _where(_every_file(rig), digest.encode()) == []

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


async def test_an_erasure_reaches_an_open_session_and_the_pages_freed_before_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Issue 11 item 5 (a)-(c): alice is erased while her door session is open and she holds
    the wrench. The engine state names "erased" instead of her from then on (the session goes
    on: its check-out and close are attributed to "erased"); and the older versions of what
    named her -- a large allow-list that listed her (its pages freed when a smaller one
    replaced it), the engine state of her open session -- are in no byte of any file the
    agent has, neither while it runs nor after it stopped."""
    steps = ["wait_locked", "badge alice", "wait_unlock", "open", "take wrench"]

    def damaged_copy(rig: Rig) -> None:
        # A database once found damaged and moved aside (docs/store.md): it names her too.
        aside = rig.dir / "agent" / "state.db.corrupt-20260101T000000.000000Z"
        aside.write_bytes(b"SQLite format 3\x00" + rig.pseudonym("alice").encode())

    async with cabinet_rig(_scenario(steps), tmp_path, mosquitto, before_start=damaged_copy) as rig:
        alice, bob = rig.pseudonym("alice"), rig.pseudonym("bob")
        # A site-sized allow-list naming her (its body spills over several database pages).
        rig.publish_document("allow-list", _allow_list_without(rig, 2, "", _fillers(rig, 400)))
        await rig.agent.wait_log("installed allow-list version 2")
        events = await rig.play()
        opened = [e for e in events if e["type"] == "session.opened"]
        assert [e["actors"] for e in opened] == [[alice]], describe_events(events, rig.artefacts)
        state = _engine_state(rig, tmp_path / "copy1")
        assert state["session"]["actors"] == [alice]  # type: ignore[index]

        # The backend's order: an allow-list without her (small: the large one's pages are
        # freed, not reused), then the erasure -- while her session is still open.
        rig.publish_document("allow-list", _allow_list_without(rig, 3, alice))
        await rig.agent.wait_log("installed allow-list version 3")
        rig.publish_document("erasure", _erasure(rig, 1, alice))
        await rig.agent.wait_log("erasure version 1 applied: 1 pseudonym(s)")
        assert "redacted, 1 place(s) in the engine state" in rig.agent.log_text()
        files = _every_file(rig)
        assert _where(files, alice.encode()) == [], "the erased pseudonym is still in the files"
        assert _where(files, bob.encode()), "the scan does see pseudonyms"
        state = _engine_state(rig, tmp_path / "copy2")
        assert state["session"]["actors"] == ["erased"]  # type: ignore[index]

        # The session goes on; what it reports names "erased", never her again.
        rig.scenario = _scenario(["close", "settle"])
        events = await rig.play()
        kinds = {e["type"]: e for e in events}
        assert kinds["item.checked_out"]["actors"] == ["erased"], events
        assert kinds["session.closed"]["actors"] == ["erased"], events
        assert kinds["session.closed"]["session_id"] == opened[0]["session_id"]
        assert _where(_every_file(rig), alice.encode()) == []
        code, out, _ = await _ctl(rig, "audit", "verify", "--json")
        assert code == 0, out
        applied = [
            r
            for r in json.loads((await _ctl(rig, "audit", "tail", "--json", "-n", "200"))[1])[
                "records"
            ]
            if r["action"] == "erasure.applied"
        ]
        assert [r["details"]["engine_state_redacted"] for r in applied] == [1]
    assert _where(_every_file(rig), alice.encode()) == []
