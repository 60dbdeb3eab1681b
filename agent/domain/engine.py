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

The engine owns the door cycle and wires its parts: ``scanning.py`` (when a pass counts and
when it is over), ``contents.py`` (the baseline, the inventory trust rules and what a pass is
reported as), ``readers.py`` (reader outages as events), ``access.py`` (who may open,
lock-outs), ``session.py`` (the door session) and ``resume.py`` (the persisted state). Every
event is built as its typed model, stamped by ``stamp.py``; ``commands.py`` is what it hands
back.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, tzinfo
from typing import Any, Literal
from uuid import UUID

from agent.domain import events as ev
from agent.domain import resume
from agent.domain.access import AccessControl, AllowList, Role
from agent.domain.assets import AssetRegistry
from agent.domain.commands import (
    Command,
    EngineOutput,
    Relock,
    StartScan,
    StopScan,
    Unlock,
)
from agent.domain.config import Antenna, CabinetDomainConfig
from agent.domain.contents import Contents
from agent.domain.holdings import Holding, Holdings
from agent.domain.ids import Uuid7Generator
from agent.domain.inventory import Baseline, ScanResult
from agent.domain.localtime import in_daily_window, next_local_time, time_of_day
from agent.domain.now import Now
from agent.domain.readers import ReaderOutages
from agent.domain.resume import EngineStateError
from agent.domain.scanning import ScanPass
from agent.domain.session import Session
from agent.domain.stamp import Stamper
from agent.domain.technician import (
    DOOR_TEST_MAX_S,
    DOOR_TEST_REASON,
    MAX_BADGE_WAIT_S,
    TECHNICIAN_RE,
    BadgeWait,
    DoorTest,
    Rebaseline,
    RebaselineState,
    Technician,
    TechnicianRefused,
    check_reason,
    check_technician,
)
from drivers.types import BadgeRead, DoorEdge, DoorState, ReaderHealth, TagRead

__all__ = [
    "CabinetEngine",
    "Command",
    "EngineOutput",
    "EngineStateError",
    "Phase",
    "Relock",
    "StartScan",
    "StopScan",
    "TechnicianRefused",
    "Unlock",
]


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
# An unverified baseline with no periodic background inventory: the verification pass is
# retried this often (and at once when a reader comes back).
_UNVERIFIED_RETRY_S = 3600.0
# While a door stands open by day under a night rule, next_deadline() also looks again this
# often for the night hours (a wall-clock boundary: the monotonic clock cannot name it).
_NIGHT_CHECK_S = 60.0


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
        timezone: tzinfo | None = None,
    ) -> None:
        self._config = config
        # The site's zone: date rules (calibration due, night hours) are judged in it.
        self.timezone: tzinfo = timezone if timezone is not None else UTC
        self.site_id = site_id
        self.cabinet_id = cabinet_id
        self.antennas: dict[Antenna, str] = config.antenna_map(readers)
        self.access = AccessControl(config, allow_list)
        self._ids = ids if ids is not None else Uuid7Generator()
        self._stamp = Stamper(site_id, cabinet_id, self._ids)
        self.health: dict[str, ReaderHealth] = {}
        self._readers = ReaderOutages(config, self._stamp)
        self._contents = Contents(
            config,
            self.antennas,
            self.health,
            self._stamp,
            baseline if baseline is not None else Baseline(),
            assets,
        )
        self._contents.timezone = self.timezone
        self._holdings = Holdings(self._stamp)
        self.phase = Phase.IDLE
        self.door_open = False
        self._session: Session | None = None
        self._pending: list[str] = []  # holders badged in, door not yet opened
        self._unlock_deadline = 0.0
        self._pass = ScanPass(config, self.antennas, self.health)
        self._first_pass: ScanResult | None = None  # a first pass awaiting its confirmation
        self._bg_attempts = 0
        self._bg_next = now.mono + config.background_period_s
        # An incomplete session left the baseline unverified: inventory as soon as readers allow.
        self._verify = False
        # The baseline may be stale (the store recovered from damage): until a complete pass
        # re-establishes it, differences are reported without blaming anyone (item.missing).
        self._stale = False
        self._last = now
        self._dirty = True
        self._started = False
        # Technician work (agent/domain/technician.py): the technician session from its
        # unlock to its closing scan, a pending wait for a supervisor's badge, a re-baseline.
        self._tech: Technician | None = None
        self._tech_wait: BadgeWait | None = None
        self._rebase: Rebaseline | None = None
        # A door test in progress (not persisted: a restart ends it, and start() relocks).
        self._test: DoorTest | None = None
        self.rebaseline_state: RebaselineState | None = None
        self.rebaselines = 0  # re-baselines requested so far (cabinetctl waits for its own)
        self.rebaseline_result: ev.InventoryRebaselined | None = None

    @property
    def config(self) -> CabinetDomainConfig:
        """The domain config; assigning it (SIGHUP) also reaches every part."""
        return self._config

    @config.setter
    def config(self, config: CabinetDomainConfig) -> None:
        self._config = config
        self.access.config = config
        self._readers.config = config
        self._contents.config = config
        self._pass.config = config

    @property
    def baseline(self) -> Baseline:
        """What the cabinet holds, as of the last complete cycle (the trusted contents)."""
        return self._contents.baseline

    @property
    def assets(self) -> AssetRegistry | None:
        return self._contents.assets

    def overdue(self) -> list[tuple[str, Holding]]:
        """Items out past their limit (``item.overdue`` raised), oldest check-out first."""
        return self._holdings.overdue()

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
        if not self._pass.running and self.phase in _SESSION_SCANS:
            # The passes of an interrupted scan are lost with the process: rescan from scratch.
            self._start_pass(Phase.SCANNING, now, out, first=True)
        elif not self._pass.running and self.phase in _BACKGROUND_SCANS:
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

    def next_deadline(self) -> float | None:
        """Monotonic time by which ``tick()`` must run next, or None while no timer is armed
        (then only an input can change anything). While a scan pass runs (or a scan phase
        waits for one) it is the last time seen: a pass is judged on every tick."""
        if self._pass.running or self.phase in (*_SESSION_SCANS, *_BACKGROUND_SCANS):
            return self._last.mono
        due = [
            self.access.next_deadline(),
            self._readers.next_deadline(),
            self._holdings.next_deadline(),
            None if self._tech_wait is None else self._tech_wait.until_mono,
            None if self._test is None else self._test.until_mono,
        ]
        if self.phase is Phase.UNLOCKED:
            due.append(self._unlock_deadline)
        elif self.phase is Phase.OPEN and self._session is not None:
            # The next door.left_open, with the period in force now (_left_open's rule).
            cfg = self.config
            session = self._session
            if self._tech is not None:
                night = True  # a technician's limit of its own: no night rule to wait for
                period = cfg.technician_left_open_s
            else:
                night = self._night(self._last)
                period = cfg.night_left_open_s if night else cfg.left_open_s
            if period > 0:
                due.append(session.door_opened_mono + session.left_open_due_s + period)
            if cfg.night_left_open_s > 0 and not night:
                # The night hours may begin before then, with their shorter period: be there
                # when the site's clocks read night_start (and look again now and then: a
                # wall-clock boundary, which a daylight-saving gap or a clock step can move).
                last = self._last
                night_at = next_local_time(last.wall, self.timezone, time_of_day(cfg.night_start))
                due.append(last.mono + max(0.0, (night_at - last.wall).total_seconds()))
                due.append(last.mono + _NIGHT_CHECK_S)
        if (
            self.phase is Phase.IDLE
            and not self.door_open
            and self._test is None
            and (self._verify or self.config.background_period_s > 0)
        ):
            due.append(self._bg_next)
        return min((d for d in due if d is not None), default=None)

    def on_alive(self, reader_id: str, heard_mono: float, now: Now) -> EngineOutput:
        """The reader was heard from at monotonic ``heard_mono`` (any frame, keepalives too).

        Evidence a reader is not silently dead: once a reader has reported liveness, a scan
        pass only ends after every such reader was heard from *after* the pass met its end
        conditions; a reader that stays silent until ``scan_max_ms`` makes the pass incomplete.
        Without this, a reader whose socket stays open but which sends nothing looks exactly
        like an empty drawer until its read watchdog fires.
        """
        self._pass.alive(reader_id, heard_mono)
        return self._end(self._begin(now))

    def on_scan_started(self, now: Now) -> EngineOutput:
        """The runner carried out the StartScan of the running scan (the readers were told;
        reads for this cabinet flow from those that inventory): the pass may count from now.

        A shared reader inventorying for another cabinet reports INVENTORYING all along, yet
        routes this cabinet's reads only from this point; time before it is not "no new EPC".
        """
        out = self._begin(now)
        self._pass.started(now.mono)
        return self._end(out)

    def on_tags(self, reads: Sequence[TagRead], now: Now) -> EngineOutput:
        """Tag reads from any reader; counted only while a scan pass runs."""
        out = self._begin(now)
        self._pass.tags(reads, now.mono)
        return self._end(out)

    def on_health(self, health: ReaderHealth, now: Now) -> EngineOutput:
        """A reader's health changed."""
        out = self._begin(now)
        rid = health.reader_id
        self.health[rid] = health
        self._readers.health(health, now, out.events)
        if self._verify and self.phase is Phase.IDLE and self._pass.ready():
            self._bg_next = min(self._bg_next, now.mono)
        self._pass.health(health, now.mono)
        return self._end(out)

    def withdraw_unlock(self, actors: Collection[str], now: Now) -> EngineOutput:
        """Another door of this cabinet's bank opened for ``actors`` (a card shown at a badge
        reader in front of several cabinets): an unlock granted here to them alone and not used
        yet lapses now, so one card opens one door. An unlock anyone else was granted, a
        technician session, an open door: unchanged."""
        out = self._begin(now)
        if (
            self.phase is Phase.UNLOCKED
            and self._tech is None
            and self._pending
            and set(self._pending) <= set(actors)
        ):
            self._pending = []
            self.phase = Phase.IDLE
            self._dirty = True
            out.commands.append(Relock())
        return self._end(out)

    def on_badge(self, badge: BadgeRead, now: Now) -> EngineOutput:
        """A (pseudonymized) badge was presented."""
        out = self._begin(now)
        actor = badge.pseudonym
        if not _PSEUDONYM_RE.fullmatch(actor):
            # Not a pseudonym (a driver bug, maybe a raw id): it must never reach an event.
            actor = ev.UNKNOWN_ACTOR
        outcome = self.access.badge(badge.reader_id, actor, now)
        busy = self._door_taken(actor) if outcome.granted else None
        if busy is not None:
            # The door is someone else's for now: refused, said why, not counted towards a
            # lock-out (the badge is valid); the person badges again once it is free.
            outcome = dataclasses.replace(outcome, granted=False, reason=busy, grace=None)
            if self._test is not None:
                self._test.refused += 1
        out.events.extend(outcome.events(actor, badge.reader_id, self._stamp, now))
        if outcome.lockout is not None:
            self._dirty = True
        if not outcome.granted:
            return self._end(out)
        phase = self.phase
        wait = self._tech_wait
        if (
            wait is not None
            and phase in (Phase.IDLE, *_BACKGROUND_SCANS)
            and Role.SUPERVISOR in outcome.roles
        ):
            # cabinetctl asked for a supervisor's badge: this one opens the technician session.
            self._tech_wait = None
            if phase is not Phase.IDLE:
                self._abort_background(out)
            self._open_technician(actor, "badge", wait.reason, now, out)
            return self._end(out)
        if self._tech is not None:
            # Its own technician (a supervisor who opened it with their badge), badging again:
            # the window starts over, or (during the closing scan) the door unlocks again.
            if phase is Phase.UNLOCKED:
                self._release_for_technician(now, out)
            elif phase in _SESSION_SCANS:
                assert self._session is not None
                self._session.unlocked_after_close = True
                self._unlock(now, out, enter=False)
            return self._end(out)
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

    def on_erasure(self, pseudonyms: Collection[str], now: Now) -> tuple[int, EngineOutput]:
        """The backend erased these people (docs/privacy.md §7): wherever the state names one
        of them (the badges of the unlock window, the holders of the open session, the
        holders of items still out, a supervisor's technician session) the ``"erased"`` actor
        stands in, so the session goes on
        and later events (a return, ``item.overdue``) stay consistent without naming them.
        Returns how many places changed, and the output (the new state to persist, if any)."""
        out = self._begin(now)
        changed = ev.erase_actors(self._pending, pseudonyms)
        if self._session is not None:
            changed += ev.erase_actors(self._session.actors, pseudonyms)
        # A technician session opened with a supervisor's badge, and what it asked for.
        for work in (self._tech, self._rebase):
            if work is not None and work.who in pseudonyms:
                work.who = ev.ERASED_ACTOR
                changed += 1
        if changed:
            self._dirty = True
        changed += self._holdings.erase(pseudonyms)
        return changed, self._end(out)

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
        self._contents.assets = assets

    # ---- technician work (docs/domain.md, "Technician sessions") ------------------------------

    @property
    def technician(self) -> Technician | None:
        """The technician session in progress (unlocked, door open, or its closing scan)."""
        return self._tech

    @property
    def awaiting_supervisor(self) -> bool:
        """True while a ``technician open --badge`` waits for a supervisor's badge."""
        return self._tech_wait is not None

    def open_technician(self, technician: str, reason: str, now: Now) -> EngineOutput:
        """Open a technician session for ``uid:<n>`` (cabinetctl): unlock, no forced opening.

        Raises TechnicianRefused unless the cabinet is idle (a background inventory is
        abandoned, as for a badge)."""
        out = self._begin(now)
        if not TECHNICIAN_RE.fullmatch(technician):
            raise TechnicianRefused("not a technician id")
        text = check_reason(reason)
        self._require_idle("open a technician session")
        if self.phase is not Phase.IDLE:
            self._abort_background(out)
        self._tech_wait = None
        self._open_technician(technician, "cli", text, now, out)
        return self._end(out)

    def await_supervisor(
        self, requested_by: str, reason: str, wait_s: float, now: Now
    ) -> EngineOutput:
        """The next supervisor badge within ``wait_s`` opens a technician session (the
        supervisor is its technician); other badges work as usual meanwhile."""
        out = self._begin(now)
        if not TECHNICIAN_RE.fullmatch(requested_by):
            raise TechnicianRefused("not a technician id")
        text = check_reason(reason)
        self._require_idle("wait for a supervisor badge")
        wait_s = min(max(wait_s, 1.0), MAX_BADGE_WAIT_S)
        self._tech_wait = BadgeWait(text, requested_by, now.mono + wait_s)
        self._dirty = True
        return self._end(out)

    def cancel_supervisor_wait(self, now: Now) -> EngineOutput:
        """Forget a supervisor-badge wait whose requester has gone (cabinetctl interrupted):
        a supervisor badging later must get the door session they came for, not a technician
        session nobody attends. A session the badge already opened is left alone."""
        out = self._begin(now)
        if self._tech_wait is not None:
            self._tech_wait = None
            self._dirty = True
        return self._end(out)

    def close_technician(self, now: Now) -> EngineOutput:
        """Close a technician session whose door has not opened (cabinetctl): relock. Once
        the door opened, the session ends with its closing scan instead."""
        out = self._begin(now)
        if self._tech_wait is not None and self._tech is None:
            self._tech_wait = None
            self._dirty = True
            return self._end(out)
        tech = self._tech
        if tech is None:
            raise TechnicianRefused("no technician session is open")
        if self.phase is not Phase.UNLOCKED:
            raise TechnicianRefused(
                "the door has opened: the session ends by itself once the door is closed and "
                "the closing scan is over"
            )
        self._pending = []
        self.phase = Phase.IDLE
        out.commands.append(Relock())
        self._end_technician(now, out, "cancelled")
        return self._end(out)

    def rebaseline(self, technician: str, reason: str, now: Now) -> EngineOutput:
        """Inventory now and make what is found the baseline (cabinetctl inventory
        rebaseline): differences are counted in ``inventory.rebaselined``, nobody is charged,
        nothing is missing. ``rebaseline_state`` follows it; a badge interrupts it."""
        out = self._begin(now)
        if not TECHNICIAN_RE.fullmatch(technician):
            raise TechnicianRefused("not a technician id")
        text = check_reason(reason)
        if self.phase is not Phase.IDLE or self.door_open:
            raise TechnicianRefused(
                f"cannot re-baseline now: the cabinet is {self.phase}"
                f"{' with the door open' if self.door_open else ''}; try again when it is idle"
            )
        if self._test is not None:
            raise TechnicianRefused("cannot re-baseline now: a door test is running")
        self._rebase = Rebaseline(technician, text)
        self.rebaseline_state = "running"
        self.rebaselines += 1
        self._bg_attempts = 0
        self._start_pass(Phase.BACKGROUND, now, out, first=True)
        return self._end(out)

    @property
    def door_test(self) -> DoorTest | None:
        """The door test in progress (``begin_door_test`` … ``end_door_test``)."""
        return self._test

    def begin_door_test(self, technician: str, now: Now) -> EngineOutput:
        """``cabinetctl door test`` takes the door: until ``end_door_test`` (or
        DOOR_TEST_MAX_S) no badge is granted (``access.denied``, reason ``door test``) and no
        technician session, re-baseline or background inventory starts, so nothing the
        engine does moves the lock under the test, nor the test under a session. Raises
        TechnicianRefused unless the cabinet is idle with its door closed."""
        out = self._begin(now)
        if not TECHNICIAN_RE.fullmatch(technician):
            raise TechnicianRefused("not a technician id")
        if self.phase is not Phase.IDLE or self.door_open:
            raise TechnicianRefused(
                f"cannot test the door now: the cabinet is {self.phase}"
                f"{' with the door open' if self.door_open else ''}; try when idle"
            )
        if self._test is not None:
            raise TechnicianRefused("cannot test the door now: a door test is running")
        self._test = DoorTest(technician, now.mono + DOOR_TEST_MAX_S)
        return self._end(out)

    def door_test_release(self, now: Now) -> EngineOutput:
        """The door test is about to release the lock: from now on until it ends, the door
        opening is the tester's (a technician session in their name), not forced."""
        out = self._begin(now)
        if self._test is None:
            raise TechnicianRefused("no door test is running (it lapsed?): the lock stays engaged")
        self._test.released = True
        return self._end(out)

    def end_door_test(self, now: Now) -> EngineOutput:
        """The door test is over: the door is the engine's again. Idle, it relocks (whatever
        the test's last step achieved: the engine's fail-secure relock takes over)."""
        out = self._begin(now)
        if self._test is not None:
            self._test = None
            if self.phase is Phase.IDLE:
                out.commands.append(Relock())
        return self._end(out)

    def _require_idle(self, what: str) -> None:
        if self.door_open or self.phase not in (Phase.IDLE, *_BACKGROUND_SCANS):
            raise TechnicianRefused(
                f"cannot {what} now: the cabinet is {self.phase}"
                f"{' with the door open' if self.door_open else ''}; try again when it is idle"
            )
        if self._rebase is not None:
            raise TechnicianRefused(f"cannot {what} now: a re-baseline is running")
        if self._test is not None:
            raise TechnicianRefused(f"cannot {what} now: a door test is running")

    def _door_taken(self, actor: str) -> ev.DenyReason | None:
        """Why a valid badge cannot have the door now, or None: a door test holds it, or a
        technician session (from its unlock to its closing scan) that is not this person's.
        A technician session books what moves as removals and restocks: anyone else let in
        would take items out unattributed."""
        if self._test is not None:
            return "door test"
        if self._tech is not None and actor != self._tech.who:
            return "technician session"
        return None

    def _open_technician(
        self, who: str, via: ev.TechnicianVia, reason: str, now: Now, out: EngineOutput
    ) -> None:
        self._start_technician(who, via, reason, now, out)
        self._pending = []
        self._release_for_technician(now, out)
        self.phase = Phase.UNLOCKED

    def _release_for_technician(self, now: Now, out: EngineOutput) -> None:
        # Time to reach the door (a terminal, a laptop): the lock stays released that long.
        window = self.config.technician_unlock_s
        out.commands.append(Unlock(window))
        self._unlock_deadline = now.mono + window
        self._dirty = True

    def _start_technician(
        self, who: str, via: ev.TechnicianVia, reason: str, now: Now, out: EngineOutput
    ) -> Technician:
        tech = Technician(self._ids(now.wall), who, via, reason, now.mono)
        self._tech = tech
        self._dirty = True
        out.events.append(
            ev.TechnicianOpened(
                **self._stamp(now),
                session_id=tech.session_id,
                technician=who,
                via=via,
                reason=reason,
                door_id=self.config.door_id,
            )
        )
        return tech

    def _end_technician(
        self,
        now: Now,
        out: EngineOutput,
        ended: Literal["scanned", "not_opened", "cancelled"],
        *,
        quality: Literal["complete", "incomplete", "none"] = "none",
        restocked: int = 0,
        removed: int = 0,
        actors: Sequence[str] = (),
    ) -> None:
        tech = self._tech
        assert tech is not None
        self._tech = None
        self._dirty = True
        out.events.append(
            ev.TechnicianClosed(
                **self._stamp(now),
                session_id=tech.session_id,
                technician=tech.who,
                via=tech.via,
                ended=ended,
                quality=quality,
                duration_s=round(tech.elapsed(now.mono), 3),
                restocked=restocked,
                removed=removed,
                actors=list(actors),
            )
        )

    # ---- resume ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The state needed to resume after a crash (pseudonyms only; timers as remaining time)."""
        at = self._last.mono
        s = self._session
        state: dict[str, Any] = {
            "phase": self.phase.value,
            "door_open": self.door_open,
            "pending": list(self._pending),
            "unlock_remaining_s": max(0.0, self._unlock_deadline - at),
            "bg_remaining_s": max(0.0, self._bg_next - at),
            **self._readers.snapshot(at),
            "verify": self._verify,
            "stale": self._stale,
            "access": self.access.snapshot(at),
            **self._contents.snapshot(),
            "session": None if s is None else s.snapshot(self._last),
            **self._holdings.snapshot(at),
            "technician": None if self._tech is None else self._tech.snapshot(at),
            "technician_wait": None if self._tech_wait is None else self._tech_wait.snapshot(at),
            "rebaseline": None
            if self._rebase is None
            else {"who": self._rebase.who, "reason": self._rebase.reason},
        }
        return resume.dump(state, self._last)

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
        timezone: tzinfo | None = None,
    ) -> CabinetEngine:
        """Rebuild an engine from ``to_bytes``; call ``start(now)`` next. Raises EngineStateError."""
        try:
            state = resume.load(data)
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
                timezone=timezone,
            )
            # Timers were saved as "remaining at saved_at": re-base them on the instant the
            # state was saved, so time spent since (staleness, downtime) counts against them.
            base = resume.rebase(state, now)
            engine.phase = Phase(state["phase"])
            engine.door_open = bool(state["door_open"])
            engine._pending = [resume.actor(a) for a in state["pending"]]
            engine._unlock_deadline = base.mono + float(state["unlock_remaining_s"])
            engine._bg_next = base.mono + float(state["bg_remaining_s"])
            engine._readers.restore(state, base.mono)
            engine._verify = bool(state["verify"])
            engine._stale = bool(state.get("stale", False))  # absent in older states
            engine._contents.restore(state)
            engine.access.restore(state["access"], base)
            s = state["session"]
            if s is not None:
                engine._session = Session.restore(s, base)
                if "left_open_due_s" not in s:  # states written before the night rule
                    engine._session.left_open_due_s = (
                        engine._session.left_open_alerts * config.left_open_s
                    )
            engine._holdings.restore(state, base.mono)
            # Absent in states written before technician sessions existed.
            if (t := state.get("technician")) is not None:
                engine._tech = Technician.restore(t, base.mono)
            if (w := state.get("technician_wait")) is not None:
                engine._tech_wait = BadgeWait.restore(w, base.mono)
            if (r := state.get("rebaseline")) is not None:
                engine._rebase = Rebaseline(check_technician(r["who"]), check_reason(r["reason"]))
                engine.rebaseline_state = "running"
        except EngineStateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, TechnicianRefused) as err:
            raise EngineStateError(f"engine state is malformed ({type(err).__name__})") from None
        needs_session = engine.phase in (Phase.OPEN, *_SESSION_SCANS)
        if needs_session != (engine._session is not None):
            raise EngineStateError("engine state is inconsistent (session vs phase)")
        if engine._tech is not None and engine.phase not in (
            Phase.UNLOCKED,
            Phase.OPEN,
            *_SESSION_SCANS,
        ):
            raise EngineStateError("engine state is inconsistent (technician vs phase)")
        if engine._rebase is not None and engine.phase not in _BACKGROUND_SCANS:
            raise EngineStateError("engine state is inconsistent (re-baseline vs phase)")
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
            session.left_open_due_s = 0.0
            self.phase = Phase.OPEN
            grace = self.config.reopen_grace_s
            if not session.unlocked_after_close and now.mono - session.door_closed_mono > grace:
                session.add_actor(ev.UNKNOWN_ACTOR)
                out.events.append(
                    ev.DoorForced(
                        **self._stamp(now),
                        session_id=session.session_id,
                        door_id=self.config.door_id,
                    )
                )
            return
        if phase in _BACKGROUND_SCANS:
            self._abort_background(out)
            phase = Phase.IDLE
        tech = self._tech if phase is Phase.UNLOCKED else None
        test = self._test
        if phase is Phase.IDLE and test is not None and test.released:
            # The door test released the lock and the door opened: the tester's doing (on site
            # by their word), not a break-in. What moves until it is shut and scanned is booked
            # to them, as in a technician session; the test reports the opening.
            tech = self._start_technician(test.who, "cli", DOOR_TEST_REASON, now, out)
            test.session_id = tech.session_id
        if tech is not None:
            # A technician's opening: not forced, no session.opened (technician.opened said it).
            self._session = Session(
                session_id=tech.session_id,
                actors=list(self._pending),
                opened_wall=now.wall,
                elapsed_base=0.0,
                since_mono=now.mono,
                door_opened_mono=now.mono,
            )
            self._pending = []
            self.phase = Phase.OPEN
            return
        trigger: Literal["badge", "forced"]
        if phase is Phase.UNLOCKED:
            actors, trigger = list(self._pending), "badge"
        else:
            actors, trigger = [ev.UNKNOWN_ACTOR], "forced"
            # A technician session is UNLOCKED until its door opens: none can be pending here
            # (defensive: a stale one must never relabel this forced opening).
            self._tech = None
            if test is not None:
                # Opened during a door test with the lock engaged: the lock did not hold.
                test.forced = True
        self._pending = []
        session_id = self._ids(now.wall)
        self._session = Session(
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
                ev.DoorForced(
                    **self._stamp(now), session_id=session_id, door_id=self.config.door_id
                )
            )
        out.events.append(
            ev.SessionOpened(
                **self._stamp(now),
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
            out.events.append(change.event(self._stamp(now)))
            self._dirty = True
        self._readers.timers(now, out.events)
        self._holdings.timers(now, out.events, self.baseline)
        phase = self.phase
        if self._tech_wait is not None and now.mono >= self._tech_wait.until_mono:
            self._tech_wait = None  # nobody badged: cabinetctl says so
            self._dirty = True
        if phase is Phase.UNLOCKED and now.mono >= self._unlock_deadline:
            self._pending = []
            self.phase = Phase.IDLE
            self._dirty = True
            out.commands.append(Relock())
            if self._tech is not None:
                self._end_technician(now, out, "not_opened")
        elif phase is Phase.OPEN:
            self._left_open(now, out)
        elif self._pass.running:
            self._maybe_end_pass(now, out)
        if self._test is not None and now.mono >= self._test.until_mono:
            self._test = None  # its caller is gone: the door is the engine's again
            if self.phase is Phase.IDLE:
                out.commands.append(Relock())
        if (
            self.phase is Phase.IDLE
            and not self.door_open
            and self._test is None
            and (self._verify or self.config.background_period_s > 0)
            and now.mono >= self._bg_next
        ):
            self._bg_attempts = 0
            self._start_pass(Phase.BACKGROUND, now, out, first=True)
        return out

    def _end(self, out: EngineOutput) -> EngineOutput:
        if (
            self._dirty
            or self.access.changed
            or self._readers.changed
            or self._contents.changed
            or self._holdings.changed
        ):
            out.session_state = self.to_bytes()
            self._dirty = False
            self._holdings.changed = False
            self.access.changed = False
            self._readers.changed = False
            self._contents.changed = False
        return out

    def _left_open(self, now: Now, out: EngineOutput) -> None:
        session = self._session
        assert session is not None
        if self._tech is not None:
            # Maintenance keeps the door open longer than a check-out, but a technician who
            # walks away from an open cabinet must still be noticed: a limit of its own.
            night = False
            period = self.config.technician_left_open_s
            if period <= 0:
                return
        else:
            night = self._night(now)
            period = self.config.night_left_open_s if night else self.config.left_open_s
        open_s = now.mono - session.door_opened_mono
        # The next alert is one period (the one in force now: night hours are stricter) after
        # the previous one fell due; all day long that is every left_open_s of the opening.
        last = session.left_open_due_s
        if open_s >= last + period:
            # One alert per input even after a long silence; the count says how many periods.
            periods = int((open_s - last) // period)
            session.left_open_alerts += periods
            session.left_open_due_s = last + periods * period
            self._dirty = True
            out.events.append(
                ev.DoorLeftOpen(
                    **self._stamp(now),
                    session_id=session.session_id,
                    door_id=self.config.door_id,
                    actors=list(session.actors),
                    technician=self._tech.who if self._tech is not None else None,
                    open_s=round(open_s, 3),
                    alert=session.left_open_alerts,
                    night=night,
                )
            )

    def _night(self, now: Now) -> bool:
        """Whether the night rule is on and the site's clocks read night hours."""
        cfg = self.config
        if cfg.night_left_open_s <= 0:
            return False
        start, end = time_of_day(cfg.night_start), time_of_day(cfg.night_end)
        return in_daily_window(now.wall, self.timezone, start, end)

    # ---- scanning ----------------------------------------------------------------------------

    def _start_pass(self, phase: Phase, now: Now, out: EngineOutput, *, first: bool) -> None:
        if first:
            self._first_pass = None
            out.commands.append(StartScan())
        self.phase = phase
        self._pass.start(now.mono, new_scan=first)
        self._dirty = True

    def _stop_pass(self, out: EngineOutput) -> None:
        self._pass.stop()
        self._first_pass = None
        out.commands.append(StopScan())

    def _abort_background(self, out: EngineOutput) -> None:
        if self._rebase is not None:
            self._rebase = None
            self.rebaseline_state = "interrupted"
        self._stop_pass(out)
        self.phase = Phase.IDLE
        self._bg_next = self._last.mono + self.config.background_period_s
        self._dirty = True

    def _maybe_end_pass(self, now: Now, out: EngineOutput) -> None:
        result = self._pass.finished(now.mono)
        if result is None:
            return
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
        out.events.append(
            ev.InventoryIncomplete(
                **self._stamp(now),
                purpose=purpose,
                session_id=session_id,
                attempt=attempt,
                will_retry=retry,
                reasons=list(result.problems),
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
            if self._contents.needs_confirmation(result):
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
        checked_out = returned = consumed = restocked = 0
        if self._tech is not None:
            self._close_technician_session(now, out, result)
            return
        if result is not None and self._stale:
            # The baseline may be stale: what differs may have left or come back in a cycle the
            # store lost, so nobody of this session is named for it.
            self._reestablish(result, sid, now, out)
            reads, tags = result.reads, len(self.baseline)
        elif result is not None:
            first = len(out.events)
            checked_out, returned = self._contents.close_session(
                result, sid, actors, now, out.events
            )
            out.events[first:] = self._holdings.after_session(
                out.events[first:], self.assets, self.config.overdue_after_s, now
            )
            self._holdings.back(self.baseline)
            consumed, restocked = self._contents.consumed, self._contents.restocked
            reads, tags = result.reads, len(self.baseline)
            out.baseline = self.baseline
        out.events.append(
            ev.SessionClosed(
                **self._stamp(now),
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
                consumed=consumed,
                restocked=restocked,
            )
        )
        self._after_session(now, out, result)

    def _close_technician_session(
        self, now: Now, out: EngineOutput, result: ScanResult | None
    ) -> None:
        """A technician session's closing scan: restocks and removals, never check-outs."""
        session, tech = self._session, self._tech
        assert session is not None
        assert tech is not None
        restocked = removed = 0
        if result is not None and self._stale:
            self._reestablish(result, session.session_id, now, out)
        elif result is not None:
            restocked, removed = self._contents.close_technician(
                result, session.session_id, tech.who, list(session.actors), now, out.events
            )
            # An item someone holds, put back by the technician: its holding ends (no return).
            self._holdings.back(self.baseline)
            out.baseline = self.baseline
        self._end_technician(
            now,
            out,
            "scanned",
            quality="complete" if result is not None else "incomplete",
            restocked=restocked,
            removed=removed,
            actors=session.actors,
        )
        self._after_session(now, out, result)

    def _after_session(self, now: Now, out: EngineOutput, result: ScanResult | None) -> None:
        out.commands.append(StopScan())
        # Idempotent; also covers an Unlock a holder asked for during the scan but never used.
        out.commands.append(Relock())
        self._session = None
        self._pass.stop()
        self._first_pass = None
        self.phase = Phase.IDLE
        self._verify = result is None
        period = self.config.background_period_s
        if self._verify:
            # Re-check at once if the readers are fine, else when they are back (on_health).
            period = 0.0 if self._pass.ready() else (period or _UNVERIFIED_RETRY_S)
        self._bg_next = now.mono + period
        self._dirty = True

    def _background_pass_done(self, result: ScanResult, now: Now, out: EngineOutput) -> None:
        if not result.complete:
            self._bg_attempts += 1
            if not self._pass_incomplete(result, now, out, "background", self._bg_attempts):
                self._finish_background(now, out, complete=False)
            return
        if self.phase is Phase.BACKGROUND:
            if self._contents.needs_confirmation(result):
                self._first_pass = result
                self._start_pass(Phase.BACKGROUND_CONFIRM, now, out, first=False)
                return
            merged = result
        else:
            first = self._first_pass
            assert first is not None
            merged = first.merge(result)
        rebase = self._rebase
        if rebase is not None:
            mark = len(out.events)
            self._contents.rebaseline(merged, rebase.who, rebase.reason, now, out.events)
            self._holdings.back(self.baseline)
            self.rebaseline_result = next(
                e for e in out.events[mark:] if isinstance(e, ev.InventoryRebaselined)
            )
            out.baseline = self.baseline
            self._stale = False
            self._rebase = None
            self.rebaseline_state = "done"
        else:
            self._reestablish(merged, None, now, out)
        self._finish_background(now, out, complete=True)

    def _reestablish(
        self, result: ScanResult, session_id: UUID | None, now: Now, out: EngineOutput
    ) -> None:
        """A complete pass nobody is accountable for (background, or a session while the
        baseline is stale) becomes the baseline (``Contents.reestablish``): trusted again."""
        self._contents.reestablish(result, session_id, now, out.events)
        self._holdings.back(self.baseline)
        out.baseline = self.baseline
        self._stale = False

    def _finish_background(self, now: Now, out: EngineOutput, *, complete: bool) -> None:
        if self._rebase is not None:  # incomplete: the baseline stays as it was
            self._rebase = None
            self.rebaseline_state = "incomplete"
        out.commands.append(StopScan())
        self._first_pass = None
        self._pass.stop()
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


_PSEUDONYM_RE = re.compile(ev.PSEUDONYM_PATTERN)
