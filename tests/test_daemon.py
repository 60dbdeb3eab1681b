"""The daemon as a real process: starts the configured readers, stops cleanly on signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, parse_config
from agent.daemon import Daemon
from agent.sdnotify import Notifier
from drivers.types import ReaderState
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import config_text, provision

ROOT = Path(__file__).resolve().parent.parent


async def _wait_for(path: Path, text: str, timeout: float = 30.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            content = path.read_text() if path.exists() else ""
            if text in content:
                return content
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_daemon_process_stops_cleanly_within_budget(tmp_path: Path, sig: int) -> None:
    provision(tmp_path)
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=5) as sim:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(config_text(tmp_path, sim.port))
        log = tmp_path / "agent.log"
        with log.open("w") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli.cabinet_agent",
                "run",
                "--config",
                str(cfg),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
            )
            try:
                await _wait_for(log, "connecting -> online")
                assert sim.connections.active == 1
                t0 = time.monotonic()
                proc.send_signal(sig)
                async with asyncio.timeout(5.0):
                    rc = await proc.wait()
                elapsed = time.monotonic() - t0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        text = log.read_text()
        assert rc == 0, text
        assert "stopped in" in text
        assert "Traceback" not in text
        assert elapsed < 5.0
        # The reader session was closed by the daemon, not left dangling.
        await sim.wait_until(lambda: sim.connections.active == 0, timeout=5.0)


@pytest.mark.parametrize(
    ("target", "mode", "says"),
    [
        ("site.key", 0o644, "chmod 600"),
        ("signing.pub", 0o666, "chmod go-w"),
        ("backend-hpke.pub", 0o646, "chmod go-w"),
        (".", 0o777, "chmod go-w"),  # the directory: anyone could swap the files
        ("ca.pem", 0o666, "chmod go-w"),  # MQTT TLS trust anchor
    ],
)
async def test_loose_key_file_permissions_refuse_to_start(
    tmp_path: Path, target: str, mode: int, says: str
) -> None:
    creds = provision(tmp_path)
    (creds / "ca.pem").write_text("not read: refused before it is parsed\n")
    (creds / target).chmod(mode)
    cfg = tmp_path / "agent.toml"
    tls = f'[mqtt]\nhost = "127.0.0.1"\nport = 9\ntls = {{ ca_file = "{creds}/ca.pem" }}\n'
    cfg.write_text(config_text(tmp_path, 9) + (tls if target == "ca.pem" else ""))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli.cabinet_agent",
        "run",
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    async with asyncio.timeout(30):
        _out, err = await proc.communicate()
    assert proc.returncode == EX_CONFIG, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines  # one line naming the file and the fix, no traceback
    assert says in lines[0]
    assert not (tmp_path / "state.db").exists(), "nothing may start on a bad key file"


async def test_in_process_daemon_leaves_no_task_or_socket(tmp_path: Path) -> None:
    """Run the daemon in this loop: after stop, the autouse guard proves no task leaked."""
    creds = provision(tmp_path)
    async with LlrpSimulator(personality="zebra", antennas=4, port=0, seed=2) as sim:
        cfg = parse_config(_toml(config_text(tmp_path, sim.port)))
        daemon = Daemon(cfg, credentials_dir=creds, notifier=Notifier.from_env({}))
        task = asyncio.create_task(daemon.run(), name="daemon-under-test")
        try:
            async with asyncio.timeout(30):
                await daemon.app.ready.wait()
                while daemon.app.readers[0].health.state != ReaderState.ONLINE:
                    await asyncio.sleep(0.05)
            assert (tmp_path / "control.sock").exists()
            daemon.request_stop()
            async with asyncio.timeout(5):
                await task
        finally:
            if not task.done():
                task.cancel()
        assert not (tmp_path / "control.sock").exists(), "control socket removed on stop"
        await sim.wait_until(lambda: sim.connections.active == 0, timeout=5.0)
        assert os.path.exists(tmp_path / "state.db")


def _toml(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)


async def test_reload_reverifies_stored_documents(tmp_path: Path) -> None:
    """SIGHUP path: a stored allow-list that no longer verifies is dropped (nobody let in)."""
    from datetime import UTC, datetime, timedelta

    from backend.keys import load_backend_keys
    from backend.signing import allow_list_doc, sign_document

    creds = provision(tmp_path)
    backend = load_backend_keys(tmp_path / "backend")
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=2) as sim:
        cfg = parse_config(_toml(config_text(tmp_path, sim.port)))
        daemon = Daemon(cfg, credentials_dir=creds, notifier=Notifier.from_env({}))
        task = asyncio.create_task(daemon.run(), name="daemon-under-test")
        try:
            async with asyncio.timeout(30):
                await daemon.app.ready.wait()
            app = daemon.app
            pseudonym = app.privacy.pseudonyms.badge_now("0012AB34CD")
            doc = allow_list_doc(
                "hangar-3",
                "crib-07",
                1,
                datetime.now(UTC) + timedelta(days=1),
                {pseudonym: ["user"]},
            )
            raw = sign_document(backend.signing_private, backend.signing_kid, doc)
            verified = app.privacy.verifier.verify(raw, "allow-list", datetime.now(UTC))
            await app.install(verified, raw)
            assert await app.reload_documents() == ["allow-list v1"]
            assert app.engine is not None
            assert app.engine.access.allow_list is not None
            # Someone edits the stored document on disk: the signature no longer matches.
            assert app.store is not None
            await app.store.kv_put("doc:allow-list", raw.replace(b'"user"', b'"supervisor"'))
            assert await app.reload_documents() == []
            assert app.engine.access.allow_list is None
            daemon.request_stop()
            async with asyncio.timeout(5):
                await task
        finally:
            if not task.done():
                task.cancel()


async def test_corrupt_database_is_quarantined_and_reported_to_the_backend(tmp_path: Path) -> None:
    """A corrupt state file is moved aside and an ``agent.alert`` event goes to the backend."""
    import json as _json

    from agent.privacy.envelope import Opener
    from backend.keys import load_backend_keys

    creds = provision(tmp_path)
    backend = load_backend_keys(tmp_path / "backend")
    (tmp_path / "state.db").write_bytes(b"this is not a database " * 200)
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=2) as sim:
        cfg = parse_config(_toml(config_text(tmp_path, sim.port)))
        daemon = Daemon(cfg, credentials_dir=creds, notifier=Notifier.from_env({}))
        task = asyncio.create_task(daemon.run(), name="daemon-under-test")
        try:
            async with asyncio.timeout(30):
                await daemon.app.ready.wait()
                store = daemon.app.store
                assert store is not None
                while not [r for r in await store.peek(50) if r.kind == "agent.alert"]:
                    await asyncio.sleep(0.05)
            rows = [r for r in await store.peek(50) if r.kind == "agent.alert"]
            opener = Opener({backend.hpke_kid: backend.hpke_private})
            header, plaintext = opener.open(rows[0].envelope)
            event = _json.loads(plaintext)
            assert event["type"] == "agent.alert"
            assert event["kind"] == "store.corrupt_quarantined"
            assert header.seq == event["seq"] == rows[0].seq
            assert rows[0].priority == 0
            assert any(p.name.startswith("state.db.corrupt-") for p in tmp_path.iterdir())
            daemon.request_stop()
            async with asyncio.timeout(5):
                await task
        finally:
            if not task.done():
                task.cancel()


async def test_start_up_lock_waits_quietly_for_the_door_reader(tmp_path: Path) -> None:
    """The start-up Relock is applied once the door's reader is online, with no error or
    warning before (it used to fail against a reader still connecting, and log it)."""
    import json

    from simulators.door import SimulatedDoor
    from tests.daemon_rig import AgentProcess

    provision(tmp_path)
    door_cfg = '[door]\nreader = "dock-1"\nsensor_gpi = 1\nlock_gpo = 2\n'
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=8) as sim:
        # Released, as the agent may find it after a power cut mid-cycle.
        sim_door = SimulatedDoor(
            sim.set_gpi, sensor_port=1, sensor_open_when_high=True, lock_port=2, locked=False
        )
        sim.gpo_listeners.append(sim_door.on_gpo)
        cfg = tmp_path / "agent.toml"
        cfg.write_text(config_text(tmp_path, sim.port, fmt="json", extra=door_cfg))
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"lock \(GPO 2 -> low\) done")
            await sim.wait_gpo(2, False, timeout=10.0)
            assert sim_door.locked
            assert await agent.stop() == 0, agent.text()
    records = [json.loads(line) for line in agent.text().splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    online = next(i for i, m in enumerate(messages) if "connecting -> online" in m)
    locked = next(i for i, m in enumerate(messages) if "lock (GPO 2 -> low) done" in m)
    assert online < locked, messages
    noisy = [
        r["msg"]
        for r in records[:locked]
        if r["level"] in ("WARNING", "ERROR") and "no [mqtt] section" not in r["msg"]
    ]
    assert noisy == [], noisy
    assert any("lock waits for reader dock-1" in m for m in messages[:online])


async def test_the_door_is_locked_once_on_the_way_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop sequence locks the door while its reader is still connected; the final
    shutdown does not try again (it used to: a second write to a reader already gone, and a
    second error for the same lock)."""
    from agent.app import CabinetApp
    from simulators.door import SimulatedDoor

    creds = provision(tmp_path)
    door_cfg = '[door]\nreader = "dock-1"\nsensor_gpi = 1\nlock_gpo = 2\n'
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=8) as sim:
        sim_door = SimulatedDoor(
            sim.set_gpi, sensor_port=1, sensor_open_when_high=True, lock_port=2, locked=True
        )
        sim.gpo_listeners.append(sim_door.on_gpo)
        cfg = parse_config(_toml(config_text(tmp_path, sim.port, extra=door_cfg)))
        app = CabinetApp(cfg, credentials_dir=creds)
        task = asyncio.create_task(app.run(), name="app-under-test")
        try:
            door = app.door
            assert door is not None
            async with asyncio.timeout(30):
                await app.ready.wait()
                while door.locked is not True:  # the start-up lock, once the reader is online
                    await asyncio.sleep(0.05)
            await door.unlock(600.0)  # released, its re-lock far away
            assert not sim_door.locked
            # The door's reader goes away: the lock on the way out cannot be written.
            await sim.stop()
            async with asyncio.timeout(10):
                while app.readers[0].health.healthy:
                    await asyncio.sleep(0.05)
            app.request_stop()
            async with asyncio.timeout(10):
                await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    tries = [r.getMessage() for r in caplog.records if "could not lock on close" in r.getMessage()]
    assert len(tries) == 1, tries
    assert door.locked is None  # unknown: the write failed (and status says so)


async def test_a_second_agent_on_the_same_control_socket_is_one_line(tmp_path: Path) -> None:
    """The second agent exits 78 with one line; the first keeps its socket and answers."""
    from agent.control.client import ControlClient
    from tests.daemon_rig import AgentProcess

    provision(tmp_path)
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=9) as sim:
        first_cfg = tmp_path / "first.toml"
        first_cfg.write_text(config_text(tmp_path, sim.port))
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        # Its own state database, the same control socket (a copy-pasted config).
        second_text = config_text(tmp_path, sim.port).replace(
            f'path = "{tmp_path}/state.db"', f'path = "{second_dir}/state.db"'
        )
        assert f"{second_dir}/state.db" in second_text
        second_cfg = tmp_path / "second.toml"
        second_cfg.write_text(second_text)
        async with AgentProcess(first_cfg, tmp_path / "first.log") as first:
            await first.wait_log("ready: site")
            second = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(second_cfg),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            async with asyncio.timeout(30):
                _out, err = await second.communicate()
            assert second.returncode == EX_CONFIG, err
            lines = err.decode().strip().splitlines()
            assert len(lines) == 1, lines
            assert "already serving" in lines[0]
            assert "Traceback" not in err.decode()
            async with ControlClient(tmp_path / "control.sock", timeout_s=10) as client:
                assert (await client.call("status"))["cabinet_id"] == "crib-07"
            assert await first.stop() == 0, first.text()


async def test_a_small_order_signing_key_refuses_to_start(tmp_path: Path) -> None:
    """An all-zero signing.pub would accept documents anyone can forge: exit 78, one line."""
    from agent.privacy.keyfile import write_key_file
    from agent.privacy.keys import KIND_SIGNING_PUBLIC

    creds = provision(tmp_path)
    (creds / "signing.pub").unlink()
    write_key_file(creds / "signing.pub", KIND_SIGNING_PUBLIC, "sig1", bytes(32), secret=False)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, 9))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _out, err = await proc.communicate()
    assert proc.returncode == EX_CONFIG, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "anyone could forge documents" in lines[0]
