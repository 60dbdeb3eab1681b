"""Committed envelope test vectors, and an RFC 9180 opener written from the spec alone.

The hand-rolled opener below uses only X25519, HMAC/HKDF-Expand and AES-GCM primitives and
what ``docs/envelope.md`` says; it shares no code with ``agent.privacy``. It is first checked
against the RFC 9180 Appendix A.1.1 known answer, then made to open our envelopes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from agent.privacy import vectors
from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer, parse_header

from .conftest import ROOT

VECTORS_PATH = ROOT / "docs" / "envelope-test-vectors.json"


# --- an independent RFC 9180 base-mode opener (recipient side, single shot) -----------------


def _extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()


def _expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, n: int) -> bytes:
    return HKDFExpand(
        hashes.SHA256(), n, n.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
    ).derive(prk)


def rfc9180_open(
    sk_r: bytes, enc: bytes, info: bytes, ct: bytes, *, aead_id: int, aad: bytes = b""
) -> bytes:
    """DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-GCM (aead_id 1: 128, 2: 256), seq 0."""
    kem_suite = b"KEM" + (0x0020).to_bytes(2, "big")
    hpke_suite = b"HPKE" + struct.pack(">HHH", 0x0020, 0x0001, aead_id)
    recipient = X25519PrivateKey.from_private_bytes(sk_r)
    pk_rm = recipient.public_key().public_bytes_raw()
    dh = recipient.exchange(X25519PublicKey.from_public_bytes(enc))
    shared = _expand(
        kem_suite, _extract(kem_suite, b"", b"eae_prk", dh), b"shared_secret", enc + pk_rm, 32
    )
    context = (
        b"\x00"
        + _extract(hpke_suite, b"", b"psk_id_hash", b"")
        + _extract(hpke_suite, b"", b"info_hash", info)
    )
    secret = _extract(hpke_suite, shared, b"secret", b"")
    key = _expand(hpke_suite, secret, b"key", context, {1: 16, 2: 32}[aead_id])
    nonce = _expand(hpke_suite, secret, b"base_nonce", context, 12)
    return AESGCM(key).decrypt(nonce, ct, aad)


def spec_split(envelope: bytes) -> tuple[dict[str, object], bytes, bytes, bytes]:
    """Split an envelope by the byte layout in docs/envelope.md: header fields, info, enc, ct."""
    assert envelope[:4] == b"CAE1"
    version = envelope[4]
    kid_len = envelope[5]
    kid = envelope[6 : 6 + kid_len].decode("ascii")
    pos = 6 + kid_len
    cab_len = envelope[pos]
    cabinet = envelope[pos + 1 : pos + 1 + cab_len].decode("ascii")
    pos += 1 + cab_len
    fields: dict[str, object] = {"version": version, "key_id": kid, "cabinet_id": cabinet}
    if version == 2:  # version 2 adds the 8-byte epoch before seq
        fields["epoch"] = envelope[pos : pos + 8].hex()
        pos += 8
    else:
        assert version == 1
    fields["seq"] = int.from_bytes(envelope[pos : pos + 8], "big")
    fields["event_id"] = str(uuid.UUID(bytes=envelope[pos + 8 : pos + 24]))
    pos += 24
    return fields, envelope[:pos], envelope[pos : pos + 32], envelope[pos + 32 :]


# --- tests ----------------------------------------------------------------------------------


def test_hand_rolled_opener_matches_rfc9180_a_1_1() -> None:
    """RFC 9180 A.1.1 (X25519, HKDF-SHA256, AES-128-GCM), base mode, sequence 0."""
    sk_rm = bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
    enc = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
    info = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")  # "Ode on a Grecian Urn"
    ct = bytes.fromhex(
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
    )
    pt = rfc9180_open(sk_rm, enc, info, ct, aead_id=1, aad=b"Count-0")
    assert pt == b"Beauty is truth, truth beauty"


def test_derive_key_pair_matches_rfc9180_a_1_1() -> None:
    ikm_e = bytes.fromhex("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234")
    pk_em = vectors.derive_x25519_key_pair(ikm_e).public_key().public_bytes_raw()
    assert pk_em.hex() == "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"


def load_vectors() -> dict[str, object]:
    return json.loads(VECTORS_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_committed_vectors_are_what_the_generator_writes() -> None:
    assert VECTORS_PATH.read_text(encoding="utf-8") == vectors.render()


@pytest.mark.parametrize("index", range(len(vectors.generate_vectors()["vectors"])))
def test_committed_vector_opens_three_ways(index: int) -> None:
    doc = load_vectors()
    assert (doc["mode"], doc["kem_id"], doc["kdf_id"], doc["aead_id"]) == (0, 0x20, 1, 2)
    v = doc["vectors"][index]  # type: ignore[index]
    envelope = bytes.fromhex(v["envelope"])
    sk_r = bytes.fromhex(v["recipient_private_key"])
    plaintext = v["plaintext"].encode("utf-8")

    # 1. the header bytes follow the spec layout and carry the listed fields
    fields, info, enc, ct = spec_split(envelope)
    assert fields == v["header"]
    assert info.hex() == v["header_hex"]
    assert enc.hex() == v["enc"]

    # 2. the product's opener (cryptography's HPKE)
    private = X25519PrivateKey.from_private_bytes(sk_r)
    header, opened = Opener({v["header"]["key_id"]: private}).open(envelope)
    assert opened == plaintext
    assert header == parse_header(envelope)
    assert str(header.event_id) == v["header"]["event_id"]

    # 3. the independent opener, from the spec alone: info = header bytes, empty AAD
    assert rfc9180_open(sk_r, enc, info, ct, aead_id=2) == plaintext

    # 4. the event repeats the header's ids (docs/envelope.md §4)
    event = json.loads(plaintext)
    assert event["event_id"] == v["header"]["event_id"]
    assert event["seq"] == v["header"]["seq"]
    assert event["cabinet_id"] == v["header"]["cabinet_id"]


def test_vectors_cover_both_versions() -> None:
    versions = [v["header"]["version"] for v in load_vectors()["vectors"]]  # type: ignore[attr-defined]
    assert set(versions) == {1, 2}


def test_independent_opener_opens_a_fresh_product_envelope() -> None:
    """The product's random-ephemeral envelopes are plain RFC 9180 too."""
    private = X25519PrivateKey.generate()
    sk_r = private.private_bytes_raw()
    hdr = EnvelopeHeader("hpke1", "crib-07", 99, uuid.uuid4(), 2, bytes.fromhex("0102030405060708"))
    event = b'{"type":"door.closed"}'
    envelope = Sealer(private.public_key(), "hpke1").seal(hdr, event)
    fields, info, enc, ct = spec_split(envelope)
    assert fields["seq"] == 99
    assert fields["epoch"] == "0102030405060708"
    assert rfc9180_open(sk_r, enc, info, ct, aead_id=2) == event


def test_header_is_bound_through_info_not_aad() -> None:
    """Opening with any other info fails: the header is authenticated by the key schedule."""
    v = load_vectors()["vectors"][1]  # type: ignore[index]
    envelope = bytes.fromhex(v["envelope"])
    _, info, enc, ct = spec_split(envelope)
    sk_r = bytes.fromhex(v["recipient_private_key"])
    with pytest.raises(InvalidTag):
        rfc9180_open(sk_r, enc, info[:-1] + bytes([info[-1] ^ 1]), ct, aead_id=2)


def test_spec_example_is_vector_0() -> None:
    """The annotated header example in docs/envelope.md is the real header of vector 0."""
    spec = (ROOT / "docs" / "envelope.md").read_text(encoding="utf-8")
    line = next(ln for ln in spec.splitlines() if ln.startswith("43414531 "))
    assert line.replace(" ", "") == load_vectors()["vectors"][0]["header_hex"]  # type: ignore[index]
