"""The ``[control]`` config section: where the control socket lives and who may use it."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from agent.control.protocol import DEFAULT_SOCKET_PATH, TECHNICIAN_GROUP
from drivers.config import StrictModel

_NAME_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}$"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


class ControlConfig(StrictModel):
    enabled: bool = True
    socket_path: Path = Field(DEFAULT_SOCKET_PATH, description="Unix socket of the control API")
    group: str | None = Field(
        TECHNICIAN_GROUP,
        pattern=_NAME_PATTERN,
        description="group owning the socket (mode 0660); its members may use the API",
    )
    allow_root: bool = Field(True, description="uid 0 may use the API")
    allowed_users: list[str] = Field(
        default=[], description="extra user names allowed (the daemon's own user always is)"
    )
    allowed_groups: list[str] = Field(default=[], description="extra groups whose members may")
    max_line_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    max_connections: int = Field(16, ge=1, le=1024)
    max_inflight_per_connection: int = Field(8, ge=1, le=256)
    rate_per_s: float = Field(20.0, gt=0, le=10000, description="sustained requests/s per client")
    rate_burst: int = Field(40, ge=1, le=100000)
    idle_timeout_s: float = Field(300.0, gt=0, le=86400, description="close silent clients")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="default per command")
    write_timeout_s: float = Field(10.0, gt=0, le=600, description="client must read replies")

    @field_validator("socket_path")
    @classmethod
    def _usable_path(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError("must be an absolute path")
        if len(str(v).encode()) > _SUN_PATH_MAX:
            raise ValueError(f"too long for a Unix socket (max {_SUN_PATH_MAX} bytes)")
        return v

    @field_validator("allowed_users", "allowed_groups")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not re.match(_NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"not valid user/group names: {', '.join(bad)}")
        return v
