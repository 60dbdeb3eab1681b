"""The scenario file: people, tagged items, drawers, steps and expected events (format:
``docs/scenarios.md``), parsed and checked before anything plays. Raw badge ids live only in
the scenario file and in memory: never logged, never echoed in an error."""

from __future__ import annotations

import math
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_EPC_RE = re.compile(r"(?:[0-9a-f]{4}){1,31}")
_TID_RE = re.compile(r"(?:[0-9a-f]{4}){2,32}")


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
    calibration_due_in_days: int | None = Field(
        None,
        ge=-3650,
        le=3650,
        description="instead of calibration_due: that many days from the date at the site "
        "([cabinet] timezone) when the scenario is provisioned (-1: due yesterday there)",
    )
    overdue_after_s: int | None = Field(
        None, ge=0, le=366 * 86400, description="the registry's limit out (0: never overdue)"
    )
    registered: bool = Field(True, description="false: not in the asset registry")
    read_probability: float = Field(1.0, gt=0, le=1)
    rssi_dbm: float = Field(-55.0, ge=-100, le=0)
    consumable: bool = Field(False, description="a consumable unit or pack (needs its sku)")
    sku: str | None = Field(None, pattern=_NAME_RE)
    tid: str | None = Field(
        None,
        description="the tag's TID; the asset registry pins the item to it (unless unregistered)",
    )

    @field_validator("epc")
    @classmethod
    def _epc(cls, value: str) -> str:
        epc = value.strip().lower()
        if not _EPC_RE.fullmatch(epc):
            raise ValueError("epc must be lower-case hex, whole 16-bit words (4..124 digits)")
        return epc

    @model_validator(mode="after")
    def _sku(self) -> Item:
        if self.consumable and self.sku is None:
            raise ValueError(f"item {self.name!r} is consumable: it needs its sku")
        return self

    @field_validator("tid")
    @classmethod
    def _tid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        tid = value.strip().lower()
        if not _TID_RE.fullmatch(tid):
            raise ValueError("tid must be lower-case hex, 2..32 whole 16-bit words")
        return tid

    @property
    def asset(self) -> str:
        return self.asset_id or self.name

    @model_validator(mode="after")
    def _one_due_date(self) -> Item:
        if self.calibration_due is not None and self.calibration_due_in_days is not None:
            raise ValueError("give calibration_due or calibration_due_in_days, not both")
        return self


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
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA zone of the site")
    read_tid: bool = Field(False, description="the agent reads TIDs with the inventory")


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
    "add_clone": (3, 4),
    "remove_clone": (1, 1),
    "wait": (1, 1),
    "wait_event": (1, 2),
    "settle": (0, 0),
    "wait_scanning": (0, 0),
    "reader_fail": (1, 1),
    "reader_recover": (0, 0),
    "reader_fault": (1, 1),
    "wait_allow_list_expired": (0, 0),
    # cabinetctl, run by the technician at the cabinet (the runner's ``ctl``)
    "technician": (1, None),
    "rebaseline": (1, None),
    "door_test": (0, 0),
}
_TECHNICIAN_OPS = ("open", "open_by_badge", "close")


# LLRP simulator fault switches on the agent's current connection.
_READER_FAULTS = ("silence", "drop_mid_frame", "garbage", "straddle", "clear")


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
    at_night: bool = Field(
        False,
        description="the scenario plays during the night hours: [domain] night_start/night_end "
        "are set to the two hours around the moment it is provisioned, on the site's clocks",
    )
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
            if self.at_night and key in ("night_start", "night_end"):
                raise ValueError(f"domain.{key} comes from at_night; do not set it here")
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
        if op == "add_clone":
            need_item(args[0])
            tid = args[1].lower()
            if not _TID_RE.fullmatch(tid):
                raise ValueError(f"{step.where()}: {args[1]!r} is not a TID (hex, whole words)")
            if tid == self.item(args[0]).tid:
                raise ValueError(f"{step.where()}: a clone's TID is not the item's own")
            if len(args) == 4 and args[2] != "to":
                raise ValueError(f"{step.where()}: expected 'add_clone ITEM TID [to] DRAWER'")
            need_drawer(args[-1])
        if op == "remove_clone":
            need_item(args[0])
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
        if op == "technician":
            if args[0] not in _TECHNICIAN_OPS:
                raise ValueError(f"{step.where()}: technician {' | '.join(_TECHNICIAN_OPS)}")
            if (args[0] == "close") != (len(args) == 1):
                raise ValueError(f"{step.where()}: open needs a reason, close takes none")
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


# Commissioning: the installer's first door cycle gives the agent its first baseline.
INSTALLER = Person(name="installer", badge="4C0FEE1234", roles=["user"])
