"""Config pieces shared by every driver section (each driver declares its own section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

READER_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BackoffConfig(StrictModel):
    initial_s: float = Field(0.5, gt=0, le=60, description="first reconnect delay bound")
    max_s: float = Field(30.0, gt=0, le=3600, description="largest reconnect delay")

    @model_validator(mode="after")
    def _ordered(self) -> BackoffConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class ReaderBackoffConfig(BackoffConfig):
    """An RFID reader's reconnect policy: the delay only starts over after a *stable* session.

    Resetting on every successful configure let a reader that accepts, configures and drops
    (failing hardware, a hostile peer) be reconnected at the shortest delay forever.
    """

    stable_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="a session connected and healthy this long resets the delay to initial_s",
    )


class ReaderConfigBase(StrictModel):
    id: str = Field(pattern=READER_ID_PATTERN, description="stable reader name used in events")
    antennas: list[int] = Field(default=[1], min_length=1, description="antenna ports in use")
    backoff: ReaderBackoffConfig = ReaderBackoffConfig()

    def gpi_inputs(self) -> list[int] | None:
        """GPI ports this reader reports (a door sensor may use them); None: it has no GPI."""
        return None

    @model_validator(mode="after")
    def _antennas_unique(self) -> ReaderConfigBase:
        if len(set(self.antennas)) != len(self.antennas):
            raise ValueError("antennas must not repeat")
        if any(a < 1 or a > 64 for a in self.antennas):
            raise ValueError("antenna ports are 1..64")
        return self
