"""Backend key material for the reference backend, demos and tests: generate, write (0600 for
secrets), load back.

A cabinet gets only the public halves and the site key (``agent.privacy.keys`` reads those);
the private HPKE and signing keys never leave the backend.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.privacy.keyfile import read_key_file, write_key_file
from agent.privacy.keys import (
    HPKE_PRIVATE_FILE,
    HPKE_PUBLIC_FILE,
    KIND_HPKE_PRIVATE,
    KIND_HPKE_PUBLIC,
    KIND_SIGNING_PRIVATE,
    KIND_SIGNING_PUBLIC,
    SIGNING_PRIVATE_FILE,
    SIGNING_PUBLIC_FILE,
    SITE_KEY_FILE,
)
from agent.privacy.pseudonym import (
    P2_DEFAULT,
    SITE_KEY_LEN,
    Argon2Params,
    SiteKey,
    load_site_key,
    write_site_key,
)

__all__ = [
    "P2_DEFAULT",
    "Argon2Params",
    "BackendKeys",
    "SiteKey",
    "generate_backend_keys",
    "generate_site_key",
    "load_backend_keys",
    "load_hpke_private",
    "load_signing_private",
    "write_backend_keys",
]

_RAW: Final = serialization.Encoding.Raw


@dataclass
class BackendKeys:
    """Everything a demo backend holds. ``repr`` never shows key material."""

    hpke_private: X25519PrivateKey = field(repr=False)
    hpke_kid: str
    signing_private: Ed25519PrivateKey = field(repr=False)
    signing_kid: str
    site_key: bytes = field(repr=False)
    site_kid: str
    site_argon2: Argon2Params | None = P2_DEFAULT  # None: a legacy p1 (HMAC) site key
    site_tpm: bool = False  # p3: the cabinets hold its HMAC key in their TPMs

    @property
    def site(self) -> SiteKey:
        """The site key as the backend computes with it (id, bytes, pseudonym scheme)."""
        return SiteKey(self.site_kid, self.site_key, self.site_argon2, tpm=self.site_tpm)

    @property
    def hpke_public(self) -> X25519PublicKey:
        return self.hpke_private.public_key()

    @property
    def signing_public(self) -> Ed25519PublicKey:
        return self.signing_private.public_key()


def generate_backend_keys(
    out_dir: Path,
    *,
    hpke_kid: str = "hpke1",
    signing_kid: str = "sig1",
    site_kid: str = "s1",
    site_argon2: Argon2Params | None = P2_DEFAULT,
    site_tpm: bool = False,
) -> BackendKeys:
    """Generate fresh keys and write the five key files into ``out_dir`` (created 0700).

    The site key derives p2 pseudonyms with ``site_argon2`` (p3 with ``site_tpm``: the cabinets
    hold it in their TPMs, docs/privacy.md §5); ``None`` makes a legacy p1 key (only to rehearse
    a p1 → p2 migration).
    """
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = BackendKeys(
        hpke_private=X25519PrivateKey.generate(),
        hpke_kid=hpke_kid,
        signing_private=Ed25519PrivateKey.generate(),
        signing_kid=signing_kid,
        site_key=secrets.token_bytes(SITE_KEY_LEN),
        site_kid=site_kid,
        site_argon2=site_argon2,
        site_tpm=site_tpm,
    )
    write_backend_keys(out_dir, keys)
    return keys


def generate_site_key(
    path: Path, kid: str, argon2: Argon2Params | None = P2_DEFAULT, *, tpm: bool = False
) -> SiteKey:
    """A fresh site key written to ``path`` (0600): the new key of a rotation (p3 with ``tpm``:
    the cabinets get it wrapped for their TPMs, ``cabinet-consumer tpm-wrap``)."""
    site = SiteKey(kid, secrets.token_bytes(SITE_KEY_LEN), argon2, tpm=tpm)
    write_site_key(path, site.kid, site.key, site.argon2, tpm=site.tpm)
    return site


def write_backend_keys(out_dir: Path, keys: BackendKeys) -> None:
    """Write the five key files (secrets 0600, public keys 0644)."""
    write_key_file(
        out_dir / HPKE_PRIVATE_FILE,
        KIND_HPKE_PRIVATE,
        keys.hpke_kid,
        _private_raw(keys.hpke_private),
        secret=True,
    )
    write_key_file(
        out_dir / HPKE_PUBLIC_FILE,
        KIND_HPKE_PUBLIC,
        keys.hpke_kid,
        keys.hpke_public.public_bytes_raw(),
        secret=False,
    )
    write_key_file(
        out_dir / SIGNING_PRIVATE_FILE,
        KIND_SIGNING_PRIVATE,
        keys.signing_kid,
        _private_raw(keys.signing_private),
        secret=True,
    )
    write_key_file(
        out_dir / SIGNING_PUBLIC_FILE,
        KIND_SIGNING_PUBLIC,
        keys.signing_kid,
        keys.signing_public.public_bytes_raw(),
        secret=False,
    )
    write_site_key(
        out_dir / SITE_KEY_FILE, keys.site_kid, keys.site_key, keys.site_argon2, tpm=keys.site_tpm
    )


def load_backend_keys(dir: Path) -> BackendKeys:
    """Load what ``generate_backend_keys`` wrote; secret files must still be 0600."""
    hpke_kid, hpke_private = load_hpke_private(dir / HPKE_PRIVATE_FILE)
    signing_kid, signing_private = load_signing_private(dir / SIGNING_PRIVATE_FILE)
    site = load_site_key(dir / SITE_KEY_FILE)
    return BackendKeys(
        hpke_private=hpke_private,
        hpke_kid=hpke_kid,
        signing_private=signing_private,
        signing_kid=signing_kid,
        site_key=site.key,
        site_kid=site.kid,
        site_argon2=site.argon2,
        site_tpm=site.tpm,
    )


def load_hpke_private(path: Path) -> tuple[str, X25519PrivateKey]:
    """The backend's HPKE private key (backend side only)."""
    kid, raw = read_key_file(path, KIND_HPKE_PRIVATE, secret=True)
    return kid, X25519PrivateKey.from_private_bytes(raw)


def load_signing_private(path: Path) -> tuple[str, Ed25519PrivateKey]:
    """The backend's document-signing private key (backend side only)."""
    kid, raw = read_key_file(path, KIND_SIGNING_PRIVATE, secret=True)
    return kid, Ed25519PrivateKey.from_private_bytes(raw)


def _private_raw(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
