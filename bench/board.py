"""The numbers a small board feels, measured side by side in one run on the real daemon.

    .venv/bin/python bench/board.py [--idle-s 60] [--cycles 60] [--backlog 100000]
                                    [--tags 5000] [--events 20000] [--threads]

Everything is the real ``cabinet-agent run`` (a subprocess, as systemd starts it, with a fake
notify socket and ``WATCHDOG_USEC``), the bundled simulators (LLRP reader with the door on its
GPI/GPO, a badge reader on a pseudo-terminal: a serial port) and mosquitto on loopback. The
agent's timers are the production defaults (LLRP keepalive 2 s, MQTT keepalive 30 s, watchdog
30 s, metrics and control socket on) except the door cycle's short scan timers.

1. start → READY: spawn to ``READY=1`` on the notify socket.
2. idle: door closed, nothing happening, background inventory off: CPU (utime+stime ticks of
   every thread) and wake-ups (voluntary + involuntary context switches of every thread) over
   ``--idle-s``, next to a bare paho client idling in the same window (keepalive 30 s);
   ``--threads`` prints who wakes. RSS at rest (VmRSS) at the end.
3. door cycles: ``--cycles`` badge → unlock → open → take or return a tool → close; latency
   beyond the scan = (PUBACK of the cycle's ``session.closed`` as the broker sends it) − (door
   closed) − the scan's own duration (``scan_duration_ms`` in that event, opened with the
   backend's key). PUBACKs are seen by a tap in a loopback proxy in front of mosquitto.
4. drain: a fresh agent on a store holding a ``--tags`` baseline and a ``--backlog`` sealed
   backlog, broker up, replay unthrottled: its drain rate next to a bare paho QoS 1 publisher
   sending the same payloads with the same window (20), and the agent's VmRSS/VmHWM while it
   drains (a door cycle over all ``--tags`` tags runs meanwhile); beside it the floor: the
   VmHWM of a process holding only the libraries the daemon runs on, after one badge read's
   Argon2id (no agent code, no data).
5. throughput ratios (``bench/pipeline.py``'s children, ``--events`` events): seal + commit
   vs seal alone, and the Publisher's drain vs bare paho — on all cores and pinned to one
   (``taskset -c 0``, the contender only; mosquitto stays free).

Targets (issue 14): idle ≤ 0.3 % of a core and ≤ 20 wake-ups/s; peak RSS ≤ 45 MB with 5,000
tags and a 100,000-event backlog draining; seal+commit ≥ 0.7 × seal; drain ≥ 0.9 × bare paho.
Needs mosquitto, util-linux ``taskset``; nothing here imports test code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.privacy.envelope import EnvelopeError, Opener, parse_header  # noqa: E402
from backend.keys import BackendKeys, generate_backend_keys  # noqa: E402
from simulators.badge import BadgeSimulator  # noqa: E402
from simulators.broker import Mosquitto  # noqa: E402
from simulators.cabinet import (  # noqa: E402
    INSTALLER,
    AgentArtefacts,
    Scenario,
    agent_config,
    build_artefacts,
    cmd_topic,
    find_scenario,
    load_scenario,
    populate,
    publish_retained,
    tag_for,
    to_toml,
    wire_door,
)
from simulators.door import SimulatedDoor  # noqa: E402
from simulators.faultproxy import FaultProxy, MqttAckTap  # noqa: E402
from simulators.llrp import LlrpSimulator  # noqa: E402

TICK_HZ = os.sysconf("SC_CLK_TCK")
WATCHDOG_S = 30.0  # systemd/cabinet-agent.service WatchdogSec=
STEP_TIMEOUT_S = 60.0
MB = 1024 * 1024


# ---- /proc ---------------------------------------------------------------------------------------


@dataclass
class ThreadSample:
    name: str
    ticks: int  # utime + stime
    switches: int  # voluntary + involuntary context switches


def threads(pid: int) -> dict[int, ThreadSample]:
    """Every thread of ``pid``: name, CPU ticks and context switches so far."""
    out: dict[int, ThreadSample] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
        inv = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
        out[int(task.name)] = ThreadSample(name, ticks, vol + inv)
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    hwm = int(re.search(r"^VmHWM:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    return rss / 1024, hwm / 1024


def rss_split_mb(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of ``pid`` in MiB: private memory vs mapped files (shared libraries,
    reclaimable by the kernel)."""
    text = Path(f"/proc/{pid}/status").read_text()
    anon = int(re.search(r"^RssAnon:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    files = int(re.search(r"^RssFile:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    return anon / 1024, files / 1024


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class IdleCost:
    seconds: float
    ticks: int
    switches: int
    per_thread: list[tuple[int, str, int, int]]  # tid, name, ticks, switches (in the window)

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.ticks / TICK_HZ / self.seconds

    @property
    def wakeups_per_s(self) -> float:
        return self.switches / self.seconds


def idle_cost(
    before: dict[int, ThreadSample], after: dict[int, ThreadSample], s: float
) -> IdleCost:
    rows = []
    for tid, a in after.items():
        b = before.get(tid, ThreadSample(a.name, 0, 0))
        rows.append((tid, a.name, a.ticks - b.ticks, a.switches - b.switches))
    rows.sort(key=lambda r: -r[3])
    return IdleCost(s, sum(r[2] for r in rows), sum(r[3] for r in rows), rows)


# ---- the agent process ---------------------------------------------------------------------------


class Agent:
    """``cabinet-agent run`` with a fake systemd notify socket (READY, WATCHDOG pings)."""

    def __init__(self, config: Path, work: Path, *, pin: str | None = None) -> None:
        self.config = config
        self.log = work / "agent.log"
        self.notify_path = work / "notify.sock"
        self.pin = pin
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.ready_at: float | None = None
        self.pings: list[float] = []
        self._sock: socket.socket | None = None
        self._ready = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._datagram)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000)),
        }
        env.pop("WATCHDOG_PID", None)
        cli = Path(sys.executable).parent / "cabinet-agent"
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "agent.cli.cabinet_agent"]
        if self.pin is not None:
            cmd = ["taskset", "-c", self.pin, *cmd]
        self.spawned = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def _datagram(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError):
            while True:
                fields = self._sock.recv(4096).decode(errors="replace").split("\n")
                now = time.monotonic()
                if "READY=1" in fields and self.ready_at is None:
                    self.ready_at = now
                    self._ready.set()
                if "WATCHDOG=1" in fields:
                    self.pings.append(now)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_ready(self) -> float:
        """Seconds from spawn to READY=1."""
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while not self._ready.is_set():
                self._check_alive()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._ready.wait()
        assert self.ready_at is not None
        return self.ready_at - self.spawned

    async def wait_log(self, pattern: str, count: int = 1, timeout: float = STEP_TIMEOUT_S) -> None:
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while len(rx.findall(self.text())) < count:
                self._check_alive()
                await asyncio.sleep(0.1)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.text()[-3000:]}")

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    while proc.poll() is None:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                proc.kill()
                proc.wait(10)
        self.proc = None


# ---- the cabinet around it -----------------------------------------------------------------------


@dataclass
class Cabinet:
    """Simulators, broker (behind a PUBACK tap), backend keys and documents for one agent."""

    work: Path
    keys: BackendKeys
    scenario: Scenario
    art: AgentArtefacts
    broker: Mosquitto
    proxy: FaultProxy
    llrp: LlrpSimulator
    badge: BadgeSimulator
    door: SimulatedDoor
    opener: Opener
    acks: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    ack_event: asyncio.Event = field(default_factory=asyncio.Event)

    def on_ack(self, topic: str, payload: bytes) -> None:
        """A PUBACK the broker sent for one of the agent's events (called by the tap)."""
        at = time.monotonic()
        if not topic.endswith("/events"):
            return
        with contextlib.suppress(EnvelopeError, ValueError):
            parse_header(payload)
            self.acks.append((at, json.loads(self.opener.open(payload)[1])))
            self.ack_event.set()

    async def wait_ack(self, predicate: Callable[[dict[str, Any]], bool], since: int) -> float:
        """Arrival time of the first PUBACKed event at index ≥ ``since`` matching."""
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while True:
                for at, event in self.acks[since:]:
                    if predicate(event):
                        return at
                self.ack_event.clear()
                await self.ack_event.wait()

    def config(self, state: Path, *, mqtt_port: int, domain: dict[str, Any] | None = None) -> Path:
        cfg = agent_config(
            self.scenario,
            self.art,
            llrp_port=self.llrp.port,
            badge_url=self.badge.url,
            key_dir=self.work / "keys",
            state_dir=state,
            mqtt_port=mqtt_port,
        )
        # Production timers where the door cycle does not need short ones.
        reader = cfg["readers"][0]
        reader["keepalive_s"] = 2.0
        reader["backoff"] = {"initial_s": 0.5, "max_s": 30.0}
        cfg["badge_readers"][0]["backoff"] = {"initial_s": 0.5, "max_s": 30.0}
        cfg["badge_readers"][0]["repeat_interval_s"] = 2.0
        cfg["mqtt"] = {
            "host": "127.0.0.1",
            "port": mqtt_port,
            "keepalive_s": 30,
            "replay_rate": 0,  # the drain phase measures the unthrottled drain
        }
        cfg["store"] = {"path": str(state / "state.db")}
        cfg["metrics"] = {"enabled": True, "port": 0}
        cfg["time"] = {"sync_source": f"file:{state / 'time-synced'}"}
        if domain:
            cfg["domain"] = {**cfg["domain"], **domain}
        (state / "time-synced").touch()
        path = state / "agent.toml"
        path.write_text(to_toml(cfg))
        return path

    async def door_cycle(self, agent: Agent, person: str, change: Callable[[], None]) -> float:
        """Badge → unlock → open → ``change()`` → close; returns the monotonic close time."""
        people = {p.name: p for p in (*self.scenario.people, INSTALLER)}
        badge = people[person].badge
        before = agent.text().count("badge presented at")
        await self.badge.present(badge)
        await agent.wait_log("badge presented at", before + 1)
        await self.llrp.wait_until(lambda: not self.door.locked, STEP_TIMEOUT_S)
        await self.door.open()
        change()
        closed = time.monotonic()
        await self.door.close()
        return closed


@contextlib.asynccontextmanager
async def cabinet(work: Path, extra_tags: int) -> Any:
    keys = generate_backend_keys(work / "keys")
    scenario = load_scenario(find_scenario("plain-checkout"))
    broker = Mosquitto(work / "broker", persistence=False)
    broker.start()
    cab_box: list[Cabinet] = []
    tap = MqttAckTap(lambda topic, payload: cab_box[0].on_ack(topic, payload))
    try:
        async with (
            FaultProxy(broker.port, client_tap=tap.client, server_tap=tap.server) as proxy,
            LlrpSimulator(personality="impinj", antennas=4, seed=7) as llrp,
            BadgeSimulator(transport="pty") as badge,
        ):
            door = wire_door(scenario, llrp)
            populate(scenario, llrp)
            if extra_tags:
                llrp.add_random_tags(extra_tags, seed=3)
            art = build_artefacts(
                scenario,
                site=keys.site,
                signing_key=keys.signing_private,
                signing_kid=keys.signing_kid,
                extra_people=[INSTALLER],
            )
            for kind, wire in (
                ("allow-list", art.allow_list),
                ("asset-registry", art.asset_registry),
            ):
                await asyncio.to_thread(publish_retained, broker.port, cmd_topic(art, kind), wire)
            cab = Cabinet(
                work,
                keys,
                scenario,
                art,
                broker,
                proxy,
                llrp,
                badge,
                door,
                Opener({keys.hpke_kid: keys.hpke_private}),
            )
            cab_box.append(cab)
            yield cab
    finally:
        broker.stop()


# ---- the bare paho baselines ---------------------------------------------------------------------

BARE_IDLE = """
import sys, threading, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-idle", protocol=MQTTProtocolVersion.MQTTv5)
c.connect("127.0.0.1", int(sys.argv[1]), keepalive=30)
c.loop_start()
print("connected", flush=True)
sys.stdin.read()
c.disconnect(); c.loop_stop()
"""


# The floor under the daemon's memory: the standard library it cannot run without and the
# chosen dependencies (pydantic, cryptography, paho-mqtt, sllurp, pyserial) imported, and one
# Argon2id derivation with the daemon's default parameters (a badge read), with none of the
# agent's code and no data. Prints VmRSS after the imports and VmHWM after the derivation (KiB).
FLOOR = """
import asyncio, json, logging, socket, sqlite3, ssl, sys, uuid
import paho.mqtt.client, serial, pydantic
from sllurp.llrp import LLRPMessage
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
rss = status("VmRSS")
memory_kib, iterations = int(sys.argv[1]), int(sys.argv[2])
Argon2id(salt=bytes(16), length=32, iterations=iterations, lanes=1,
         memory_cost=memory_kib).derive(b"badge")
print(rss, status("VmHWM"))
"""


def floor_mib() -> tuple[float, float]:
    """(VmRSS after the imports, VmHWM after one badge read's Argon2id), MiB."""
    from agent.privacy.pseudonym import P2_DEFAULT

    out = subprocess.run(
        [sys.executable, "-c", FLOOR, str(P2_DEFAULT.memory_kib), str(P2_DEFAULT.iterations)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024


def start_bare_idle(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_IDLE, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def stop_bare_idle(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(BrokenPipeError):
        assert proc.stdin is not None
        proc.stdin.close()
    proc.wait(10)


# ---- phases --------------------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # what, value, baseline, target
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, value: str, baseline: str = "", target: str = "") -> None:
        self.rows.append((what, value, baseline, target))
        print(f"  {what}: {value}  {baseline}  {target}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def phase_idle_and_cycles(args: argparse.Namespace, work: Path, res: Results) -> None:
    async with cabinet(work, 0) as cab:
        state = work / "agent-a"
        state.mkdir()
        agent = Agent(cab.config(state, mqtt_port=cab.proxy.port), state)
        agent.start()
        try:
            ready_s = await agent.wait_ready()
            res.add("start → READY=1", f"{ready_s:.2f} s")
            await agent.wait_log("installed asset-registry")
            await agent.wait_log(r"reader dock-1: connecting -> online")
            await agent.wait_log(r"badge reader badge-1: connected")
            # The installer's cycle makes the first baseline.
            n = len(cab.acks)
            await cab.door_cycle(agent, INSTALLER.name, lambda: None)
            await cab.wait_ack(lambda e: e["type"] == "session.closed", n)
            await cab.llrp.wait_until(lambda: cab.door.locked, STEP_TIMEOUT_S)

            # -- idle, next to a bare paho client in the same window
            await asyncio.sleep(5.0)  # past the cycle's tail (relock, last acks)
            bare = start_bare_idle(cab.broker.port)
            try:
                await asyncio.sleep(1.0)
                pings0 = len(agent.pings)
                a0, b0 = threads(agent.pid), threads(bare.pid)
                t0 = time.monotonic()
                await asyncio.sleep(args.idle_s)
                a1, b1 = threads(agent.pid), threads(bare.pid)
                span = time.monotonic() - t0
                pings = len(agent.pings) - pings0
                idle_rss = memory_mb(bare.pid)[0]
            finally:
                stop_bare_idle(bare)
            ac, bc = idle_cost(a0, a1, span), idle_cost(b0, b1, span)
            res.add(
                f"idle CPU, {span:.0f} s",
                f"{ac.cpu_pct:.2f} % of a core ({ac.ticks} ticks)",
                f"bare paho {bc.cpu_pct:.2f} % ({bc.ticks} ticks)",
                "≤ 0.3 %",
            )
            res.add(
                "idle wake-ups (ctx switches, all threads)",
                f"{ac.wakeups_per_s:.1f} /s ({len(a1)} threads)",
                f"bare paho {bc.wakeups_per_s:.1f} /s ({len(b1)} threads)",
                "≤ 20 /s",
            )
            res.add(
                "  watchdog pings in the idle window",
                f"{pings} (every {WATCHDOG_S / 2:g} s expected: {span / (WATCHDOG_S / 2):.1f})",
            )
            if args.threads:
                for tid, name, ticks, sw in ac.per_thread:
                    print(f"    tid {tid:>7} {name:<16} {ticks:>4} ticks {sw / span:>7.2f} wake/s")
            rss, hwm = memory_mb(agent.pid)
            anon, files = rss_split_mb(agent.pid)
            res.add(
                "RSS at rest (VmRSS / VmHWM so far)",
                f"{rss:.1f} / {hwm:.1f} MiB (anon {anon:.1f}, files {files:.1f})",
                f"bare paho VmRSS {idle_rss:.1f} MiB",
            )

            # -- door cycles
            wrench = cab.scenario.item("wrench")
            lat: list[float] = []
            scans: list[float] = []
            for i in range(args.cycles):
                inside = i % 2 == 0

                def change(inside: bool = inside) -> None:
                    if inside:
                        cab.llrp.remove_tag(wrench.epc)
                    else:
                        cab.llrp.add_tag(tag_for(cab.scenario, wrench.epc, "top", wrench))

                n = len(cab.acks)
                # Alice takes the wrench, Bob brings it back: a card is shown again only
                # after a whole cycle (the reader drops repeats within repeat_interval_s).
                person = "alice" if inside else "bob"
                closed = await cab.door_cycle(agent, person, change)
                acked = await cab.wait_ack(lambda e: e["type"] == "session.closed", n)
                event = next(e for _, e in cab.acks[n:] if e["type"] == "session.closed")
                scan_ms = float(event["scan_duration_ms"])
                lat.append((acked - closed) * 1000 - scan_ms)
                scans.append(scan_ms)
                await cab.llrp.wait_until(lambda: cab.door.locked, STEP_TIMEOUT_S)
            res.add(
                f"door closed → PUBACK beyond the scan ({len(lat)} cycles)",
                f"p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                f"max {max(lat):.1f} ms",
                f"(scan itself: p50 {statistics.median(scans):.0f} ms)",
            )
        except BaseException:
            print(f"--- agent log (end):\n{agent.text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            await agent.stop()


async def prefill(
    state: Path, keys: BackendKeys, site: str, cabinet_id: str, tags: list[tuple[str, str]], n: int
) -> None:
    """A store as a busy cabinet leaves it after an outage: a ``tags`` baseline, ``n`` events."""
    from agent.privacy.envelope import EnvelopeHeader, Sealer
    from agent.store import OutboxRow, Store, StoreConfig
    from agent.store.types import BaselineEntry

    store = await Store.open(StoreConfig(path=state / "state.db"))
    try:
        now = datetime.now(UTC)
        baseline = {epc: BaselineEntry(drawer, now) for epc, drawer in tags}
        await store.submit_cycle([], baseline, None)
        sealer = Sealer(keys.hpke_public, keys.hpke_kid)
        body = json.dumps({"type": "inventory.snapshot", "pad": "x" * 300}).encode()
        pending: list[asyncio.Future[object]] = []
        batch = 500
        for first in range(0, n, batch):
            seq0 = store.next_seq_nowait()
            rows = []
            for k in range(min(batch, n - first)):
                eid = uuid.uuid4()
                header = EnvelopeHeader(
                    sealer.key_id, cabinet_id, seq0 + k, eid, version=2, epoch=store.epoch
                )
                rows.append(
                    OutboxRow(
                        seq0 + k, eid, 1, "inventory.snapshot", now, sealer.seal(header, body)
                    )
                )
            pending.append(store.submit_events(rows))  # type: ignore[arg-type]
            if len(pending) > 4:
                await pending.pop(0)
        for fut in pending:
            await fut
    finally:
        await store.close()


def outbox_depth(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def run_pipeline_child(mode: str, db: Path, port: int, n: int, pin: bool) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "pipeline.py"),
        "--child",
        mode,
        str(db),
        str(port),
        str(n),
        "20",
    ]
    if pin:
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def phase_drain(args: argparse.Namespace, work: Path, res: Results) -> None:
    async with cabinet(work, args.tags) as cab:
        state = work / "agent-b"
        state.mkdir()
        # Every tag in the field is in the baseline: the drawer of its antenna.
        drawer_of = {ant: d for d, ants in cab.scenario.aliases().items() for ant in ants}
        tags = [(t.epc, drawer_of.get(f"dock-1:{t.antenna}", "top")) for t in cab.llrp.tags]
        print(
            f"  prefilling {args.backlog} sealed events and a {len(tags)}-tag baseline ...",
            flush=True,
        )
        await prefill(state, cab.keys, cab.art.site_id, cab.art.cabinet_id, tags, args.backlog)
        bare_db = work / "bare.db"
        src, dst = sqlite3.connect(state / "state.db"), sqlite3.connect(bare_db)
        src.backup(dst)
        src.close()
        dst.close()
        n = outbox_depth(bare_db)
        # The bare baseline first (the broker is the same one; it keeps nothing: no subscriber).
        bare = await asyncio.to_thread(
            run_pipeline_child, "bare", bare_db, cab.broker.port, n, False
        )
        bare_rate = n / bare["elapsed"]
        agent = Agent(cab.config(state, mqtt_port=cab.broker.port), state)
        agent.start()
        peak_rss = 0.0
        try:
            await agent.wait_ready()
            t0 = time.monotonic()
            await agent.wait_log(r"reader dock-1: connecting -> online")
            await agent.wait_log(r"badge reader badge-1: connected")
            await agent.wait_log("installed allow-list")  # else the card is denied
            cycle = asyncio.create_task(
                cab.door_cycle(agent, "alice", lambda: None), name="drain-door-cycle"
            )
            done_at: float | None = None
            async with asyncio.timeout(1800):
                while True:
                    rss, _ = memory_mb(agent.pid)
                    peak_rss = max(peak_rss, rss)
                    depth = await asyncio.to_thread(outbox_depth, state / "state.db")
                    if depth == 0 and done_at is None:
                        done_at = time.monotonic()
                    if cycle.done() and cycle.exception() is not None:
                        await cycle  # the door cycle failed: say why
                    if done_at is not None and cycle.done() and "session.closed" in agent.text():
                        break
                    await asyncio.sleep(0.5)
            await cycle
            await agent.wait_log(r"event session\.closed seq=\d+ committed")
            rss, hwm = memory_mb(agent.pid)
            anon, files = rss_split_mb(agent.pid)
            drain_rate = n / (done_at - t0)
        finally:
            await agent.stop()
    res.add(
        f"drain of {n:,} events by the daemon ({args.tags:,}-tag cabinet)",
        f"{drain_rate:,.0f} msg/s",
        f"bare paho {bare_rate:,.0f} msg/s",
        f"ratio {drain_rate / bare_rate:.2f}",
    )
    res.add(
        "RSS while draining (+ a door cycle over every tag)",
        f"VmHWM {hwm:.1f} MiB (VmRSS max {peak_rss:.1f}, end {rss:.1f}: "
        f"anon {anon:.1f}, files {files:.1f})",
        f"bare paho VmHWM {bare['vmhwm_kb'] / 1024:.1f} MiB",
        "≤ 45 MB",
    )
    floor_rss, floor_hwm = await asyncio.to_thread(floor_mib)
    res.add(
        "floor: the libraries alone (stdlib + chosen deps, no agent code) + one badge Argon2id",
        f"VmHWM {floor_hwm:.1f} MiB = {floor_hwm * 1.048576:.1f} MB "
        f"(VmRSS {floor_rss:.1f} MiB after the imports)",
        "",
        "≤ 45 MB",
    )


async def phase_throughput(args: argparse.Namespace, work: Path, res: Results) -> None:
    broker = Mosquitto(work / "tp-broker", persistence=False)
    broker.start()
    try:
        for pin in (False, True):
            where = "pinned to CPU 0" if pin else "all cores"
            d = work / ("tp-pin" if pin else "tp-all")
            d.mkdir()
            cmd = [
                sys.executable,
                str(ROOT / "bench" / "board.py"),
                "--seal-child",
                str(d),
                str(args.events),
            ]
            if pin:
                cmd = ["taskset", "-c", "0", *cmd]
            proc = await asyncio.to_thread(
                subprocess.run,
                cmd,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"seal child failed:\n{proc.stderr[-3000:]}")
            seal, commit = json.loads(proc.stdout.strip().splitlines()[-1])
            res.add(
                f"seal + commit vs seal alone ({where})",
                f"{commit:,.0f} ev/s",
                f"seal {seal:,.0f} ev/s",
                f"ratio {commit / seal:.2f} (≥ 0.7)",
            )
            db = d / "state.db"
            bare_db = d / "bare.db"
            shutil.copy(db, bare_db)
            for suffix in ("-wal", "-shm"):
                if Path(f"{db}{suffix}").exists():
                    shutil.copy(f"{db}{suffix}", f"{bare_db}{suffix}")
            bare = await asyncio.to_thread(
                run_pipeline_child, "bare", bare_db, broker.port, args.events, pin
            )
            drain = await asyncio.to_thread(
                run_pipeline_child, "drain", db, broker.port, args.events, pin
            )
            b, p = args.events / bare["elapsed"], args.events / drain["elapsed"]
            res.add(
                f"Publisher drain vs bare paho ({where})",
                f"{p:,.0f} msg/s",
                f"bare {b:,.0f} msg/s",
                f"ratio {p / b:.2f} (≥ 0.9)",
            )
    finally:
        broker.stop()


def seal_child(argv: list[str]) -> int:
    d, n = Path(argv[0]), int(argv[1])
    from bench.pipeline import seal_and_commit

    seal, commit = asyncio.run(seal_and_commit(d / "state.db", n, 100))
    print(json.dumps([seal, commit]))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--seal-child":
        return seal_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=5000)
    parser.add_argument("--events", type=int, default=20_000, help="throughput ratios' events")
    parser.add_argument("--threads", action="store_true", help="idle wake-ups per thread")
    parser.add_argument(
        "--only", choices=["idle", "drain", "throughput"], help="one phase (idle includes cycles)"
    )
    args = parser.parse_args()
    res = Results()
    print(f"cabinet-agent on a small board: {os.cpu_count()} CPUs, load {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cabinet-board-") as tmp:
        work = Path(tmp)
        if args.only in (None, "idle"):
            asyncio.run(phase_idle_and_cycles(args, work / "a", res))
        if args.only in (None, "drain"):
            asyncio.run(phase_drain(args, work / "b", res))
        if args.only in (None, "throughput"):
            (work / "c").mkdir()
            asyncio.run(phase_throughput(args, work / "c", res))
    print(f"\nload average at the end: {loadavg()}")
    widths = [max(len(r[i]) for r in res.rows) for i in range(4)]
    header = ("measure", "agent", "same-run baseline", "target / ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in res.rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
