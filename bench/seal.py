"""Privacy-core throughput: HPKE seal per second for 300-byte events (single thread).

Run: ``.venv/bin/python bench/seal.py [n]``. ``seal_rate(n)`` is the baseline the pipeline
benchmark imports (``from bench.seal import seal_rate`` with the repo root on sys.path).
The "× AES-GCM" column is each row's cost relative to a bare AES-256-GCM encryption of the
same 300 bytes, measured in the same run, so it stays comparable across machines.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer, seal_batch
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import DocumentVerifier
from backend.signing import allow_list_doc, sign_document

EVENT_BYTES = 300


def _event() -> bytes:
    return (b'{"type":"item.checked_out","epc":"' + os.urandom(12).hex().encode() + b'"}').ljust(
        EVENT_BYTES, b" "
    )


def _rate(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def seal_rate(n: int = 2000) -> float:
    """HPKE single-shot seals per second of a 300-byte event, one thread."""
    private = X25519PrivateKey.generate()
    sealer = Sealer(private.public_key(), "hpke1")
    header = EnvelopeHeader("hpke1", "crib-07", 1, uuid.uuid4())
    plaintext = _event()
    sealer.seal(header, plaintext)  # warm-up
    return _rate(lambda: sealer.seal(header, plaintext), n)


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 2000
    plaintext = _event()
    private = X25519PrivateKey.generate()
    sealer = Sealer(private.public_key(), "hpke1")
    opener = Opener({"hpke1": private})
    header = EnvelopeHeader("hpke1", "crib-07", 1, uuid.uuid4())
    envelope = sealer.seal(header, plaintext)
    aes = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    batch = [(EnvelopeHeader("hpke1", "crib-07", i, uuid.uuid4()), plaintext) for i in range(100)]
    pseudo = Pseudonymizer("hangar-3", "s1", os.urandom(32))
    signer = Ed25519PrivateKey.generate()
    entries = {pseudo.badge(f"{i:010x}"): ["tech"] for i in range(1000)}
    expires = datetime.now(UTC) + timedelta(days=1)
    doc = sign_document(signer, "sig1", allow_list_doc("hangar-3", "*", 1, expires, entries))
    verifier = DocumentVerifier({"sig1": signer.public_key()}, "hangar-3", "crib-07")
    now = datetime.now(UTC)

    baseline = _rate(lambda: aes.encrypt(nonce, plaintext, b""), n)
    rows: list[tuple[str, float]] = [
        ("AES-256-GCM encrypt only (baseline)", baseline),
        ("HPKE seal (Sealer.seal)", seal_rate(n)),
        (
            "HPKE seal via seal_batch(100) /event",
            100 * _rate(lambda: seal_batch(sealer, batch), max(1, n // 100)),
        ),
        ("HPKE open (Opener.open, backend side)", _rate(lambda: opener.open(envelope), n)),
        ("Pseudonymizer.badge", _rate(lambda: pseudo.badge("0012ab"), n)),
        (
            "verify 1000-entry allow-list",
            _rate(lambda: verifier.verify(doc, "allow-list", now), max(1, n // 100)),
        ),
    ]
    print(f"privacy core, {EVENT_BYTES}-byte events, n={n}, single thread")
    print(f"{'operation':<42} {'ops/s':>12} {'µs/op':>10} {'× AES-GCM':>10}")
    for name, rate in rows:
        print(f"{name:<42} {rate:>12,.0f} {1e6 / rate:>10.1f} {baseline / rate:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
