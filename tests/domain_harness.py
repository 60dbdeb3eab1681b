"""A simulated cabinet around the pure engine: fake clock, tags in drawers, readers that read them.

Readers behave like the real ones: while a scan runs, every 100 ms of simulated time each healthy
reader reports the tags its connected antennas see (each with probability ``read_p``, seeded).
As the drivers do, a healthy reader reports ``INVENTORYING`` once a ``StartScan`` took effect
and ``ONLINE`` after a ``StopScan`` (``hold_start``: the start has not reached the readers yet;
``hold_stop``: the readers have not confirmed the stop yet, so the engine still hears them say
``INVENTORYING``);
as the runner does, the engine is told ``on_scan_started`` once the start was carried out, and
reads for this cabinet flow only from then (``shared``: the readers also serve another cabinet
that keeps them inventorying, so only this cabinet's start routes its reads; as
``drivers/shared.py`` does, that start restarts a reader the other cabinet keeps reading: ONLINE,
held like any stop by ``hold_stop``, then INVENTORYING).
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from agent.domain import events as ev
from agent.domain.access import AllowList
from agent.domain.assets import AssetRegistry
from agent.domain.config import CabinetDomainConfig
from agent.domain.engine import (
    CabinetEngine,
    Command,
    EngineOutput,
    Phase,
    StartScan,
    StopScan,
)
from agent.domain.ids import Uuid7Generator
from agent.domain.inventory import Baseline
from agent.domain.now import Now
from drivers.types import BadgeRead, DoorEdge, DoorState, ReaderHealth, ReaderState, TagRead

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
MONO0 = 1000.0
STEP_S = 0.1


def pseudonym(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()[:16]
    return "p1.k1." + base64.b32encode(digest).decode().rstrip("=").lower()


ALICE = pseudonym("alice")
BOB = pseudonym("bob")
SUPER = pseudonym("supervisor")
AUDITOR = pseudonym("auditor")
MALLORY = pseudonym("mallory")
NAMES = {ALICE: "alice", BOB: "bob", SUPER: "super", AUDITOR: "auditor", MALLORY: "mallory"}

DRAWERS = {"top": ["dock-1:1", "dock-1:2"], "bottom": ["dock-1:3"], "side": ["dock-2:1"]}
DRAWER_ANTENNA = {"top": ("dock-1", 1), "bottom": ("dock-1", 3), "side": ("dock-2", 1)}
READER_PORTS = {"dock-1": frozenset({1, 2, 3}), "dock-2": frozenset({1})}


def domain_config(**overrides: Any) -> CabinetDomainConfig:
    base: dict[str, Any] = {
        "drawers": DRAWERS,
        "min_reads": 2,
        "rssi_floor_dbm": -70.0,
        "stable_ms": 1000,
        "scan_min_ms": 2000,
        "scan_max_ms": 10_000,
        "confirm_pass": True,
        "max_rescans": 2,
        "unlock_pulse_s": 5.0,
        "relock_after_s": 10.0,
        "left_open_s": 60.0,
        "lockout_denials": 3,
        "lockout_window_s": 60.0,
        "lockout_duration_s": 120.0,
        "background_period_s": 0,
        # Every outage reported at once: these tests follow outages event by event (the
        # debounce and flapping have their own tests, tests/test_domain_reader_events.py).
        "reader_offline_debounce_s": 0,
    }
    base.update(overrides)
    return CabinetDomainConfig.model_validate(base)


def allow_list(expires_at: datetime | None = None, version: int = 1) -> AllowList:
    body = {
        "entries": {
            ALICE: ["user"],
            BOB: ["user"],
            SUPER: ["supervisor"],
            AUDITOR: ["auditor"],
        }
    }
    return AllowList.from_body(version, expires_at or T0 + timedelta(days=30), body)


def epc(i: int) -> str:
    return f"e280{i:020x}"


@dataclass
class Tag:
    drawer: str
    rssi: float = -50.0
    # None: answers every round (with the cabinet's read_p); else whether it answers at a tick
    answers: Callable[[int], bool] | None = None
    # None: read by its drawer's antenna; else the (reader, antenna) that reads it at a tick
    # (a tag at the edge of two readers' fields)
    antenna: Callable[[int], tuple[str, int]] | None = None


@dataclass
class ReaderSim:
    state: ReaderState = ReaderState.ONLINE  # connected, idle: a StartScan makes it read
    session: int = 1
    antennas: frozenset[int] | None = None
    dead: set[int] = field(default_factory=set)  # unplugged, and the reader cannot tell

    @property
    def healthy(self) -> bool:
        return self.state in (ReaderState.ONLINE, ReaderState.INVENTORYING)


@dataclass
class Cabinet:
    """Drives an engine through whole door cycles; records every output."""

    config: CabinetDomainConfig = field(default_factory=domain_config)
    tags: dict[str, Tag] = field(default_factory=dict)
    read_p: float = 1.0
    seed: int = 1
    assets: AssetRegistry | None = None
    al: AllowList | None = field(default_factory=allow_list)
    engine: CabinetEngine = field(init=False)
    now: Now = field(default_factory=lambda: Now(T0, MONO0))
    events: list[ev.Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)
    readers: dict[str, ReaderSim] = field(default_factory=dict)
    scanning: bool = False
    # A StartScan does not reach the readers until ``start_readers()`` (a slow commit before
    # the command, a starved loop, a reader slow to start).
    hold_start: bool = False
    # A StopScan's effect (each reader's ONLINE) does not reach the engine until
    # ``stop_readers()``: a door cycle quicker than the readers' stop (the driver says ONLINE only
    # once it has handled what the reader sent after the stop; the reads on the wire come first).
    hold_stop: bool = False
    stop_pending: bool = False
    shared: bool = False  # the readers inventory for another cabinet too: no StopScan stops them
    # ... and this cabinet's start restarts a reader that already reads for the other one
    # (drivers/shared.py); False: it joins the running read cycle (as before that restart).
    restart_shared: bool = True
    # The readers stamp their reads with their own clock (``TagRead.reader_clock``): the wall
    # time of the tick they read in, plus ``clock_skew`` for that reader (a wrong or jumping
    # clock). False: reads carry no reader time, as from a reader without timestamps.
    reader_clock: bool = False
    clock_skew: dict[str, timedelta] = field(default_factory=dict)
    started: bool = False  # this cabinet's StartScan was carried out: its reads flow
    scan_steps: int = 0
    ticks: int = 0  # 100 ms steps since T0: exact times, no float drift
    t0: datetime = T0  # the wall time at tick 0
    timezone: tzinfo | None = None  # the site's zone (None: the engine's default, UTC)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now = Now(self.t0 + timedelta(milliseconds=100 * self.ticks), self.now.mono)
        self.engine = CabinetEngine(
            self.config,
            site_id="hangar-3",
            cabinet_id="crib-07",
            now=self.now,
            baseline=Baseline({e: t.drawer for e, t in self.tags.items()}),
            allow_list=self.al,
            assets=self.assets,
            ids=Uuid7Generator(random.Random(self.seed).randbytes),
            timezone=self.timezone,
        )
        self.readers = {r: ReaderSim(antennas=ports) for r, ports in READER_PORTS.items()}
        self._apply(self.engine.start(self.now))
        for rid in sorted(self.readers):
            self._apply(self.engine.on_health(self._health(rid), self.now))

    # ---- actions -------------------------------------------------------------------------

    def badge(self, who: str, reader: str = "front") -> None:
        self._apply(self.engine.on_badge(BadgeRead(reader, who, self.now.wall), self.now))

    def open(self) -> None:
        self._apply(self.engine.on_door(DoorEdge("door", DoorState.OPEN, self.now.wall), self.now))

    def close(self) -> None:
        self._apply(
            self.engine.on_door(DoorEdge("door", DoorState.CLOSED, self.now.wall), self.now)
        )

    def set_reader(
        self,
        rid: str,
        state: ReaderState,
        *,
        reconnect: bool = False,
        antennas: Iterable[int] | None = None,
    ) -> None:
        sim = self.readers[rid]
        if reconnect:
            sim.session += 1
        sim.state = state
        if antennas is not None:
            sim.antennas = frozenset(antennas)
        self._apply(self.engine.on_health(self._health(rid), self.now))

    def start_readers(self) -> None:
        """The held StartScan reaches the readers: the healthy ones start reading."""
        self.hold_start = False
        self._start()

    def stop_readers(self) -> None:
        """The held stop reaches the engine: each reader says ONLINE, and one whose scan was
        started again meanwhile starts reading again (INVENTORYING), as the drivers do."""
        self.hold_stop = self.stop_pending = False
        self._inventory(False)
        if self.started:
            self._inventory(True)

    def advance(self, seconds: float) -> None:
        """Let simulated time pass in 100 ms steps; readers report while a scan runs."""
        steps = round(seconds / STEP_S)
        for _ in range(steps):
            self._step(1)
            if self.scanning and self.started:
                self.scan_steps += 1
                reads = self._read_round()
                if reads:
                    self._apply(self.engine.on_tags(reads, self.now))
            self._apply(self.engine.tick(self.now))

    def settle(self, limit_s: float = 300.0) -> None:
        """Advance until the engine is idle with no scan running (bounded)."""
        waited = 0.0
        while self.engine.phase is not Phase.IDLE or self.scanning:
            assert waited < limit_s, f"engine stuck in {self.engine.phase}"
            self.advance(STEP_S)
            waited += STEP_S

    def alive(self) -> None:
        """Every reader says it is alive now (the runner's liveness barrier)."""
        for rid in sorted(self.readers):
            self._apply(self.engine.on_alive(rid, self.now.mono, self.now))

    def until_idle(self, limit_s: float = 60.0) -> None:
        """Advance in 100 ms steps, every reader alive at each, until the engine is idle with
        no scan running (bounded)."""
        for _ in range(round(limit_s / STEP_S)):
            self.advance(STEP_S)
            self.alive()
            if self.engine.phase is Phase.IDLE and not self.scanning:
                return
        raise AssertionError(f"engine stuck in {self.engine.phase}: {self.brief()}")

    def cycle(
        self, who: str | None, take: Iterable[str] = (), put: dict[str, str] | None = None
    ) -> None:
        """Badge (or not), open, move tags, close, wait for the verdict."""
        if who is not None:
            self.badge(who)
        self.advance(1.0)
        self.open()
        self.advance(5.0)
        for e in take:
            del self.tags[e]
        for e, drawer in (put or {}).items():
            self.tags[e] = Tag(drawer)
        self.close()
        self.settle()

    def restart(self, *, downtime_s: float = 0.0) -> None:
        """kill -9 and start again from the last persisted state."""
        state = self.states[-1] if self.states else self.engine.to_bytes()
        self._step(round(downtime_s / STEP_S))
        self.scanning = self.started = False
        self.engine = CabinetEngine.from_bytes(
            state,
            self.config,
            site_id="hangar-3",
            cabinet_id="crib-07",
            now=self.now,
            allow_list=self.al,
            assets=self.assets,
            ids=Uuid7Generator(random.Random(self.seed + 1).randbytes),
            timezone=self.timezone,
        )
        self._apply(self.engine.start(self.now))
        for rid in sorted(self.readers):
            self._apply(self.engine.on_health(self._health(rid), self.now))

    # ---- views -----------------------------------------------------------------------------

    def brief(self, start: int = 0) -> list[str]:
        return [describe(e) for e in self.events[start:]]

    def types(self, start: int = 0) -> list[str]:
        return [e.type for e in self.events[start:]]

    # ---- internals ---------------------------------------------------------------------------

    def _step(self, n: int) -> None:
        self.ticks += n
        self.now = Now(self.t0 + timedelta(milliseconds=100 * self.ticks), MONO0 + self.ticks / 10)

    def _health(self, rid: str) -> ReaderHealth:
        sim = self.readers[rid]
        return ReaderHealth(
            rid, sim.state, self.now.wall, antennas_connected=sim.antennas, session=sim.session
        )

    def _read_round(self) -> list[TagRead]:
        reads = []
        for e, tag in self.tags.items():
            rid, ant = (
                DRAWER_ANTENNA[tag.drawer] if tag.antenna is None else tag.antenna(self.ticks)
            )
            sim = self.readers[rid]
            if sim.state is not ReaderState.INVENTORYING:
                continue
            if sim.antennas is not None and ant not in sim.antennas:
                continue
            if ant in sim.dead:
                continue
            if tag.answers is not None and not tag.answers(self.ticks):
                continue
            if self.read_p < 1.0 and self.rng.random() >= self.read_p:
                continue
            if self.reader_clock:
                at = self.now.wall + self.clock_skew.get(rid, timedelta(0))
                reads.append(TagRead(rid, e, ant, tag.rssi, at, reader_clock=True))
            else:
                reads.append(TagRead(rid, e, ant, tag.rssi, self.now.wall))
        return reads

    def _apply(self, out: EngineOutput) -> None:
        self.events.extend(out.events)
        self.commands.extend(out.commands)
        if out.baseline is not None:
            self.baselines.append(out.baseline)
        if out.session_state is not None:
            self.states.append(out.session_state)
        for cmd in out.commands:
            if isinstance(cmd, StartScan):
                self.scanning = True
                if not self.hold_start:
                    self._start()
            elif isinstance(cmd, StopScan):
                self.scanning = self.started = False
                if self.hold_stop:
                    self.stop_pending = True
                elif not self.shared:
                    self._inventory(False)

    def _start(self) -> None:
        """The StartScan is carried out: the readers start, and the engine is told. A shared
        reader already reading for the other cabinet is restarted (stopped, then started)."""
        self.started = True
        reading = any(s.state is ReaderState.INVENTORYING for s in self.readers.values())
        if self.shared and self.restart_shared and reading:
            if self.hold_stop:
                self.stop_pending = True  # the stop's ONLINE, then INVENTORYING, come later
            else:
                self._inventory(False)
        self._inventory(True)
        self._apply(self.engine.on_scan_started(self.now))

    def _inventory(self, on: bool) -> None:
        """Healthy readers start (or stop) reading and say so, as the drivers do."""
        want = ReaderState.INVENTORYING if on else ReaderState.ONLINE
        for rid, sim in sorted(self.readers.items()):
            if sim.healthy and sim.state is not want:
                sim.state = want
                self._apply(self.engine.on_health(self._health(rid), self.now))


def describe(e: ev.Event) -> str:
    """A short, stable line per event for exact-list assertions."""
    d = e.model_dump()
    who = ""
    if d.get("actors") is not None:
        who = " " + ",".join(NAMES.get(a, a) for a in d["actors"])
    elif d.get("actor"):
        who = " " + NAMES.get(d["actor"], d["actor"])
    match e.type:
        case "item.checked_out" | "item.returned" | "item.missing":
            return f"{e.type} {d['epc'][-3:]} {d['drawer']}{who}"
        case "item.unknown":
            return f"{e.type} {d['epc'][-3:]} {d['drawer']}"
        case "item.counterfeit":
            return f"{e.type} {d['epc'][-3:]} {d['drawer']} tid={d['tid'][-4:]}{who}"
        case "item.misplaced":
            return f"{e.type} {d['epc'][-3:]} {d['drawer']}≠{d['home_drawer']}"
        case "item.calibration_overdue":
            return f"{e.type} {d['epc'][-3:]} {d['calibration_due']}{who}"
        case "session.opened":
            return f"{e.type} {d['trigger']}{who}"
        case "session.closed":
            return f"{e.type} {d['quality']} out={d['checked_out']} in={d['returned']}{who}"
        case "access.denied":
            return f"{e.type} {d['reason']}{who}"
        case "access.lockout":
            return f"{e.type} {d['state']}{who}"
        case "door.left_open":
            return f"{e.type} #{d['alert']}{who}"
        case "inventory.incomplete":
            retry = "retry" if d["will_retry"] else "give-up"
            return f"{e.type} {d['purpose']} #{d['attempt']} {retry} {';'.join(d['reasons'])}"
        case "inventory.snapshot":
            return f"{e.type} {d['tags']}"
        case "inventory.suspect":
            return f"{e.type} {d['purpose']} {d['drawer']} held={d['held']}"
        case "reader.offline" | "reader.online":
            return f"{e.type} {d['reader_id']}"
        case "reader.flapping":
            return f"{e.type} {d['reader_id']} {d['state']} {d['outages']}"
        case _:
            return f"{e.type}{who}"
