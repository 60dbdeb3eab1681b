"""The key files a cabinet reads: the backend's public keys and the site key.

A cabinet is provisioned with three files only: ``backend-hpke.pub``, ``signing.pub`` and
``site.key``. The private HPKE and signing keys stay with the backend (``backend.keys``
generates and loads them); the file names and kinds here are the contract both sides share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.privacy.keyfile import KeyFileError, read_key_file
from agent.privacy.weakkeys import ed25519_small_order, x25519_weak

__all__ = [
    "HPKE_PRIVATE_FILE",
    "HPKE_PUBLIC_FILE",
    "KIND_HPKE_PRIVATE",
    "KIND_HPKE_PUBLIC",
    "KIND_SIGNING_PRIVATE",
    "KIND_SIGNING_PUBLIC",
    "SIGNING_PRIVATE_FILE",
    "SIGNING_PUBLIC_FILE",
    "SITE_KEY_FILE",
    "load_hpke_public",
    "load_signing_public",
]

HPKE_PRIVATE_FILE: Final = "backend-hpke.key"
HPKE_PUBLIC_FILE: Final = "backend-hpke.pub"
SIGNING_PRIVATE_FILE: Final = "signing.key"
SIGNING_PUBLIC_FILE: Final = "signing.pub"
SITE_KEY_FILE: Final = "site.key"

KIND_HPKE_PRIVATE: Final = "x25519-hpke-private"
KIND_HPKE_PUBLIC: Final = "x25519-hpke-public"
KIND_SIGNING_PRIVATE: Final = "ed25519-signing-private"
KIND_SIGNING_PUBLIC: Final = "ed25519-signing-public"


def load_hpke_public(path: Path) -> tuple[str, X25519PublicKey]:
    """The backend's HPKE public key and its key id (what a cabinet seals to)."""
    kid, raw = read_key_file(path, KIND_HPKE_PUBLIC, secret=False)
    key = X25519PublicKey.from_public_bytes(raw)
    if x25519_weak(key):
        raise KeyFileError(
            f"{path}: not a usable X25519 public key (small order): every event sealed to it could be read"
        )
    return kid, key


def load_signing_public(path: Path) -> tuple[str, Ed25519PublicKey]:
    """The backend's document-signing public key and its key id."""
    kid, raw = read_key_file(path, KIND_SIGNING_PUBLIC, secret=False)
    if ed25519_small_order(raw):
        raise KeyFileError(
            f"{path}: not a usable Ed25519 public key (small order or not a curve point): "
            "anyone could forge documents for it"
        )
    return kid, Ed25519PublicKey.from_public_bytes(raw)
