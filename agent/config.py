"""The agent's one TOML config file, validated once at the edge by pydantic.

Raw dicts never travel past this module: everything downstream gets typed sections.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from datetime import date, datetime, time, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.control.config import ControlConfig
from agent.domain.config import CabinetDomainConfig
from agent.domain.localtime import zone
from agent.metrics_config import MetricsConfig
from agent.mqtt.config import MqttConfig
from agent.privacy.config import PrivacyConfig
from agent.store.config import StoreConfig
from drivers.badge.config import BadgeReaderConfig
from drivers.config import READER_ID_PATTERN, StrictModel
from drivers.door import DoorConfig
from drivers.registry import READER_TYPES, ReaderConfig

if TYPE_CHECKING:
    from agent.controller_config import ControllerConfig

EX_CONFIG = 78  # sysexits.h EX_CONFIG
MAX_CONFIG_BYTES = 1024 * 1024


class CabinetSection(StrictModel):
    site_id: str = Field(pattern=READER_ID_PATTERN, description="site (hangar, lab) identifier")
    cabinet_id: str = Field(pattern=READER_ID_PATTERN, description="cabinet identifier")
    timezone: str = Field(
        "UTC",
        description="the site's IANA time zone ('Europe/Paris'): date rules (calibration due, "
        "night hours, expiry warnings) are judged in it; events stay in UTC",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone(value)  # TimeZoneError is a ValueError: one config line naming the field
        return value

    def zone(self) -> tzinfo:
        """The site's time zone."""
        return zone(self.timezone)


class LoggingSection(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class TimeSection(StrictModel):
    sync_source: str = Field(
        "kernel",
        pattern=r"^(kernel|none|file:/.+)$",
        description="what says the wall clock is synchronised to a time server (NTP): 'kernel' "
        "(adjtimex: systemd-timesyncd, chrony, ntpd), 'none', or 'file:<absolute path>' "
        "(synchronised while that file exists); a synchronised wall clock proves the agent's "
        "time, one taken at boot without it is provisional",
    )
    clock_watch: Literal["kernel", "poll"] = Field(
        "kernel",
        description="how a wall-clock step is noticed: 'kernel' (the kernel says when the clock "
        "is set: a timerfd cancelled on set; falls back to 'poll' where it cannot) or 'poll' "
        "(read the wall clock every second: for a clock faked in user space, e.g. libfaketime, "
        "which no kernel notification sees)",
    )


class AgentConfig(StrictModel):
    cabinet: CabinetSection
    logging: LoggingSection = LoggingSection()
    readers: list[ReaderConfig] = Field(min_length=1)
    mqtt: MqttConfig | None = None
    domain: CabinetDomainConfig = CabinetDomainConfig()
    store: StoreConfig = StoreConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    badge_readers: list[BadgeReaderConfig] = Field(default_factory=list)
    door: DoorConfig | None = None
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    time: TimeSection = TimeSection()

    @model_validator(mode="after")
    def _reader_ids_unique(self) -> AgentConfig:
        ids = [r.id for r in self.readers]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"reader ids must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _badge_and_door_wiring(self) -> AgentConfig:
        reader_ids = {r.id for r in self.readers}
        badge_ids = [b.id for b in self.badge_readers]
        clash = sorted({i for i in badge_ids if badge_ids.count(i) > 1 or i in reader_ids})
        if clash:
            raise ValueError(
                f"badge reader ids must be unique among all readers: {', '.join(clash)}"
            )
        if self.door is not None:
            wired = [r for r in self.readers if r.id == self.door.reader]
            if not wired:
                raise ValueError(f"door.reader {self.door.reader!r} is not a configured reader id")
            gpi_ports = wired[0].gpi_inputs()
            if gpi_ports is None:
                raise ValueError(
                    f"door.reader {self.door.reader!r} is a {wired[0].type} reader, which cannot "
                    "report GPI inputs: the door sensor would never report (wire the door to an "
                    "LLRP reader)"
                )
            if self.door.sensor_gpi not in gpi_ports:
                raise ValueError(
                    f"door.sensor_gpi {self.door.sensor_gpi} is not in the gpi_ports of reader "
                    f"{self.door.reader!r}: the door would never report"
                )
        return self


class ConfigError(Exception):
    """The config file is unusable; ``problems`` holds one human line per problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s) in config")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: field path, the rule broken, the offending value."""
    lines = []
    for e in err.errors(include_url=False):
        # Discriminated unions put the tag name in the location ("readers.0.llrp.host");
        # drop it so the path is the one the user wrote.
        raw_loc = e["loc"]
        loc = tuple(
            p
            for i, p in enumerate(raw_loc)
            if not (i > 0 and isinstance(raw_loc[i - 1], int) and p in READER_TYPES)
        )
        path = _loc(loc)
        rule = e["type"]
        msg = e["msg"]
        if rule == "missing":
            lines.append(f"{path}: required field is missing")
        elif rule == "extra_forbidden":
            lines.append(f"{path}: unknown key (typo?) [value {_describe(e.get('input'))}]")
        else:
            lines.append(f"{path}: {msg} [rule {rule}; value {_describe(e.get('input'))}]")
    return lines


def parse_config(data: dict[str, object], path: Path = Path("<memory>")) -> AgentConfig:
    """Validate an already-parsed TOML document.

    Strict types: ``port = "15084"`` is a string, not a number, and is refused. Validation goes
    through JSON so that strings may still name paths (strict Python mode wants ``Path``
    objects, which TOML cannot express).
    """
    try:
        doc = json.dumps(data, default=_json_default)
    except (ValueError, TypeError, RecursionError) as err:
        raise ConfigError(path, [f"(file): cannot represent the document: {err}"]) from None
    try:
        cfg = AgentConfig.model_validate_json(doc, strict=True)
    except ValidationError as err:
        raise ConfigError(path, format_validation_error(err)) from None
    # Cross-section wiring: a drawer on an unconfigured reader/antenna would make every scan
    # incomplete forever, so it is a config error, one line per problem.
    problems = cfg.domain.check_readers({r.id: list(r.antennas) for r in cfg.readers})
    if problems:
        raise ConfigError(path, problems)
    return cfg


def load_config(path: Path, cabinet: str | None = None) -> AgentConfig:
    """Read and validate the config file; raise ConfigError with every problem found.

    A multi-cabinet file (``[[cabinets]]``) gives the config of the cabinet named ``cabinet``
    (what one cabinet's commands, checks and control socket use); without a name it is refused
    with the names to choose from. A single-cabinet file answers to its own cabinet id or none.
    """
    data = read_document(path)
    if "cabinets" not in data:
        cfg = parse_config(data, path)
        if cabinet is not None and cabinet != cfg.cabinet.cabinet_id:
            raise ConfigError(
                path,
                [
                    f"cabinet.cabinet_id: this file configures {cfg.cabinet.cabinet_id!r}, "
                    f"not {cabinet!r}"
                ],
            )
        return cfg
    from agent.controller_config import parse_controller

    ctrl = parse_controller(data, path)
    return ctrl.select(cabinet)


def load_controller(path: Path) -> ControllerConfig:
    """Read and validate the config file as the whole controller (one cabinet or several)."""
    from agent.controller_config import ControllerConfig, parse_controller

    data = read_document(path)
    if "cabinets" not in data:
        return ControllerConfig.single(parse_config(data, path), path)
    return parse_controller(data, path)


def read_document(path: Path) -> dict[str, object]:
    """The config file's TOML document (size, type and encoding checked); ConfigError if not."""
    try:
        # O_NONBLOCK: a FIFO in the config's place must be refused, not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ConfigError(path, [f"(file): cannot read {path}: {err.strerror}"]) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(path, [f"(file): {path} is not a regular file"])
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(path, [f"(file): cannot read {path}: {err.strerror}"]) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [f"(file): larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, ["(file): not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [f"(file): TOML syntax error: {err}"]) from None
    except RecursionError:
        raise ConfigError(path, ["(file): nested too deeply"]) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(path, [f"(file): unusable value: {_first_sentence(err)}"]) from None
    return data


def _first_sentence(err: Exception) -> str:
    return str(err).split(";")[0].split(": value has")[0]


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()  # no field takes a date: a string fails where a number is due
    raise TypeError(f"{type(value).__name__} is not a config value")
