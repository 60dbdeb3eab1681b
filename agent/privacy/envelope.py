"""Sealed event envelopes: HPKE base mode to the backend, public header bound as ``info``.

Byte layout, suite and versioning rules are specified in ``docs/envelope.md``; keep the two in
step. The cabinet holds only the backend's public key, so it cannot open its own outbox.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.privacy.keyfile import KID_PATTERN
from drivers.config import READER_ID_PATTERN

__all__ = [
    "CABINET_ID_PATTERN",
    "ENC_LEN",
    "EPOCH_LEN",
    "KEY_ID_PATTERN",
    "MAGIC",
    "MAX_ENVELOPE_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "SUPPORTED_VERSIONS",
    "TAG_LEN",
    "EnvelopeError",
    "EnvelopeHeader",
    "Opener",
    "Sealer",
    "encode_header",
    "parse_header",
    "seal_batch",
]

MAGIC: Final = b"CAE1"
# 1: the original layout (still opened: old outboxes hold it); 2: adds the store epoch.
SUPPORTED_VERSIONS: Final = frozenset({1, 2})
CURRENT_VERSION: Final = 2
# RFC 9180 identifiers of the one suite both versions use (informative: the version implies them).
KEM_ID: Final = 0x0020  # DHKEM(X25519, HKDF-SHA256)
KDF_ID: Final = 0x0001  # HKDF-SHA256
AEAD_ID: Final = 0x0002  # AES-256-GCM
ENC_LEN: Final = 32  # X25519 public key of the per-event ephemeral key pair
TAG_LEN: Final = 16  # AES-GCM tag
EPOCH_LEN: Final = 8  # random id of the state database incarnation that numbered the event
# Events are a few hundred bytes; the bound keeps a hostile or corrupt row from costing memory.
MAX_PLAINTEXT_BYTES: Final = 256 * 1024
MAX_ENVELOPE_BYTES: Final = MAX_PLAINTEXT_BYTES + 512

# Key ids and cabinet ids travel in clear (header, topics): one rule each, the same everywhere.
# A key id is a key file's ``kid`` (docs/privacy.md); a cabinet id is ``[cabinet] cabinet_id``.
KEY_ID_PATTERN: Final = KID_PATTERN
CABINET_ID_PATTERN: Final = READER_ID_PATTERN.removeprefix("^").removesuffix("$")
_KEY_ID_RE: Final = re.compile(KEY_ID_PATTERN)
_CABINET_ID_RE: Final = re.compile(CABINET_ID_PATTERN)
_MAX_ID_LEN: Final = 64  # a length byte beyond any valid id is refused before decoding
_U64_MAX: Final = (1 << 64) - 1
_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class EnvelopeError(ValueError):
    """An envelope (or a header) cannot be built, parsed or opened."""


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The public part of an envelope: enough to route and de-duplicate, nothing personal.

    Version 2 (what the agent seals) carries the ``epoch`` of the state database that numbered
    the event; version 1 (no epoch) is what older agents sealed.
    """

    key_id: str
    cabinet_id: str
    seq: int
    event_id: uuid.UUID
    version: int = 1
    epoch: bytes | None = None

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise EnvelopeError(f"unsupported envelope version {self.version!r}")
        if self.version == 1 and self.epoch is not None:
            raise EnvelopeError("a version 1 header has no epoch (use version 2)")
        if self.version >= 2 and (
            not isinstance(self.epoch, bytes) or len(self.epoch) != EPOCH_LEN
        ):
            raise EnvelopeError(f"a version {self.version} header needs an {EPOCH_LEN}-byte epoch")
        _check_id("key id", self.key_id, _KEY_ID_RE, KEY_ID_PATTERN)
        _check_id("cabinet id", self.cabinet_id, _CABINET_ID_RE, CABINET_ID_PATTERN)
        if isinstance(self.seq, bool) or not isinstance(self.seq, int):
            raise EnvelopeError("seq must be an int")
        if not 0 <= self.seq <= _U64_MAX:
            raise EnvelopeError(f"seq {self.seq} out of range 0..2**64-1")
        if not isinstance(self.event_id, uuid.UUID):
            raise EnvelopeError("event_id must be a uuid.UUID")


def encode_header(header: EnvelopeHeader) -> bytes:
    """The exact header bytes (also the HPKE ``info``) for ``header``."""
    key_id = header.key_id.encode("ascii")
    cabinet_id = header.cabinet_id.encode("ascii")
    return b"".join(
        (
            MAGIC,
            struct.pack(">BB", header.version, len(key_id)),
            key_id,
            struct.pack(">B", len(cabinet_id)),
            cabinet_id,
            header.epoch or b"",
            struct.pack(">Q", header.seq),
            header.event_id.bytes,
        )
    )


def parse_header(envelope: bytes) -> EnvelopeHeader:
    """Read the public header of an envelope; no key needed, nothing authenticated yet."""
    header, _ = _split(envelope)
    return header


class Sealer:
    """Seals events to one backend public key; a fresh ephemeral key pair per call."""

    def __init__(self, public_key: X25519PublicKey | bytes, key_id: str) -> None:
        if isinstance(public_key, bytes | bytearray | memoryview):
            if len(public_key) != ENC_LEN:
                raise EnvelopeError(f"X25519 public key must be {ENC_LEN} bytes")
            public_key = X25519PublicKey.from_public_bytes(bytes(public_key))
        if not isinstance(public_key, X25519PublicKey):
            raise EnvelopeError("public key must be X25519")
        _check_id("key id", key_id, _KEY_ID_RE, KEY_ID_PATTERN)
        self._public_key = public_key
        self._key_id = key_id

    @property
    def key_id(self) -> str:
        return self._key_id

    def seal(self, header: EnvelopeHeader, plaintext: bytes) -> bytes:
        """Return ``header || enc || ciphertext``; ``header.key_id`` must be this sealer's."""
        if header.key_id != self._key_id:
            raise EnvelopeError(
                f"header key id {header.key_id!r} does not match the sealer's {self._key_id!r}"
            )
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise EnvelopeError(
                f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT_BYTES} bytes"
            )
        info = encode_header(header)
        # Suite.encrypt draws a new ephemeral key each call and returns enc || ct.
        return info + _SUITE.encrypt(plaintext, self._public_key, info=info)

    def __repr__(self) -> str:
        return f"Sealer(key_id={self._key_id!r})"


class Opener:
    """Opens envelopes with the backend's private keys, chosen by the header's key id."""

    def __init__(self, private_keys: Mapping[str, X25519PrivateKey]) -> None:
        if not private_keys:
            raise EnvelopeError("an opener needs at least one private key")
        for key_id, key in private_keys.items():
            _check_id("key id", key_id, _KEY_ID_RE, KEY_ID_PATTERN)
            if not isinstance(key, X25519PrivateKey):
                raise EnvelopeError(f"key {key_id!r} is not an X25519 private key")
        self._keys = dict(private_keys)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def open(self, envelope: bytes) -> tuple[EnvelopeHeader, bytes]:
        """Authenticate and decrypt; the header is returned only once it is authenticated."""
        header, header_len = _split(envelope)
        key = self._keys.get(header.key_id)
        if key is None:
            raise EnvelopeError(f"unknown key id {header.key_id!r}")
        info = bytes(envelope[:header_len])
        try:
            plaintext = _SUITE.decrypt(bytes(envelope[header_len:]), key, info=info)
        except InvalidTag:
            raise EnvelopeError(
                f"envelope seq {header.seq} of cabinet {header.cabinet_id!r} failed "
                "authentication (tampered, truncated or sealed to another key)"
            ) from None
        return header, plaintext

    def __repr__(self) -> str:
        return f"Opener(key_ids={sorted(self._keys)!r})"


def seal_batch(sealer: Sealer, items: Sequence[tuple[EnvelopeHeader, bytes]]) -> list[bytes]:
    """Seal several events in one call (meant for ``asyncio.to_thread``)."""
    return [sealer.seal(header, plaintext) for header, plaintext in items]


def _check_id(what: str, value: object, rx: re.Pattern[str], pattern: str) -> None:
    if not isinstance(value, str) or rx.fullmatch(value) is None:
        raise EnvelopeError(f"{what} must match {pattern}, got {value!r}")


def _split(envelope: bytes) -> tuple[EnvelopeHeader, int]:
    """Parse the header; return it and its length in bytes."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise EnvelopeError("envelope must be bytes")
    data = bytes(envelope[: 4 + 2 + 2 * (1 + _MAX_ID_LEN) + EPOCH_LEN + 8 + 16])
    total = len(envelope)
    if total > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope of {total} bytes exceeds {MAX_ENVELOPE_BYTES} bytes")
    if len(data) < 6:
        raise EnvelopeError(f"envelope of {total} bytes is too short for a header")
    if data[:4] != MAGIC:
        raise EnvelopeError(
            f"not a cabinet envelope (magic {data[:4].hex()}, expected {MAGIC.hex()})"
        )
    version = data[4]
    if version not in SUPPORTED_VERSIONS:
        raise EnvelopeError(
            f"unsupported envelope version {version} (this agent knows {sorted(SUPPORTED_VERSIONS)})"
        )
    pos = 5
    key_id, pos = _read_id(data, pos, "key id", _KEY_ID_RE, KEY_ID_PATTERN)
    cabinet_id, pos = _read_id(data, pos, "cabinet id", _CABINET_ID_RE, CABINET_ID_PATTERN)
    epoch: bytes | None = None
    if version >= 2:
        epoch = data[pos : pos + EPOCH_LEN]
        pos += EPOCH_LEN
    if len(data) < pos + 8 + 16:
        raise EnvelopeError("envelope truncated inside the header")
    (seq,) = struct.unpack_from(">Q", data, pos)
    event_id = uuid.UUID(bytes=data[pos + 8 : pos + 24])
    pos += 24
    if total < pos + ENC_LEN + TAG_LEN:
        raise EnvelopeError(f"envelope of {total} bytes is too short for enc and tag")
    return EnvelopeHeader(key_id, cabinet_id, seq, event_id, version, epoch), pos


def _read_id(
    data: bytes, pos: int, what: str, rx: re.Pattern[str], pattern: str
) -> tuple[str, int]:
    if len(data) <= pos:
        raise EnvelopeError(f"envelope truncated before the {what}")
    length = data[pos]
    raw = data[pos + 1 : pos + 1 + length]
    if length == 0 or length > _MAX_ID_LEN or len(raw) != length:
        raise EnvelopeError(f"bad {what} length {length} in header")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(f"{what} in header is not ASCII") from None
    _check_id(what, text, rx, pattern)
    return text, pos + 1 + length
