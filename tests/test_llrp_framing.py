"""The sans-IO LLRP framer: arbitrary splits, hostile headers, bounded lengths; real captures."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sllurp.llrp import LLRPMessage

from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.framing import (
    HEADER_LEN,
    FramingError,
    LlrpFramer,
    encode_gpo_write,
    encode_header,
)
from drivers.llrp.reader import LlrpReader
from drivers.sinks import QueueSink
from drivers.types import TagRead
from tests.conftest import CAPTURES, ROOT

_message = st.tuples(
    st.integers(0, 1023), st.integers(0, 2**32 - 1), st.binary(min_size=0, max_size=300)
)


def _frame(msg_type: int, msg_id: int, body: bytes) -> bytes:
    return encode_header(msg_type, len(body), msg_id) + body


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, min_size=1, max_size=8), st.data())
def test_any_split_yields_the_same_messages(
    messages: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(_frame(*m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    framer = LlrpFramer()
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += framer.feed(stream[prev:cut])
        prev = cut
    assert [(f.msg_type, f.msg_id, f.data[HEADER_LEN:]) for f in out] == messages
    assert framer.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_either_frames_or_raises_framing_error(blob: bytes) -> None:
    framer = LlrpFramer(max_frame_bytes=4096)
    try:
        frames = framer.feed(blob)
    except FramingError:
        return
    assert sum(len(f.data) for f in frames) + framer.buffered == len(blob)
    assert framer.buffered < 4096


def test_oversized_length_is_refused_before_buffering() -> None:
    framer = LlrpFramer(max_frame_bytes=1024)
    with pytest.raises(FramingError, match="exceeds"):
        framer.feed(struct.pack("!HII", (1 << 10) | 61, 1025, 1))


def test_length_shorter_than_header_is_refused() -> None:
    with pytest.raises(FramingError, match="shorter"):
        LlrpFramer().feed(struct.pack("!HII", (1 << 10) | 61, 9, 1))


def test_bad_version_and_reserved_bits_are_refused() -> None:
    with pytest.raises(FramingError, match="version"):
        LlrpFramer().feed(struct.pack("!HII", (5 << 10) | 61, 10, 1))
    with pytest.raises(FramingError, match="reserved"):
        LlrpFramer().feed(struct.pack("!HII", 0x8000 | (1 << 10) | 61, 10, 1))


def test_gpo_write_layout() -> None:
    raw = encode_gpo_write(7, 2, True)
    vt, length, msg_id = struct.unpack_from("!HII", raw)
    assert (vt & 0x3FF, length, msg_id) == (3, len(raw), 7)
    # ResetToFactoryDefault=0, then GPOWriteData TLV: type 219, len 7, port 2, data bit set.
    assert raw[10:] == bytes([0x00, 0x00, 219, 0x00, 0x07, 0x00, 0x02, 0x80])


# -- real reader captures -----------------------------------------------------------------

_CAPTURE_TYPES = {
    "ROAccessReport": 61,
    "ReaderEventNotification": 63,
    "GetReaderCapabilitiesResponse": 11,
    "GetReaderConfigResponse": 12,
    "CloseConnectionResponse": 4,
}


def _capture(name: str) -> tuple[bytes, dict[str, object]]:
    body = (CAPTURES / f"{name}.bytes").read_bytes()
    expected = json.loads((CAPTURES / f"{name}.json").read_text())
    kind = name.rsplit("-", 1)[0]
    return _frame(_CAPTURE_TYPES[kind], 99, body), expected


def _report_captures() -> list[str]:
    return sorted(p.stem for p in CAPTURES.glob("ROAccessReport-*.bytes"))


def test_captures_are_present() -> None:
    # Vendored in the repository: a missing file is a broken checkout.
    assert len(_report_captures()) == 5, f"expected the R420 captures in {CAPTURES}"


@pytest.mark.parametrize("name", [f"ROAccessReport-00{i}" for i in range(1, 6)])
async def test_real_reports_become_the_right_tag_reads(name: str) -> None:
    raw, expected = _capture(name)
    (frame,) = LlrpFramer().feed(raw)
    sink = QueueSink()
    reader = LlrpReader(LlrpReaderConfig(id="r420", host="127.0.0.1"), sink)
    msg = LLRPMessage(msgbytes=frame.data)
    await reader._on_report(msg.msgdict["RO_ACCESS_REPORT"])
    reads = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]
    tags = expected["TagReportData"]
    assert isinstance(tags, list)
    assert len(reads) == len(tags)
    for read, tag in zip(reads, tags, strict=True):
        assert isinstance(read, TagRead)
        epc = tag["EPC96"]["EPC"] if tag.get("EPC96") else tag["EPCData"]["EPC"]
        assert read.epc == base64.b64decode(epc).hex()
        assert read.antenna == tag["AntennaID"]
        assert read.peak_rssi_dbm == tag["PeakRSSI"]
        first = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=tag["FirstSeenUTC"])
        assert read.first_seen == first
        assert read.reader_id == "r420"


def test_real_event_notification_decodes() -> None:
    raw, expected = _capture("ReaderEventNotification-000")
    (frame,) = LlrpFramer().feed(raw)
    msg = LLRPMessage(msgbytes=frame.data)
    data = msg.msgdict["READER_EVENT_NOTIFICATION"]["ReaderEventNotificationData"]
    assert "ConnectionCloseEvent" in data
    exp = expected["ReaderEventNotificationData"]
    assert isinstance(exp, dict)
    assert data["UTCTimestamp"]["Microseconds"] == exp["UTCTimestamp"]


def test_real_capabilities_decode_with_antennas_and_power_table() -> None:
    raw, expected = _capture("GetReaderCapabilitiesResponse-000")
    (frame,) = LlrpFramer().feed(raw)
    caps = LLRPMessage(msgbytes=frame.data).msgdict["GET_READER_CAPABILITIES_RESPONSE"]
    gdc = caps["GeneralDeviceCapabilities"]
    exp = expected["GeneralDeviceCapabilities"]
    assert isinstance(exp, dict)
    assert gdc["MaxNumberOfAntennaSupported"] == exp["MaxSupportedAntennas"]
    assert gdc["DeviceManufacturerName"] == exp["DeviceManufacturer"]
    assert gdc["ModelName"] == exp["Model"]


def test_capture_split_byte_by_byte() -> None:
    stream = b"".join(_capture(n)[0] for n in _report_captures())
    framer = LlrpFramer()
    frames = []
    for i in range(len(stream)):
        frames += framer.feed(stream[i : i + 1])
    assert len(frames) == 5
    assert all(f.msg_type == 61 for f in frames)


def test_captures_live_inside_the_checkout() -> None:
    # No test may read anything outside the repository (a plain clone must pass).
    assert CAPTURES.resolve().is_relative_to(ROOT.resolve())
    assert (CAPTURES / "LICENSE.edgex-apache-2.0").is_file()


def test_no_test_reads_outside_the_checkout() -> None:
    # A plain clone, with nothing beside it, must pass: no path may climb out of the repository.
    offenders = []
    for tree in ("tests", "bench"):
        for path in (ROOT / tree).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for needle in ("ROOT.parent", '"shared"', "../shared"):
                if needle in text and path.name != "test_llrp_framing.py":
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []
