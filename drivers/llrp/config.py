"""Configuration section of an LLRP reader (Impinj Speedway/R700, Zebra FX)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drivers.config import ReaderConfigBase
from drivers.tid import DEFAULT_TID_WORDS, MAX_TID_WORDS, MIN_TID_WORDS


class LlrpReaderConfig(ReaderConfigBase):
    type: Literal["llrp"] = "llrp"
    host: str = Field(min_length=1, description="reader host name or address")
    port: int = Field(5084, ge=1, le=65535)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    keepalive_s: float = Field(
        2.0, ge=0.5, le=300, description="reader keepalive period (also bounds scan liveness)"
    )
    inventory_deadline_s: float = Field(
        15.0, gt=0, le=600, description="connect → configured must finish within this"
    )
    tx_power_dbm: float | None = Field(None, ge=0, le=36, description="None: reader maximum")
    session: Literal[0, 1, 2, 3] = Field(
        0, description="Gen2 session; S0 keeps re-reading static tags"
    )
    impinj_search_mode: Literal["single_target", "dual_target", None] = Field(
        None, description="Impinj only; dual_target re-reads static tags (needs extensions)"
    )
    report_every_n_tags: int = Field(100, ge=1, le=65535)
    report_timeout_ms: int = Field(250, ge=0, le=60000)
    max_frame_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="larger frames end the session"
    )
    gpi_ports: list[int] = Field(default=[], description="GPI ports to enable (door sensor)")
    read_tid: bool = Field(
        False,
        description="read each tag's TID with the inventory (an AccessSpec with a C1G2Read of "
        "bank 2); a reader that refuses it keeps reading EPCs only",
    )
    tid_words: int = Field(
        DEFAULT_TID_WORDS,
        ge=MIN_TID_WORDS,
        le=MAX_TID_WORDS,
        description="TID words to read (a result of any other size is refused)",
    )

    def gpi_inputs(self) -> list[int] | None:
        return list(self.gpi_ports)

    @model_validator(mode="after")
    def _watchdog_fits(self) -> LlrpReaderConfig:
        if self.inventory_deadline_s <= self.connect_timeout_s:
            raise ValueError("inventory_deadline_s must exceed connect_timeout_s")
        return self
