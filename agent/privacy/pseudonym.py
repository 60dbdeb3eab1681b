"""Badge pseudonyms: the raw card number dies in ``Pseudonymizer.badge()``.

Derivation and key file format are specified in ``docs/privacy.md``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.domain.events import PSEUDONYM_BODY
from agent.privacy.keyfile import KID_PATTERN, KeyFileError, read_key_file, write_key_file

logger = logging.getLogger(__name__)

__all__ = [
    "BADGE_PURPOSE",
    "KeyFileError",
    "Pseudonymizer",
    "canonical_badge_id",
    "is_pseudonym",
    "load_site_key",
    "write_site_key",
]

BADGE_PURPOSE: Final = "badge-pseudonym/v1"
SITE_KEY_KIND: Final = "site-key"
SITE_KEY_LEN: Final = 32
MAX_BADGE_HEX: Final = 64
_HMAC_PREFIX: Final = b"badge/v1\0"
_HKDF_SALT_PREFIX: Final = b"cabinet-agent/site\0"
_KID_RE: Final = re.compile(KID_PATTERN)
_SITE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# "p1.<kid>.<16 bytes in base32, 26 characters once the padding is removed>".
_PSEUDONYM_RE: Final = re.compile(PSEUDONYM_BODY)
# Separators some readers put between bytes; anything else that is not hex is an error.
_SEPARATORS: Final = str.maketrans("", "", " :-_")


def is_pseudonym(s: str) -> bool:
    """True if ``s`` has the shape of a badge pseudonym (``p1.<kid>.<26 base32>``)."""
    return isinstance(s, str) and _PSEUDONYM_RE.fullmatch(s) is not None


def canonical_badge_id(raw_id: str) -> bytes:
    """Canonical bytes of a badge number: upper-case hex digits, no separators or leading zeros.

    Raises ValueError whose message never contains the input.
    """
    if not isinstance(raw_id, str):
        raise TypeError("badge id must be a str")
    text = raw_id.strip().translate(_SEPARATORS).upper()
    if text.startswith("0X"):
        text = text[2:]
    if not text:
        raise ValueError("badge id is empty")
    if len(text) > MAX_BADGE_HEX:
        raise ValueError(f"badge id longer than {MAX_BADGE_HEX} hex digits")
    if any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"badge id of {len(text)} characters is not hexadecimal")
    # The same card reads as "00000012AB" on an EM4100 reader and "12ab" on a line reader.
    return (text.lstrip("0") or "0").encode("ascii")


class Pseudonymizer:
    """Maps raw badge ids to stable per-site pseudonyms ``p1.<kid>.<base32>``."""

    __slots__ = ("_key", "_kid", "_prefix", "_site_id")

    def __init__(self, site_id: str, kid: str, site_key: bytes) -> None:
        if not isinstance(site_id, str) or _SITE_RE.fullmatch(site_id) is None:
            raise ValueError(f"site id {site_id!r} is not a valid identifier")
        _check_kid(kid)
        if not isinstance(site_key, bytes) or len(site_key) < SITE_KEY_LEN:
            raise ValueError(f"site key must be at least {SITE_KEY_LEN} bytes")
        self._site_id = site_id
        self._kid = kid
        self._key = derive_purpose_key(site_key, site_id, BADGE_PURPOSE)
        self._prefix = f"p1.{kid}."

    @classmethod
    def from_key_file(cls, site_id: str, path: Path) -> Pseudonymizer:
        """Build from a site key file (see ``load_site_key``)."""
        kid, key = load_site_key(path)
        return cls(site_id, kid, key)

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def site_id(self) -> str:
        return self._site_id

    def badge(self, raw_id: str) -> str:
        """The pseudonym of a badge; ValueError (without the raw id) if it is not a badge id."""
        try:
            canonical = canonical_badge_id(raw_id)
        except ValueError as err:
            # The reason never quotes the input; it helps a technician spot a misread format.
            logger.debug("badge id refused: %s", err)
            raise
        digest = hmac.new(self._key, _HMAC_PREFIX + canonical, hashlib.sha256).digest()
        return self._prefix + base64.b32encode(digest[:16]).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"Pseudonymizer(site_id={self._site_id!r}, kid={self._kid!r})"


def derive_purpose_key(site_key: bytes, site_id: str, purpose: str) -> bytes:
    """HKDF-SHA256 of the site key, separated by site and purpose."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_HKDF_SALT_PREFIX + site_id.encode("utf-8"),
        info=purpose.encode("utf-8"),
    ).derive(site_key)


def load_site_key(path: Path) -> tuple[str, bytes]:
    """Read ``(kid, key)`` from a site key file; refuse it unless only its owner can use it."""
    return read_key_file(path, SITE_KEY_KIND, secret=True, length=SITE_KEY_LEN)


def write_site_key(path: Path, kid: str, key: bytes) -> None:
    """Write a site key file with mode 0600 (the format ``load_site_key`` reads)."""
    if len(key) != SITE_KEY_LEN:
        raise ValueError(f"site key must be {SITE_KEY_LEN} bytes")
    write_key_file(path, SITE_KEY_KIND, kid, key, secret=True)


def _check_kid(kid: object) -> None:
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {_KID_RE.pattern}, got {kid!r}")
