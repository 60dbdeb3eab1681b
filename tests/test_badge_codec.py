"""Badge codecs under hostile input: round trips, resync after garbage, bounded buffers."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.privacy.pseudonym import Pseudonymizer
from drivers.badge.codec import (
    EM4100_FRAME_LEN,
    AsciiLineCodec,
    Em4100Codec,
    RawBadge,
    compile_line_pattern,
    make_codec,
)
from simulators.badge import ascii_line, em4100_frame

cards = st.text(alphabet="0123456789ABCDEF", min_size=10, max_size=10)
line_cards = st.text(alphabet="0123456789abcdefABCDEF", min_size=8, max_size=20)
garbage = st.binary(max_size=200)


def _feed_in_pieces(codec: Em4100Codec | AsciiLineCodec, data: bytes, cuts: list[int]) -> list[str]:
    out: list[str] = []
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        out += [b.reveal() for b in codec.feed(data[start:point])]
        start = point
    return out


# --- EM4100 -------------------------------------------------------------------------------


def test_em4100_known_frame() -> None:
    # 01 02 03 04 05 -> XOR = 01^02^03^04^05 = 01
    assert Em4100Codec.encode("0102030405") == b"\x02010203040501\x03"
    codec = Em4100Codec()
    assert [b.reveal() for b in codec.feed(b"\x02010203040501\x03")] == ["0102030405"]
    assert codec.stats.frames == 1


def test_em4100_lower_case_hex_is_canonicalized() -> None:
    codec = Em4100Codec()
    frame = em4100_frame("ABCDEF0123").replace(b"ABCDEF", b"abcdef")
    assert [b.reveal() for b in codec.feed(frame)] == ["ABCDEF0123"]


@given(cards=st.lists(cards, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000)))
def test_em4100_round_trip_any_split(cards: list[str], cuts: list[int]) -> None:
    stream = b"".join(Em4100Codec.encode(c) for c in cards)
    codec = Em4100Codec()
    assert _feed_in_pieces(codec, stream, cuts) == cards
    assert codec.stats.dropped_bytes == 0
    assert codec.buffered == 0


@given(card=cards)
def test_simulator_encoder_agrees_with_codec(card: str) -> None:
    assert em4100_frame(card) == Em4100Codec.encode(card)


@given(noise=garbage, card=cards, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_em4100_resyncs_after_garbage(noise: bytes, card: str, cuts: list[int]) -> None:
    codec = Em4100Codec()
    got = _feed_in_pieces(codec, noise + Em4100Codec.encode(card), cuts)
    # Random noise could itself hold a valid frame; the real one must still come last.
    assert got
    assert got[-1] == card
    assert codec.buffered == 0


@given(card=cards, flip=st.integers(1, 255))
def test_em4100_bad_checksum_is_dropped_and_counted(card: str, flip: int) -> None:
    frame = bytearray(Em4100Codec.encode(card))
    checksum = int(frame[11:13], 16) ^ flip
    frame[11:13] = b"%02X" % checksum
    codec = Em4100Codec()
    assert codec.feed(bytes(frame)) == []
    assert codec.stats.bad_checksums == 1
    assert codec.stats.dropped_bytes == EM4100_FRAME_LEN
    # and the next good frame still decodes
    assert [b.reveal() for b in codec.feed(Em4100Codec.encode(card))] == [card]


def test_em4100_truncated_frame_followed_by_good_frame() -> None:
    codec = Em4100Codec()
    good = Em4100Codec.encode("1234567890")
    assert [b.reveal() for b in codec.feed(good[:7] + good)] == ["1234567890"]
    assert codec.stats.dropped_bytes == 7


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_em4100_any_bytes_never_crash_and_buffer_stays_bounded(chunks: list[bytes]) -> None:
    codec = Em4100Codec()
    total = 0
    for chunk in chunks:
        out = codec.feed(chunk)
        total += len(chunk)
        assert codec.buffered < EM4100_FRAME_LEN
        assert all(isinstance(b, RawBadge) for b in out)
    s = codec.stats
    # every byte is accounted for: a frame, dropped, or still buffered
    assert s.frames * EM4100_FRAME_LEN + s.dropped_bytes + codec.buffered == total


def test_em4100_encode_refuses_bad_card() -> None:
    with pytest.raises(ValueError, match="10 hex digits"):
        Em4100Codec.encode("12345")


# --- ASCII lines ----------------------------------------------------------------------------


@given(
    cards=st.lists(line_cards, min_size=1, max_size=5),
    end=st.sampled_from([b"\r", b"\n", b"\r\n"]),
    cuts=st.lists(st.integers(0, 10_000)),
)
def test_lines_round_trip_any_line_end_any_split(
    cards: list[str], end: bytes, cuts: list[int]
) -> None:
    stream = b"".join(ascii_line(c, end) for c in cards)
    codec = AsciiLineCodec()
    assert _feed_in_pieces(codec, stream, cuts) == [c.upper() for c in cards]
    assert codec.stats.rejected_lines == 0


def test_lines_non_matching_lines_dropped_and_counted() -> None:
    codec = AsciiLineCodec()
    out = codec.feed(b"hello\r\nZZZZZZZZZZ\n\xff\xfe\n12345678\n")
    assert [b.reveal() for b in out] == ["12345678"]
    assert codec.stats.rejected_lines == 3


def test_lines_custom_pattern() -> None:
    codec = AsciiLineCodec(r"^ID:(?P<id>[0-9A-F]{10})\s*;")
    out = codec.feed(b"ID:0102030405 ;\nID:01\n")
    assert [b.reveal() for b in out] == ["0102030405"]
    assert codec.stats.rejected_lines == 1


def test_lines_overlong_line_discarded_up_to_its_end() -> None:
    codec = AsciiLineCodec(max_line=16)
    out = codec.feed(b"A" * 40)
    assert out == []
    assert codec.buffered <= 16
    out = codec.feed(b"B" * 40 + b"\n12345678\n")
    assert [b.reveal() for b in out] == ["12345678"]
    assert codec.stats.overlong_lines == 1


@given(noise=garbage, card=line_cards, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_lines_resync_after_garbage_line(noise: bytes, card: str, cuts: list[int]) -> None:
    codec = AsciiLineCodec()
    got = _feed_in_pieces(codec, noise + b"\n" + ascii_line(card), cuts)
    assert got
    assert got[-1] == card.upper()


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), max_line=st.integers(1, 80))
def test_lines_any_bytes_never_crash_and_buffer_stays_bounded(
    chunks: list[bytes], max_line: int
) -> None:
    codec = AsciiLineCodec(r"(?P<id>[0-9A-F]+)", max_line=max_line)
    for chunk in chunks:
        codec.feed(chunk)
        assert codec.buffered <= max_line


def test_decimal_line_reader_agrees_with_em4100_reader() -> None:
    """The same card on a decimal keyboard-style reader and an RDM6300 gets one pseudonym."""
    card = "0102030405"
    decimal = str(int(card, 16)).zfill(10)
    codec = AsciiLineCodec(r"^(?P<id>[0-9]{10})$", id_base=10)
    (from_line,) = codec.feed(decimal.encode() + b"\r\n")
    (from_em,) = Em4100Codec().feed(Em4100Codec.encode(card))
    pseudonymizer = Pseudonymizer("site-test", "k1", bytes(range(32)))
    assert pseudonymizer.badge(from_line.reveal()) == pseudonymizer.badge(from_em.reveal())


def test_line_ids_must_be_numbers_in_the_configured_base() -> None:
    hex_codec = AsciiLineCodec(r"^(?P<id>\S+)$")
    assert [b.reveal() for b in hex_codec.feed(b"xyz123\nab12\n")] == ["AB12"]
    assert hex_codec.stats.rejected_lines == 1
    dec_codec = AsciiLineCodec(r"^(?P<id>\S+)$", id_base=10)
    assert [b.reveal() for b in dec_codec.feed(b"ab12\n255\n")] == ["FF"]
    assert dec_codec.stats.rejected_lines == 1
    with pytest.raises(ValueError, match="id_base"):
        AsciiLineCodec(id_base=8)


def test_pattern_without_id_group_refused() -> None:
    with pytest.raises(ValueError, match="named group 'id'"):
        compile_line_pattern(r"^[0-9]+$")
    with pytest.raises(ValueError, match="does not compile"):
        compile_line_pattern(r"(?P<id>[0-9")
    with pytest.raises(ValueError, match="unknown badge protocol"):
        make_codec("wiegand")


# --- RawBadge never shows its number --------------------------------------------------------


def test_raw_badge_hides_its_number() -> None:
    raw = RawBadge("DEADBEEF42")
    logging_style = "%s %r" % (raw, raw)  # noqa: UP031  logging formats exactly like this
    for text in (repr(raw), str(raw), f"{raw}", f"{raw!r}", logging_style, repr([raw])):
        assert "DEADBEEF42" not in text
        assert re.search("redacted", text)
    with pytest.raises(TypeError) as exc:
        pickle.dumps(raw)
    assert "DEADBEEF42" not in str(exc.value)
    with pytest.raises(TypeError):
        copy.deepcopy(raw)
    assert raw == RawBadge("DEADBEEF42")
    assert raw != RawBadge("DEADBEEF43")
    assert raw.reveal() == "DEADBEEF42"
