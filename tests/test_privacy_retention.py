"""Issue 11, item 4: the audit log's retention bound, through the real agent and its files.

The real ``cabinet-agent run`` process, simulated readers and door, a real mosquitto
(tests/scenario_harness.py), under libfaketime: the wall clock is moved forward between runs,
as days passing while the cabinet is off (the time source says synchronised, so the agent
trusts it). ``[store] audit_retention_days = 2``:

- run 1 (day 0): mallory is refused, alice opens and closes the door;
- run 2 (day 1.5): bob opens and closes the door;
- run 3 (day 3): housekeeping at start prunes what is older than 2 days -- run 1's records.

Then the bytes of every file the agent has (database, WAL, -shm, log, config, reserve,
quarantined copies of a damaged database) hold no marker of run 1's records (each record's
salt and salted digest as stored, mallory's pseudonym, the session id in alice's records, a
copy quarantined on day 0) and still hold run 2's.
"""

from __future__ import annotations

import glob
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.control.client import ControlClient
from agent.store import Store, StoreConfig
from agent.trusted_time import KV_KEY as TIME_KEY
from agent.trusted_time import FloorRecord, decode_floor, encode_floor
from simulators.cabinet import Scenario, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import MARKER_READER, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

RETENTION_DAYS = 2
TECHNICIAN_COMMANDS = 150


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: apt-get install faketime (tests/run does)"
    return found[0]


def _set_wall(clock_file: Path, wall: datetime) -> None:
    """Make the faked wall clock read ``wall`` now (an offset from the real time)."""
    clock_file.write_text(f"{int((wall - datetime.now(UTC)).total_seconds()):+d}s\n")


def _scenario(steps: list[str]) -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": steps, "expect": []})


def _every_file(rig: Rig) -> dict[str, bytes]:
    agent_dir = rig.dir / "agent"
    return {
        str(p.relative_to(agent_dir)): p.read_bytes()
        for p in sorted(agent_dir.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _found(files: dict[str, bytes], markers: dict[str, bytes]) -> list[str]:
    """The names of the markers found in any file (``marker in file``)."""
    return [
        f"{what} in {name}"
        for what, needle in markers.items()
        for name, data in files.items()
        if needle in data
    ]


def _audit_rows(rig: Rig, into: Path) -> list[tuple[int, bytes, bytes]]:
    """(seq, salt, salted digest) of every audit record, from a copy of the stopped agent's
    database (its files are not opened in place)."""
    into.mkdir()
    db = rig.dir / "agent" / "state.db"
    for suffix in ("", "-wal"):
        src = Path(str(db) + suffix)
        if src.exists():
            Path(str(into / "state.db") + suffix).write_bytes(src.read_bytes())
    conn = sqlite3.connect(into / "state.db")
    try:
        rows = conn.execute(
            "SELECT seq, salt, personal FROM audit WHERE salt IS NOT NULL ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [(int(seq), bytes(salt), bytes(personal)) for seq, salt, personal in rows]


def _markers(rows: list[tuple[int, bytes, bytes]], tag: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for seq, salt, personal in rows:
        out[f"{tag} record {seq} salt"] = salt
        out[f"{tag} record {seq} digest"] = personal
    return out


async def _reboot(rig: Rig, clock_file: Path, wall: datetime, starts: int) -> None:
    """The (stopped) cabinet was off until ``wall``: a new boot (the saved time floor no
    longer continues on this boot's monotonic clock), the wall clock synchronised at
    ``wall``; start the agent, back on its readers."""
    store = await Store.open(StoreConfig(path=rig.dir / "agent" / "state.db"))
    try:
        raw = await store.kv_get(TIME_KEY)
        assert raw is not None
        saved = decode_floor(raw)
        await store.kv_put(TIME_KEY, encode_floor(FloorRecord(saved.floor, saved.trusted)))
    finally:
        await store.close()
    _set_wall(clock_file, wall)
    rig.agent.start()
    await rig.wait_connected()
    for reader in (rig.scenario.cabinet.badge_reader_id, MARKER_READER):
        await rig.agent.wait_log(f"badge reader {reader}: connected", count=starts)
    await rig.agent.wait_log(
        f"reader {rig.scenario.cabinet.reader_id}: connecting -> online", count=starts
    )


async def test_audit_records_past_retention_leave_every_file_the_agent_has(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    day0 = datetime.now(UTC)
    clock_file = tmp_path / "faketime"
    _set_wall(clock_file, day0)
    env = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(clock_file),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }

    def under_faketime(rig: Rig) -> None:
        rig.agent.env = env

    # Nothing is taken: a check-out's session id stays in the engine state while the item
    # is out (docs/privacy.md §6, holdings), under another bound than the audit log's.
    run1 = ["badge mallory", "badge alice", "wait_unlock", "open", "close"]
    async with cabinet_rig(
        _scenario([*run1, "settle"]),
        tmp_path,
        mosquitto,
        before_start=under_faketime,
        agent_extra={
            "store": {"audit_retention_days": RETENTION_DAYS},
            "control": {"rate_per_s": 1000, "rate_burst": 1000},
            # libfaketime moves the agent's clock, not the kernel's: no clock-set notification.
            "time": {"clock_watch": "poll"},
        },
    ) as rig:
        mallory = rig.pseudonym("mallory")
        events = await rig.play()
        opened = [e for e in events if e["type"] == "session.opened"]
        assert len(opened) == 1, events
        assert any(e["type"] == "access.denied" and e["actor"] == mallory for e in events)
        # A technician at work (each command is audited): day 0's records fill many pages,
        # so pruning them frees whole pages, not only cells.
        async with ControlClient(rig.dir / "agent" / "ctl.sock", timeout_s=20.0) as client:
            for _ in range(TECHNICIAN_COMMANDS):
                await client.call("queue.stats")
        assert await rig.agent.stop() == 0
        old_rows = _audit_rows(rig, tmp_path / "copy1")
        old = {
            **_markers(old_rows, "day-0"),
            "mallory's pseudonym": mallory.encode(),
            "alice's session id": json.dumps(opened[0]["session_id"]).encode(),
        }
        assert not _found({"agent.log": (rig.dir / "agent" / "agent.log").read_bytes()}, old)
        assert len(old_rows) > TECHNICIAN_COMMANDS
        assert len(_found(_every_file(rig), old)) >= len(old)  # the scan sees every marker

        # Day 1.5: bob's door cycle, within the bound at day 3.
        await _reboot(rig, clock_file, day0 + timedelta(days=1.5), starts=2)
        rig.scenario = _scenario(["badge bob", "wait_unlock", "open", "close", "settle"])
        events = await rig.play()
        bob_session = next(e for e in events if e["type"] == "session.opened")["session_id"]
        assert await rig.agent.stop() == 0
        new_rows = [r for r in _audit_rows(rig, tmp_path / "copy2") if r[0] > old_rows[-1][0]]
        assert new_rows
        new = {
            **_markers(new_rows, "day-1.5"),
            "bob's session id": json.dumps(bob_session).encode(),
        }

        # Damaged database files moved aside for forensics (docs/store.md) on day 0 and day
        # 1.5: copies of the audit log, under the same bound.
        for day, tag in ((0.0, b"day-0 quarantined"), (1.5, b"day-1.5 quarantined")):
            stamp = (day0 + timedelta(days=day)).strftime("%Y%m%dT%H%M%S.%fZ")
            (rig.dir / "agent" / f"state.db.corrupt-{stamp}").write_bytes(tag + b" copy")
        old["a quarantined copy of day 0"] = b"day-0 quarantined copy"
        new["a quarantined copy of day 1.5"] = b"day-1.5 quarantined copy"

        # Day 3: housekeeping at start prunes day 0, and says so once the bytes are gone.
        await _reboot(rig, clock_file, day0 + timedelta(days=3), starts=3)
        await rig.agent.wait_log(
            f"audit record(s) older than {RETENTION_DAYS} days pruned: gone from the file, "
            "its free pages and the WAL"
        )
        await rig.agent.wait_log(
            f"1 quarantined file(s) deleted (older than {RETENTION_DAYS} days)"
        )
        files = _every_file(rig)
        assert _found(files, old) == [], "records past the retention bound are still on disk"
        missing = set(new) - {f.split(" in ")[0] for f in _found(files, new)}
        assert not missing, f"records within the bound are gone: {sorted(missing)}"
    # And after a clean stop.
    files = _every_file(rig)
    assert _found(files, old) == []
