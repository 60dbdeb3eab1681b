"""Reader types: a new reader type is a new driver package, its config in the union below and
one case in ``make_reader``."""

from __future__ import annotations

from typing import Annotated, Final, Union, assert_never

from pydantic import Field

from drivers.config import ReaderConfigBase
from drivers.llrp.config import LlrpReaderConfig
from drivers.mercury.config import MercuryReaderConfig
from drivers.types import Clock, ReaderDriver, ReaderSink

# Every reader config section the agent accepts.
AnyReaderConfig = Union[LlrpReaderConfig, MercuryReaderConfig]  # noqa: UP007  (grows per type)

# What the config loader parses a [[readers]] entry into (picked by its ``type``).
ReaderConfig = Annotated[AnyReaderConfig, Field(discriminator="type")]

# type name → its config section model (error messages name the type).
READER_TYPES: Final[dict[str, type[ReaderConfigBase]]] = {
    "llrp": LlrpReaderConfig,
    "mercury": MercuryReaderConfig,
}


def make_reader(cfg: AnyReaderConfig, sink: ReaderSink, clock: Clock) -> ReaderDriver:
    """Build the driver for one configured reader.

    The driver imports stay lazy so that the config checker does not pull in every transport.
    """
    if isinstance(cfg, LlrpReaderConfig):
        from drivers.llrp.reader import LlrpReader

        return LlrpReader(cfg, sink, clock=clock)
    if isinstance(cfg, MercuryReaderConfig):
        from drivers.mercury.reader import MercuryReader

        return MercuryReader(cfg, sink, clock=clock)
    assert_never(cfg)
