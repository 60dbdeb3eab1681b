"""Several cabinets on one controller: the ``[[cabinets]]`` form of the config file.

The controller's hardware is declared once (``[[readers]]``, ``[[badge_readers]]``), so a reader
shared by two cabinets has exactly one connection; each ``[[cabinets]]`` entry says which
antenna ports, badge readers and door are its own. Every cabinet then gets an ordinary
single-cabinet :class:`AgentConfig` (its readers restricted to its ports), validated by the same
rules as a one-cabinet file, so nothing downstream of the loader knows there are others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydantic import Field, ValidationError

from agent.config import (
    AgentConfig,
    CabinetSection,
    ConfigError,
    LoggingSection,
    TimeSection,
    _json_default,
    format_validation_error,
)
from agent.control.config import ControlConfig
from agent.domain.config import CabinetDomainConfig
from agent.metrics_config import MetricsConfig
from agent.mqtt.config import MqttConfig
from agent.privacy.config import PrivacyConfig
from agent.store.config import StoreConfig
from drivers.badge.config import BadgeReaderConfig
from drivers.config import READER_ID_PATTERN, StrictModel
from drivers.door import DoorConfig
from drivers.registry import AnyReaderConfig, ReaderConfig

_PLACEHOLDER = "each-cabinet"  # [cabinet] cabinet_id while the shared part is validated
# Sections every cabinet inherits as they are (one site, one broker, one set of keys).
_SHARED = ("logging", "mqtt", "privacy", "time")
# Sections a cabinet entry may override key by key (its own database, socket, port, drawers).
_PER_CABINET = ("store", "control", "metrics", "domain")


class CabinetEntry(StrictModel):
    """One ``[[cabinets]]`` entry: what of the controller's hardware is this cabinet's."""

    cabinet_id: str = Field(pattern=READER_ID_PATTERN, description="cabinet identifier")
    readers: dict[str, list[int]] = Field(
        min_length=1, description="reader id -> the antenna ports of this cabinet"
    )
    badge_readers: list[str] = Field(default=[], description="badge reader ids in front of it")
    door: DoorConfig | None = None
    store: dict[str, Any] = Field(default={}, description="keys over [store]")
    control: dict[str, Any] = Field(default={}, description="keys over [control]")
    metrics: dict[str, Any] = Field(default={}, description="keys over [metrics]")
    domain: dict[str, Any] = Field(default={}, description="keys over [domain]")


class ControllerFile(StrictModel):
    """The whole multi-cabinet file; shared sections are validated here once."""

    cabinet: CabinetSection  # its cabinet_id is a placeholder: each entry has its own
    logging: LoggingSection = LoggingSection()
    readers: list[ReaderConfig] = Field(min_length=1)
    badge_readers: list[BadgeReaderConfig] = Field(default_factory=list)
    mqtt: MqttConfig | None = None
    privacy: PrivacyConfig = PrivacyConfig()
    time: TimeSection = TimeSection()
    store: StoreConfig = StoreConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    domain: CabinetDomainConfig = CabinetDomainConfig()
    cabinets: list[CabinetEntry] = Field(min_length=1)


@dataclass(frozen=True)
class ControllerConfig:
    """Every cabinet's config, and the hardware they share (each reader declared once)."""

    path: Path
    cabinets: list[AgentConfig]
    readers: list[AnyReaderConfig]
    badge_readers: list[BadgeReaderConfig]
    multi: bool  # False: an ordinary one-cabinet file

    @classmethod
    def single(cls, cfg: AgentConfig, path: Path) -> ControllerConfig:
        return cls(path, [cfg], list(cfg.readers), list(cfg.badge_readers), multi=False)

    @property
    def logging(self) -> LoggingSection:
        return self.cabinets[0].logging

    @property
    def names(self) -> list[str]:
        return [c.cabinet.cabinet_id for c in self.cabinets]

    def select(self, name: str | None) -> AgentConfig:
        """The config of cabinet ``name``; ConfigError naming the choices if there is none."""
        for cfg in self.cabinets:
            if cfg.cabinet.cabinet_id == name or (name is None and not self.multi):
                return cfg
        choices = ", ".join(self.names)
        if name is None:
            line = (
                f"cabinets: {len(self.cabinets)} cabinets ({choices}): choose one (--cabinet NAME)"
            )
        else:
            line = f"cabinets: no cabinet {name!r} (configured: {choices})"
        raise ConfigError(self.path, [line])


def parse_controller(data: dict[str, object], path: Path) -> ControllerConfig:
    """Validate a ``[[cabinets]]`` document; ConfigError with one line per problem."""
    # A one-cabinet file's [cabinet] cabinet_id and [door] have no place beside [[cabinets]]:
    # said as such (not as unknown keys), with whatever else is wrong.
    refused: list[str] = []
    data = dict(data)
    site = data.get("cabinet")
    if isinstance(site, dict):
        if "cabinet_id" in site:
            refused.append("cabinet.cabinet_id: not allowed beside [[cabinets]] (each has its own)")
        # The rest of [cabinet] (site, time zone…) is every cabinet's: checked here once.
        site = {k: v for k, v in site.items() if k != "cabinet_id"}
        data["cabinet"] = {**site, "cabinet_id": _PLACEHOLDER}
    if "door" in data:
        del data["door"]
        refused.append("door: not allowed beside [[cabinets]] (each cabinet entry has its own)")
    try:
        doc = json.dumps(data, default=_json_default)
        top = ControllerFile.model_validate_json(doc, strict=True)
    except ValidationError as err:
        raise ConfigError(path, refused + format_validation_error(err)) from None
    except (ValueError, TypeError, RecursionError) as err:
        raise ConfigError(path, [f"(file): cannot represent the document: {err}"]) from None
    raw_readers: dict[str, dict[str, Any]] = {
        str(r["id"]): r
        for r in _dicts(data.get("readers"))  # validated above: every entry has an id
    }
    raw_badges = {str(b["id"]): b for b in _dicts(data.get("badge_readers"))}
    raw_entries = _dicts(data.get("cabinets"))
    problems = refused + _cross_checks(top)
    cabinets: list[AgentConfig] = []
    indexed: list[tuple[int, AgentConfig]] = []
    for i, (entry, raw) in enumerate(zip(top.cabinets, raw_entries, strict=True)):
        if any(p.startswith(f"cabinets[{i}].") for p in problems):
            continue  # its wiring is wrong already: the derived config would only repeat it
        sub = _cabinet_document(top, data, entry, raw, raw_readers, raw_badges, i)
        try:
            cfg = AgentConfig.model_validate_json(
                json.dumps(sub, default=_json_default), strict=True
            )
        except ValidationError as err:
            problems += [f"cabinets[{i}].{line}" for line in format_validation_error(err)]
            continue
        problems += [
            f"cabinets[{i}].{line}"
            for line in cfg.domain.check_readers({r.id: list(r.antennas) for r in cfg.readers})
        ]
        cabinets.append(cfg)
        indexed.append((i, cfg))
    problems += _distinct_places(indexed)
    if problems:
        raise ConfigError(path, problems)
    return ControllerConfig(path, cabinets, list(top.readers), list(top.badge_readers), multi=True)


def _cross_checks(top: ControllerFile) -> list[str]:
    """Wiring between the entries and the hardware: one line per problem."""
    problems: list[str] = []
    readers = {r.id: r for r in top.readers}
    badge_ids = {b.id for b in top.badge_readers}
    ids = [r.id for r in top.readers] + [b.id for b in top.badge_readers]
    for dupe in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"readers: id {dupe!r} is declared more than once")
    names = [c.cabinet_id for c in top.cabinets]
    for dupe in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"cabinets: cabinet_id {dupe!r} is used more than once")
    owner: dict[tuple[str, int], str] = {}
    users: dict[str, list[str]] = {}
    gpio: dict[tuple[str, str, int], str] = {}
    for i, c in enumerate(top.cabinets):
        at = f"cabinets[{i}]"
        for rid, ports in c.readers.items():
            reader = readers.get(rid)
            if reader is None:
                problems.append(f"{at}.readers.{rid}: no reader with this id in [[readers]]")
                continue
            users.setdefault(rid, []).append(c.cabinet_id)
            if not ports:
                problems.append(f"{at}.readers.{rid}: no antenna port listed")
            for port in ports:
                if port not in reader.antennas:
                    problems.append(
                        f"{at}.readers.{rid}: antenna {port} is not in reader {rid!r}'s antennas"
                    )
                elif (rid, port) in owner:
                    problems.append(
                        f"{at}.readers.{rid}: antenna {port} already belongs to cabinet "
                        f"{owner[rid, port]!r} (a port belongs to one cabinet)"
                    )
                else:
                    owner[rid, port] = c.cabinet_id
        for bid in c.badge_readers:
            if bid not in badge_ids:
                problems.append(f"{at}.badge_readers: no badge reader {bid!r} in [[badge_readers]]")
        if c.door is not None:
            if c.door.reader not in c.readers:
                problems.append(
                    f"{at}.door.reader: {c.door.reader!r} is not one of this cabinet's readers"
                )
            for kind, port in (("GPI", c.door.sensor_gpi), ("GPO", c.door.lock_gpo)):
                key = (c.door.reader, kind, port)
                if key in gpio:
                    field = "sensor_gpi" if kind == "GPI" else "lock_gpo"
                    problems.append(
                        f"{at}.door.{field}: {kind} {port} of reader {c.door.reader!r} is "
                        f"already wired to cabinet {gpio[key]!r}'s door"
                    )
                else:
                    gpio[key] = c.cabinet_id
    listed = {b for c in top.cabinets for b in c.badge_readers}
    for badge in top.badge_readers:
        if badge.id not in listed:
            problems.append(f"badge_readers: badge reader {badge.id!r} belongs to no cabinet")
    for reader in top.readers:
        sharers = users.get(reader.id, [])
        if not sharers:
            problems.append(f"readers: reader {reader.id!r} belongs to no cabinet")
        elif len(sharers) > 1 and reader.type != "llrp":
            problems.append(
                f"readers: reader {reader.id!r} is a {reader.type} reader; only LLRP readers "
                f"can be split between cabinets ({', '.join(sharers)})"
            )
    return problems


def _cabinet_document(
    top: ControllerFile,
    data: dict[str, object],
    entry: CabinetEntry,
    raw: dict[str, Any],
    raw_readers: dict[str, dict[str, Any]],
    raw_badges: dict[str, dict[str, Any]],
    index: int,
) -> dict[str, Any]:
    """The one-cabinet document of ``entry``: shared sections, its readers cut to its ports, and
    its own store, socket and metrics port (derived from the shared ones unless it names them)."""
    doc: dict[str, Any] = {k: data[k] for k in _SHARED if k in data}
    doc["cabinet"] = {**cast(dict[str, Any], data["cabinet"]), "cabinet_id": entry.cabinet_id}
    doc["readers"] = [
        {**raw_readers[rid], "antennas": ports} for rid, ports in entry.readers.items()
    ]
    doc["badge_readers"] = [raw_badges[b] for b in entry.badge_readers]
    if "door" in raw:
        doc["door"] = raw["door"]
    for name in _PER_CABINET:
        shared = data.get(name)
        own = raw.get(name, {})
        doc[name] = {**(shared if isinstance(shared, dict) else {}), **own}
    name = entry.cabinet_id
    if "path" not in entry.store:
        # Its own database beside the shared [store] path: <dir>/<cabinet_id>/<file>.
        doc["store"]["path"] = str(top.store.path.parent / name / top.store.path.name)
    if "socket_path" not in entry.control:
        doc["control"]["socket_path"] = str(top.control.socket_path.parent / f"{name}.sock")
    if "port" not in entry.metrics and top.metrics.port != 0:
        doc["metrics"]["port"] = top.metrics.port + 1 + index
    return doc


def _distinct_places(cabinets: list[tuple[int, AgentConfig]]) -> list[str]:
    """Two cabinets must not share a database, a control socket or a metrics port."""
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for i, cfg in cabinets:
        places = [("store.path", str(cfg.store.path))]
        if cfg.control.enabled:
            places.append(("control.socket_path", str(cfg.control.socket_path)))
        if cfg.metrics.enabled and cfg.metrics.port != 0:
            places.append(("metrics.port", str(cfg.metrics.port)))
        for field, value in places:
            if (field, value) in seen:
                problems.append(
                    f"cabinets[{i}].{field}: {value} is already used by cabinet {seen[field, value]!r}"
                )
            else:
                seen[field, value] = cfg.cabinet.cabinet_id
    return problems


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
