"""Cabinet scenario simulator: people, tagged items, drawers, a door and a badge reader, played
from a TOML scenario file against the LLRP reader simulator, the badge simulator and the simulated
door (format: ``docs/scenarios.md``).

```python
scenario = load_scenario(find_scenario("plain-checkout"))
populate(scenario, llrp)                      # the items' tags, in their drawers
door = wire_door(scenario, llrp)              # sensor on a GPI, lock on a GPO
runner = ScenarioRunner(scenario, llrp, badge, door, events=log)   # log: decrypted events
log.mark()
await runner.run()
problems = match_events(scenario.expect, log.since_mark(), artefacts)   # [] = exact match
```

``build_artefacts`` turns the scenario's people and items into what the agent needs (a signed
allow-list of pseudonyms, a signed asset registry, the ``[domain]`` drawers) and ``agent_config``
writes a matching agent config, so a test or a demo starts the daemon with one file and maps the
decrypted events back to names. Raw badge ids live only in the scenario file and in memory here:
they are never logged, never written to a generated file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shlex
import tempfile
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simulators.badge import BadgeSimulator
from simulators.door import DoorLockedError, SimulatedDoor
from simulators.llrp import LlrpSimulator, SimTag, neighbour_tag

logger = logging.getLogger(__name__)

__all__ = [
    "FAST_DOMAIN",
    "INSTALLER",
    "AgentArtefacts",
    "EventFeed",
    "EventLog",
    "Item",
    "Person",
    "Scenario",
    "ScenarioError",
    "ScenarioRunner",
    "Step",
    "agent_config",
    "build_artefacts",
    "bundled_scenarios",
    "cmd_topic",
    "describe_event",
    "load_scenario",
    "match_events",
    "populate",
    "publish_documents",
    "publish_retained",
    "to_toml",
]

DEFAULT_TIMEOUT_S = 30.0
# Commissioning: the installer's first door cycle gives the agent its first baseline.
BADGE_GAP_S = 0.5  # a card is taken away and shown again: never faster than this
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_EPC_RE = re.compile(r"(?:[0-9a-f]{4}){1,31}")

# Short timers so a whole door cycle takes about a second: tests and demos, not production.
FAST_DOMAIN: dict[str, Any] = {
    "min_reads": 2,
    "stable_ms": 300,
    "scan_min_ms": 500,
    "scan_max_ms": 4000,
    "confirm_pass": True,
    "max_rescans": 2,
    "unlock_pulse_s": 4.0,
    "relock_after_s": 4.0,
    "left_open_s": 60.0,
    "reopen_grace_s": 0.5,
    "lockout_denials": 5,
    "lockout_window_s": 120.0,
    "lockout_duration_s": 300.0,
    "background_period_s": 0,
    # Reports come every 100 ms (agent_config): a round holds about two of them.
    "presence_round_ms": 200,
}


class ScenarioError(Exception):
    """A scenario file is invalid, or a step could not be played (names the step)."""


# ---- the scenario file ---------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Person(_Model):
    """Someone with a badge. ``listed = false`` keeps them out of the allow-list."""

    name: str = Field(pattern=_NAME_RE)
    badge: str = Field(description="raw card number: 10 hex digits (EM4100)")
    roles: list[str] = Field(default=["user"])
    listed: bool = True

    @field_validator("badge")
    @classmethod
    def _em4100(cls, value: str) -> str:
        text = value.strip().upper()
        if len(text) != 10 or any(c not in "0123456789ABCDEF" for c in text):
            # Never echo the value: it is a badge number.
            raise ValueError("badge must be 10 hex digits (an EM4100 card number)")
        return text


class Item(_Model):
    """A tagged tool. ``drawer`` is where it starts (omit: it starts outside, held by someone)."""

    name: str = Field(pattern=_NAME_RE)
    epc: str
    drawer: str | None = None
    asset_id: str | None = Field(None, min_length=1, max_length=128)
    home_drawer: str | None = None
    calibration_due: date | None = None
    registered: bool = Field(True, description="false: not in the asset registry")
    read_probability: float = Field(1.0, gt=0, le=1)
    rssi_dbm: float = Field(-55.0, ge=-100, le=0)

    @field_validator("epc")
    @classmethod
    def _epc(cls, value: str) -> str:
        epc = value.strip().lower()
        if not _EPC_RE.fullmatch(epc):
            raise ValueError("epc must be lower-case hex, whole 16-bit words (4..124 digits)")
        return epc

    @property
    def asset(self) -> str:
        return self.asset_id or self.name


class Neighbour(_Model):
    """A tag of the cabinet next door that the antennas of ``drawer`` hear through the wall:
    weak (near the agent's -80 dBm floor) and intermittent (it can answer only in ``duty`` of
    the inventory rounds, in runs of ``burst_rounds`` rounds on average)."""

    epc: str
    drawer: str
    rssi_dbm: float = Field(-79.0, ge=-100, le=0)
    duty: float = Field(0.3, gt=0, le=1)
    burst_rounds: float = Field(6.0, ge=1, le=10_000)

    @field_validator("epc")
    @classmethod
    def _epc(cls, value: str) -> str:
        epc = value.strip().lower()
        if not _EPC_RE.fullmatch(epc):
            raise ValueError("epc must be lower-case hex, whole 16-bit words (4..124 digits)")
        return epc


class Layout(_Model):
    """The cabinet hardware the scenario plays on."""

    site_id: str = Field("hangar-3", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")
    cabinet_id: str = Field("crib-07", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")
    reader_id: str = Field("dock-1", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")
    personality: Literal["impinj", "zebra"] = "impinj"
    antennas: int = Field(4, ge=1, le=8)
    sensor_gpi: int = Field(1, ge=1, le=4)
    lock_gpo: int = Field(1, ge=1, le=4)
    badge_reader_id: str = Field("badge-1", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")
    door_id: str = Field("door", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")


class AllowListSpec(_Model):
    version: int = Field(1, ge=0)
    expires_in_s: float = Field(30 * 86400.0, gt=0, description="from when the list is signed")


class Expected(BaseModel):
    """One expected event: ``type`` plus only the fields that matter (names, not pseudonyms)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str

    def fields(self) -> dict[str, Any]:
        extra = self.model_extra or {}
        return {"type": self.type, **extra}


@dataclass(frozen=True)
class Step:
    """One parsed step: ``op`` and its words; ``index`` (1-based) and ``text`` for messages."""

    index: int
    text: str
    op: str
    args: tuple[str, ...]

    def where(self) -> str:
        return f"step {self.index} {self.text!r}"


# op → (min args, max args or None); checked at load time, names resolved too.
_OPS: dict[str, tuple[int, int | None]] = {
    "badge": (1, 1),
    "wait_unlock": (0, 0),
    "wait_locked": (0, 0),
    "expect_lock_state": (1, 1),
    "open": (0, 0),
    "try_open": (0, 0),
    "force_open": (0, 0),
    "close": (0, 0),
    "take": (1, None),
    "return": (1, None),
    "move": (3, 3),
    "vanish": (1, None),
    "add_unknown_tag": (2, 3),
    "wait": (1, 1),
    "wait_event": (1, 2),
    "settle": (0, 0),
    "wait_scanning": (0, 0),
    "reader_fail": (1, 1),
    "reader_recover": (0, 0),
    "reader_fault": (1, 1),
    "wait_allow_list_expired": (0, 0),
}


# LLRP simulator fault switches on the agent's current connection.
_READER_FAULTS = ("silence", "drop_mid_frame", "garbage", "clear")


class Scenario(_Model):
    """A whole scenario file (see docs/scenarios.md)."""

    name: str = Field(pattern=_NAME_RE)
    description: str = ""
    loop: bool = Field(False, description="the steps leave the cabinet as they found it")
    cabinet: Layout = Layout()
    drawers: dict[str, list[int]] = Field(min_length=1)
    domain: dict[str, Any] = Field(default_factory=dict, description="[domain] overrides")
    allow_list: AllowListSpec = AllowListSpec()
    people: list[Person] = Field(default_factory=list)
    items: list[Item] = Field(default_factory=list)
    neighbours: list[Neighbour] = Field(default_factory=list)
    asset_registry: bool = Field(True, description="false: the agent gets no asset registry")
    steps: list[str] = Field(min_length=1)
    expect: list[Expected] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ports: dict[int, str] = {}
        for drawer, ants in self.drawers.items():
            if not re.fullmatch(_NAME_RE, drawer):
                raise ValueError(f"drawer name {drawer!r} must match {_NAME_RE}")
            if not ants:
                raise ValueError(f"drawer {drawer!r} has no antennas")
            for ant in ants:
                if not 1 <= ant <= self.cabinet.antennas:
                    raise ValueError(
                        f"drawer {drawer!r}: antenna {ant} outside 1..{self.cabinet.antennas}"
                    )
                if ant in ports:
                    raise ValueError(f"antenna {ant} is in drawers {ports[ant]!r} and {drawer!r}")
                ports[ant] = drawer
        _unique("person", [p.name for p in self.people])
        _unique("badge of person", [p.badge for p in self.people], show=False)
        _unique("item", [i.name for i in self.items])
        _unique("item epc", [i.epc for i in self.items] + [n.epc for n in self.neighbours])
        for n in self.neighbours:
            if n.drawer not in self.drawers:
                raise ValueError(f"neighbour {n.epc}: drawer {n.drawer!r} is not a drawer")
        for item in self.items:
            for what, where in (("drawer", item.drawer), ("home_drawer", item.home_drawer)):
                if where is not None and where not in self.drawers:
                    raise ValueError(f"item {item.name!r}: {what} {where!r} is not a drawer")
        for key in self.domain:
            if key == "drawers":
                raise ValueError("domain.drawers comes from [drawers]; do not set it here")
        self.parsed_steps()  # raises on the first bad step
        return self

    # -- lookups --------------------------------------------------------------------------

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)

    def item(self, name: str) -> Item:
        for i in self.items:
            if i.name == name:
                return i
        raise KeyError(name)

    def aliases(self) -> dict[str, list[str]]:
        """The ``[domain] drawers`` the agent needs: drawer → ``"reader:port"``."""
        rid = self.cabinet.reader_id
        return {d: [f"{rid}:{a}" for a in ants] for d, ants in self.drawers.items()}

    def antennas_in_use(self) -> list[int]:
        return sorted(a for ants in self.drawers.values() for a in ants)

    def parsed_steps(self) -> list[Step]:
        """Every step parsed and checked against the declared people, items and drawers."""
        return [self._parse_step(i, text) for i, text in enumerate(self.steps, 1)]

    def _parse_step(self, index: int, text: str) -> Step:
        try:
            words = shlex.split(text)
        except ValueError as err:
            raise ValueError(f"step {index} {text!r}: {err}") from None
        if not words:
            raise ValueError(f"step {index} is empty")
        op, args = words[0], tuple(words[1:])
        step = Step(index, text, op, args)
        if op not in _OPS:
            raise ValueError(f"{step.where()}: unknown step {op!r} (known: {', '.join(_OPS)})")
        lo, hi = _OPS[op]
        if len(args) < lo or (hi is not None and len(args) > hi):
            raise ValueError(f"{step.where()}: wrong number of arguments")
        people = {p.name for p in self.people}
        items = {i.name for i in self.items}

        def need_item(name: str) -> None:
            if name not in items:
                raise ValueError(f"{step.where()}: no item {name!r}")

        def need_drawer(name: str) -> None:
            if name not in self.drawers:
                raise ValueError(f"{step.where()}: no drawer {name!r}")

        if op == "badge" and args[0] not in people:
            raise ValueError(f"{step.where()}: no person {args[0]!r}")
        if op == "expect_lock_state" and args[0] not in ("locked", "unlocked"):
            raise ValueError(f"{step.where()}: expected 'locked' or 'unlocked'")
        if op in ("take", "vanish"):
            for name in args:
                need_item(name)
        if op == "return":
            names = list(args)
            if len(names) >= 2 and names[-2] == "to":
                need_drawer(names[-1])
                names = names[:-2]
            if not names:
                raise ValueError(f"{step.where()}: return what?")
            for name in names:
                need_item(name)
        if op == "move":
            need_item(args[0])
            if args[1] != "to":
                raise ValueError(f"{step.where()}: expected 'move ITEM to DRAWER'")
            need_drawer(args[2])
        if op == "add_unknown_tag":
            epc = args[0].lower()
            if not _EPC_RE.fullmatch(epc):
                raise ValueError(f"{step.where()}: {args[0]!r} is not an EPC")
            if epc in {i.epc for i in self.items}:
                raise ValueError(f"{step.where()}: {epc} is a declared item")
            if len(args) == 3 and args[1] != "to":
                raise ValueError(f"{step.where()}: expected 'add_unknown_tag EPC [to] DRAWER'")
            need_drawer(args[-1])
        if op in ("wait", "reader_fail") and args:
            try:
                seconds = float(args[0])
            except ValueError:
                raise ValueError(
                    f"{step.where()}: {args[0]!r} is not a number of seconds"
                ) from None
            if not 0 <= seconds <= 3600 or math.isnan(seconds):
                raise ValueError(f"{step.where()}: seconds must be within 0..3600")
        if op == "reader_fault" and args[0] not in _READER_FAULTS:
            raise ValueError(f"{step.where()}: faults are {', '.join(_READER_FAULTS)}")
        if op == "wait_event" and len(args) == 2 and not args[1].isdigit():
            raise ValueError(f"{step.where()}: the count must be a positive integer")
        return step


def _unique(what: str, values: Sequence[str], *, show: bool = True) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} {v!r} appears twice" if show else f"a {what} appears twice")
        seen.add(v)


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError names the file and every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read: {err.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ScenarioError(f"{path}: not a TOML file: {err}") from None
    return parse_scenario(data, str(path))


def parse_scenario(data: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate an already-parsed scenario document."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors(include_url=False):
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {loc}: {e['msg']}")
        raise ScenarioError(f"{source}: invalid scenario\n" + "\n".join(lines)) from None


def bundled_scenarios() -> list[Path]:
    """The scenario files shipped with the package (``simulators/scenarios/*.toml``)."""
    root = resources.files("simulators") / "scenarios"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml"))


def find_scenario(name_or_path: str) -> Path:
    """A path, or the name of a bundled scenario (with or without ``.toml``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = name_or_path.removesuffix(".toml")
    for p in bundled_scenarios():
        if p.stem == stem:
            return p
    raise ScenarioError(f"{name_or_path}: no such file and no bundled scenario of that name")


INSTALLER = Person(name="installer", badge="4C0FEE1234", roles=["user"])


# ---- the simulated cabinet -----------------------------------------------------------------


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
    )


def populate(scenario: Scenario, llrp: LlrpSimulator) -> None:
    """Put every item that starts in a drawer into the reader's field, and the neighbour
    cabinet's tags where the drawers' antennas hear them (and nothing else)."""
    for tag in list(llrp.tags):
        llrp.remove_tag(tag.epc)
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
    location: dict[str, str | None] = field(default_factory=dict)  # epc → drawer (None: out)
    _seen: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _last_badge: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.location:
            self.location = {i.epc: i.drawer for i in self.scenario.items}

    async def run(self) -> None:
        """Play every step once, in order; ScenarioError names the step that failed.

        ``wait_event`` counts the feed's events since its mark: mark it right before.
        """
        self._seen = {}
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

    async def commission(self, installer: Person = INSTALLER) -> None:
        """Stock the cabinet: one door cycle by ``installer`` makes the agent's first baseline."""
        await self.badge.wait_for_client(self.timeout_s)
        await self.badge.present(installer.badge)
        self._last_badge[installer.name] = asyncio.get_running_loop().time()
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
        last = self._last_badge.get(person.name)
        if last is not None and loop.time() - last < self.badge_gap_s:
            # A real card is taken away and shown again; readers drop instant repeats.
            await asyncio.sleep(self.badge_gap_s - (loop.time() - last))
        await self.badge.wait_for_client(self.timeout_s)
        await self.badge.present(person.badge)
        self._last_badge[person.name] = loop.time()

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
        await self.llrp.wait_until(self._inventorying, self.timeout_s)

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

    # -- helpers ------------------------------------------------------------------------------

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


# ---- what the agent needs ------------------------------------------------------------------


@dataclass(frozen=True)
class AgentArtefacts:
    """The agent-side view of a scenario: signed documents, drawers, and names for matching."""

    site_id: str
    cabinet_id: str
    allow_list: bytes  # signed wire form
    asset_registry: bytes  # signed wire form
    allow_list_expires_at: datetime
    domain: dict[str, Any]  # the [domain] section
    names: dict[str, str]  # pseudonym → person name (every person, listed or not)
    items: dict[str, str]  # epc → item name
    registry_installed: bool = True  # false: the asset registry is never given to the agent

    def name_of(self, actor: str) -> str:
        return self.names.get(actor, actor)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``allow-list.json`` and ``asset-registry.json`` (no raw badge id in either)."""
        directory.mkdir(parents=True, exist_ok=True)
        allow = directory / "allow-list.json"
        registry = directory / "asset-registry.json"
        allow.write_bytes(self.allow_list)
        registry.write_bytes(self.asset_registry)
        return allow, registry


def build_artefacts(
    scenario: Scenario,
    *,
    site_key: bytes,
    site_kid: str,
    signing_key: Any,
    signing_kid: str,
    now: datetime | None = None,
    domain_base: Mapping[str, Any] = FAST_DOMAIN,
    allow_list_version: int | None = None,
    allow_list_expires_at: datetime | None = None,
    extra_people: Sequence[Person] = (),
) -> AgentArtefacts:
    """Pseudonymize the people with the site key and sign the allow-list and asset registry.

    ``extra_people`` (an installer, a test's marker badge) join the scenario's people.
    """
    from agent.privacy.pseudonym import Pseudonymizer
    from agent.privacy.signed import allow_list_doc, asset_registry_doc, sign_document

    lay = scenario.cabinet
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    pseudo = Pseudonymizer(lay.site_id, site_kid, site_key)
    people = [*scenario.people, *extra_people]
    names = {pseudo.badge(p.badge): p.name for p in people}
    entries = {pseudo.badge(p.badge): list(p.roles) for p in people if p.listed}
    expires = allow_list_expires_at or issued + timedelta(seconds=scenario.allow_list.expires_in_s)
    version = scenario.allow_list.version if allow_list_version is None else allow_list_version
    allow = allow_list_doc(lay.site_id, lay.cabinet_id, version, expires, entries, issued_at=issued)
    assets: list[dict[str, Any]] = []
    for item in scenario.items:
        if not item.registered:
            continue
        asset: dict[str, Any] = {"epc": item.epc, "asset_id": item.asset, "name": item.name}
        if item.home_drawer is not None:
            asset["home_drawer"] = item.home_drawer
        if item.calibration_due is not None:
            asset["calibration_due"] = item.calibration_due.isoformat()
        assets.append(asset)
    registry = asset_registry_doc(
        lay.site_id, lay.cabinet_id, 1, issued + timedelta(days=365), assets, issued_at=issued
    )
    domain = {
        **domain_base,
        **scenario.domain,
        "drawers": scenario.aliases(),
        "door_id": lay.door_id,
    }
    return AgentArtefacts(
        site_id=lay.site_id,
        cabinet_id=lay.cabinet_id,
        allow_list=sign_document(signing_key, signing_kid, allow),
        asset_registry=sign_document(signing_key, signing_kid, registry),
        allow_list_expires_at=expires,
        domain=domain,
        names=names,
        items={i.epc: i.name for i in scenario.items},
        registry_installed=scenario.asset_registry,
    )


def agent_config(
    scenario: Scenario,
    artefacts: AgentArtefacts,
    *,
    llrp_port: int,
    badge_url: str,
    key_dir: Path,
    state_dir: Path,
    mqtt_port: int | None = None,
    mqtt_host: str = "127.0.0.1",
    extra_badge_readers: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An agent config (as a dict; ``to_toml`` writes it) wired to the simulators, short timers."""
    lay = scenario.cabinet
    key_dir = key_dir.resolve()
    state_dir = state_dir.resolve()
    cfg: dict[str, Any] = {
        "cabinet": {"site_id": lay.site_id, "cabinet_id": lay.cabinet_id},
        "logging": {"level": "INFO"},
        "readers": [
            {
                "type": "llrp",
                "id": lay.reader_id,
                "host": "127.0.0.1",
                "port": llrp_port,
                "antennas": scenario.antennas_in_use(),
                "keepalive_s": 1.0,
                "connect_timeout_s": 3.0,
                "inventory_deadline_s": 10.0,
                "report_timeout_ms": 100,
                "gpi_ports": [lay.sensor_gpi],
                "backoff": {"initial_s": 0.05, "max_s": 0.5},
            }
        ],
        "badge_readers": [
            {
                "id": lay.badge_reader_id,
                "url": badge_url,
                "protocol": "em4100",
                "repeat_interval_s": 0.3,
                "backoff": {"initial_s": 0.05, "max_s": 0.5},
            },
            *[dict(b) for b in extra_badge_readers],
        ],
        "door": {
            "id": lay.door_id,
            "reader": lay.reader_id,
            "sensor_gpi": lay.sensor_gpi,
            "lock_gpo": lay.lock_gpo,
            "release_pulse_s": float(artefacts.domain.get("unlock_pulse_s", 4.0)),
            "command_timeout_s": 3.0,
        },
        "domain": artefacts.domain,
        "store": {"path": str(state_dir / "state.db"), "synchronous": "NORMAL"},
        "privacy": {
            "site_key": str(key_dir / "site.key"),
            "seal_public_key": str(key_dir / "backend-hpke.pub"),
            "signing_public_keys": [str(key_dir / "signing.pub")],
        },
        "control": {"socket_path": str(_control_socket(state_dir))},
        "metrics": {"enabled": False},
    }
    if mqtt_port is not None:
        cfg["mqtt"] = {
            "host": mqtt_host,
            "port": mqtt_port,
            "keepalive_s": 5,
            "connect_timeout_s": 5.0,
            "poll_interval_s": 0.2,
            "replay_rate": 0,
            "backoff": {"initial_s": 0.1, "max_s": 1.0},
        }
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def _control_socket(state_dir: Path) -> Path:
    """``state_dir/ctl.sock``, or a short private directory under /tmp when that path is too
    long for a Unix socket (108 bytes on Linux; deep temporary directories exceed it)."""
    path = state_dir / "ctl.sock"
    if len(str(path).encode()) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="cabinet-ctl-", dir="/tmp")) / "ctl.sock"


def cmd_topic(artefacts: AgentArtefacts, kind: str, prefix: str = "cabinets/v1") -> str:
    """The agent's MQTT command topic for a document ``kind`` (allow-list, asset-registry)."""
    return f"{prefix}/{artefacts.site_id}/{artefacts.cabinet_id}/cmd/{kind}"


def publish_retained(
    port: int, topic: str, payload: bytes, *, host: str = "127.0.0.1", timeout: float = 15.0
) -> None:
    """Publish one retained QoS 1 message and wait for the broker's acknowledgement (blocking)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=timeout)
        if not info.is_published():
            raise ScenarioError(f"the broker did not acknowledge {topic} in {timeout:g}s")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_documents(artefacts: AgentArtefacts, *, port: int, host: str = "127.0.0.1") -> None:
    """Deliver the signed allow-list and (unless the scenario has none) the asset registry as
    retained cmd messages."""
    publish_retained(port, cmd_topic(artefacts, "allow-list"), artefacts.allow_list, host=host)
    if artefacts.registry_installed:
        publish_retained(
            port, cmd_topic(artefacts, "asset-registry"), artefacts.asset_registry, host=host
        )


# ---- matching events -----------------------------------------------------------------------

# Fields that differ on every run: never part of a description unless a scenario names them.
_VOLATILE = frozenset(
    {"event_id", "seq", "time", "site_id", "cabinet_id", "schema_version", "session_id", "until"}
)


def describe_event(event: Mapping[str, Any], artefacts: AgentArtefacts) -> dict[str, Any]:
    """An event with names instead of pseudonyms and EPCs (``item``), volatile fields dropped."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _VOLATILE:
            continue
        if key == "actors" and isinstance(value, list):
            out[key] = [artefacts.name_of(a) for a in value]
        elif key == "actor" and isinstance(value, str):
            out[key] = artefacts.name_of(value)
        elif key == "epc" and isinstance(value, str):
            out["epc"] = value
            if value in artefacts.items:
                out["item"] = artefacts.items[value]
        elif key == "items" and isinstance(value, dict):
            out[key] = {artefacts.items.get(e, e): d for e, d in value.items()}
        else:
            out[key] = value
    return out


def match_events(
    expected: Sequence[Expected],
    actual: Sequence[Mapping[str, Any]],
    artefacts: AgentArtefacts,
) -> list[str]:
    """Problems (empty: exact match) comparing the expected list with the events in seq order."""
    problems: list[str] = []
    described = [describe_event(e, artefacts) for e in actual]
    for i in range(max(len(expected), len(described))):
        exp = expected[i].fields() if i < len(expected) else None
        got = described[i] if i < len(described) else None
        if exp is None:
            problems.append(f"#{i + 1}: unexpected {_short(got)}")
            continue
        if got is None:
            problems.append(f"#{i + 1}: missing {_short(exp)}")
            continue
        for key, want in exp.items():
            have = got.get(key, "<absent>")
            if _normal(have) != _normal(want):
                problems.append(f"#{i + 1} {got.get('type')}: {key} = {have!r}, expected {want!r}")
    return problems


def _normal(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _short(event: Mapping[str, Any] | None) -> str:
    return json.dumps(event, default=str, sort_keys=True)


def describe_events(events: Iterable[Mapping[str, Any]], artefacts: AgentArtefacts) -> str:
    """One line per event (for failure messages and the CLI)."""
    return "\n".join(_short(describe_event(e, artefacts)) for e in events)


# ---- TOML ----------------------------------------------------------------------------------


def to_toml(doc: Mapping[str, Any]) -> str:
    """TOML for the config shapes used here: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    _emit_table(lines, (), doc)
    return "\n".join(lines).strip() + "\n"


def _emit_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    subtables: list[tuple[str, Any]] = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping) or (
            isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
        ):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        sub = (*path, key)
        header = ".".join(_key(k) for k in sub)
        if isinstance(value, Mapping):
            lines += ["", f"[{header}]"]
            _emit_table(lines, sub, value)
        else:
            for element in value:
                lines += ["", f"[[{header}]]"]
                _emit_table(lines, sub, element)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("TOML numbers here must be finite")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
