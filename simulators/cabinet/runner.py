"""Plays a scenario on the simulators: the items' tags in the LLRP reader's field, the door on
its GPIO, the people's badges on the badge reader, step by step."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from simulators.badge import BadgeSimulator
from simulators.cabinet.scenario import INSTALLER, Item, Person, Scenario, ScenarioError, Step
from simulators.door import DoorLockedError, SimulatedDoor
from simulators.llrp import LlrpSimulator, SimTag, neighbour_tag

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
BADGE_GAP_S = 0.5  # a card is taken away and shown again: never faster than this


def tag_for(scenario: Scenario, epc: str, drawer: str, item: Item | None = None) -> SimTag:
    """The simulated tag of an EPC lying in ``drawer`` (read by the drawer's first antenna)."""
    antenna = scenario.drawers[drawer][0]
    if item is None:
        return SimTag(epc=epc, antenna=antenna)
    return SimTag(
        epc=epc,
        antenna=antenna,
        rssi_mean=item.rssi_dbm,
        read_probability=item.read_probability,
        tid=item.tid,
    )


def populate(scenario: Scenario, llrp: LlrpSimulator) -> None:
    """Put every item that starts in a drawer into the reader's field, and the neighbour
    cabinet's tags where the drawers' antennas hear them (and nothing else)."""
    for tag in list(llrp.tags):
        llrp.remove_tag(tag.epc)
    for tag in llrp.tags.clones():
        llrp.remove_clone(tag.epc)
    for item in scenario.items:
        if item.drawer is not None:
            llrp.add_tag(tag_for(scenario, item.epc, item.drawer, item))
    for n in scenario.neighbours:
        llrp.add_tag(
            neighbour_tag(
                n.epc,
                scenario.drawers[n.drawer][0],
                rssi_mean=n.rssi_dbm,
                duty=n.duty,
                burst_rounds=n.burst_rounds,
            )
        )


def wire_door(scenario: Scenario, llrp: LlrpSimulator) -> SimulatedDoor:
    """A closed, locked door whose sensor is on the reader's GPI and lock on its GPO."""
    door = SimulatedDoor(
        llrp.set_gpi,
        sensor_port=scenario.cabinet.sensor_gpi,
        lock_port=scenario.cabinet.lock_gpo,
    )
    llrp.gpo_listeners.append(door.on_gpo)
    return door


class EventFeed(Protocol):
    """What the runner needs from whoever sees the agent's events (decrypted)."""

    def count(self, type_: str) -> int: ...

    async def wait_count(self, type_: str, n: int, timeout: float) -> None: ...  # noqa: ASYNC109


class EventLog:
    """Decrypted events (dicts with ``seq``) as they arrive; ``add`` runs on the loop (from
    another thread: ``add_threadsafe``). Counting starts after ``mark()``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._after = 0

    def add(self, event: Mapping[str, Any]) -> None:
        self.events.append(dict(event))
        self._changed.set()

    def add_threadsafe(self, loop: asyncio.AbstractEventLoop, event: Mapping[str, Any]) -> None:
        loop.call_soon_threadsafe(self.add, dict(event))

    def mark(self, after_seq: int | None = None) -> int:
        """Count only events with a seq above ``after_seq`` (default: the highest seen)."""
        self._after = self.last_seq() if after_seq is None else after_seq
        return self._after

    def last_seq(self) -> int:
        return max((int(e.get("seq", 0)) for e in self.events), default=0)

    def since_mark(self, before_seq: int | None = None) -> list[dict[str, Any]]:
        """Events after the mark (and before ``before_seq``), in seq order."""
        top = math.inf if before_seq is None else before_seq
        chosen = [e for e in self.events if self._after < int(e.get("seq", 0)) < top]
        return sorted(chosen, key=lambda e: int(e["seq"]))

    def find(self, predicate: Callable[[Mapping[str, Any]], bool]) -> list[dict[str, Any]]:
        return [e for e in self.events if predicate(e)]

    def count(self, type_: str) -> int:
        return sum(1 for e in self.since_mark() if e.get("type") == type_)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds, re-checked on every new event."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_count(self, type_: str, n: int, timeout: float) -> None:  # noqa: ASYNC109
        await self.wait_for(lambda: self.count(type_) >= n, timeout)


@dataclass
class ScenarioRunner:
    """Plays a scenario's steps on the simulators. ``events``: the agent's decrypted events
    (for ``wait_event``/``settle``); without them those steps watch the reader instead."""

    scenario: Scenario
    llrp: LlrpSimulator
    badge: BadgeSimulator
    door: SimulatedDoor
    events: EventFeed | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    badge_gap_s: float = BADGE_GAP_S
    fallback_wait_s: float = 3.0
    allow_list_expires_at: datetime | None = None
    on_step: Callable[[Step], None] | None = None
    # Presents a card (the coroutine function given) and returns once the agent has read it:
    # the person keeps the card at the reader until it beeps. The agent's pseudonyms are
    # memory-hard (tens of ms per read), so "badge bob, open" must not open the door before
    # Bob's read is in. None: return as soon as the card is presented.
    badge_read: Callable[[Callable[[], Awaitable[object]]], Awaitable[None]] | None = None
    # Runs cabinetctl against the agent (simulators.cabinet.control.cabinetctl), for the
    # technician's steps; None: a scenario with such steps cannot be played.
    ctl: Callable[[Sequence[str]], Coroutine[Any, Any, dict[str, Any]]] | None = None
    location: dict[str, str | None] = field(default_factory=dict)  # epc → drawer (None: out)
    _seen: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    # When each person last showed their card (loop time): share it between the runners of one
    # cabinet, or a runner may show a card again within the reader's repeat interval.
    last_badge: dict[str, float] = field(default_factory=dict, repr=False)
    # cabinetctl commands still running (``technician open_by_badge`` waits for the badge).
    _background: list[asyncio.Task[dict[str, Any]]] = field(
        default_factory=list, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not self.location:
            self.location = {i.epc: i.drawer for i in self.scenario.items}

    async def run(self) -> None:
        """Play every step once, in order; ScenarioError names the step that failed.

        ``wait_event`` counts the feed's events since its mark: mark it right before.
        """
        self._seen = {}
        try:
            for step in self.scenario.parsed_steps():
                if self.on_step is not None:
                    self.on_step(step)
                logger.info("scenario %s: %s", self.scenario.name, step.where())
                try:
                    await self._play(step)
                except TimeoutError:
                    raise ScenarioError(
                        f"{self.scenario.name}: {step.where()} timed out after {self.timeout_s:g}s"
                    ) from None
                except DoorLockedError:
                    raise ScenarioError(
                        f"{self.scenario.name}: {step.where()}: the door is locked"
                    ) from None
            # A cabinetctl still waiting (for a badge) must have succeeded by the end.
            async with asyncio.timeout(self.timeout_s):
                for task in self._background:
                    await task
        finally:
            for task in self._background:
                task.cancel()
            if self._background:
                await asyncio.wait(self._background)
            self._background = []

    async def commission(self, installer: Person = INSTALLER) -> None:
        """Stock the cabinet: one door cycle by ``installer`` makes the agent's first baseline."""
        await self.badge.wait_for_client(self.timeout_s)
        await self.badge.present(installer.badge)
        self.last_badge[installer.name] = asyncio.get_running_loop().time()
        await self._lock_state(locked=False)
        await self.door.open()
        await self.door.close()
        if self.events is not None:
            await self.events.wait_count(
                "session.closed", self.events.count("session.closed") + 1, self.timeout_s
            )
        else:
            await self._scan_cycle()
        await self._lock_state(locked=True)

    # -- steps --------------------------------------------------------------------------------

    async def _play(self, step: Step) -> None:
        handler: Callable[[Step], Awaitable[None]] = getattr(self, f"_op_{step.op}")
        await handler(step)

    async def _op_badge(self, step: Step) -> None:
        person = self.scenario.person(step.args[0])
        loop = asyncio.get_running_loop()
        last = self.last_badge.get(person.name)
        if last is not None and loop.time() - last < self.badge_gap_s:
            # A real card is taken away and shown again; readers drop instant repeats.
            await asyncio.sleep(self.badge_gap_s - (loop.time() - last))
        await self.badge.wait_for_client(self.timeout_s)
        if self.badge_read is None:
            await self.badge.present(person.badge)
        else:
            await self.badge_read(lambda: self.badge.present(person.badge))
        self.last_badge[person.name] = loop.time()

    async def _op_wait_unlock(self, step: Step) -> None:
        await self._lock_state(locked=False)

    async def _op_wait_locked(self, step: Step) -> None:
        await self._lock_state(locked=True)

    async def _op_expect_lock_state(self, step: Step) -> None:
        await self._lock_state(locked=step.args[0] == "locked")

    async def _op_open(self, step: Step) -> None:
        await self.door.open()

    async def _op_try_open(self, step: Step) -> None:
        try:
            await self.door.open()
        except DoorLockedError:
            return
        raise ScenarioError(f"{self.scenario.name}: {step.where()}: the door was not locked")

    async def _op_force_open(self, step: Step) -> None:
        await self.door.force_open()

    async def _op_close(self, step: Step) -> None:
        await self.door.close()

    async def _op_take(self, step: Step) -> None:
        self._need_open(step)
        for name in step.args:
            item = self.scenario.item(name)
            if self.location.get(item.epc) is None:
                raise ScenarioError(f"{self.scenario.name}: {step.where()}: {name} is not inside")
            self.llrp.remove_tag(item.epc)
            self.location[item.epc] = None

    async def _op_return(self, step: Step) -> None:
        self._need_open(step)
        names = list(step.args)
        to: str | None = None
        if len(names) >= 2 and names[-2] == "to":
            to, names = names[-1], names[:-2]
        for name in names:
            item = self.scenario.item(name)
            if self.location.get(item.epc) is not None:
                raise ScenarioError(f"{self.scenario.name}: {step.where()}: {name} is inside")
            drawer = to or item.home_drawer or item.drawer
            if drawer is None:
                raise ScenarioError(
                    f"{self.scenario.name}: {step.where()}: where does {name} go? (say 'to DRAWER')"
                )
            self.llrp.add_tag(tag_for(self.scenario, item.epc, drawer, item))
            self.location[item.epc] = drawer

    async def _op_move(self, step: Step) -> None:
        self._need_open(step)
        item = self.scenario.item(step.args[0])
        if self.location.get(item.epc) is None:
            raise ScenarioError(f"{self.scenario.name}: {step.where()}: {item.name} is not inside")
        drawer = step.args[2]
        self.llrp.add_tag(tag_for(self.scenario, item.epc, drawer, item))
        self.location[item.epc] = drawer

    async def _op_vanish(self, step: Step) -> None:
        # The tag stops answering with the door shut: broken, shielded, or taken through a gap.
        for name in step.args:
            item = self.scenario.item(name)
            if self.location.get(item.epc) is None:
                raise ScenarioError(f"{self.scenario.name}: {step.where()}: {name} is not inside")
            self.llrp.remove_tag(item.epc)
            self.location[item.epc] = None

    async def _op_add_unknown_tag(self, step: Step) -> None:
        epc, drawer = step.args[0].lower(), step.args[-1]
        self.llrp.add_tag(tag_for(self.scenario, epc, drawer))
        self.location[epc] = drawer

    async def _op_add_clone(self, step: Step) -> None:
        # Another chip programmed with the item's EPC, answering with its own TID.
        self._need_open(step)
        item = self.scenario.item(step.args[0])
        antenna = self.scenario.drawers[step.args[-1]][0]
        self.llrp.add_clone(SimTag(epc=item.epc, antenna=antenna, tid=step.args[1].lower()))

    async def _op_remove_clone(self, step: Step) -> None:
        self._need_open(step)
        item = self.scenario.item(step.args[0])
        try:
            self.llrp.remove_clone(item.epc)
        except KeyError:
            raise ScenarioError(
                f"{self.scenario.name}: {step.where()}: no clone of {item.name} inside"
            ) from None

    async def _op_wait(self, step: Step) -> None:
        await asyncio.sleep(float(step.args[0]))

    async def _op_wait_event(self, step: Step) -> None:
        type_ = step.args[0]
        n = int(step.args[1]) if len(step.args) == 2 else self._seen.get(type_, 0) + 1
        self._seen[type_] = n
        if self.events is not None:
            await self.events.wait_count(type_, n, self.timeout_s)
        elif type_ == "session.closed":
            await self._scan_cycle()
        else:
            await asyncio.sleep(self.fallback_wait_s)

    async def _op_settle(self, step: Step) -> None:
        await self._op_wait_event(Step(step.index, step.text, "wait_event", ("session.closed",)))

    async def _op_wait_scanning(self, step: Step) -> None:
        # A ROSpec active is not enough: the agent counts a pass only once the reader's answer
        # to its start has arrived, and a fault armed between the simulator activating the
        # ROSpec and sending that answer would stop the start, not the scan. The first report
        # of the new scan follows the answer on the same connection.
        sent = self.llrp.stats.reports_sent
        await self.llrp.wait_until(
            lambda: self._inventorying() and self.llrp.stats.reports_sent > sent, self.timeout_s
        )

    async def _op_reader_fail(self, step: Step) -> None:
        self.llrp.faults.reboot(down_s=float(step.args[0]))
        await self.llrp.wait_until(lambda: not self.llrp.is_up, self.timeout_s)

    async def _op_reader_fault(self, step: Step) -> None:
        faults = self.llrp.faults
        kind = step.args[0]
        if kind == "silence":
            faults.silence()
        elif kind == "drop_mid_frame":
            faults.drop_mid_frame()
        elif kind == "garbage":
            faults.garbage()
        elif kind == "straddle":
            faults.straddle()
        else:
            faults.clear()

    async def _op_reader_recover(self, step: Step) -> None:
        await self.llrp.wait_up(self.timeout_s)
        # Back only once the agent has reconnected and configured the reader again.
        await self.llrp.wait_until(lambda: self.llrp.connections.active == 1, self.timeout_s)

    async def _op_wait_allow_list_expired(self, step: Step) -> None:
        at = self.allow_list_expires_at
        if at is None:
            raise ScenarioError(f"{self.scenario.name}: {step.where()}: expiry time not given")
        remaining = (at - datetime.now(UTC)).total_seconds()
        if remaining > self.timeout_s:
            raise ScenarioError(
                f"{self.scenario.name}: {step.where()}: the allow-list expires in {remaining:.0f}s"
            )
        if remaining > 0:
            await asyncio.sleep(remaining + 0.2)

    async def _op_technician(self, step: Step) -> None:
        ctl = self._ctl(step)
        what, reason = step.args[0], " ".join(step.args[1:])
        if what == "close":
            await ctl(["technician", "close"])
        elif what == "open":
            await ctl(["technician", "open", "--reason", reason])
        else:
            # cabinetctl waits for the supervisor's badge: the next steps present it.
            wait = f"{self.timeout_s:g}"
            self._background.append(
                asyncio.create_task(
                    ctl(["technician", "open", "--badge", "--wait", wait, "--reason", reason]),
                    name=f"scenario:{step.where()}",
                )
            )
            async with asyncio.timeout(self.timeout_s):
                while not (await ctl(["technician", "status"]))["awaiting_supervisor"]:
                    if self._background[-1].done():
                        await self._background[-1]  # it failed: say why
                    await asyncio.sleep(0.1)

    async def _op_rebaseline(self, step: Step) -> None:
        await self._ctl(step)(["inventory", "rebaseline", "--reason", " ".join(step.args)])

    async def _op_door_test(self, step: Step) -> None:
        result = await self._ctl(step)(["door", "test", "--yes-i-am-on-site"])
        if not result.get("ok"):
            raise ScenarioError(f"{self.scenario.name}: {step.where()}: {result.get('steps')}")

    # -- helpers ------------------------------------------------------------------------------

    def _ctl(self, step: Step) -> Callable[[Sequence[str]], Coroutine[Any, Any, dict[str, Any]]]:
        if self.ctl is None:
            raise ScenarioError(
                f"{self.scenario.name}: {step.where()}: this runner cannot run cabinetctl "
                "(no control socket)"
            )
        return self.ctl

    def _need_open(self, step: Step) -> None:
        if not self.door.is_open:
            raise ScenarioError(f"{self.scenario.name}: {step.where()}: the door is closed")

    async def _lock_state(self, *, locked: bool) -> None:
        await self.llrp.wait_until(lambda: self.door.locked == locked, self.timeout_s)

    async def _scan_cycle(self) -> None:
        """Without an event feed: the settle scan is over when the reader stops inventorying."""
        await self.llrp.wait_until(self._inventorying, self.timeout_s)
        await self.llrp.wait_until(lambda: not self._inventorying(), self.timeout_s)

    def _inventorying(self) -> bool:
        return any(rs.state.name == "Active" for rs in self.llrp.rospecs.values())
