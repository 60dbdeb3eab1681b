"""The fast RO_ACCESS_REPORT decoder agrees with sllurp, or steps aside (returns None)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from sllurp.llrp import LLRPMessage

from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.reader import LlrpReader
from drivers.llrp.reports import decode_report
from drivers.sinks import QueueSink
from drivers.types import TagRead
from simulators.llrp.codec import Bits, encode_message
from tests.conftest import CAPTURES

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_US = int(NOW.timestamp() * 1_000_000)


class _FixedClock:
    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 1.0


def _reader() -> tuple[LlrpReader, QueueSink]:
    sink = QueueSink(maxsize=100_000)
    cfg = LlrpReaderConfig(id="r", host="127.0.0.1")
    return LlrpReader(cfg, sink, clock=_FixedClock()), sink


async def _both_paths(frame: bytes) -> tuple[list[TagRead] | None, list[TagRead]]:
    """(fast path reads or None, sllurp path reads) for one report frame."""
    fast: list[TagRead] | None = None
    raw = decode_report(frame)
    if raw is not None:
        reader, sink = _reader()
        await reader._on_raw_report(raw)
        fast = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]  # type: ignore[misc]
    reader, sink = _reader()
    body = LLRPMessage(msgbytes=frame).msgdict["RO_ACCESS_REPORT"]
    await reader._on_report(body)
    slow = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]
    return fast, slow  # type: ignore[return-value]


def _header(body: bytes) -> bytes:
    return (
        ((1 << 10) | 61).to_bytes(2, "big")
        + (10 + len(body)).to_bytes(4, "big")
        + b"\0\0\0\1"
        + body
    )


async def test_real_captures_decode_identically() -> None:
    paths = sorted(CAPTURES.glob("ROAccessReport-*.bytes"))
    assert paths
    for p in paths:
        fast, slow = await _both_paths(_header(p.read_bytes()))
        assert fast is not None, p.name
        assert fast == slow, p.name


_tag = st.fixed_dictionaries(
    {"epc": st.binary(min_size=2, max_size=32).filter(lambda b: len(b) % 2 == 0)},
    optional={
        "AntennaID": st.integers(1, 64),
        "PeakRSSI": st.integers(-128, 0),
        "FirstSeenTimestampUTC": st.one_of(
            st.integers(0, 2**40), st.integers(NOW_US - 10**10, NOW_US + 10**10)
        ),
        "TagSeenCount": st.integers(0, 65535),
        "ChannelIndex": st.integers(0, 65535),
        "ROSpecID": st.integers(0, 2**32 - 1),
        "LastSeenTimestampUTC": st.integers(0, 2**63),
        "C1G2_PC": st.integers(0, 65535),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_tag, min_size=0, max_size=12))
async def test_generated_reports_decode_identically(tags: list[dict[str, object]]) -> None:
    report = []
    for t in tags:
        epc = t.pop("epc")
        assert isinstance(epc, bytes)
        entry: dict[str, object] = dict(t)
        if len(epc) == 12:
            entry["EPC_96"] = epc
        else:
            entry["EPCData"] = {"EPC": Bits(len(epc) * 8, epc)}
        report.append(entry)
    frame = encode_message("RO_ACCESS_REPORT", {"TagReportData": report}, 5)
    fast, slow = await _both_paths(frame)
    assert fast is not None
    assert fast == slow


def test_custom_parameters_fall_back_to_sllurp() -> None:
    # A TagReportData holding a Custom parameter (type 1023) is not for the fast path.
    custom = (1023).to_bytes(2, "big") + (12).to_bytes(2, "big") + b"\x00\x00\x65\x1a" + b"\0\0\0\1"
    tag = b"\x8d" + bytes(12) + b"\x81\x00\x01" + custom
    trd = (240).to_bytes(2, "big") + (4 + len(tag)).to_bytes(2, "big") + tag
    assert decode_report(_header(trd)) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(body: bytes) -> None:
    result = decode_report(_header(body))
    assert result is None or all(isinstance(t.epc, str) for t in result)
