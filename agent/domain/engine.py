"""The cabinet engine: a deterministic state machine from driver values and time to events and commands.

Pure: no I/O, no clock reads. Every input carries ``now`` (:class:`~agent.domain.now.Now`); the
caller commits ``EngineOutput.events`` together with ``EngineOutput.baseline`` (when set) and
``EngineOutput.session_state`` (when set) in one transaction, then executes the commands.

Door cycle::

    idle ──valid badge──► unlocked ──door opens──► open ──door closes──► scanning (settle pass)
      ▲                      │ not opened in T: Relock                        │ missing items?
      │                      ▼                                                ▼
      └──────────────── idle ◄── diff, events, StopScan ◄──────────── confirming (second pass)

A door opened while not unlocked is forced (actor ``"unknown"``). A pass ends when no new EPC
has shown up for ``stable_ms`` (between ``scan_min_ms`` and ``scan_max_ms``). An incomplete pass
(a reader or antenna unhealthy, a reconnect) never yields check-outs: ``inventory.incomplete``
and a rescan, at most ``max_rescans`` times, then ``session.closed`` (incomplete) with the
baseline unchanged.
"""

from __future__ import annotations

import enum
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias, cast
from uuid import UUID

from agent.domain import events as ev
from agent.domain.access import AccessControl, AllowList, LockoutChange
from agent.domain.assets import AssetRegistry
from agent.domain.config import Antenna, CabinetDomainConfig
from agent.domain.ids import Uuid7Generator
from agent.domain.inventory import Baseline, ScanAccumulator, ScanResult, diff
from agent.domain.now import Now
from drivers.types import BadgeRead, DoorEdge, DoorState, ReaderHealth, ReaderState, TagRead

STATE_VERSION = 1


# ---- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unlock:
    """Release the lock for ``pulse_s`` seconds."""

    pulse_s: float


@dataclass(frozen=True, slots=True)
class Relock:
    """Engage the lock now (idempotent)."""


@dataclass(frozen=True, slots=True)
class StartScan:
    """Start (or keep) inventorying on every reader (idempotent)."""


@dataclass(frozen=True, slots=True)
class StopScan:
    """Stop inventorying."""


Command: TypeAlias = Unlock | Relock | StartScan | StopScan


@dataclass
class EngineOutput:
    """What one input produced. Commit events + baseline + session_state atomically."""

    events: list[ev.Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    baseline: Baseline | None = None  # set when a cycle completed: the new trusted contents
    session_state: bytes | None = None  # set when the resumable state changed


class Phase(enum.StrEnum):
    IDLE = "idle"
    UNLOCKED = "unlocked"
    OPEN = "open"
    SCANNING = "scanning"  # settle pass after the door closed
    CONFIRMING = "confirming"  # second pass to confirm missing items
    BACKGROUND = "background"  # periodic idle inventory
    BACKGROUND_CONFIRM = "background_confirm"


_SESSION_SCANS = (Phase.SCANNING, Phase.CONFIRMING)
_BACKGROUND_SCANS = (Phase.BACKGROUND, Phase.BACKGROUND_CONFIRM)
_OFFLINE_STATES = (ReaderState.OFFLINE, ReaderState.STOPPED, ReaderState.FAILED)
# An unverified baseline with no periodic background inventory: the verification pass is
# retried this often (and at once when a reader comes back).
_UNVERIFIED_RETRY_S = 3600.0


@dataclass
class _Session:
    session_id: UUID
    actors: list[str]
    opened_wall: datetime
    elapsed_base: float  # seconds elapsed before ``since_mono`` (survives a restart)
    since_mono: float
    door_opened_mono: float = 0.0
    left_open_alerts: int = 0
    door_closed_mono: float = 0.0
    unlocked_after_close: bool = False  # a holder badged during the scan
    passes: int = 0
    scan_ms: int = 0
    attempts: int = 0  # failed (incomplete) passes in this closing

    def elapsed(self, now: Now) -> float:
        return self.elapsed_base + max(0.0, now.mono - self.since_mono)

    def add_actor(self, actor: str) -> bool:
        if actor in self.actors:
            return False
        self.actors.append(actor)
        return True


@dataclass
class _ReaderWatch:
    """What the engine tracks to report a reader's outages without flooding the outbox."""

    down_since: float | None = None  # monotonic start of the current outage; None: not down
    detail: str = ""  # the latest reason of the current outage
    connection: int = 0
    outages: deque[float] = field(default_factory=deque)  # outage starts within the flap window
    short: int = 0  # outages shorter than the debounce, not reported yet
    healthy_since: float | None = None
    flapping_since: float | None = None  # monotonic; None: not flapping
    flap_outages: int = 0  # outages since the episode began


@dataclass(frozen=True)
class _Verdict:
    base: Mapping[str, str]  # the baseline the pass is compared with (registered tags only)
    inventory: dict[str, str]  # what the cabinet holds: the next baseline
    unknown: dict[str, str]  # steady unregistered tags not reported yet (item.unknown)
    arrivals: bool  # steady tags new to the cabinet: confirm before trusting them
    suspect: dict[str, list[str]]  # blind drawers → the tags held there
    vanished: dict[str, str]  # held tags gone once their drawer reads again → item.missing


class EngineStateError(ValueError):
    """Serialized engine state is unreadable (wrong version, malformed)."""


class CabinetEngine:
    """One cabinet's door, lock, access and inventory logic."""

    def __init__(
        self,
        config: CabinetDomainConfig,
        *,
        site_id: str,
        cabinet_id: str,
        now: Now,
        readers: Mapping[str, Sequence[int]] | None = None,
        baseline: Baseline | None = None,
        allow_list: AllowList | None = None,
        assets: AssetRegistry | None = None,
        ids: Uuid7Generator | None = None,
    ) -> None:
        self._config = config
        self.site_id = site_id
        self.cabinet_id = cabinet_id
        self.antennas: dict[Antenna, str] = config.antenna_map(readers)
        ports: dict[str, set[int]] = {}
        for reader, port in self.antennas:
            ports.setdefault(reader, set()).add(port)
        self._ports = {r: frozenset(p) for r, p in sorted(ports.items())}
        self.baseline = baseline if baseline is not None else Baseline()
        self.access = AccessControl(config, allow_list)
        self.assets = assets
        self._ids = ids if ids is not None else Uuid7Generator()
        self.health: dict[str, ReaderHealth] = {}
        self.phase = Phase.IDLE
        self.door_open = False
        self._offline: set[str] = set()  # readers whose reader.offline was published
        self._watch: dict[str, _ReaderWatch] = {}
        self._session: _Session | None = None
        self._pending: list[str] = []  # holders badged in, door not yet opened
        self._unlock_deadline = 0.0
        self._scan: ScanAccumulator | None = None
        self._waiting = False  # the pass waits for every reader to be healthy before it counts
        self._alive: dict[str, float] = {}  # reader → monotonic time it was last heard from
        self._end_candidate: float | None = None  # when the pass first met its end conditions
        self._first_pass: ScanResult | None = None
        self._bg_attempts = 0
        self._bg_next = now.mono + config.background_period_s
        # An incomplete session left the baseline unverified: inventory as soon as readers allow.
        self._verify = False
        # The baseline may be stale (the store recovered from damage): until a complete pass
        # re-establishes it, differences are reported without blaming anyone (item.missing).
        self._stale = False
        self._unknown: dict[str, str] = {}  # unregistered tags reported and still present
        self._held: dict[str, list[str]] = {}  # blind drawers → tags held there (not judged)
        self._last = now
        self._dirty = True
        self._started = False

    @property
    def config(self) -> CabinetDomainConfig:
        """The domain config; assigning it (SIGHUP) also reaches access control."""
        return self._config

    @config.setter
    def config(self, config: CabinetDomainConfig) -> None:
        self._config = config
        self.access.config = config

    # ---- inputs ----------------------------------------------------------------------------

    def start(self, now: Now) -> EngineOutput:
        """First call after construction or ``from_bytes``: resumes an interrupted scan."""
        out = self._begin(now)
        if self._started:
            return self._end(out)
        self._started = True
        if self.phase not in (Phase.OPEN, Phase.UNLOCKED):
            # Whatever the lock did while we were down, it must be locked now.
            out.commands.insert(0, Relock())
        if self._scan is None and self.phase in _SESSION_SCANS:
            # The passes of an interrupted scan are lost with the process: rescan from scratch.
            self._start_pass(Phase.SCANNING, now, out, first=True)
        elif self._scan is None and self.phase in _BACKGROUND_SCANS:
            self._start_pass(Phase.BACKGROUND, now, out, first=True)
        return self._end(out)

    def distrust_baseline(self, now: Now) -> None:
        """The baseline cannot be proven current (the store was recovered from damage and may
        have lost cycles): inventory as soon as the readers allow, and until a complete pass
        has re-established it, attribute no difference to whoever opens the door."""
        self._stale = True
        self._verify = True
        if self.phase is Phase.IDLE:
            self._bg_next = min(self._bg_next, now.mono)
        self._dirty = True

    @property
    def baseline_trusted(self) -> bool:
        return not self._stale

    def tick(self, now: Now) -> EngineOutput:
        """Time passed: timers, scan settle, background inventory."""
        return self._end(self._begin(now))

    def on_alive(self, reader_id: str, heard_mono: float, now: Now) -> EngineOutput:
        """The reader was heard from at monotonic ``heard_mono`` (any frame, keepalives too).

        Evidence a reader is not silently dead: once a reader has reported liveness, a scan
        pass only ends after every such reader was heard from *after* the pass met its end
        conditions; a reader that stays silent until ``scan_max_ms`` makes the pass incomplete.
        Without this, a reader whose socket stays open but which sends nothing looks exactly
        like an empty drawer until its read watchdog fires.
        """
        if heard_mono > self._alive.get(reader_id, float("-inf")):
            self._alive[reader_id] = heard_mono
        return self._end(self._begin(now))

    def on_tags(self, reads: Sequence[TagRead], now: Now) -> EngineOutput:
        """Tag reads from any reader; counted only while a scan pass runs."""
        out = self._begin(now)
        if self._scan is not None:
            self._scan.add(reads, now.mono)
        return self._end(out)

    def on_health(self, health: ReaderHealth, now: Now) -> EngineOutput:
        """A reader's health changed."""
        out = self._begin(now)
        rid = health.reader_id
        self.health[rid] = health
        self._reader_health(health, now, out)
        if self._verify and self.phase is Phase.IDLE and self._readers_ready():
            self._bg_next = min(self._bg_next, now.mono)
        if self._scan is not None:
            self._scan.health(health)
            if self._waiting and self._readers_ready():
                # Start counting only now: a pass begun with a reader down could never be complete.
                self._waiting = False
                self._scan = ScanAccumulator(self.config, self.antennas, self.health, now.mono)
        return self._end(out)

    def on_badge(self, badge: BadgeRead, now: Now) -> EngineOutput:
        """A (pseudonymized) badge was presented."""
        out = self._begin(now)
        actor = badge.pseudonym
        if not _PSEUDONYM_RE.fullmatch(actor):
            # Not a pseudonym (a driver bug, maybe a raw id): it must never reach an event.
            actor = ev.UNKNOWN_ACTOR
        outcome = self.access.badge(badge.reader_id, actor, now)
        if not outcome.granted:
            assert outcome.reason is not None
            out.events.append(
                self._event(
                    ev.AccessDenied,
                    now,
                    actor=actor,
                    badge_reader=badge.reader_id,
                    reason=outcome.reason,
                )
            )
            if outcome.lockout is not None:
                self._lockout_event(outcome.lockout, now, out)
            return self._end(out)
        if outcome.lockout is not None:
            self._lockout_event(outcome.lockout, now, out)
        if outcome.grace is not None:
            grace = outcome.grace
            out.events.append(
                self._event(
                    ev.AccessGraceGranted,
                    now,
                    actor=actor,
                    badge_reader=badge.reader_id,
                    roles=sorted(str(r) for r in grace.roles),
                    allow_list_version=grace.allow_list_version,
                    expired_at=grace.expired_at,
                    grace_until=grace.grace_until,
                )
            )
        phase = self.phase
        if phase in (Phase.IDLE, *_BACKGROUND_SCANS):
            if phase is not Phase.IDLE:
                self._abort_background(out)
            self._pending = [actor]
            self._unlock(now, out, enter=True)
        elif phase is Phase.UNLOCKED:
            if actor not in self._pending:
                self._pending.append(actor)
            self._unlock(now, out, enter=True)
        else:
            session = self._session
            assert session is not None
            if session.add_actor(actor):
                self._dirty = True
            if phase in _SESSION_SCANS:
                # A holder badging during the scan wants the door again.
                session.unlocked_after_close = True
                self._dirty = True
                self._unlock(now, out, enter=False)
        return self._end(out)

    def on_door(self, edge: DoorEdge, now: Now) -> EngineOutput:
        """The door opened or closed."""
        out = self._begin(now)
        if edge.state is DoorState.OPEN:
            self._door_opened(now, out)
        else:
            self._door_closed(now, out)
        return self._end(out)

    def set_allow_list(self, allow_list: AllowList | None) -> None:
        """Install a newly verified allow-list."""
        self.access.allow_list = allow_list

    def set_assets(self, assets: AssetRegistry | None) -> None:
        """Install a newly verified asset registry."""
        self.assets = assets

    # ---- resume ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The state needed to resume after a crash (pseudonyms only; timers as remaining time)."""
        at = self._last.mono
        s = self._session
        state: dict[str, Any] = {
            "v": STATE_VERSION,
            "saved_at": self._last.wall.isoformat(),
            "phase": self.phase.value,
            "door_open": self.door_open,
            "pending": list(self._pending),
            "unlock_remaining_s": max(0.0, self._unlock_deadline - at),
            "bg_remaining_s": max(0.0, self._bg_next - at),
            "offline": sorted(self._offline),
            "readers": {
                r: {
                    "down_s": None if w.down_since is None else max(0.0, at - w.down_since),
                    "short": w.short,
                    "flapping": None if w.flapping_since is None else w.flap_outages,
                }
                for r, w in sorted(self._watch.items())
                if w.down_since is not None or w.short or w.flapping_since is not None
            },
            "verify": self._verify,
            "stale": self._stale,
            "access": self.access.snapshot(at),
            "baseline": self.baseline.to_dict(),
            "unknown": dict(sorted(self._unknown.items())),
            "held": dict(sorted(self._held.items())),
            "session": None
            if s is None
            else {
                "id": str(s.session_id),
                "actors": list(s.actors),
                "opened": s.opened_wall.isoformat(),
                "elapsed_s": s.elapsed(self._last),
                "door_open_s": max(0.0, at - s.door_opened_mono),
                "left_open_alerts": s.left_open_alerts,
                "door_closed_s": max(0.0, at - s.door_closed_mono),
                "unlocked_after_close": s.unlocked_after_close,
                "passes": s.passes,
                "scan_ms": s.scan_ms,
                "attempts": s.attempts,
            },
        }
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        config: CabinetDomainConfig,
        *,
        site_id: str,
        cabinet_id: str,
        now: Now,
        readers: Mapping[str, Sequence[int]] | None = None,
        allow_list: AllowList | None = None,
        assets: AssetRegistry | None = None,
        ids: Uuid7Generator | None = None,
    ) -> CabinetEngine:
        """Rebuild an engine from ``to_bytes``; call ``start(now)`` next. Raises EngineStateError."""
        try:
            state = json.loads(data)
            if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
                raise EngineStateError(f"engine state is not version {STATE_VERSION}")
            engine = cls(
                config,
                site_id=site_id,
                cabinet_id=cabinet_id,
                now=now,
                readers=readers,
                baseline=Baseline.from_dict(state["baseline"]),
                allow_list=allow_list,
                assets=assets,
                ids=ids,
            )
            # Timers were saved as "remaining at saved_at": re-base them on the instant the
            # state was saved, so time spent since (staleness, downtime) counts against them.
            down = _downtime(datetime.fromisoformat(state["saved_at"]), now.wall)
            base = Now(now.wall, now.mono - down, now.trusted, now.proven)
            engine.phase = Phase(state["phase"])
            engine.door_open = bool(state["door_open"])
            engine._pending = [_actor(a) for a in state["pending"]]
            engine._unlock_deadline = base.mono + float(state["unlock_remaining_s"])
            engine._bg_next = base.mono + float(state["bg_remaining_s"])
            engine._offline = {str(r) for r in state["offline"]}
            # Outages and flapping episodes outlive a restart (their events are still owed);
            # a window of calm starts over. Optional: states written before it lack the key.
            for rid, r in dict(state.get("readers") or {}).items():
                down, flaps = r["down_s"], r["flapping"]
                engine._watch[str(rid)] = _ReaderWatch(
                    down_since=None if down is None else base.mono - float(down),
                    short=int(r["short"]),
                    flapping_since=None if flaps is None else base.mono,
                    flap_outages=0 if flaps is None else int(flaps),
                )
            engine._verify = bool(state["verify"])
            engine._stale = bool(state.get("stale", False))  # absent in older states
            engine._unknown = dict(Baseline.from_dict(state.get("unknown") or {}))
            held = Baseline.from_dict(
                {str(e): str(d) for d, es in dict(state.get("held") or {}).items() for e in es}
            )
            for epc, drawer in held.items():
                engine._held.setdefault(drawer, []).append(epc)
            engine.access.restore(state["access"], base)
            s = state["session"]
            if s is not None:
                engine._session = _Session(
                    session_id=UUID(s["id"]),
                    actors=[_actor(a) for a in s["actors"]],
                    opened_wall=datetime.fromisoformat(s["opened"]),
                    elapsed_base=float(s["elapsed_s"]),
                    since_mono=base.mono,
                    door_opened_mono=base.mono - float(s["door_open_s"]),
                    left_open_alerts=int(s["left_open_alerts"]),
                    door_closed_mono=base.mono - float(s["door_closed_s"]),
                    unlocked_after_close=bool(s["unlocked_after_close"]),
                    passes=int(s["passes"]),
                    scan_ms=int(s["scan_ms"]),
                    attempts=int(s["attempts"]),
                )
        except EngineStateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise EngineStateError(f"engine state is malformed ({type(err).__name__})") from None
        needs_session = engine.phase in (Phase.OPEN, *_SESSION_SCANS)
        if needs_session != (engine._session is not None):
            raise EngineStateError("engine state is inconsistent (session vs phase)")
        return engine

    # ---- door -------------------------------------------------------------------------------

    def _door_opened(self, now: Now, out: EngineOutput) -> None:
        if self.door_open:
            return
        self.door_open = True
        self._dirty = True
        phase = self.phase
        if phase in _SESSION_SCANS:
            # Reopened before the scan finished: the same session goes on. The lock engaged at
            # close, so unless a holder badged (or the door bounced), this opening was forced.
            session = self._session
            assert session is not None
            self._stop_pass(out)
            session.door_opened_mono = now.mono
            session.left_open_alerts = 0
            self.phase = Phase.OPEN
            grace = self.config.reopen_grace_s
            if not session.unlocked_after_close and now.mono - session.door_closed_mono > grace:
                session.add_actor(ev.UNKNOWN_ACTOR)
                out.events.append(
                    self._event(
                        ev.DoorForced,
                        now,
                        session_id=session.session_id,
                        door_id=self.config.door_id,
                    )
                )
            return
        if phase in _BACKGROUND_SCANS:
            self._abort_background(out)
            phase = Phase.IDLE
        if phase is Phase.UNLOCKED:
            actors, trigger = list(self._pending), "badge"
        else:
            actors, trigger = [ev.UNKNOWN_ACTOR], "forced"
        self._pending = []
        session_id = self._ids(now.wall)
        self._session = _Session(
            session_id=session_id,
            actors=actors,
            opened_wall=now.wall,
            elapsed_base=0.0,
            since_mono=now.mono,
            door_opened_mono=now.mono,
        )
        self.phase = Phase.OPEN
        if trigger == "forced":
            out.events.append(
                self._event(ev.DoorForced, now, session_id=session_id, door_id=self.config.door_id)
            )
        out.events.append(
            self._event(
                ev.SessionOpened,
                now,
                session_id=session_id,
                actors=list(actors),
                trigger=trigger,
                door_id=self.config.door_id,
            )
        )

    def _door_closed(self, now: Now, out: EngineOutput) -> None:
        if not self.door_open:
            return
        self.door_open = False
        self._dirty = True
        if self.phase is not Phase.OPEN:
            return
        session = self._session
        assert session is not None
        session.attempts = 0
        session.door_closed_mono = now.mono
        session.unlocked_after_close = False
        out.commands.append(Relock())
        self._start_pass(Phase.SCANNING, now, out, first=True)

    def _unlock(self, now: Now, out: EngineOutput, *, enter: bool) -> None:
        out.commands.append(Unlock(self.config.unlock_pulse_s))
        self._unlock_deadline = now.mono + self.config.relock_after_s
        if enter:
            self.phase = Phase.UNLOCKED
        self._dirty = True

    # ---- time -------------------------------------------------------------------------------

    def _begin(self, now: Now) -> EngineOutput:
        """Run every timer due by ``now`` before handling the input that carries it."""
        if now.mono < self._last.mono:
            # A monotonic clock never goes back; treat it as "no time passed".
            now = Now(now.wall, self._last.mono, now.trusted, now.proven)
        self._last = now
        out = EngineOutput()
        for change in self.access.tick(now):
            self._lockout_event(change, now, out)
        self._reader_timers(now, out)
        phase = self.phase
        if phase is Phase.UNLOCKED and now.mono >= self._unlock_deadline:
            self._pending = []
            self.phase = Phase.IDLE
            self._dirty = True
            out.commands.append(Relock())
        elif phase is Phase.OPEN:
            self._left_open(now, out)
        elif self._scan is not None:
            self._maybe_end_pass(now, out)
        if (
            self.phase is Phase.IDLE
            and not self.door_open
            and (self._verify or self.config.background_period_s > 0)
            and now.mono >= self._bg_next
        ):
            self._bg_attempts = 0
            self._start_pass(Phase.BACKGROUND, now, out, first=True)
        return out

    def _end(self, out: EngineOutput) -> EngineOutput:
        if self._dirty or self.access.changed:
            out.session_state = self.to_bytes()
            self._dirty = False
            self.access.changed = False
        return out

    def _left_open(self, now: Now, out: EngineOutput) -> None:
        session = self._session
        assert session is not None
        period = self.config.left_open_s
        open_s = now.mono - session.door_opened_mono
        due = int(open_s // period)
        if due > session.left_open_alerts:
            # One alert per input even after a long silence; the count says how many periods.
            session.left_open_alerts = due
            self._dirty = True
            out.events.append(
                self._event(
                    ev.DoorLeftOpen,
                    now,
                    session_id=session.session_id,
                    door_id=self.config.door_id,
                    actors=list(session.actors),
                    open_s=round(open_s, 3),
                    alert=due,
                )
            )

    # ---- reader outages ----------------------------------------------------------------------

    def _reader_health(self, health: ReaderHealth, now: Now, out: EngineOutput) -> None:
        """Outage bookkeeping. Events only: scans read ``self.health`` directly, so a debounced
        outage still makes every pass it touched incomplete."""
        rid = health.reader_id
        w = self._watch.setdefault(rid, _ReaderWatch())
        cfg = self.config
        if health.state in _OFFLINE_STATES:
            w.detail = health.detail[:200]
            w.connection = max(0, health.session)
            if w.down_since is not None:
                return
            w.down_since = now.mono
            w.healthy_since = None
            self._dirty = True
            w.outages.append(now.mono)
            while w.outages and now.mono - w.outages[0] > cfg.reader_flap_window_s:
                w.outages.popleft()
            if w.flapping_since is not None:
                w.flap_outages += 1
            elif len(w.outages) >= cfg.reader_flap_count:
                w.flapping_since = now.mono
                w.flap_outages = len(w.outages)
                w.short = 0  # the alert's count covers them
                self._dirty = True
                out.events.append(
                    self._event(
                        ev.ReaderFlapping,
                        now,
                        reader_id=rid,
                        state="flapping",
                        outages=len(w.outages),
                        window_s=cfg.reader_flap_window_s,
                        detail=w.detail,
                        connection=w.connection,
                    )
                )
            self._reader_timers(now, out)
        elif health.healthy:
            if w.healthy_since is None:
                w.healthy_since = now.mono
            down_s = None if w.down_since is None else now.mono - w.down_since
            if rid in self._offline:
                self._offline.discard(rid)
                self._dirty = True
                ants = health.antennas_connected
                out.events.append(
                    self._event(
                        ev.ReaderOnline,
                        now,
                        reader_id=rid,
                        detail=health.detail[:200],
                        connection=max(0, health.session),
                        antennas_connected=sorted(ants) if ants is not None else None,
                        down_s=None if down_s is None else round(down_s, 3),
                        short_outages=w.short,
                    )
                )
                w.short = 0
            elif down_s is not None and w.flapping_since is None:
                w.short += 1  # back within the debounce: counted, not published
            if w.down_since is not None:
                w.down_since = None
                self._dirty = True

    def _reader_timers(self, now: Now, out: EngineOutput) -> None:
        """Publish outages that outlasted the debounce; end flapping episodes that calmed down."""
        cfg = self.config
        for rid in sorted(self._watch):
            w = self._watch[rid]
            if w.down_since is not None and rid not in self._offline:
                # While flapping, single outages are part of the episode; one that lasts a
                # whole window is a reader gone, and reported as such.
                debounce = cfg.reader_offline_debounce_s
                if w.flapping_since is not None:
                    debounce = max(debounce, cfg.reader_flap_window_s)
                down_s = now.mono - w.down_since
                if down_s >= debounce:
                    self._offline.add(rid)
                    self._dirty = True
                    out.events.append(
                        self._event(
                            ev.ReaderOffline,
                            now,
                            reader_id=rid,
                            detail=w.detail,
                            connection=w.connection,
                            down_s=round(down_s, 3),
                            short_outages=w.short,
                        )
                    )
                    w.short = 0
            if (
                w.flapping_since is not None
                and w.healthy_since is not None
                and now.mono - w.healthy_since >= cfg.reader_flap_window_s
            ):
                out.events.append(
                    self._event(
                        ev.ReaderFlapping,
                        now,
                        reader_id=rid,
                        state="stable",
                        outages=w.flap_outages,
                        window_s=cfg.reader_flap_window_s,
                        duration_s=round(now.mono - w.flapping_since, 3),
                        detail=w.detail,
                        connection=w.connection,
                    )
                )
                w.flapping_since = None
                w.flap_outages = 0
                self._dirty = True

    # ---- scanning ----------------------------------------------------------------------------

    def _start_pass(self, phase: Phase, now: Now, out: EngineOutput, *, first: bool) -> None:
        if first:
            self._first_pass = None
            out.commands.append(StartScan())
        self.phase = phase
        self._scan = ScanAccumulator(self.config, self.antennas, self.health, now.mono)
        self._waiting = not self._readers_ready()
        self._end_candidate = None
        self._dirty = True

    def _readers_ready(self) -> bool:
        for reader, ports in self._ports.items():
            h = self.health.get(reader)
            if h is None or not h.healthy:
                return False
            if h.antennas_connected is not None and not ports <= h.antennas_connected:
                return False
        return True

    def _stop_pass(self, out: EngineOutput) -> None:
        self._scan = None
        self._first_pass = None
        out.commands.append(StopScan())

    def _abort_background(self, out: EngineOutput) -> None:
        self._stop_pass(out)
        self.phase = Phase.IDLE
        self._bg_next = self._last.mono + self.config.background_period_s
        self._dirty = True

    def _maybe_end_pass(self, now: Now, out: EngineOutput) -> None:
        scan = self._scan
        assert scan is not None
        cfg = self.config
        elapsed_ms = (now.mono - scan.started) * 1000
        quiet_ms = (now.mono - scan.last_new) * 1000
        if elapsed_ms < cfg.scan_max_ms and (
            self._waiting or elapsed_ms < cfg.scan_min_ms or quiet_ms < cfg.stable_ms
        ):
            return
        if self._end_candidate is None:
            self._end_candidate = now.mono
        # Only readers that look healthy are waited for: an unhealthy one already made the
        # pass incomplete; a healthy one that has not been heard from may be silently dead.
        silent = [
            r
            for r in self._ports
            if r in self._alive
            and self._alive[r] < self._end_candidate
            and (h := self.health.get(r)) is not None
            and h.healthy
        ]
        if silent and elapsed_ms < cfg.scan_max_ms:
            return  # wait for word from every reader that it is still alive
        for reader in silent:
            scan.fail(f"{reader} silent")
        self._end_candidate = None
        self._waiting = False
        result = scan.result(now.mono)
        self._scan = None
        if self.phase in _SESSION_SCANS:
            self._session_pass_done(result, now, out)
        else:
            self._background_pass_done(result, now, out)

    def _pass_incomplete(
        self,
        result: ScanResult,
        now: Now,
        out: EngineOutput,
        purpose: ev.ScanPurpose,
        attempt: int,
        session_id: UUID | None = None,
    ) -> bool:
        """Report an untrustworthy pass and redo it while retries remain; True if retrying."""
        retry = attempt <= self.config.max_rescans
        extra = {} if session_id is None else {"session_id": session_id}
        out.events.append(
            self._event(
                ev.InventoryIncomplete,
                now,
                purpose=purpose,
                attempt=attempt,
                will_retry=retry,
                reasons=list(result.problems),
                **extra,
            )
        )
        if retry:
            self._start_pass(self.phase, now, out, first=False)
            out.commands.append(StartScan())
        return retry

    def _session_pass_done(self, result: ScanResult, now: Now, out: EngineOutput) -> None:
        session = self._session
        assert session is not None
        session.passes += 1
        session.scan_ms += result.duration_ms
        if not result.complete:
            session.attempts += 1
            # A complete first pass is kept: only the pass that failed is redone.
            if not self._pass_incomplete(
                result, now, out, "session", session.attempts, session.session_id
            ):
                self._close_session(now, out, None, reads=result.reads, tags=len(result.present))
            return
        if self.phase is Phase.SCANNING:
            if self._needs_confirmation(result):
                self._first_pass = result
                self._start_pass(Phase.CONFIRMING, now, out, first=False)
                return
            self._close_session(now, out, result)
            return
        first = self._first_pass
        assert first is not None
        self._close_session(now, out, first.merge(result))

    def _close_session(
        self,
        now: Now,
        out: EngineOutput,
        result: ScanResult | None,
        *,
        reads: int = 0,
        tags: int = 0,
    ) -> None:
        session = self._session
        assert session is not None
        actors = list(session.actors)
        sid = session.session_id
        checked_out = returned = 0
        if result is not None and self._stale:
            # The baseline may be stale: what differs may have left or come back in a cycle the
            # store lost, so nobody of this session is named for it.
            self._reestablish(result, sid, now, out)
            reads, tags = result.reads, len(self.baseline)
        elif result is not None:
            verdict = self._assess(result)
            d = diff(verdict.base, verdict.inventory)
            today = now.judged.date()  # a due date is a validity window: proven time
            self._blind_drawers(verdict, "session", sid, now, out)
            for epc, drawer in d.missing.items():
                if epc in verdict.vanished:
                    continue  # reported as missing above: who took it cannot be known
                asset = self.assets.get(epc) if self.assets is not None else None
                checked_out += 1
                out.events.append(
                    self._event(
                        ev.ItemCheckedOut,
                        now,
                        session_id=sid,
                        actors=actors,
                        epc=epc,
                        asset_id=asset.asset_id if asset else None,
                        drawer=drawer,
                    )
                )
                if asset is not None and asset.calibration_overdue(today):
                    out.events.append(
                        self._event(
                            ev.ItemCalibrationOverdue,
                            now,
                            session_id=sid,
                            actors=actors,
                            epc=epc,
                            asset_id=asset.asset_id,
                            calibration_due=asset.calibration_due,
                        )
                    )
            for epc, drawer in d.new.items():
                if epc in self._unknown:
                    continue  # inside all along, registered since: not returned by anyone
                asset = self.assets.get(epc) if self.assets is not None else None
                returned += 1
                out.events.append(
                    self._event(
                        ev.ItemReturned,
                        now,
                        session_id=sid,
                        actors=actors,
                        epc=epc,
                        asset_id=asset.asset_id if asset else None,
                        drawer=drawer,
                    )
                )
            self._placement_events(d.new, d.moved, verdict.unknown, sid, now, out)
            self._note_unknown(result, verdict.unknown)
            reads, tags = result.reads, len(verdict.inventory)
            self.baseline = Baseline(verdict.inventory)
            out.baseline = self.baseline
        out.events.append(
            self._event(
                ev.SessionClosed,
                now,
                session_id=sid,
                actors=actors,
                quality="complete" if result is not None else "incomplete",
                duration_s=round(session.elapsed(now), 3),
                scan_duration_ms=session.scan_ms,
                reads=reads,
                tags=tags,
                passes=session.passes,
                checked_out=checked_out,
                returned=returned,
            )
        )
        out.commands.append(StopScan())
        # Idempotent; also covers an Unlock a holder asked for during the scan but never used.
        out.commands.append(Relock())
        self._session = None
        self._scan = None
        self._first_pass = None
        self.phase = Phase.IDLE
        self._verify = result is None
        period = self.config.background_period_s
        if self._verify:
            # Re-check at once if the readers are fine, else when they are back (on_health).
            period = 0.0 if self._readers_ready() else (period or _UNVERIFIED_RETRY_S)
        self._bg_next = now.mono + period
        self._dirty = True

    def _background_pass_done(self, result: ScanResult, now: Now, out: EngineOutput) -> None:
        if not result.complete:
            self._bg_attempts += 1
            if not self._pass_incomplete(result, now, out, "background", self._bg_attempts):
                self._finish_background(now, out, complete=False)
            return
        if self.phase is Phase.BACKGROUND:
            if self._needs_confirmation(result):
                self._first_pass = result
                self._start_pass(Phase.BACKGROUND_CONFIRM, now, out, first=False)
                return
            merged = result
        else:
            first = self._first_pass
            assert first is not None
            merged = first.merge(result)
        self._reestablish(merged, None, now, out)
        self._finish_background(now, out, complete=True)

    def _reestablish(
        self, result: ScanResult, session_id: UUID | None, now: Now, out: EngineOutput
    ) -> None:
        """A complete pass nobody is accountable for (background, or a session while the
        baseline is stale): what is gone is ``item.missing``, what arrived is placed, and the
        pass becomes the baseline, published as ``inventory.snapshot``."""
        verdict = self._assess(result)
        d = diff(verdict.base, verdict.inventory)
        self._blind_drawers(
            verdict, "session" if session_id else "background", session_id, now, out
        )
        for epc, drawer in d.missing.items():
            if epc in verdict.vanished:
                continue  # reported above
            out.events.append(self._item_missing(epc, drawer, now))
        self._placement_events(d.new, d.moved, verdict.unknown, session_id, now, out)
        self._note_unknown(result, verdict.unknown)
        self.baseline = Baseline(verdict.inventory)
        out.baseline = self.baseline
        self._stale = False
        out.events.append(
            self._event(
                ev.InventorySnapshot,
                now,
                tags=len(self.baseline),
                by_drawer=self.baseline.by_drawer(),
                items=self.baseline.to_dict(),
            )
        )

    def _finish_background(self, now: Now, out: EngineOutput, *, complete: bool) -> None:
        out.commands.append(StopScan())
        self._first_pass = None
        self._scan = None
        self.phase = Phase.IDLE
        self._bg_attempts = 0
        period = self.config.background_period_s
        if complete:
            self._verify = False
        elif self._verify and period == 0:
            # Still unverified: try again in an hour, or sooner when a reader comes back.
            period = _UNVERIFIED_RETRY_S
        self._bg_next = now.mono + period
        self._dirty = True

    def _item_missing(self, epc: str, drawer: str, now: Now) -> ev.Event:
        """``item.missing``: gone, and nobody can be named for it."""
        asset = self.assets.get(epc) if self.assets is not None else None
        return self._event(
            ev.ItemMissing, now, epc=epc, asset_id=asset.asset_id if asset else None, drawer=drawer
        )

    def _placement_events(
        self,
        new: Mapping[str, str],
        moved: Mapping[str, tuple[str, str]],
        unknown: Mapping[str, str],
        session_id: UUID | None,
        now: Now,
        out: EngineOutput,
    ) -> None:
        """item.unknown / item.misplaced for tags that arrived somewhere (not for those that stayed)."""
        registry = self.assets
        if registry is None:
            return
        arrived: Iterable[tuple[str, str]] = [
            *new.items(),
            *((e, d[1]) for e, d in moved.items()),
            *unknown.items(),
        ]
        for epc, drawer in sorted(arrived):
            asset = registry.get(epc)
            if asset is None:
                out.events.append(
                    self._event(ev.ItemUnknown, now, epc=epc, drawer=drawer, session_id=session_id)
                )
            elif asset.misplaced_in(drawer):
                assert asset.home_drawer is not None
                out.events.append(
                    self._event(
                        ev.ItemMisplaced,
                        now,
                        epc=epc,
                        asset_id=asset.asset_id,
                        drawer=drawer,
                        home_drawer=asset.home_drawer,
                        session_id=session_id,
                    )
                )

    # ---- inventory trust ------------------------------------------------------------------

    def _assess(self, result: ScanResult) -> _Verdict:
        """What a complete pass (or merged passes) says the cabinet holds, under the trust rules.

        - With an asset registry, only registered tags are inventory: an unregistered tag never
          joins the baseline nor leaves it (a steady one is worth ``item.unknown``, once).
        - A tag already in the baseline stays while it is present at all (``min_reads`` above
          the floor); a tag new to the cabinet joins only if it was *steady* (read in enough of
          the rounds, clearly above the floor) in every pass — so a neighbour cabinet's tag,
          read weakly and now and then, never becomes inventory, and so can never be "taken".
        """
        registry = self.assets
        if registry is None:
            base: Mapping[str, str] = self.baseline
        else:
            base = {e: d for e, d in self.baseline.items() if e in registry}
        inventory: dict[str, str] = {}
        unknown: dict[str, str] = {}
        new = False
        for epc, drawer in result.present.items():
            if registry is not None and epc not in registry:
                # Reported when it arrives; one the baseline already held (from before the
                # registry knew better) did not arrive.
                if epc in result.steady and epc not in self._unknown and epc not in self.baseline:
                    unknown[epc] = drawer
            elif epc in base:
                inventory[epc] = drawer
            elif epc in result.steady:
                inventory[epc] = drawer
                new = True
        # A drawer that held tags and reads nothing at all, not even a neighbour's tag under the
        # floor, is more likely blind (an unplugged antenna its reader cannot report) than
        # emptied at once: its tags are held, never checked out. A held drawer stays held until
        # it reads again; then what is gone from it is missing, charged to nobody.
        by_drawer: dict[str, list[str]] = {}
        for epc, drawer in base.items():
            by_drawer.setdefault(drawer, []).append(epc)
        least = self.config.suspect_min_tags
        # Only where the readers cannot tell: one that reports its antennas has made a pass
        # with an unplugged one incomplete already.
        undetected = {
            drawer
            for (reader, _port), drawer in self.antennas.items()
            if (h := self.health.get(reader)) is None or h.antennas_connected is None
        }
        suspect: dict[str, list[str]] = {}
        for drawer, epcs in sorted(by_drawer.items()):
            if drawer in result.heard:
                continue
            if (least and len(epcs) >= least and drawer in undetected) or drawer in self._held:
                suspect[drawer] = sorted(epcs)
                for epc in epcs:
                    inventory[epc] = drawer
        vanished = {
            e: drawer
            for drawer, epcs in sorted(self._held.items())
            if drawer not in suspect
            for e in epcs
            if e in base and e not in inventory
        }
        return _Verdict(base, inventory, unknown, new or bool(unknown), suspect, vanished)

    def _needs_confirmation(self, result: ScanResult) -> bool:
        """A first pass that found items gone, tags new to the cabinet or a blind drawer is
        confirmed by a second one before anything is reported or joins the baseline."""
        verdict = self._assess(result)
        if verdict.suspect:
            return True  # a blind drawer is always confirmed, whatever confirm_pass says
        if not self.config.confirm_pass:
            return False
        return verdict.arrivals or bool(diff(verdict.base, verdict.inventory).missing)

    def _blind_drawers(
        self,
        verdict: _Verdict,
        purpose: ev.ScanPurpose,
        session_id: UUID | None,
        now: Now,
        out: EngineOutput,
    ) -> None:
        """inventory.suspect per blind drawer, item.missing for what left a drawer while it was
        blind; the holds carried to the next cycle."""
        extra = {} if session_id is None else {"session_id": session_id}
        for drawer, epcs in verdict.suspect.items():
            out.events.append(
                self._event(
                    ev.InventorySuspect,
                    now,
                    purpose=purpose,
                    drawer=drawer,
                    held=len(epcs),
                    first=drawer not in self._held,
                    detail="no read from its antennas in two passes: unplugged antenna?",
                    **extra,
                )
            )
        for epc, drawer in sorted(verdict.vanished.items()):
            out.events.append(self._item_missing(epc, drawer, now))
        if verdict.suspect != self._held:
            self._held = dict(verdict.suspect)
            self._dirty = True

    def _note_unknown(self, result: ScanResult, reported: Mapping[str, str]) -> None:
        """Remember the unregistered tags reported as item.unknown while they stay present (so
        each is reported once per stay, not at every scan)."""
        registry = self.assets
        if registry is None:
            return
        kept: dict[str, str] = {}
        # Also the unregistered tags the baseline held: they did not arrive, they were here.
        for epc, drawer in (*self._unknown.items(), *self.baseline.items(), *reported.items()):
            if epc in result.present and epc not in registry and len(kept) < MAX_UNKNOWN_TRACKED:
                kept[epc] = drawer
        if kept != self._unknown:
            self._unknown = kept
            self._dirty = True

    # ---- events -----------------------------------------------------------------------------

    def _lockout_event(self, change: LockoutChange, now: Now, out: EngineOutput) -> None:
        self._dirty = True
        out.events.append(
            self._event(
                ev.AccessLockout,
                now,
                badge_reader=change.badge_reader,
                state=change.state,
                denials=change.denials,
                until=change.until,
                actor=change.actor,
            )
        )

    def _event(self, cls: type[ev.EventBase], now: Now, **fields: Any) -> ev.Event:
        event = cls(
            event_id=self._ids(now.wall),
            time=now.wall,
            clock=now.clock,
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            **fields,
        )
        return cast(ev.Event, event)


_ACTOR_RE = re.compile(ev.ACTOR_PATTERN)
_PSEUDONYM_RE = re.compile(ev.PSEUDONYM_PATTERN)
MAX_CREDIBLE_DOWNTIME_S = 30 * 86_400
MAX_UNKNOWN_TRACKED = 1000


def _downtime(saved_at: datetime, now: datetime) -> float:
    """Wall time since the state was saved; 0 if the wall clock is not credible (no RTC, NTP step)."""
    if saved_at.tzinfo is None:
        raise ValueError("saved_at must be timezone-aware")
    delta = (now - saved_at).total_seconds()
    return delta if 0 <= delta <= MAX_CREDIBLE_DOWNTIME_S else 0.0


def _actor(value: object) -> str:
    if not isinstance(value, str) or not _ACTOR_RE.fullmatch(value):
        raise EngineStateError("engine state holds an actor that is not a pseudonym")
    return value
