"""Configuration section of a Mercury serial reader (ThingMagic/JADAK M6e, M6e Nano, Micro)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from drivers.config import ReaderConfigBase
from drivers.errors import PermanentError
from drivers.serialio import SerialTarget
from drivers.tid import DEFAULT_TID_WORDS, MAX_TID_WORDS, MIN_TID_WORDS

RegionName = Literal[
    "NA",
    "EU",
    "KR",
    "IN",
    "JP",
    "PRC",
    "EU2",
    "EU3",
    "KR2",
    "PRC2",
    "AU",
    "NZ",
    "NA2",
    "NA3",
    "OPEN",
]
BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


class MercuryReaderConfig(ReaderConfigBase):
    type: Literal["mercury"] = "mercury"
    url: str = Field(
        min_length=1,
        description="/dev/ttyUSB0?baud=115200, or any pyserial URL such as socket://host:port",
    )
    region: RegionName = Field("NA2", description="regulatory region the module hops in")
    read_power_dbm: float | None = Field(
        None, ge=0, le=31.5, description="read TX power; None keeps the module setting"
    )
    detect_antennas: bool | None = Field(
        None,
        description="ask the module which ports have an antenna; default (unset): yes on the "
        "models that can tell (M6e, M6e-I, M6e Micro), no on the others (M6e Nano, M7e Pico)",
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="opening the device")
    command_timeout_s: float = Field(2.0, gt=0, le=60, description="answer to one command")
    boot_timeout_s: float = Field(5.0, gt=0, le=60, description="bootloader → application")
    keepalive_s: float = Field(
        1.0, ge=0.1, le=60, description="idle: poll the module this often to notice it is gone"
    )
    watchdog_s: float = Field(
        3.0, ge=0.3, le=600, description="no valid frame for this long ends the session"
    )
    cycle_timeout_ms: int = Field(
        1000, ge=50, le=65535, description="search cycle length inside continuous reading"
    )
    read_tid: bool = Field(
        False,
        description="read each tag's TID with the inventory (an embedded READ_TAG_DATA of "
        "bank 2 in the continuous read)",
    )
    tid_words: int = Field(
        DEFAULT_TID_WORDS,
        ge=MIN_TID_WORDS,
        le=MAX_TID_WORDS,
        description="TID words to read (a result of any other size is refused)",
    )

    @field_validator("url")
    @classmethod
    def _url_parses(cls, value: str) -> str:
        try:
            target = SerialTarget.parse(value)
        except PermanentError as err:
            raise ValueError(str(err)) from None
        if target.url.startswith("/") and target.baudrate not in BAUD_RATES:
            raise ValueError(f"baud must be one of {', '.join(map(str, BAUD_RATES))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MercuryReaderConfig:
        if self.watchdog_s <= self.keepalive_s:
            raise ValueError("watchdog_s must exceed keepalive_s")
        if any(a > 15 for a in self.antennas):
            raise ValueError("Mercury antenna ports are 1..15")
        return self

    @property
    def region_code(self) -> int:
        # The codec is the reader's: validating a config (every daemon does) needs none of it.
        from drivers.mercury.codec import REGIONS

        return REGIONS[self.region]
