"""Field soak: the real agent, a cabinet looping a scenario with neighbour tags, and mosquitto,
under random chaos for a configurable time; then the invariants, as a table.

    python bench/field.py                     # 10 minutes (docs/reliability.md records one run)
    python bench/field.py --seconds 60        # the short version CI runs

Everything is real: ``cabinet-agent run`` (under libfaketime, so its wall clock can be stepped
while the monotonic clock stays real), its state database on the power-loss filesystem
(simulators/powerfs) on a small tmpfs (so the disk can fill), mosquitto behind the fault proxy,
the LLRP reader, badge reader and door simulators playing the cabinet, and a backend that opens
every envelope. Chaos, one action at a time every few seconds: agent kill -9, power cut (the
filesystem drops what was not fsynced), broker kill -9 and restart, link cut, blackhole, reader
reboot, reader flapping, a wall-clock step, a full disk.

Checked at the end (exit 1 if any fails):

* every event the agent committed reached the backend: at the end the outbox is empty, and every
  envelope the broker acknowledged to the agent (seen on the wire by the fault proxy) was
  received; seqs are contiguous per epoch; a (epoch, seq) never carries two event ids;
* duplicates only within the in-flight window (copies ≤ window × connections);
* no false check-out: each undisturbed round's events are exactly the scenario's; over the whole
  run no item is reported checked out (or missing) more often than it physically left, nor
  returned more often than it came back, and a neighbour's tag is never reported at all;
* no restart loop: while an agent process ran, its systemd watchdog pings never stopped for
  longer than the watchdog timeout;
* and it prints peak RSS and events/s.

Needs root (tmpfs, FUSE), mosquitto, libfaketime, fuse3 and a C compiler (the CI machine has
them). Nothing here imports test code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.privacy.envelope import EnvelopeError, Opener, parse_header
from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder
from backend.keys import BackendKeys, generate_backend_keys
from simulators.badge import BadgeSimulator
from simulators.broker import Mosquitto
from simulators.cabinet import (
    INSTALLER,
    AgentArtefacts,
    EventLog,
    Neighbour,
    Person,
    Scenario,
    ScenarioError,
    ScenarioRunner,
    agent_config,
    build_artefacts,
    cmd_topic,
    find_scenario,
    load_scenario,
    match_events,
    populate,
    publish_retained,
    to_toml,
    wire_door,
)
from simulators.door import SimulatedDoor
from simulators.faultproxy import FaultProxy, MqttAckTap
from simulators.llrp import LlrpSimulator
from simulators.powerfs import PowerLossFs, unavailable_reason
from simulators.tmpfs import tmpfs

ROOT = Path(__file__).resolve().parent.parent
MARKER = Person(name="marker", badge="6A2D7F0C55", listed=False)
MARKER_READER = "marker"
WATCHDOG_S = 10.0
STEP_TIMEOUT_S = 45.0
MARK_RETRY_S = 20.0
SETTLE_TIMEOUT_S = 180.0
# Session-relevant events, compared exactly in an undisturbed round (background inventories,
# reader health and agent alerts may come at any time and are checked by the other invariants).
EXACT_TYPES = ("access.", "door.", "session.", "item.")
ITEM_OUT = ("item.checked_out", "item.missing")
INFLIGHT_WINDOW = 20
CHAOS_AFTERMATH_S = 5.0

# Chaos is dealt from a shuffled deck (every kind comes up in each deck, so even a short run
# sees most of them); the counts are how often each kind is in a deck.
ACTIONS: dict[str, int] = {
    "agent_kill": 2,
    "power_cut": 2,
    "broker_kill": 1,
    "link_cut": 1,
    "blackhole": 1,
    "reader_reboot": 1,
    "reader_flap": 1,
    "clock_step": 1,
    "disk_full": 1,
}


# ---- the backend: every copy the broker delivered, opened and recorded ------------------------


@dataclass
class Backend:
    """A persistent QoS 1 subscriber: records every envelope header and opens first copies."""

    port: int
    keys: BackendKeys
    loop: asyncio.AbstractEventLoop
    log: EventLog = field(default_factory=EventLog)
    copies: list[tuple[bytes | None, int, uuid.UUID]] = field(default_factory=list)
    consumer: Consumer | None = None

    def start(self) -> None:
        recorder = self

        class _Recording(EventDecoder):
            def handle(self, topic: str, payload: bytes) -> Delivered | None:
                with contextlib.suppress(EnvelopeError):
                    h = parse_header(payload)
                    recorder.loop.call_soon_threadsafe(
                        recorder.copies.append, (getattr(h, "epoch", None), h.seq, h.event_id)
                    )
                return super().handle(topic, payload)

        decoder = _Recording(Opener({self.keys.hpke_kid: self.keys.hpke_private}))
        opts = ConsumerOptions(port=self.port, client_id="field-backend", session_expiry_s=86400)
        self.consumer = Consumer(opts, decoder, self._opened)
        self.consumer.start()
        if not self.consumer.subscribed.wait(15):
            raise RuntimeError("the backend did not subscribe")

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def _opened(self, ev: Delivered) -> None:
        self.log.add_threadsafe(self.loop, json.loads(ev.plaintext))


# ---- the agent process -------------------------------------------------------------------------


@dataclass
class AgentRun:
    """One agent process: its start, readiness and watchdog pings, and how it ended."""

    pid: int
    started: float
    ready: float | None = None
    ended: float | None = None
    pings: list[float] = field(default_factory=list)
    stopping: float | None = None
    hwm_kib: int = 0
    how: str = "running"


class Agent:
    """``cabinet-agent run`` under libfaketime, with a fake systemd notify socket."""

    def __init__(self, config: Path, work: Path, clock_file: Path) -> None:
        self.config = config
        self.log = work / "agent.log"
        self.notify_path = work / "notify.sock"
        self.clock_file = clock_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs: list[AgentRun] = []
        self._sock: socket.socket | None = None
        self.rss_samples_kib: list[int] = []

    def open_notify(self, loop: asyncio.AbstractEventLoop) -> None:
        self.notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._datagram)

    def close_notify(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _datagram(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError):
            while True:
                data = self._sock.recv(4096).decode(errors="replace")
                now = time.monotonic()
                run = self.runs[-1] if self.runs else None
                if run is None or run.ended is not None:
                    continue
                fields = data.split("\n")
                if "READY=1" in fields and run.ready is None:
                    run.ready = now
                if "WATCHDOG=1" in fields:
                    run.pings.append(now)
                if "STOPPING=1" in fields:
                    run.stopping = now

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000)),
            "LD_PRELOAD": _libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_CACHE_DURATION": "1",
        }
        env.pop("WATCHDOG_PID", None)
        cli = Path(sys.executable).parent / "cabinet-agent"
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "agent.cli.cabinet_agent"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        self.runs.append(AgentRun(self.proc.pid, time.monotonic()))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self.alive and bool(self.runs) and self.runs[-1].ready is not None

    def sample_rss(self) -> None:
        if self.alive and self.proc is not None:
            hwm, rss = _proc_memory(self.proc.pid)
            if hwm:
                self.runs[-1].hwm_kib = max(self.runs[-1].hwm_kib, hwm)
            if rss:
                self.rss_samples_kib.append(rss)

    def ended(self, how: str) -> None:
        run = self.runs[-1]
        run.ended = time.monotonic()
        run.how = how
        self.proc = None

    def kill9(self) -> None:
        if self.proc is None:
            return
        self.sample_rss()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.ended("kill -9")

    async def stop(self, timeout: float = 20.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        self.sample_rss()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                while proc.poll() is None:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            proc.kill()
            proc.wait(30)
            self.ended("SIGTERM ignored, killed")
            return -9
        self.ended(f"SIGTERM, exit {proc.returncode}")
        return proc.returncode

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not self.ready:
                if self.proc is not None and self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.ended(f"exited {code} before ready")
                    raise RuntimeError(f"the agent exited with {code} before it was ready")
                await asyncio.sleep(0.05)


# ---- chaos ---------------------------------------------------------------------------------------


@dataclass
class Chaos:
    """What happened to the world, and when (monotonic)."""

    done: Counter[str] = field(default_factory=Counter)
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, kind)
    broker_kills: list[float] = field(default_factory=list)
    clock_offset_s: int = 0

    def disturbed(self, start: float, end: float) -> bool:
        """Chaos overlapped [start, end] (an action still under way counts to infinity)."""
        return any(s <= end and e >= start for s, e, _ in self.spans)


@dataclass
class World:
    """Everything the soak runs and the records it keeps."""

    opts: argparse.Namespace
    work: Path
    rng: random.Random
    disk: Path
    pfs: PowerLossFs
    broker: Mosquitto
    proxy: FaultProxy
    tap: MqttAckTap
    keys: BackendKeys
    scenario: Scenario
    art: AgentArtefacts
    llrp: LlrpSimulator
    badge: BadgeSimulator
    marker: BadgeSimulator
    door: SimulatedDoor
    backend: Backend
    agent: Agent
    clock_file: Path
    chaos: Chaos = field(default_factory=Chaos)
    acked: dict[tuple[bytes | None, int], tuple[uuid.UUID, float]] = field(default_factory=dict)
    removals: Counter[str] = field(default_factory=Counter)
    comebacks: Counter[str] = field(default_factory=Counter)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one chaos action at a time
    _last_round_start: float | None = None
    stop_chaos: asyncio.Event = field(default_factory=asyncio.Event)

    # -- the agent --------------------------------------------------------------------------

    async def restart_agent(self) -> None:
        self.agent.start()
        await self.agent.wait_ready(120.0)
        # pyserial's socket:// open drains what arrives during its handshake: a card shown in
        # the first instant after the agent connected would be lost (a real hand is slower).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30.0):
                while self.badge.clients < 1 or self.marker.clients < 1:
                    await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)

    async def agent_connected(self, timeout: float) -> None:
        """The agent runs and holds the reader and both badge readers."""
        async with asyncio.timeout(timeout):
            while True:
                if (
                    self.agent.ready
                    and self.llrp.is_up
                    and self.llrp.connections.active == 1
                    and self.badge.clients >= 1
                    and self.marker.clients >= 1
                ):
                    return
                if not self.agent.alive and not self.lock.locked():
                    # Died on its own (a bug, or SIGTERM ignored): note it and bring it back.
                    self.agent.ended("exited on its own")
                    await self.restart_agent()
                await asyncio.sleep(0.1)

    # -- chaos actions ------------------------------------------------------------------------

    async def chaos_loop(self) -> None:
        deck: list[str] = []
        storm_ends = time.monotonic()  # it starts calm: the first rounds are compared exactly
        while not self.stop_chaos.is_set():
            if time.monotonic() >= storm_ends:
                # A calm spell: rounds played in it (and not spilled over) are compared exactly.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.opts.calm):
                        await self.stop_chaos.wait()
                storm_ends = time.monotonic() + self.opts.storm
                continue
            pause = self.rng.uniform(self.opts.chaos_min, self.opts.chaos_max)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.stop_chaos.wait()
            if self.stop_chaos.is_set():
                return
            if not deck:
                # Every kind once before any repeats (popped from the end: the repeats go first
                # in the list), so even a short run sees as many kinds as it has actions.
                once = list(ACTIONS)
                again = [kind for kind, n in ACTIONS.items() for _ in range(n - 1)]
                self.rng.shuffle(once)
                self.rng.shuffle(again)
                deck = again + once
            kind = deck.pop()
            async with self.lock:
                # Recorded before it starts: a round that ends meanwhile must know about it.
                span = len(self.chaos.spans)
                start = time.monotonic()
                self.chaos.spans.append((start, float("inf"), kind))
                await getattr(self, f"_chaos_{kind}")()
                self.chaos.done[kind] += 1
                # Its effects outlast it a little (reconnects, a clock step's event, held writes).
                self.chaos.spans[span] = (start, time.monotonic() + CHAOS_AFTERMATH_S, kind)

    async def _chaos_agent_kill(self) -> None:
        self.agent.kill9()
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        await self.restart_agent()

    async def _chaos_power_cut(self) -> None:
        pid = self.agent.proc.pid if self.agent.proc is not None else None
        self.agent.sample_rss()
        await asyncio.to_thread(self.pfs.cut, *([pid] if pid else []))
        if self.agent.proc is not None:
            self.agent.proc.wait(30)
            self.agent.ended("power cut")
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        await self.restart_agent()

    async def _chaos_broker_kill(self) -> None:
        self.chaos.broker_kills.append(time.monotonic())
        self.broker.kill()
        await asyncio.sleep(self.rng.uniform(1.0, 8.0))
        await asyncio.to_thread(self.broker.start)

    async def _chaos_link_cut(self) -> None:
        self.proxy.cut()

    async def _chaos_blackhole(self) -> None:
        self.proxy.blackhole(True)
        await asyncio.sleep(self.rng.uniform(2.0, 12.0))
        self.proxy.blackhole(False)
        self.proxy.cut()  # the silent connections die as a NAT timeout would end them

    async def _chaos_reader_reboot(self) -> None:
        self.llrp.faults.reboot(down_s=self.rng.uniform(1.0, 6.0))
        await self.llrp.wait_up(60.0)

    async def _chaos_reader_flap(self) -> None:
        self.llrp.faults.flap(up_s=self.rng.uniform(0.3, 1.5))
        await asyncio.sleep(self.rng.uniform(4.0, 12.0))
        self.llrp.faults.clear()

    async def _chaos_clock_step(self) -> None:
        choice = self.rng.random()
        if choice < 0.2:
            self.chaos.clock_offset_s = -int(time.time()) + 300  # back to 1970 (no RTC)
        elif choice < 0.5:
            self.chaos.clock_offset_s = 0  # NTP puts it right
        else:
            self.chaos.clock_offset_s += self.rng.choice((-1, 1)) * self.rng.randint(60, 7200)
        _write_clock(self.clock_file, self.chaos.clock_offset_s)
        await asyncio.sleep(1.5)  # libfaketime re-reads the file every second

    async def _chaos_disk_full(self) -> None:
        filler = self.disk / "filler"
        free = shutil.disk_usage(self.disk).free
        with filler.open("wb") as f, contextlib.suppress(OSError):
            remaining = free
            chunk = b"\0" * (1024 * 1024)
            while remaining > 0:
                f.write(chunk[: min(len(chunk), remaining)])
                remaining -= len(chunk)
        await asyncio.sleep(self.rng.uniform(3.0, 15.0))
        filler.unlink(missing_ok=True)

    # -- the cabinet ------------------------------------------------------------------------------

    def runner(self, location: dict[str, str | None] | None = None) -> ScenarioRunner:
        return _CountingRunner(
            self.scenario,
            self.llrp,
            self.badge,
            self.door,
            events=self.backend.log,
            timeout_s=STEP_TIMEOUT_S,
            allow_list_expires_at=self.art.allow_list_expires_at,
            location=dict(location or {}),
            on_move=self._moved,
        )

    def _moved(self, epc: str, inside: bool) -> None:
        """A tag physically left the cabinet or came back (a person's hand, a restock)."""
        (self.comebacks if inside else self.removals)[epc] += 1

    async def mark(self) -> int:
        """The marker card at the marker reader; the seq of its access.denied, once everything
        committed before it has arrived too. Shown again while it does not come through (a
        read the agent had not committed when it was killed is gone, as with a real card)."""
        log = self.backend.log
        who = next(p for p, n in self.art.names.items() if n == MARKER.name)

        def denials() -> list[dict[str, Any]]:
            return log.find(lambda e: e.get("type") == "access.denied" and e.get("actor") == who)

        before = len(denials())
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while True:
                await self.agent_connected(SETTLE_TIMEOUT_S)
                await asyncio.sleep(0.35)  # the badge reader drops a card shown twice in 0.3 s
                await self.marker.present(MARKER.badge)
                with contextlib.suppress(TimeoutError):
                    await log.wait_for(lambda: len(denials()) > before, MARK_RETRY_S)
                    break
            seq = int(denials()[-1]["seq"])
            await log.wait_for(lambda: _contiguous_to(log, seq), SETTLE_TIMEOUT_S)
        return seq

    async def play_round(self, index: int, location: dict[str, str | None]) -> bool:
        """Marker, the steps, marker. False if a step failed (the world needs restoring)."""
        start_seq = await self.mark()
        self.backend.log.mark(start_seq)  # the runner's waits count events from here
        started = time.monotonic()
        runner = self.runner(location)
        ok = True
        error = ""
        try:
            await runner.run()
        except (ScenarioError, TimeoutError) as err:
            ok, error = False, str(err)
        location.clear()
        location.update(runner.location)
        end_seq = await self.mark()
        ended = time.monotonic()
        # What chaos did to the previous round can spill into this one (a verification
        # inventory after an incomplete session reports what went missing then).
        since = self._last_round_start if self._last_round_start is not None else started
        self._last_round_start = started
        events = [e for e in self.backend.log.events if start_seq < int(e["seq"]) < end_seq]
        disturbed = (not ok) or self.chaos.disturbed(since, ended)
        problems: list[str] = []
        if not disturbed:
            relevant = [e for e in events if str(e.get("type", "")).startswith(EXACT_TYPES)]
            problems = match_events(self.scenario.expect, relevant, self.art)
        self.rounds.append(
            {
                "round": index,
                "ok": ok,
                "error": error,
                "disturbed": disturbed,
                "problems": problems,
                "events": len(events),
            }
        )
        with (self.work / "rounds.jsonl").open("a") as f:  # for a post-mortem
            detail = {**self.rounds[-1], "seqs": [start_seq, end_seq], "event_list": events}
            f.write(json.dumps(detail, default=str) + "\n")
        return ok

    async def restore(self, location: dict[str, str | None]) -> None:
        """Bring the cabinet back as the scenario starts: door shut, every item home, and one
        commissioning cycle so the agent's baseline agrees. Retried while chaos interferes."""
        for _attempt in range(10):
            try:
                await self.agent_connected(SETTLE_TIMEOUT_S)
                if self.door.is_open:
                    await self.door.close()
                start = {i.epc: i.drawer for i in self.scenario.items}
                for epc, where in start.items():
                    now_inside = location.get(epc) is not None
                    if now_inside != (where is not None):
                        self._moved(epc, inside=where is not None)
                populate(self.scenario, self.llrp)
                location.clear()
                location.update(start)
                await self.runner(location).commission(INSTALLER)
                return
            except (ScenarioError, TimeoutError):
                await asyncio.sleep(1.0)
        raise RuntimeError("the cabinet could not be restored after 10 attempts")


@dataclass
class _CountingRunner(ScenarioRunner):
    """The scenario runner, telling the soak about every tag that left or came back."""

    on_move: Callable[[str, bool], None] | None = None

    async def _op_take(self, step: Any) -> None:
        before = dict(self.location)
        await super()._op_take(step)
        self._report(before)

    async def _op_return(self, step: Any) -> None:
        before = dict(self.location)
        await super()._op_return(step)
        self._report(before)

    async def _op_vanish(self, step: Any) -> None:
        before = dict(self.location)
        await super()._op_vanish(step)
        self._report(before)

    def _report(self, before: dict[str, str | None]) -> None:
        if self.on_move is None:
            return
        for epc, where in self.location.items():
            if (before.get(epc) is None) != (where is None):
                self.on_move(epc, where is not None)


def _contiguous_to(log: EventLog, seq: int) -> bool:
    seqs = {int(e["seq"]) for e in log.events}
    return all(s in seqs for s in range(min(seqs), seq + 1))


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError("libfaketime is missing (apt-get install faketime)")
    return found[0]


def _write_clock(path: Path, offset_s: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{offset_s:+d}s\n")
    tmp.replace(path)


def _proc_memory(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB, 0 when the process is gone."""
    hwm = rss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


# ---- set-up --------------------------------------------------------------------------------------


def soak_scenario(registry: bool) -> Scenario:
    """demo-loop (two tools out, back in) with three neighbour tags heard through the walls."""
    base = load_scenario(find_scenario("demo-loop"))
    drawers = list(base.drawers)
    neighbours = [
        Neighbour(epc=f"e28011606000020000ff{i:04x}", drawer=drawers[i % len(drawers)])
        for i in range(3)
    ]
    return base.model_copy(update={"neighbours": neighbours, "asset_registry": registry})


async def soak(opts: argparse.Namespace) -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"field soak: cannot run the power-loss filesystem: {reason}", file=sys.stderr)
        return 69
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="cabinet-field-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    loop = asyncio.get_running_loop()
    # SIGTERM as Ctrl-C: cancel, so that every process, mount and temp dir is cleaned up.
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    print(f"field soak: {opts.seconds:g} s, seed {opts.seed}, work dir {work}", flush=True)
    with tmpfs(work / "disk", opts.disk_mib * 1024 * 1024) as disk_root:
        pfs = PowerLossFs(disk_root / "pfs")
        pfs.mount()
        try:
            return await _soak_mounted(opts, work, rng, loop, pfs, disk_root)
        finally:
            pfs.unmount()
            if not opts.keep:
                shutil.rmtree(work / "state", ignore_errors=True)


async def _soak_mounted(
    opts: argparse.Namespace,
    work: Path,
    rng: random.Random,
    loop: asyncio.AbstractEventLoop,
    pfs: PowerLossFs,
    disk_root: Path,
) -> int:
    keys = generate_backend_keys(work / "keys")
    scenario = soak_scenario(registry=not opts.no_registry)
    broker = Mosquitto(work / "broker")
    broker.start()
    acked: dict[tuple[bytes | None, int], tuple[uuid.UUID, float]] = {}

    def on_ack(topic: str, payload: bytes) -> None:
        if not topic.endswith("/events"):
            return
        with contextlib.suppress(EnvelopeError):
            h = parse_header(payload)
            acked.setdefault((getattr(h, "epoch", None), h.seq), (h.event_id, time.monotonic()))

    tap = MqttAckTap(on_ack)
    clock_file = work / "faketime"
    _write_clock(clock_file, 0)
    backend = Backend(broker.port, keys, loop)
    try:
        async with (
            FaultProxy(broker.port, client_tap=tap.client, server_tap=tap.server) as proxy,
            LlrpSimulator(personality="impinj", antennas=4, seed=opts.seed) as llrp,
            BadgeSimulator(transport="tcp") as badge,
            BadgeSimulator(transport="tcp") as marker,
        ):
            door = wire_door(scenario, llrp)
            populate(scenario, llrp)
            art = build_artefacts(
                scenario,
                site=keys.site,
                signing_key=keys.signing_private,
                signing_kid=keys.signing_kid,
                extra_people=[INSTALLER, MARKER],
            )
            # Background inventories between and during rounds (where neighbours could creep
            # in); the marker card's denials must never lock its reader out.
            art.domain.update({"background_period_s": 20.0, "lockout_denials": 1000})
            cfg = agent_config(
                scenario,
                art,
                llrp_port=llrp.port,
                badge_url=badge.url,
                key_dir=work / "keys",
                state_dir=pfs.path,
                mqtt_port=proxy.port,
                extra_badge_readers=[
                    {
                        "id": MARKER_READER,
                        "url": marker.url,
                        "repeat_interval_s": 0.3,
                        "backoff": {"initial_s": 0.05, "max_s": 0.5},
                    }
                ],
                extra={
                    "store": {"synchronous": opts.synchronous},
                    "control": {"socket_path": str(work / "ctl.sock"), "group": "root"},
                    "mqtt": {"inflight_window": INFLIGHT_WINDOW},
                },
            )
            config = work / "agent.toml"
            config.write_text(to_toml(cfg))
            for kind, wire in (
                ("allow-list", art.allow_list),
                ("asset-registry", art.asset_registry),
            ):
                publish_retained(broker.port, cmd_topic(art, kind), wire)
            backend.start()
            agent = Agent(config, work, clock_file)
            agent.open_notify(loop)
            world = World(
                opts, work, rng, disk_root, pfs, broker, proxy, tap, keys, scenario,
                art, llrp, badge, marker, door, backend, agent, clock_file,
            )  # fmt: skip
            world.acked = acked
            try:
                return await _run(world)
            finally:
                with contextlib.suppress(Exception):
                    await agent.stop()
                agent.close_notify(loop)
    finally:
        backend.stop()
        broker.stop()


async def _run(world: World) -> int:
    opts = world.opts
    agent = world.agent
    t0 = time.monotonic()
    await world.restart_agent()
    await world.agent_connected(SETTLE_TIMEOUT_S)
    location: dict[str, str | None] = {i.epc: i.drawer for i in world.scenario.items}
    for epc, where in location.items():
        if where is not None:
            world.comebacks[epc] += 1  # stocked by the installer: the first returns
    await world.restore(location)  # the installer's first cycle (retried like any restore)
    deadline = t0 + opts.seconds
    sampler_stop = asyncio.Event()

    async def sample() -> None:
        while not sampler_stop.is_set():
            agent.sample_rss()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await sampler_stop.wait()

    async with asyncio.TaskGroup() as tg:
        chaos = tg.create_task(world.chaos_loop(), name="chaos")
        tg.create_task(sample(), name="rss-sampler")
        index = 0
        # A loaded machine plays fewer chaos actions in the same time: --min-actions extends
        # the run (storms and calm spells alike) until that many were played.
        while time.monotonic() < deadline or sum(world.chaos.done.values()) < opts.min_actions:
            index += 1
            ok = await world.play_round(index, location)
            last = world.rounds[-1]
            print(
                f"  round {index:>3}: {'ok' if ok else 'FAILED'}"
                f"{' (disturbed)' if last['disturbed'] else ''}"
                f"{'  ' + '; '.join(last['problems'][:2]) if last['problems'] else ''}"
                f"  chaos so far: {dict(world.chaos.done)}",
                flush=True,
            )
            if not ok:
                await world.restore(location)
        world.stop_chaos.set()
        await chaos
        # Heal: everything up, the clock right, nothing blackholed; wait until delivered.
        world.proxy.blackhole(False)
        world.llrp.faults.clear()
        _write_clock(world.clock_file, 0)
        (world.disk / "filler").unlink(missing_ok=True)
        await world.agent_connected(SETTLE_TIMEOUT_S)
        await world.mark()
        drained = await _drain(world)
        rc = await agent.stop()
        sampler_stop.set()
    elapsed = time.monotonic() - t0
    return _report(world, elapsed, drained, rc)


async def _drain(world: World) -> bool:
    """``cabinetctl queue drain --wait``: the outbox is empty (every commit acknowledged)."""
    cli = Path(sys.executable).parent / "cabinetctl"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "agent.cli.ctl"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "queue", "drain", "--wait", "--timeout", "120", "--json",
        "--socket", str(world.work / "ctl.sock"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        print(f"  drain: exit {proc.returncode}: {out.decode(errors='replace')[-400:]}")
    return proc.returncode == 0


# ---- the verdict --------------------------------------------------------------------------------


def _report(world: World, elapsed: float, drained: bool, stop_rc: int) -> int:
    backend = world.backend
    rows: list[tuple[str, bool, str]] = []
    received: dict[tuple[bytes | None, int], set[uuid.UUID]] = defaultdict(set)
    ids: dict[uuid.UUID, set[tuple[bytes | None, int]]] = defaultdict(set)
    copies = Counter[tuple[bytes | None, int]]()
    for epoch, seq, eid in backend.copies:
        received[(epoch, seq)].add(eid)
        ids[eid].add((epoch, seq))
        copies[(epoch, seq)] += 1

    # 1. every committed event delivered
    missing = [k for k in world.acked if k not in received]
    kills = world.chaos.broker_kills
    broker_lost = [
        k for k in missing if any(world.acked[k][1] <= t <= world.acked[k][1] + 5.0 for t in kills)
    ]
    lost = [k for k in missing if k not in broker_lost]
    rows.append(
        (
            "every committed event delivered",
            drained and not lost,
            f"outbox {'empty' if drained else 'NOT drained'} at the end; "
            f"{len(world.acked)} envelopes acknowledged by the broker, {len(lost)} never received"
            + (f" ({len(broker_lost)} lost by the broker's own kill -9)" if broker_lost else ""),
        )
    )
    # 2. seq contiguous per epoch, no reuse, no re-issue
    by_epoch: dict[bytes | None, list[int]] = defaultdict(list)
    for epoch, seq in received:
        by_epoch[epoch].append(seq)
    holes = 0
    spans: list[str] = []
    excused = set(broker_lost)
    for epoch, seqs in by_epoch.items():
        seqs.sort()
        present = set(seqs)
        holes += sum(
            1
            for s in range(seqs[0], seqs[-1] + 1)
            if s not in present and (epoch, s) not in excused
        )
        spans.append(
            f"{epoch.hex()[:8] if isinstance(epoch, bytes) else epoch}: {seqs[0]}..{seqs[-1]}"
        )
    reused = [k for k, v in received.items() if len(v) > 1]
    reissued = [e for e, v in ids.items() if len(v) > 1]
    rows.append(
        (
            "seq contiguous per epoch",
            holes == 0,
            f"{len(by_epoch)} epoch(s) ({', '.join(spans)}), {holes} hole(s)",
        )
    )
    rows.append(
        (
            "no seq reused, no event re-issued",
            not reused and not reissued,
            f"{len(reused)} (epoch, seq) with two event ids, {len(reissued)} ids under two seqs",
        )
    )
    # 3. duplicates within the window
    dups = sum(n - 1 for n in copies.values())
    connections = max(1, world.tap.connections)
    bound = INFLIGHT_WINDOW * (connections + len(kills) + 1)
    rows.append(
        (
            "duplicates within the in-flight window",
            dups <= bound,
            f"{dups} duplicate copies over {connections} agent connection(s) and "
            f"{len(kills)} broker restart(s) (bound {bound})",
        )
    )
    # 4. no false check-out
    events = backend.log.events
    neighbour_epcs = {n.epc for n in world.scenario.neighbours}
    out_reports: Counter[str] = Counter(
        str(e["epc"]) for e in events if e.get("type") in ITEM_OUT and "epc" in e
    )
    back_reports: Counter[str] = Counter(
        str(e["epc"]) for e in events if e.get("type") == "item.returned" and "epc" in e
    )
    neighbour_events = [e for e in events if e.get("epc") in neighbour_epcs]
    false_out = {e: n for e, n in out_reports.items() if n > world.removals.get(e, 0)}
    false_back = {e: n for e, n in back_reports.items() if n > world.comebacks.get(e, 0)}
    exact = [r for r in world.rounds if not r["disturbed"]]
    wrong = [r for r in exact if r["problems"]]
    rows.append(
        (
            "no false check-out",
            not false_out and not false_back and not neighbour_events and not wrong,
            f"{len(world.rounds)} rounds: {len(exact)} undisturbed (exact: {len(wrong)} differ), "
            f"{len(world.rounds) - len(exact)} disturbed; reports beyond physical moves: "
            f"{len(false_out)} out, {len(false_back)} back; {len(neighbour_events)} neighbour events",
        )
    )
    # 5. no restart loop: the watchdog never starved while an agent ran
    worst = 0.0
    starved: list[str] = []
    for run in world.agent.runs:
        if run.ready is None:
            continue
        end = run.stopping or run.ended or time.monotonic()
        marks = [run.ready, *[p for p in run.pings if p >= run.ready], end]
        gap = max((b - a for a, b in itertools.pairwise(marks)), default=0.0)
        worst = max(worst, gap)
        if gap > WATCHDOG_S:
            starved.append(f"pid {run.pid}: {gap:.1f} s")
    runs = len(world.agent.runs)
    rows.append(
        (
            "no restart loop (watchdog never starved)",
            not starved and stop_rc == 0,
            f"{runs} agent run(s), longest gap between pings {worst:.1f} s "
            f"(timeout {WATCHDOG_S:g} s); final SIGTERM exit {stop_rc}"
            + (f"; starved: {starved[:3]}" if starved else ""),
        )
    )
    hwm = max((r.hwm_kib for r in world.agent.runs), default=0)
    unique = len(ids)
    chaos = ", ".join(f"{k} ×{v}" for k, v in sorted(world.chaos.done.items())) or "none"
    ok = all(passed for _, passed, _ in rows)
    print()
    print(
        f"field soak: {elapsed:.0f} s, seed {world.opts.seed}, "
        f"synchronous {world.opts.synchronous}, registry {'off' if world.opts.no_registry else 'on'}"
    )
    print(f"chaos: {chaos}")
    print()
    print("| invariant | result | detail |")
    print("|---|---|---|")
    for name, passed, detail in rows:
        print(f"| {name} | {'PASS' if passed else 'FAIL'} | {detail} |")
    print(f"| peak RSS | | {hwm / 1024:.1f} MiB (VmHWM, largest of {runs} runs) |")
    print(f"| events/s | | {unique / elapsed:.2f} ({unique} events in {elapsed:.0f} s) |")
    if not ok:
        for r in world.rounds:
            if r["problems"] and not r["disturbed"]:
                print(f"round {r['round']} differs:\n  " + "\n  ".join(r["problems"][:10]))
        if false_out or false_back:
            print(f"false reports: out {false_out}, back {false_back}")
        print(f"agent log: {world.agent.log}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long (default 10 min)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--chaos-min", type=float, default=4.0, help="shortest pause between actions"
    )
    parser.add_argument("--chaos-max", type=float, default=12.0, help="longest pause")
    parser.add_argument("--storm", type=float, default=60.0, help="seconds of chaos ...")
    parser.add_argument(
        "--min-actions",
        type=int,
        default=0,
        help="go on past --seconds until this many chaos actions",
    )
    parser.add_argument("--calm", type=float, default=30.0, help="... then this long without")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="NORMAL")
    parser.add_argument("--no-registry", action="store_true", help="no asset registry installed")
    parser.add_argument("--disk-mib", type=int, default=96, help="size of the state disk (tmpfs)")
    parser.add_argument("--workdir", help="keep everything here (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the state files")
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("field soak: needs root (tmpfs and FUSE mounts)", file=sys.stderr)
        return 77
    try:
        return asyncio.run(soak(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("field soak: interrupted (everything it started is stopped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
