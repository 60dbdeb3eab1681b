"""The persisted floor (``time.floor`` in the store's kv): the agent's proven time, its trust and
basis, and the boot and monotonic time that let a restart within one boot carry it on exactly."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from agent.trusted_time.estimate import LATEST_TIME, Basis, sane_time

KV_KEY: Final = "time.floor"
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class FloorRecord:
    """What is persisted between runs (``time.floor`` in the store's kv)."""

    floor: datetime  # the agent's proven time when saved (never a provisional reading)
    trusted: bool = True  # whether the wall clock was trusted then
    basis: Basis = Basis.CLOCK
    boot: str | None = None  # the kernel boot id then: same boot, same monotonic clock
    mono: float | None = None  # the monotonic time of ``floor``
    since: datetime | None = None  # when the wall clock stopped being trusted (agent time)


class FloorStore(Protocol):
    """Where the floor is kept (``agent.store.Store`` provides it)."""

    async def kv_get(self, key: str) -> bytes | None: ...

    async def kv_put(self, key: str, value: bytes | None) -> None: ...


def read_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    """The kernel's boot id (Linux), or None: a restart within one boot keeps its time."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if 0 < len(text) <= 64 else None


def encode_floor(record: FloorRecord) -> bytes:
    """The record as stored; every time held below ``LATEST_TIME`` (what ``decode_floor``
    accepts), whatever was handed in."""
    data: dict[str, Any] = {
        "floor": sane_time(record.floor).isoformat(),
        "trusted": record.trusted,
        "basis": str(record.basis),
    }
    if record.boot is not None and record.mono is not None:
        data.update(boot=record.boot, mono=record.mono)
    if record.since is not None:
        data["since"] = sane_time(record.since).isoformat()
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_floor(raw: bytes) -> FloorRecord:
    """Inverse of ``encode_floor`` (older records hold only floor and trust); ValueError if
    it is not that, or holds an absurd time."""
    try:
        data = json.loads(raw)
        floor = datetime.fromisoformat(data["floor"])
        trusted = data["trusted"]
        basis = Basis(data.get("basis", Basis.CLOCK))
        boot = data.get("boot")
        mono = data.get("mono")
        since_raw = data.get("since")
        since = None if since_raw is None else datetime.fromisoformat(since_raw)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{type(err).__name__}") from None
    if not isinstance(trusted, bool):
        raise ValueError("malformed")
    for value in (floor, since):
        if value is not None and (value.tzinfo is None or not value < LATEST_TIME):
            raise ValueError("a time is not timezone-aware or is absurd")
    if boot is not None and not isinstance(boot, str):
        raise ValueError("malformed boot id")
    if mono is not None and (
        isinstance(mono, bool) or not isinstance(mono, int | float) or not math.isfinite(mono)
    ):
        raise ValueError("malformed monotonic time")
    return FloorRecord(
        floor.astimezone(UTC),
        trusted,
        basis,
        boot,
        None if mono is None else float(mono),
        None if since is None else since.astimezone(UTC),
    )
