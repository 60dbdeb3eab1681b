"""Reader types: a new reader type is a new module plus one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import Field

from drivers.llrp.config import LlrpReaderConfig
from drivers.mercury.config import MercuryReaderConfig
from drivers.types import Clock, ReaderDriver, ReaderSink


def _make_llrp(cfg: Any, sink: ReaderSink, clock: Clock) -> ReaderDriver:
    from drivers.llrp.reader import LlrpReader

    return LlrpReader(cfg, sink, clock=clock)


def _make_mercury(cfg: Any, sink: ReaderSink, clock: Clock) -> ReaderDriver:
    from drivers.mercury.reader import MercuryReader

    return MercuryReader(cfg, sink, clock=clock)


# type name → (config section model, factory). Imports of the drivers stay lazy so the
# config checker does not pull in every transport.
READER_TYPES: dict[str, tuple[type[Any], Callable[[Any, ReaderSink, Clock], ReaderDriver]]] = {
    "llrp": (LlrpReaderConfig, _make_llrp),
    "mercury": (MercuryReaderConfig, _make_mercury),
}

ReaderConfig = Annotated[
    Union[LlrpReaderConfig, MercuryReaderConfig],  # noqa: UP007  (grows with READER_TYPES)
    Field(discriminator="type"),
]


def make_reader(cfg: Any, sink: ReaderSink, clock: Clock) -> ReaderDriver:
    """Build the driver for one configured reader."""
    _, factory = READER_TYPES[cfg.type]
    driver: ReaderDriver = factory(cfg, sink, clock)
    return driver
