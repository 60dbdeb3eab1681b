"""cabinetctl against a running daemon: every command as a subprocess with ``--json``.

A real ``cabinet-agent run`` process serves its control socket; the LLRP simulator (reader, door
sensor on GPI 1, lock on GPO 1) runs in this test's loop, mosquitto where delivery matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulators.llrp import LlrpSimulator, SimTag
from tests.daemon_rig import provision
from tests.mqtt_fixtures import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
WAIT_S = 30.0
TAGS = [
    SimTag(epc="e28011606000020000000001", antenna=1, rssi_mean=-50.0),
    SimTag(epc="e28011606000020000000002", antenna=2, rssi_mean=-52.0),
    SimTag(epc="e28011606000020000000003", antenna=4, rssi_mean=-48.0),
]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short (sun_path is 108 bytes) and traversable by uid 65534 (pytest's tmp_path is 0700).
    d = Path(tempfile.mkdtemp(prefix="cab-cli-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Ctl:
    rc: int
    out: str
    err: str

    def doc(self) -> Any:
        """The single JSON document (or the last line of a stream)."""
        lines = self.out.strip().splitlines()
        assert lines, f"no output; stderr: {self.err}"
        return json.loads(lines[-1])

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.strip().splitlines()]


# The interpreter lives under /root, unreadable by uid 65534: import as root, then drop to the
# other identity before cabinetctl connects (the identity is what the socket and daemon check).
_AS_USER = """
import os, sys
import agent.cli.ctl
parser = agent.cli.ctl.build_parser()  # imports every subcommand's module
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
args = parser.parse_args(sys.argv[2:])
sys.exit(args.func(args))
"""


async def ctl(*argv: str, user: int | None = None) -> Ctl:
    """Run cabinetctl in a subprocess (never blocking this loop: the simulator lives here)."""
    head = ["-m", "agent.cli.ctl"] if user is None else ["-c", _AS_USER, str(user)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *head,
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT_S * 2):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Ctl(proc.returncode, out.decode(), err.decode())


async def _on_tty(*argv: str) -> tuple[int, str]:
    """Run cabinetctl with its stdout on a real pseudo-terminal; return (rc, what it showed)."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []
    loop = asyncio.get_running_loop()

    def _drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the child's side is closed
            chunks.append(os.read(master, 65536))

    loop.add_reader(master, _drain)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli.ctl",
            *argv,
            cwd=ROOT,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
        )
        os.close(slave)
        slave = -1
        async with asyncio.timeout(WAIT_S * 2):
            rc = await proc.wait()
        _drain()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        loop.remove_reader(master)
        os.close(master)
        if slave != -1:
            os.close(slave)
    return rc, b"".join(chunks).decode(errors="replace")


def _config(tmp: Path, sock: Path, port: int, mqtt_port: int | None = None) -> Path:
    creds = tmp / "creds"
    text = f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-07"

[[readers]]
type = "llrp"
id = "dock-1"
host = "127.0.0.1"
port = {port}
antennas = [1, 2, 3, 4]
keepalive_s = 1.0
gpi_ports = [1]
backoff = {{ initial_s = 0.05, max_s = 0.5 }}

[door]
reader = "dock-1"
sensor_gpi = 1
lock_gpo = 1
release_pulse_s = 30.0

[privacy]
site_key = "{creds}/site.key"
seal_public_key = "{creds}/backend-hpke.pub"
signing_public_keys = ["{creds}/signing.pub"]

[store]
path = "{tmp}/state.db"

[control]
socket_path = "{sock}"
group = "root"

[metrics]
enabled = false

[domain]
drawers = {{ top = ["dock-1:1", "dock-1:2"], bottom = ["dock-1:3", "dock-1:4"] }}
background_period_s = 0
# The tests below make events with short reader reboots: report every outage at once.
reader_offline_debounce_s = 0
"""
    if mqtt_port is not None:
        text += f"""
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
backoff = {{ initial_s = 0.05, max_s = 0.5 }}
poll_interval_s = 0.2
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    config: Path
    sock: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text()


@contextlib.asynccontextmanager
async def daemon(
    tmp: Path, sockdir: Path, sim: LlrpSimulator, mqtt_port: int | None = None
) -> AsyncIterator[Running]:
    """A ``cabinet-agent run`` process, ready (socket answering, reader online)."""
    provision(tmp)
    sock = sockdir / "control.sock"
    config = _config(tmp, sock, sim.port, mqtt_port)
    log = tmp / "agent.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli.cabinet_agent",
            "run",
            "--config",
            str(config),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        running = Running(proc, config, sock, log)
        try:
            async with asyncio.timeout(WAIT_S):
                while not (sock.exists() and "connecting -> online" in running.text()):
                    assert proc.returncode is None, running.text()
                    await asyncio.sleep(0.05)
            yield running
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


async def _events(sock: Path) -> list[dict[str, Any]]:
    r = await ctl("events", "tail", "-n", "200", "--json", "--socket", str(sock))
    assert r.rc == 0, r.err
    events: list[dict[str, Any]] = r.doc()["events"]
    return events


async def _until_event(sock: Path, kind: str, after_seq: int = 0) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        while True:
            for e in await _events(sock):
                if e["type"] == kind and e["seq"] > after_seq:
                    return e
            await asyncio.sleep(0.2)


async def _reader_online(sock: Path) -> None:
    async with asyncio.timeout(WAIT_S):
        while True:
            st = (await ctl("status", "--json", "--socket", str(sock))).doc()
            if st["readers"][0]["state"] in ("online", "inventorying"):
                return
            await asyncio.sleep(0.2)


async def test_status_readers_events_and_audit_through_the_daemon(
    tmp_path: Path, sockdir: Path
) -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=7) as sim:
        for tag in TAGS:
            sim.add_tag(tag)
        async with daemon(tmp_path, sockdir, sim) as d:
            sock = str(d.sock)
            # status: found through --config's [control] socket_path.
            st = await ctl("status", "--json", "--config", str(d.config))
            assert st.rc == 0, st.err
            doc = st.doc()
            assert (doc["site_id"], doc["cabinet_id"]) == ("hangar-3", "crib-07")
            assert [r["id"] for r in doc["readers"]] == ["dock-1"]
            assert doc["readers"][0]["state"] in ("online", "inventorying")
            assert doc["engine"]["phase"] == "idle"
            assert doc["broker"] is None
            assert doc["outbox"]["depth"] >= 0

            ping = await ctl("readers", "ping", "--json", "--config", str(d.config))
            assert ping.rc == 0, ping.err
            pdoc = ping.doc()
            assert pdoc["via"] == "daemon"
            (row,) = pdoc["readers"]
            assert row["reader"] == "dock-1"
            assert row["ok"] is True
            assert row["session"] >= 1
            assert row["last_progress_age_s"] is not None
            assert row["last_progress_age_s"] >= 0

            # The daemon keeps its reader session; the scan goes through it (one client only).
            conns = sim.connections.total
            scan = await ctl(
                "readers", "scan", "--seconds", "1.5", "--json", "--config", str(d.config)
            )
            assert scan.rc == 0, scan.err
            lines = scan.lines()
            assert any("progress" in line for line in lines[:-1])
            sdoc = lines[-1]
            assert sdoc["via"] == "daemon"
            assert sdoc["readers_failed"] == {}
            seen = {t["epc"]: t for t in sdoc["tags"]}
            assert set(seen) == {t.epc for t in TAGS}
            for t in TAGS:
                assert seen[t.epc]["antenna"] == t.antenna
                assert seen[t.epc]["reads"] >= 1
            assert sim.connections.total == conns, "cabinetctl must not open its own session"
            rc, screen = await _on_tty("readers", "scan", "--seconds", "1", "--socket", sock)
            assert rc == 0, screen
            assert "scanning" in screen
            assert f"{len(TAGS)} tags (via cabinet-agent)" in screen
            for t in TAGS:
                assert t.epc in screen

            # A reader outage: the app commits reader.offline; events tail shows metadata only.
            sim.faults.reboot(down_s=1.0)
            offline = await _until_event(d.sock, "reader.offline")
            await _until_event(d.sock, "reader.online", offline["seq"])
            events = await _events(d.sock)
            for e in events:
                assert set(e) == {"seq", "type", "time", "size"}
                assert e["size"] > 0
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)

            q = await ctl("queue", "stats", "--json", "--socket", sock)
            assert q.rc == 0, q.err
            qdoc = q.doc()
            # No [mqtt]: every committed event is still in the outbox.
            assert qdoc["depth"] == len(events)
            assert qdoc["next_seq"] == max(seqs) + 1
            assert qdoc["broker"] is None

            # --follow: the backlog, then events committed while it runs; ends on disconnect.
            follow = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli.ctl",
                *("events", "tail", "-n", "1", "--follow", "--json", "--socket", sock),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert follow.stdout is not None
                async with asyncio.timeout(WAIT_S):
                    first = json.loads(await follow.stdout.readline())
                assert first["seq"] == max(seqs)
                sim.faults.reboot(down_s=0.5)
                async with asyncio.timeout(WAIT_S):
                    nxt = json.loads(await follow.stdout.readline())
                assert nxt["type"] == "reader.offline"
                assert nxt["seq"] > first["seq"]
                assert set(nxt) == {"seq", "type", "time", "size"}
            finally:
                follow.send_signal(signal.SIGINT)
                async with asyncio.timeout(WAIT_S):
                    await follow.wait()
            assert follow.returncode == 0

            tail = await ctl("audit", "tail", "-n", "50", "--json", "--socket", sock)
            assert tail.rc == 0, tail.err
            records = tail.doc()["records"]
            cli = [r for r in records if r["action"] == "cli.command"]
            assert {r["actor"] for r in cli} == {"cli:uid=0"}
            cmds = [r["details"]["cmd"] for r in cli]
            for cmd in ("status", "readers.ping", "readers.scan", "queue.stats", "events.tail"):
                assert cmd in cmds
            scans = [r for r in records if r["action"] == "readers.scan"]
            assert scans
            assert scans[-1]["details"]["tags"] == len(TAGS)

            verify = await ctl("audit", "verify", "--json", "--socket", sock)
            assert verify.rc == 0, verify.err
            vdoc = verify.doc()
            assert vdoc["ok"] is True
            assert vdoc["problems"] == []
            assert vdoc["last_seq"] >= max(r["seq"] for r in records)

            # The same, for a person at a terminal.
            human = await ctl("status", "--socket", sock)
            assert human.rc == 0, human.err
            assert "site hangar-3  cabinet crib-07" in human.out
            assert "reader    dock-1" in human.out
            assert "not configured (no [mqtt] section)" in human.out
            human = await ctl("queue", "stats", "--socket", sock)
            waiting = re.match(r"outbox: (\d+) event\(s\) waiting", human.out)
            assert waiting is not None, human.out
            assert int(waiting.group(1)) > qdoc["depth"], "the --follow outage added events"
            human = await ctl("events", "tail", "-n", "3", "--socket", sock)
            assert human.rc == 0, human.err
            assert len(human.out.strip().splitlines()) == 3
            assert "reader.offline" in human.out or "reader.online" in human.out
            human = await ctl("audit", "verify", "--socket", sock)
            assert human.rc == 0, human.err
            assert human.out.startswith("audit log intact:")
            human = await ctl("audit", "tail", "-n", "2", "--socket", sock)
            assert human.rc == 0, human.err
            assert "cli:uid=0" in human.out

            # Someone outside the socket's group: refused with the group to join (0660 socket).
            assert os.stat(d.sock).st_mode & 0o777 == 0o660
            denied = await ctl("status", "--json", "--socket", sock, user=NOBODY)
            assert denied.rc == 77, denied.err
            assert "permission denied" in denied.err
            assert "group root" in denied.err
            assert denied.doc()["code"] == "forbidden"


async def test_door_commands_are_confirmed_audited_and_scan_respects_a_session(
    tmp_path: Path, sockdir: Path
) -> None:
    async with (
        LlrpSimulator(
            personality="impinj", antennas=4, port=0, seed=9, gpi_ports_enabled=True
        ) as sim,
        daemon(tmp_path, sockdir, sim) as d,
    ):
        sock = str(d.sock)
        writes = len(sim.gpo_history)
        refused = await ctl("door", "unlock", "--json", "--socket", sock)
        assert refused.rc == 64
        assert "--yes-i-am-on-site" in refused.err
        assert len(sim.gpo_history) == writes, "no lock movement without confirmation"

        unlock = await ctl(
            "door", "unlock", "--yes-i-am-on-site", "--pulse", "20", "--json", "--socket", sock
        )
        assert unlock.rc == 0, unlock.err
        udoc = unlock.doc()
        assert udoc["locked"] is False
        assert udoc["pulse_s"] == 20.0
        assert sim.gpo_history[-1][:2] == (1, True), "lock released on GPO 1"

        lock = await ctl("door", "lock", "--yes-i-am-on-site", "--json", "--socket", sock)
        assert lock.rc == 0, lock.err
        assert lock.doc()["locked"] is True
        assert sim.gpo_history[-1][:2] == (1, False), "lock engaged on GPO 1"

        # The door opens without a badge: the engine runs a session; a scan must not
        # disturb it.
        # A scan already running when the door opens gives the readers back and says so.
        scan = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli.ctl",
            *("readers", "scan", "--seconds", "30", "--json", "--socket", sock),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert scan.stdout is not None
            async with asyncio.timeout(WAIT_S):
                first = json.loads(await scan.stdout.readline())
            assert first["progress"]["seconds"] == 30.0
            sim.set_gpi(1, True)
            async with asyncio.timeout(WAIT_S):
                rest, scan_err = await scan.communicate()
        finally:
            if scan.returncode is None:
                scan.kill()
                await scan.wait()
        assert scan.returncode == 75, scan_err.decode()
        interrupted = json.loads(rest.decode().strip().splitlines()[-1])
        assert interrupted["interrupted"].startswith("the cabinet became busy")
        assert "scan stopped early" in scan_err.decode()
        async with asyncio.timeout(WAIT_S):
            while True:
                st = (await ctl("status", "--json", "--socket", sock)).doc()
                if st["engine"]["phase"] != "idle":
                    break
                await asyncio.sleep(0.1)
        busy = await ctl("readers", "scan", "--seconds", "1", "--json", "--socket", sock)
        assert busy.rc == 75, busy.err
        assert "try again when it is idle" in busy.err
        assert busy.doc()["code"] == "busy"
        sim.set_gpi(1, False)
        # The session the scan gave way to runs its own settle scan to the end.
        opened = await _until_event(d.sock, "session.opened")
        await _until_event(d.sock, "session.closed", opened["seq"])

        # SIGHUP: the reload is audited as well.
        assert d.proc.returncode is None
        d.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(WAIT_S):
            while True:
                tail = await ctl("audit", "tail", "-n", "100", "--json", "--socket", sock)
                records = tail.doc()["records"]
                if any(r["action"] == "config.reload" for r in records):
                    break
                await asyncio.sleep(0.2)
        by_action = {r["action"]: r for r in records}
        assert by_action["door.unlock"]["actor"] == "cli:uid=0"
        assert by_action["door.unlock"]["details"] == {
            "door_id": "door",
            "ok": True,
            "pulse_s": 20.0,
        }
        assert by_action["door.lock"]["actor"] == "cli:uid=0"
        assert by_action["door.lock"]["details"]["ok"] is True
        assert by_action["session.forced"]["actor"] == "system"
        assert by_action["door.forced"]["details"]["door_id"] == "door"
        assert by_action["config.reload"]["actor"] == "system"
        assert by_action["config.reload"]["details"]["ok"] is True
        # The refused (unconfirmed) unlock reached the daemon: audited as a CLI command,
        # but no door.unlock record with ok=false exists for it.
        unlocks = [r for r in records if r["action"] == "door.unlock"]
        assert len(unlocks) == 1
        verify = await ctl("audit", "verify", "--json", "--socket", sock)
        assert verify.rc == 0
        assert verify.doc()["ok"] is True


async def test_queue_drain_waits_until_the_broker_took_everything(
    tmp_path: Path, sockdir: Path
) -> None:
    port = free_port()
    broker = Mosquitto(tmp_path / "broker", port=port)
    async with (
        LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim,
        daemon(tmp_path, sockdir, sim, mqtt_port=port) as d,
    ):
        sock = str(d.sock)
        # No broker yet: events pile up in the outbox.
        sim.faults.reboot(down_s=0.5)
        await _until_event(d.sock, "reader.online")
        q = (await ctl("queue", "stats", "--json", "--socket", sock)).doc()
        assert q["depth"] >= 2
        assert q["broker"]["connected"] is False

        short = await ctl("queue", "drain", "--wait", "--timeout", "1", "--json", "--socket", sock)
        assert short.rc == 75, short.err
        assert short.doc()["drained"] is False
        assert short.doc()["depth"] >= q["depth"]
        # On a terminal: a progress bar that says what it waits for, then the advice.
        rc, screen = await _on_tty("queue", "drain", "--wait", "--timeout", "1", "--socket", sock)
        assert rc == 75, screen
        assert "draining outbox" in screen
        assert "waiting for the broker" in screen
        assert "check the broker (cabinetctl status)" in screen

        broker.start()
        try:
            drain = await ctl(
                "queue", "drain", "--wait", "--timeout", "60", "--json", "--socket", sock
            )
            assert drain.rc == 0, drain.err
            lines = drain.lines()
            final = lines[-1]
            assert final["drained"] is True
            assert final["depth"] == 0
            assert final["broker"]["connected"] is True
            assert final["broker"]["acked"] >= q["depth"]
            for line in lines[:-1]:
                assert line["progress"]["depth"] > 0
            after = (await ctl("queue", "stats", "--json", "--socket", sock)).doc()
            assert after["depth"] == 0
        finally:
            broker.stop()


async def test_daemon_down_says_how_to_start_it(sockdir: Path) -> None:
    sock = str(sockdir / "control.sock")
    r = await ctl("status", "--json", "--socket", sock)
    assert r.rc == 69
    assert f"cabinet-agent is not running (no socket at {sock})" in r.err
    assert "systemctl start cabinet-agent" in r.err
    assert r.doc() == {"ok": False, "code": "not_running", "error": r.err.split(": ", 1)[1].strip()}
    for argv in (("queue", "stats"), ("audit", "verify"), ("events", "tail")):
        r = await ctl(*argv, "--socket", sock)
        assert r.rc == 69, (argv, r.err)
        assert "systemctl start cabinet-agent" in r.err


async def test_sigterm_with_a_client_connected_stops_without_an_error(
    tmp_path: Path, sockdir: Path
) -> None:
    """An operator's ``events tail --follow`` is connected when systemd stops the daemon: the
    connection ends (the client says why), and the journal gets no ERROR with a traceback
    (Python 3.11's stream callback logs a connection task that ends cancelled as one)."""
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=7) as sim:
        for tag in TAGS:
            sim.add_tag(tag)
        async with daemon(tmp_path, sockdir, sim) as d:
            sock = str(d.sock)
            stock = await ctl("inventory", "rebaseline", "--reason", "stock", "--socket", sock)
            assert stock.rc == 0, stock.err  # an event for the follower to show first
            follow = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli.ctl",
                "events",
                "tail",
                "--follow",
                "--socket",
                sock,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert follow.stdout is not None
                async with asyncio.timeout(WAIT_S):  # its first line: it is connected
                    assert await follow.stdout.readline()
                d.proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(WAIT_S):
                    assert await d.proc.wait() == 0
                    _, err = await follow.communicate()
            finally:
                if follow.returncode is None:
                    follow.kill()
                    await follow.wait()
            assert follow.returncode == 75, err
            log = d.text()
            assert "Traceback" not in log, log
            assert " ERROR " not in log, log
