"""Sealed event envelopes: round trip, tamper evidence, key ids, versions, header parsing."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.privacy.envelope import (
    ENC_LEN,
    MAGIC,
    MAX_PLAINTEXT_BYTES,
    TAG_LEN,
    EnvelopeError,
    EnvelopeHeader,
    Opener,
    Sealer,
    encode_header,
    parse_header,
    seal_batch,
)

PRIVATE = X25519PrivateKey.generate()
OTHER = X25519PrivateKey.generate()
EVENT = b'{"type":"item.checked_out","epc":"e2801160600002084b3c1a2f","by":"p1.s1.x"}'

# The rules of docs/envelope.md §1: a key file's kid, and a configured cabinet id.
key_ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,15}", fullmatch=True)
cabinet_ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,31}", fullmatch=True)


def header(seq: int = 7, key_id: str = "hpke1", cabinet_id: str = "crib-07") -> EnvelopeHeader:
    return EnvelopeHeader(key_id=key_id, cabinet_id=cabinet_id, seq=seq, event_id=uuid.uuid4())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key_id=key_ids,
    cabinet_id=cabinet_ids,
    seq=st.integers(0, 2**64 - 1),
    event_id=st.uuids(),
    plaintext=st.binary(max_size=2048),
    epoch=st.none() | st.binary(min_size=8, max_size=8),
)
def test_round_trip(
    key_id: str,
    cabinet_id: str,
    seq: int,
    event_id: uuid.UUID,
    plaintext: bytes,
    epoch: bytes | None,
) -> None:
    hdr = EnvelopeHeader(key_id, cabinet_id, seq, event_id, 1 if epoch is None else 2, epoch)
    envelope = Sealer(PRIVATE.public_key(), key_id).seal(hdr, plaintext)
    assert parse_header(envelope) == hdr
    assert Opener({key_id: PRIVATE}).open(envelope) == (hdr, plaintext)
    assert len(envelope) == len(encode_header(hdr)) + ENC_LEN + len(plaintext) + TAG_LEN


def test_sealer_accepts_raw_public_key_bytes() -> None:
    sealer = Sealer(PRIVATE.public_key().public_bytes_raw(), "hpke1")
    hdr = header()
    assert Opener({"hpke1": PRIVATE}).open(sealer.seal(hdr, EVENT)) == (hdr, EVENT)


def test_every_tampered_byte_is_refused() -> None:
    hdr = header()
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(hdr, EVENT)
    opener = Opener({"hpke1": PRIVATE})
    refused = 0
    for i in range(len(envelope)):
        for flip in (0x01, 0x80):
            tampered = bytearray(envelope)
            tampered[i] ^= flip
            with pytest.raises(EnvelopeError):
                opener.open(bytes(tampered))
            refused += 1
    assert refused == 2 * len(envelope)
    assert opener.open(envelope) == (hdr, EVENT)


def test_header_field_swaps_are_refused() -> None:
    """A valid-looking header from another event cannot be grafted onto a ciphertext."""
    sealer = Sealer(PRIVATE.public_key(), "hpke1")
    opener = Opener({"hpke1": PRIVATE})
    hdr = header(seq=5)
    envelope = sealer.seal(hdr, EVENT)
    body = envelope[len(encode_header(hdr)) :]
    for other in (
        EnvelopeHeader("hpke1", "crib-07", 6, hdr.event_id),
        EnvelopeHeader("hpke1", "crib-08", 5, hdr.event_id),
        EnvelopeHeader("hpke1", "crib-07", 5, uuid.uuid4()),
    ):
        with pytest.raises(EnvelopeError, match="failed authentication"):
            opener.open(encode_header(other) + body)


def test_truncation_and_extension_are_refused() -> None:
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(header(), EVENT)
    opener = Opener({"hpke1": PRIVATE})
    for cut in range(len(envelope)):
        with pytest.raises(EnvelopeError):
            opener.open(envelope[:cut])
    with pytest.raises(EnvelopeError):
        opener.open(envelope + b"\x00")


def test_each_seal_uses_a_fresh_ephemeral_key() -> None:
    sealer = Sealer(PRIVATE.public_key(), "hpke1")
    hdr = header()
    a, b = sealer.seal(hdr, EVENT), sealer.seal(hdr, EVENT)
    start = len(encode_header(hdr))
    assert a[:start] == b[:start]
    assert a[start : start + ENC_LEN] != b[start : start + ENC_LEN]
    assert a[start + ENC_LEN :] != b[start + ENC_LEN :]


def test_unknown_key_id_is_refused_by_name() -> None:
    envelope = Sealer(PRIVATE.public_key(), "hpke2").seal(header(key_id="hpke2"), EVENT)
    with pytest.raises(EnvelopeError, match="unknown key id 'hpke2'"):
        Opener({"hpke1": PRIVATE}).open(envelope)


def test_wrong_private_key_under_right_id_fails_authentication() -> None:
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(header(), EVENT)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        Opener({"hpke1": OTHER}).open(envelope)


def test_key_rotation_opens_old_and_new() -> None:
    old = Sealer(OTHER.public_key(), "2026-a").seal(header(key_id="2026-a"), b"old")
    new = Sealer(PRIVATE.public_key(), "2026-b").seal(header(key_id="2026-b"), b"new")
    opener = Opener({"2026-a": OTHER, "2026-b": PRIVATE})
    assert opener.open(old)[1] == b"old"
    assert opener.open(new)[1] == b"new"
    assert opener.key_ids == {"2026-a", "2026-b"}


def test_sealer_refuses_a_header_for_another_key() -> None:
    with pytest.raises(EnvelopeError, match="does not match"):
        Sealer(PRIVATE.public_key(), "hpke1").seal(header(key_id="hpke2"), EVENT)


def test_unknown_version_and_magic_are_refused() -> None:
    envelope = bytearray(Sealer(PRIVATE.public_key(), "hpke1").seal(header(), EVENT))
    envelope[4] = 3  # 1 and 2 exist; 3 does not (yet)
    with pytest.raises(EnvelopeError, match="unsupported envelope version 3"):
        parse_header(bytes(envelope))
    with pytest.raises(EnvelopeError, match="unsupported envelope version 3"):
        Opener({"hpke1": PRIVATE}).open(bytes(envelope))
    envelope[4] = 1
    envelope[:4] = b"CAE2"
    with pytest.raises(EnvelopeError, match="not a cabinet envelope"):
        parse_header(bytes(envelope))
    with pytest.raises(EnvelopeError, match="unsupported envelope version"):
        EnvelopeHeader("hpke1", "crib-07", 1, uuid.uuid4(), version=3)


def test_parse_header_needs_no_key_and_matches_the_spec_layout() -> None:
    hdr = EnvelopeHeader("hpke1", "crib-07", 0x0102030405060708, uuid.uuid4())
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(hdr, EVENT)
    expected = (
        MAGIC
        + bytes([1, 5])
        + b"hpke1"
        + bytes([7])
        + b"crib-07"
        + struct.pack(">Q", hdr.seq)
        + hdr.event_id.bytes
    )
    assert envelope.startswith(expected)
    assert encode_header(hdr) == expected
    assert parse_header(envelope) == hdr


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"key_id": ""}, "key id"),
        ({"key_id": "k" * 65}, "key id"),
        ({"key_id": "clé"}, "key id"),
        ({"cabinet_id": "has space"}, "cabinet id"),
        ({"cabinet_id": "-lead"}, "cabinet id"),
        ({"seq": -1}, "out of range"),
        ({"seq": 2**64}, "out of range"),
        ({"seq": True}, "must be an int"),
        ({"event_id": "not-a-uuid"}, "uuid"),
    ],
)
def test_header_validation(bad: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "key_id": "hpke1",
        "cabinet_id": "crib-07",
        "seq": 1,
        "event_id": uuid.uuid4(),
    }
    fields.update(bad)
    with pytest.raises(EnvelopeError, match=message):
        EnvelopeHeader(**fields)  # type: ignore[arg-type]


def test_plaintext_size_is_bounded() -> None:
    sealer = Sealer(PRIVATE.public_key(), "hpke1")
    sealer.seal(header(), b"x" * MAX_PLAINTEXT_BYTES)
    with pytest.raises(EnvelopeError, match="exceeds"):
        sealer.seal(header(), b"x" * (MAX_PLAINTEXT_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_header_of_garbage_raises_only_envelope_error(data: bytes) -> None:
    opener = Opener({"hpke1": PRIVATE})
    for candidate in (data, MAGIC + b"\x01" + data):
        with contextlib.suppress(EnvelopeError):
            parse_header(candidate)
        with pytest.raises(EnvelopeError):
            opener.open(candidate)


def test_seal_batch_keeps_order_and_headers() -> None:
    sealer = Sealer(PRIVATE.public_key(), "hpke1")
    items = [(header(seq=i), f'{{"n":{i}}}'.encode()) for i in range(5)]
    envelopes = seal_batch(sealer, items)
    opener = Opener({"hpke1": PRIVATE})
    assert [opener.open(e) for e in envelopes] == items


def test_constructor_validation_and_repr_shows_no_key_material() -> None:
    with pytest.raises(EnvelopeError, match="32 bytes"):
        Sealer(b"short", "hpke1")
    with pytest.raises(EnvelopeError, match="at least one"):
        Opener({})
    with pytest.raises(EnvelopeError, match="not an X25519"):
        Opener({"hpke1": object()})  # type: ignore[dict-item]
    opener = Opener({"hpke1": PRIVATE})
    assert repr(opener) == "Opener(key_ids=['hpke1'])"
    assert repr(Sealer(PRIVATE.public_key(), "hpke1")) == "Sealer(key_id='hpke1')"


EPOCH = bytes.fromhex("a1b2c3d4e5f60718")


def test_version_2_carries_the_epoch_before_seq() -> None:
    hdr = EnvelopeHeader("hpke1", "crib-07", 0x0102030405060708, uuid.uuid4(), 2, EPOCH)
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(hdr, EVENT)
    expected = (
        MAGIC
        + bytes([2, 5])
        + b"hpke1"
        + bytes([7])
        + b"crib-07"
        + EPOCH
        + struct.pack(">Q", hdr.seq)
        + hdr.event_id.bytes
    )
    assert encode_header(hdr) == expected
    assert parse_header(envelope) == hdr
    assert parse_header(envelope).epoch == EPOCH
    assert Opener({"hpke1": PRIVATE}).open(envelope) == (hdr, EVENT)


def test_the_epoch_is_authenticated() -> None:
    hdr = EnvelopeHeader("hpke1", "crib-07", 5, uuid.uuid4(), 2, EPOCH)
    envelope = Sealer(PRIVATE.public_key(), "hpke1").seal(hdr, EVENT)
    body = envelope[len(encode_header(hdr)) :]
    other = EnvelopeHeader("hpke1", "crib-07", 5, hdr.event_id, 2, bytes(8))
    with pytest.raises(EnvelopeError, match="failed authentication"):
        Opener({"hpke1": PRIVATE}).open(encode_header(other) + body)


@pytest.mark.parametrize(
    ("version", "epoch", "message"),
    [
        (1, EPOCH, "version 1 header has no epoch"),
        (2, None, "8-byte epoch"),
        (2, b"short", "8-byte epoch"),
    ],
)
def test_epoch_goes_with_version_2_only(version: int, epoch: bytes | None, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        EnvelopeHeader("hpke1", "crib-07", 1, uuid.uuid4(), version, epoch)


@pytest.mark.parametrize(
    ("key_id", "cabinet_id"),
    [("Hpke1", "crib-07"), ("hp.ke", "crib-07"), ("k" * 17, "crib-07"), ("hpke1", "Crib-07")],
)
def test_ids_follow_the_one_rule_of_key_files_and_config(key_id: str, cabinet_id: str) -> None:
    """Key ids are key-file kids, cabinet ids are config cabinet ids: nothing wider."""
    with pytest.raises(EnvelopeError, match="must match"):
        EnvelopeHeader(key_id, cabinet_id, 1, uuid.uuid4())
