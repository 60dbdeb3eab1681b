"""The ``[domain]`` config section: drawers, scan rules, door and access timers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, model_validator

from agent.domain.localtime import TIME_OF_DAY_PATTERN
from drivers.config import READER_ID_PATTERN, StrictModel

ALIAS_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}:[1-9][0-9]?$"
DRAWER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ALIAS_RE = re.compile(ALIAS_PATTERN)
_DRAWER_RE = re.compile(DRAWER_PATTERN)

Antenna = tuple[str, int]  # (reader_id, antenna port)
GraceRole = Literal["user", "supervisor"]  # roles that may open (auditors never do)


class CabinetDomainConfig(StrictModel):
    drawers: dict[str, list[str]] = Field(
        default_factory=dict,
        description='drawer name → antennas "reader:port"; empty: one drawer per reader antenna',
    )
    door_id: str = Field("door", pattern=READER_ID_PATTERN, description="the door's name in events")
    min_reads: int = Field(2, ge=1, le=1000, description="reads above the floor to count a tag")
    rssi_floor_dbm: float = Field(-80.0, ge=-150, le=20, description="default antenna RSSI floor")
    rssi_floor_overrides: dict[str, float] = Field(
        default_factory=dict, description='per antenna "reader:port" → floor (dBm)'
    )
    presence_round_ms: int = Field(
        1000,
        ge=50,
        le=600_000,
        description="read rounds of a pass; longer than the reader needs to read every tag once",
    )
    presence_min_ratio: float = Field(
        0.75,
        ge=0,
        le=1,
        description="a tag new to the cabinet must be read in this share of the pass's rounds",
    )
    presence_margin_db: float = Field(
        6.0,
        ge=0,
        le=60,
        description="... and with a mean RSSI this far above its antenna's floor",
    )
    stable_ms: int = Field(2000, ge=100, le=600_000, description="settle: no new EPC for this")
    scan_min_ms: int = Field(3000, ge=0, le=600_000, description="shortest scan pass")
    scan_max_ms: int = Field(30_000, ge=100, le=3_600_000, description="hard limit of a pass")
    confirm_pass: bool = Field(True, description="confirm missing items with a second pass")
    suspect_min_tags: int = Field(
        2,
        ge=0,
        le=1_000_000,
        description="a drawer that held this many tags and reads nothing at all makes the "
        "pass suspect, never a mass check-out (0: off)",
    )
    max_rescans: int = Field(2, ge=0, le=20, description="rescans after incomplete passes")
    max_tags: int = Field(50_000, ge=1, le=1_000_000, description="tag limit per scan pass")
    unlock_pulse_s: float = Field(5.0, gt=0, le=300, description="lock release pulse")
    relock_after_s: float = Field(10.0, gt=0, le=3600, description="relock if door not opened")
    left_open_s: float = Field(120.0, gt=0, le=86_400, description="door.left_open period")
    reopen_grace_s: float = Field(
        2.0, ge=0, le=60, description="reopening this soon after closing is not forced"
    )
    lockout_denials: int = Field(5, ge=1, le=1000, description="N denials ...")
    lockout_window_s: float = Field(300.0, gt=0, le=86_400, description="... within this window")
    lockout_duration_s: float = Field(600.0, gt=0, le=86_400, description="lock-out length")
    background_period_s: float = Field(
        3600.0, ge=0, le=7 * 86_400, description="idle inventory period; 0 disables it"
    )
    expired_allow_list_grace_h: float = Field(
        0.0,
        ge=0,
        le=30 * 24,
        description="hours after the allow-list expired during which the grace roles may still "
        "open (each such grant is an access.grace_granted event and audited); 0: deny by default",
    )
    expired_allow_list_grace_roles: list[GraceRole] = Field(
        default_factory=lambda: list[GraceRole](["supervisor"]),
        description="roles the expired-allow-list grace applies to",
    )
    allow_list_expiry_warning_days: float = Field(
        7.0,
        ge=0,
        le=365,
        description="cabinetctl status and selftest warn this long before the allow-list expires",
    )
    reader_offline_debounce_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="reader.offline only once a reader has been away this long; shorter "
        "outages are counted (0: report every outage at once)",
    )
    reader_flap_count: int = Field(
        3, ge=2, le=1000, description="outages within reader_flap_window_s: reader.flapping"
    )
    reader_flap_window_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="flap window; a flapping reader healthy this long is stable again",
    )
    technician_unlock_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="a technician session keeps the lock released this long for the door to "
        "be opened (from the terminal to the cabinet); not opened by then: ended, relocked",
    )
    technician_left_open_s: float = Field(
        1800.0,
        ge=0,
        le=86_400,
        description="door.left_open during a technician session: every this many seconds the "
        "door stays open (maintenance takes longer than a check-out; 0: off)",
    )

    night_left_open_s: float = Field(
        0.0,
        ge=0,
        le=86_400,
        description="door.left_open period during the night hours (night_start..night_end, the "
        "site's local time, [cabinet] timezone); 0: no night rule, left_open_s all day",
    )
    night_start: str = Field(
        "22:00", pattern=TIME_OF_DAY_PATTERN, description="night hours begin (local HH:MM)"
    )
    night_end: str = Field(
        "06:00",
        pattern=TIME_OF_DAY_PATTERN,
        description="night hours end (local HH:MM); before night_start: over midnight",
    )
    overdue_after_s: float = Field(
        43_200.0,
        ge=0,
        le=366 * 86_400,
        description="item.overdue once an item has been out this long (the asset registry's "
        "overdue_after_s of an asset wins); 0: only assets with a limit of their own",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CabinetDomainConfig:
        if self.scan_max_ms < self.scan_min_ms:
            raise ValueError("scan_max_ms must be >= scan_min_ms")
        seen: dict[str, str] = {}
        for drawer, aliases in self.drawers.items():
            if not _DRAWER_RE.match(drawer):
                raise ValueError(f"drawer name {drawer!r} must match {DRAWER_PATTERN}")
            if not aliases:
                raise ValueError(f"drawer {drawer!r} has no antennas")
            for alias in aliases:
                if not _ALIAS_RE.match(alias):
                    raise ValueError(f'antenna {alias!r} of drawer {drawer!r} is not "reader:port"')
                if alias in seen:
                    raise ValueError(
                        f"antenna {alias} is in drawers {seen[alias]!r} and {drawer!r}"
                    )
                seen[alias] = drawer
        for alias in self.rssi_floor_overrides:
            if not _ALIAS_RE.match(alias):
                raise ValueError(f'rssi_floor_overrides key {alias!r} is not "reader:port"')
        return self

    def antenna_map(self, readers: Mapping[str, Sequence[int]] | None = None) -> dict[Antenna, str]:
        """(reader, port) → drawer. Without drawers, each antenna of ``readers`` is its own drawer."""
        if self.drawers:
            out: dict[Antenna, str] = {}
            for drawer, aliases in self.drawers.items():
                for alias in aliases:
                    reader, port = alias.rsplit(":", 1)
                    out[(reader, int(port))] = drawer
            return out
        if not readers:
            raise ValueError("no drawers configured and no readers to derive them from")
        return {(r, a): f"{r}.{a}" for r, ports in readers.items() for a in ports}

    def check_readers(self, readers: Mapping[str, Sequence[int]]) -> list[str]:
        """Problems (one line each) with drawers naming readers or ports that are not configured.

        A drawer on a missing reader would make every scan incomplete forever; catch it at start.
        """
        problems = []
        for drawer, aliases in self.drawers.items():
            for alias in aliases:
                reader, port = alias.rsplit(":", 1)
                if reader not in readers:
                    problems.append(f"domain.drawers.{drawer}: reader {reader!r} is not configured")
                elif int(port) not in readers[reader]:
                    problems.append(
                        f"domain.drawers.{drawer}: antenna {port} is not in reader {reader!r}'s antennas"
                    )
        if self.drawers:
            used = {a for aliases in self.drawers.values() for a in aliases}
            for rid, rports in readers.items():
                for rport in rports:
                    if f"{rid}:{rport}" not in used:
                        problems.append(
                            f"domain.drawers: antenna {rid}:{rport} is in use but in no drawer"
                        )
        return problems

    def rssi_floor(self, reader: str, antenna: int) -> float:
        """The RSSI floor of one antenna."""
        return self.rssi_floor_overrides.get(f"{reader}:{antenna}", self.rssi_floor_dbm)
