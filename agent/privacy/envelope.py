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

__all__ = [
    "ENC_LEN",
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
SUPPORTED_VERSIONS: Final = frozenset({1})
# RFC 9180 identifiers of the one suite version 1 uses (informative: the version implies them).
KEM_ID: Final = 0x0020  # DHKEM(X25519, HKDF-SHA256)
KDF_ID: Final = 0x0001  # HKDF-SHA256
AEAD_ID: Final = 0x0002  # AES-256-GCM
ENC_LEN: Final = 32  # X25519 public key of the per-event ephemeral key pair
TAG_LEN: Final = 16  # AES-GCM tag
MAX_ID_LEN: Final = 64
# Events are a few hundred bytes; the bound keeps a hostile or corrupt row from costing memory.
MAX_PLAINTEXT_BYTES: Final = 256 * 1024
MAX_ENVELOPE_BYTES: Final = MAX_PLAINTEXT_BYTES + 512

# Key ids and cabinet ids travel in clear (header, topics): a narrow alphabet keeps names of people
# and other free text out of them.
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_U64_MAX: Final = (1 << 64) - 1
_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class EnvelopeError(ValueError):
    """An envelope (or a header) cannot be built, parsed or opened."""


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The public part of an envelope: enough to route and de-duplicate, nothing personal."""

    key_id: str
    cabinet_id: str
    seq: int
    event_id: uuid.UUID
    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise EnvelopeError(f"unsupported envelope version {self.version!r}")
        _check_id("key id", self.key_id)
        _check_id("cabinet id", self.cabinet_id)
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
        _check_id("key id", key_id)
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
            _check_id("key id", key_id)
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


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise EnvelopeError(
            f"{what} must be 1-{MAX_ID_LEN} ASCII characters [A-Za-z0-9_.:-] "
            f"starting with a letter or digit, got {value!r}"
        )


def _split(envelope: bytes) -> tuple[EnvelopeHeader, int]:
    """Parse the header; return it and its length in bytes."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise EnvelopeError("envelope must be bytes")
    data = bytes(envelope[: 4 + 2 + 2 * (1 + MAX_ID_LEN) + 8 + 16])
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
    key_id, pos = _read_id(data, pos, "key id")
    cabinet_id, pos = _read_id(data, pos, "cabinet id")
    if len(data) < pos + 8 + 16:
        raise EnvelopeError("envelope truncated inside the header")
    (seq,) = struct.unpack_from(">Q", data, pos)
    event_id = uuid.UUID(bytes=data[pos + 8 : pos + 24])
    pos += 24
    if total < pos + ENC_LEN + TAG_LEN:
        raise EnvelopeError(f"envelope of {total} bytes is too short for enc and tag")
    return EnvelopeHeader(key_id, cabinet_id, seq, event_id, version), pos


def _read_id(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if len(data) <= pos:
        raise EnvelopeError(f"envelope truncated before the {what}")
    length = data[pos]
    raw = data[pos + 1 : pos + 1 + length]
    if length == 0 or length > MAX_ID_LEN or len(raw) != length:
        raise EnvelopeError(f"bad {what} length {length} in header")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(f"{what} in header is not ASCII") from None
    _check_id(what, text)
    return text, pos + 1 + length
