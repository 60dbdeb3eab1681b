"""Configuration section of a badge reader (EM4100 or ASCII-line, on a serial URL)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from drivers.badge.codec import DEFAULT_LINE_PATTERN, MAX_LINE_LIMIT, compile_line_pattern
from drivers.config import READER_ID_PATTERN, BackoffConfig, StrictModel
from drivers.errors import PermanentError
from drivers.serialio import SerialTarget


class BadgeReaderConfig(StrictModel):
    id: str = Field(pattern=READER_ID_PATTERN, description="stable badge reader name")
    url: str = Field(
        min_length=1, description="serial device: /dev/ttyUSB0?baud=9600 or socket://host:port"
    )
    protocol: Literal["em4100", "ascii-lines"] = "em4100"
    pattern: str = Field(
        DEFAULT_LINE_PATTERN, description="ascii-lines: regex with a named group 'id'"
    )
    max_line: int = Field(64, ge=8, le=MAX_LINE_LIMIT, description="ascii-lines: longest line")
    id_base: Literal[10, 16] = Field(
        16, description="ascii-lines: the reader prints card numbers in hex (16) or decimal (10)"
    )
    baud: int = Field(9600, gt=0, le=4_000_000, description="unless the URL says ?baud=")
    repeat_interval_s: float = Field(
        2.0, ge=0, le=600, description="a card held to the reader yields one read per interval"
    )
    open_timeout_s: float = Field(5.0, gt=0, le=120)
    backoff: BackoffConfig = BackoffConfig()

    @field_validator("url")
    @classmethod
    def _url_parses(cls, value: str) -> str:
        try:
            SerialTarget.parse(value)
        except PermanentError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        compile_line_pattern(value)
        return value

    @model_validator(mode="after")
    def _pattern_only_for_lines(self) -> BadgeReaderConfig:
        if self.protocol == "em4100" and (
            self.pattern != DEFAULT_LINE_PATTERN or self.id_base != 16
        ):
            raise ValueError("pattern and id_base apply to protocol 'ascii-lines' only")
        return self

    def target(self) -> SerialTarget:
        """The parsed device URL, with ``baud`` as the default line speed."""
        return SerialTarget.parse(self.url, default_baud=self.baud)
