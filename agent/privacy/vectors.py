"""Deterministic envelope test vectors (``docs/envelope-test-vectors.json``).

cryptography's HPKE draws its ephemeral key internally, so the vectors are sealed here with
the RFC 9180 base-mode sender written out from primitives and an ephemeral key derived from
a fixed seed (``DeriveKeyPair``, RFC 9180 §7.1.3). The tests open them with
``agent.privacy.envelope.Opener`` (cryptography's HPKE), which cross-checks both.

Regenerate: ``python -m agent.privacy.vectors docs/envelope-test-vectors.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
import uuid
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from agent.privacy.envelope import AEAD_ID, KDF_ID, KEM_ID, EnvelopeHeader, encode_header

__all__ = ["derive_x25519_key_pair", "generate_vectors", "main", "seal_deterministic"]

_KEM_SUITE_ID: Final = b"KEM" + struct.pack(">H", KEM_ID)
_HPKE_SUITE_ID: Final = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)
_N_K: Final = 32  # AES-256-GCM key
_N_N: Final = 12  # AES-GCM nonce
_N_SECRET: Final = 32  # HKDF-SHA256 output / DHKEM(X25519) shared secret
_MODE_BASE: Final = 0x00

# (version, key id, cabinet id, epoch, seq, event body without the ids): the header's ids are
# filled into the body, as docs/envelope.md §4 requires of every event.
_Case = tuple[int, str, str, str | None, int, dict[str, object]]
_CASES: Final[tuple[_Case, ...]] = (
    (2, "hpke1", "crib-07", "5eed0f0e1d2c3b4a", 1, {"type": "session.opened", "trigger": "badge"}),
    (
        2,
        "hpke1",
        "crib-07",
        "5eed0f0e1d2c3b4a",
        42,
        {
            "type": "item.checked_out",
            "epc": "e2801160600002084b3c1a2f",
            "actors": ["p1.s1.abcdefghijklmnopqrstuvwxyz"],
        },
    ),
    (
        2,
        "2027-01_b",
        "hangar-3.crib-12",
        "ffffffffffffffff",
        (1 << 64) - 1,
        {"type": "agent.alert", "kind": "store.seq_rollback", "detail": "résumé ✓ — non-ASCII"},
    ),
    # Version 1 (no epoch): what agents before epochs sealed; still in old outboxes.
    (1, "k", "c", None, 7, {"type": "door.forced"}),
)
_SITE: Final = "hangar-3"
_TIME: Final = "2026-11-29T08:00:00Z"


def derive_x25519_key_pair(ikm: bytes) -> X25519PrivateKey:
    """RFC 9180 §7.1.3 DeriveKeyPair for DHKEM(X25519, HKDF-SHA256)."""
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", 32)
    return X25519PrivateKey.from_private_bytes(sk)


def seal_deterministic(
    recipient: X25519PublicKey, info: bytes, plaintext: bytes, ikm_e: bytes
) -> dict[str, bytes]:
    """Single-shot base-mode seal with an ephemeral key from ``ikm_e``; every intermediate."""
    sk_e = derive_x25519_key_pair(ikm_e)
    enc = sk_e.public_key().public_bytes_raw()
    pk_rm = recipient.public_bytes_raw()
    dh = sk_e.exchange(recipient)
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    shared_secret = _labeled_expand(
        _KEM_SUITE_ID, eae_prk, b"shared_secret", enc + pk_rm, _N_SECRET
    )
    psk_id_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"info_hash", info)
    context = bytes([_MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE_ID, secret, b"key", context, _N_K)
    base_nonce = _labeled_expand(_HPKE_SUITE_ID, secret, b"base_nonce", context, _N_N)
    # Single shot: sequence number 0, so the nonce is base_nonce itself; empty AAD.
    ciphertext = AESGCM(key).encrypt(base_nonce, plaintext, b"")
    return {
        "ephemeral_private_key": _private_raw(sk_e),
        "enc": enc,
        "shared_secret": shared_secret,
        "key": key,
        "base_nonce": base_nonce,
        "ciphertext": ciphertext,
    }


def generate_vectors() -> dict[str, Any]:
    """The complete, deterministic test-vector document."""
    recipient = derive_x25519_key_pair(hashlib.sha256(b"cabinet-agent/vectors/recipient").digest())
    vectors = []
    for i, (version, key_id, cabinet_id, epoch_hex, seq, body) in enumerate(_CASES):
        seed = hashlib.sha256(b"cabinet-agent/vectors/event/%d" % i).digest()
        event_id = _uuid7_shaped(seed[:16])
        epoch = None if epoch_hex is None else bytes.fromhex(epoch_hex)
        header = EnvelopeHeader(key_id, cabinet_id, seq, event_id, version, epoch)
        info = encode_header(header)
        event = {
            "schema_version": 1,
            "event_id": str(event_id),
            "seq": seq,
            "time": _TIME,
            "site_id": _SITE,
            "cabinet_id": cabinet_id,
            **body,
        }
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        plaintext = text.encode("utf-8")
        ikm_e = hashlib.sha256(b"cabinet-agent/vectors/ephemeral/%d" % i).digest()
        sealed = seal_deterministic(recipient.public_key(), info, plaintext, ikm_e)
        envelope = info + sealed["enc"] + sealed["ciphertext"]
        vectors.append(
            {
                "recipient_private_key": _private_raw(recipient).hex(),
                "recipient_public_key": recipient.public_key().public_bytes_raw().hex(),
                "header": {
                    "version": header.version,
                    "key_id": key_id,
                    "cabinet_id": cabinet_id,
                    **({} if epoch is None else {"epoch": epoch.hex()}),
                    "seq": seq,
                    "event_id": str(event_id),
                },
                "header_hex": info.hex(),
                "plaintext": text,
                "ikm_e": ikm_e.hex(),
                **{name: value.hex() for name, value in sealed.items() if name != "ciphertext"},
                "envelope": envelope.hex(),
            }
        )
    return {
        "description": (
            "cabinet-agent sealed-event envelope test vectors (format versions 2 and 1). "
            "See docs/envelope.md. HPKE RFC 9180 base mode, single shot; "
            "ikm_e/ephemeral_private_key/shared_secret/key/base_nonce are intermediates "
            "for debugging an implementation (a real sealer uses a random ephemeral key)."
        ),
        "mode": _MODE_BASE,
        "kem_id": KEM_ID,
        "kdf_id": KDF_ID,
        "aead_id": AEAD_ID,
        "vectors": vectors,
    }


def render() -> str:
    """The vectors as the committed file's exact text."""
    return json.dumps(generate_vectors(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the vectors to the path given (or stdout)."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _uuid7_shaped(raw: bytes) -> uuid.UUID:
    """16 bytes with the UUIDv7 version and RFC 9562 variant bits set (events carry UUIDv7)."""
    value = int.from_bytes(raw, "big")
    value &= ~(0xF << 76) & ~(0x3 << 62)
    value |= (0x7 << 76) | (0x2 << 62)
    return uuid.UUID(int=value)


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    # HKDF-Extract is HMAC(salt, ikm); an empty salt is HMAC's all-zero key (RFC 5869 §2.2).
    return hmac.new(salt, b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled_info).derive(prk)


def _private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


if __name__ == "__main__":
    raise SystemExit(main())
