"""Mercury codec: documented frames, CRC, hostile input (hypothesis), tag records."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import PermanentError, TransientError
from drivers.mercury import codec
from drivers.mercury.codec import (
    Command,
    CommandDecoder,
    MalformedMessage,
    Response,
    ResponseDecoder,
    Status,
    StreamStatus,
    TagRecord,
)
from simulators.mercury import wire


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# Frames from the SparkFun Simultaneous RFID Tag Reader library's transport logs
# ("Example Communication Logs", captured from ThingMagic's Universal Reader Assistant).
DOC_VERSION_CMD = h("FF 00 03 1D 0C")
DOC_VERSION_RSP = h(
    "FF 14 03 00 00 14 12 08 00 30 00 00 02 20 15 03 10 01 03 01 47 00 00 00 10 EB FF"
)
DOC_SET_REGION_NA2 = h("FF 01 97 0D 4B B0")
DOC_SET_POWER_27 = h("FF 02 92 0A 8C 4B D5")
DOC_SET_ANTENNA_LIST = h("FF 03 91 02 01 01 42 C5")
DOC_START_READING = h("FF 10 2F 00 00 01 22 00 00 05 07 22 10 00 1B 03 E8 01 FF DD 2B")
DOC_START_ACK = h("FF 04 2F 00 00 01 22 00 00 6D C3")
DOC_STOP_READING = h("FF 03 2F 00 00 02 5E 86")
DOC_STOP_ACK = h("FF 01 2F 00 00 02 30 E6")
DOC_NO_TAGS = h("FF 00 22 04 00 84 E0")
DOC_RECORD_E200 = h(
    "FF 28 22 00 00 10 00 1B 01 FF 01 01 C9 11 0E 08 30 00 00 00 13 00 00 05 00 00 0F 00 80"
    " 30 00 E2 00 10 26 76 0E 01 79 15 90 71 25 19 85 57 97"
)
DOC_RECORD_596F = h(
    "FF 20 22 00 00 10 00 1B 01 FF 01 01 C7 11 0E 08 30 00 00 00 0F 00 00 05 00 00 0F 00 40"
    " 10 00 59 6F 59 6F F3 13 89 90"
)


def test_crc_matches_the_documented_version_command() -> None:
    assert codec.crc16(b"\x00\x03") == 0x1D0C
    assert codec.encode(codec.version()) == DOC_VERSION_CMD


def test_crc_is_not_plain_ccitt_false() -> None:
    # CRC-16/CCITT-FALSE (same polynomial and preset, direct form) gives 0x2D6C here:
    # the module's register takes message bits at the bottom, so a standard table is wrong.
    reg = 0xFFFF
    for byte in b"\x00\x03":
        reg ^= byte << 8
        for _ in range(8):
            reg = ((reg << 1) ^ 0x1021) & 0xFFFF if reg & 0x8000 else (reg << 1) & 0xFFFF
    assert reg == 0x2D6C != codec.crc16(b"\x00\x03")


@pytest.mark.parametrize(
    ("cmd", "frame"),
    [
        (codec.set_region(codec.REGIONS["NA2"]), DOC_SET_REGION_NA2),
        (codec.set_read_power(27.0), DOC_SET_POWER_27),
        (codec.set_antenna_search_list([1]), DOC_SET_ANTENNA_LIST),
        (codec.start_continuous_read(), DOC_START_READING),
        (codec.stop_continuous_read(), DOC_STOP_READING),
    ],
)
def test_commands_match_documented_frames(cmd: Command, frame: bytes) -> None:
    assert codec.encode(cmd) == frame
    assert CommandDecoder().feed(frame) == [cmd]


def test_documented_responses_decode() -> None:
    stream = DOC_VERSION_RSP + DOC_START_ACK + DOC_RECORD_E200 + DOC_NO_TAGS + DOC_STOP_ACK
    dec = ResponseDecoder()
    frames = dec.feed(stream)
    assert [f.opcode for f in frames] == [0x03, 0x2F, 0x22, 0x22, 0x2F]
    assert dec.stats.frames == 5
    assert dec.stats.dropped_bytes == 0
    assert dec.stats.bad_crc == 0
    info = codec.parse_version(frames[0].data)
    assert info.model == "M6e Nano"
    assert info.supports_gen2
    assert frames[1].data == b"\x01\x22\x00\x00"
    assert codec.parse_stream(frames[3]) == StreamStatus(Status.NO_TAGS_FOUND)
    assert frames[4].data == b"\x02"


def test_documented_tag_records_parse() -> None:
    rec = codec.parse_stream(ResponseDecoder().feed(DOC_RECORD_E200)[0])
    assert isinstance(rec, TagRecord)
    assert rec.epc.hex() == "e2001026760e017915907125"
    assert (rec.antenna, rec.rx_port, rec.rssi_dbm, rec.read_count) == (1, 1, -55, 1)
    assert rec.frequency_khz == 0x0E0830
    assert rec.timestamp_ms == 0x13
    assert rec.protocol == 5
    assert rec.pc == 0x3000
    assert rec.epc_crc_ok
    short = codec.parse_stream(ResponseDecoder().feed(DOC_RECORD_596F)[0])
    assert isinstance(short, TagRecord)
    assert short.epc.hex() == "596f596f"
    assert short.rssi_dbm == -57
    assert short.epc_crc_ok


def test_status_words_map_to_clear_errors() -> None:
    err = codec.status_error(0x2F, 0x0101)
    assert isinstance(err, TransientError)
    assert "invalid command opcode" in str(err)
    cfg_err = codec.status_error(0x97, 0x0105)
    assert isinstance(cfg_err, PermanentError)
    assert "parameter value out of range" in str(cfg_err)
    assert isinstance(codec.status_error(0x92, 0x0103), PermanentError)
    assert codec.status_text(0x0400) == "no tags found"
    with pytest.raises(PermanentError, match="0x010B"):
        codec.check(Response(0x97, 0x010B))
    assert codec.check(Response(0x2F, 0x0101), allow=(0x0101,)).status == 0x0101


def test_tag_record_from_the_simulator_parses_identically() -> None:
    data = wire.tag_record(
        epc=bytes(range(12)),
        metadata=0x01FF,
        read_count=3,
        rssi=-61,
        antenna=4,
        frequency_khz=915250,
        timestamp_ms=1234,
    )
    rec = codec.parse_tag_record(data)
    assert rec.epc == bytes(range(12))
    assert (rec.antenna, rec.rssi_dbm, rec.read_count, rec.frequency_khz) == (4, -61, 3, 915250)
    assert rec.timestamp_ms == 1234
    assert rec.epc_crc_ok


# --- hypothesis ----------------------------------------------------------------------------

responses = st.builds(
    Response,
    opcode=st.integers(0, 255),
    status=st.integers(0, 0xFFFF),
    data=st.binary(max_size=255),
)
commands = st.builds(Command, opcode=st.integers(0, 255), data=st.binary(max_size=255))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(responses, max_size=6), st.lists(st.integers(0, 10_000), max_size=20))
def test_round_trip_any_chunking(frames: list[Response], cuts: list[int]) -> None:
    stream = b"".join(codec.encode(f) for f in frames)
    dec = ResponseDecoder()
    got: list[Response] = []
    for chunk in _chunks(stream, cuts):
        got += dec.feed(chunk)
    assert got == frames
    assert dec.buffered == 0
    assert dec.stats.dropped_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(commands, max_size=4))
def test_command_round_trip(frames: list[Command]) -> None:
    stream = b"".join(codec.encode(f) for f in frames)
    assert CommandDecoder().feed(stream) == frames
    # the simulator's independent scanner agrees on the same bytes
    assert [(c.opcode, c.data) for c in wire.CommandScanner().feed(stream)] == [
        (f.opcode, f.data) for f in frames
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.lists(responses, min_size=1, max_size=4),
    st.binary(max_size=300),
    st.lists(responses, min_size=1, max_size=4),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_resync_after_garbage_prefix_and_infix(
    prefix: bytes, first: list[Response], infix: bytes, second: list[Response], cuts: list[int]
) -> None:
    good1 = b"".join(codec.encode(f) for f in first)
    good2 = b"".join(codec.encode(f) for f in second)
    stream = prefix + good1 + infix + good2
    dec = ResponseDecoder()
    got: list[Response] = []
    for chunk in _chunks(stream, cuts):
        got += dec.feed(chunk)
    assert got[-len(second) :] == second
    assert all(f in got for f in first)
    assert dec.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=8))
def test_any_bytes_never_crash_and_every_byte_is_accounted_for(chunks: list[bytes]) -> None:
    dec = ResponseDecoder()
    consumed = 0
    for chunk in chunks:
        for frame in dec.feed(chunk):
            consumed += len(frame.data) + codec.RESPONSE_OVERHEAD
            try:
                if frame.opcode == 0x22:
                    codec.parse_stream(frame)
            except MalformedMessage:
                pass
        assert dec.buffered <= dec.max_buffered
    assert consumed + dec.stats.dropped_bytes + dec.buffered == sum(map(len, chunks))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_tag_record_parser_only_raises_malformed(data: bytes) -> None:
    try:
        rec = codec.parse_tag_record(data)
    except MalformedMessage:
        return
    assert isinstance(rec, TagRecord)


@settings(max_examples=200, deadline=None)
@given(
    epc_words=st.integers(1, 31),
    seed=st.binary(min_size=62, max_size=62),
    metadata=st.integers(0, 0x01FF),
    rssi=st.integers(-127, -1),
    antenna=st.integers(1, 15),
    read_count=st.integers(1, 255),
)
def test_simulator_records_round_trip_through_the_driver_codec(
    epc_words: int, seed: bytes, metadata: int, rssi: int, antenna: int, read_count: int
) -> None:
    epc = seed[: 2 * epc_words]
    frame = wire.response(
        0x22,
        0,
        wire.tag_record(
            epc=epc,
            metadata=metadata,
            read_count=read_count,
            rssi=rssi,
            antenna=antenna,
            frequency_khz=902750,
            timestamp_ms=77,
        ),
    )
    (resp,) = ResponseDecoder().feed(frame)
    rec = codec.parse_stream(resp)
    assert isinstance(rec, TagRecord)
    assert rec.epc == epc
    assert rec.epc_crc_ok
    assert rec.rssi_dbm == (rssi if metadata & codec.META_RSSI else None)
    assert rec.antenna == (antenna if metadata & codec.META_ANTENNA else 0)
    assert rec.read_count == (read_count if metadata & codec.META_READCOUNT else 1)


@given(st.binary(max_size=64))
def test_simulator_and_driver_crc_agree(data: bytes) -> None:
    assert wire.crc16(data) == codec.crc16(data)
    assert wire.gen2_crc16(data) == codec.gen2_crc16(data)


def test_oversize_length_is_skipped_and_counted() -> None:
    dec = ResponseDecoder(max_data_len=64)
    frame = codec.encode(Response(0x03, 0, b"x" * 100))
    good = codec.encode(Response(0x67, 0, b"\x0d"))
    assert dec.feed(frame + good) == [Response(0x67, 0, b"\x0d")]
    assert dec.stats.oversize >= 1
    assert dec.stats.dropped_bytes >= len(frame)


def test_a_fake_header_does_not_hold_back_a_later_valid_frame() -> None:
    # "FF C8" promises 200 bytes that never come; the real answer right behind it must
    # not wait for them (idle links only send answers, so nothing would ever fill it).
    dec = ResponseDecoder()
    answer = codec.encode(Response(0x67, 0, b"\x0d"))
    assert dec.feed(b"\xff\xc8\x01" + answer) == [Response(0x67, 0, b"\x0d")]
    assert dec.stats.dropped_bytes == 3


def test_encode_rejects_what_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="too long"):
        codec.encode(Command(0x03, b"x" * 256))
    with pytest.raises(ValueError, match="antenna port"):
        codec.set_antenna_search_list([16])
