"""Badge pseudonyms: the raw card number dies in ``Pseudonymizer.badge()``.

Two schemes, named by the pseudonym's first part: ``p2`` (Argon2id keyed by the site key: each
guess costs tens of milliseconds and ~19 MiB even to whoever holds the key) and ``p1`` (HMAC-SHA256,
the legacy scheme kept for sites that migrate). Derivations, key file format and threat model:
``docs/privacy.md``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.domain.events import PSEUDONYM_BODY
from agent.privacy.keyfile import KID_PATTERN, KeyFileError, read_key_table, write_key_file

logger = logging.getLogger(__name__)

__all__ = [
    "ARGON2_BOUNDS",
    "BADGE_PURPOSE",
    "BADGE_PURPOSE_V2",
    "P2_DEFAULT",
    "Argon2Params",
    "BadgePseudonyms",
    "KeyFileError",
    "Pseudonymizer",
    "Scheme",
    "SiteKey",
    "canonical_badge_id",
    "is_pseudonym",
    "load_site_key",
    "pseudonym_prefix",
    "write_site_key",
]

Scheme = Literal["p1", "p2"]

BADGE_PURPOSE: Final = "badge-pseudonym/v1"
BADGE_PURPOSE_V2: Final = "badge-pseudonym/v2"
SITE_KEY_KIND: Final = "site-key"
SITE_KEY_LEN: Final = 32
MAX_BADGE_HEX: Final = 64
_HMAC_PREFIX: Final = b"badge/v1\0"
_ARGON2_PREFIX: Final = b"badge/v2\0"
_ARGON2_SALT_PREFIX: Final = b"cabinet-agent/badge-pseudonym/v2\0"
_HKDF_SALT_PREFIX: Final = b"cabinet-agent/site\0"
_TAG_LEN: Final = 16
_KID_RE: Final = re.compile(KID_PATTERN)
_SITE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# "p1|p2.<kid>.<16 bytes in base32, 26 characters once the padding is removed>".
_PSEUDONYM_RE: Final = re.compile(PSEUDONYM_BODY)
# Separators some readers put between bytes; anything else that is not hex is an error.
_SEPARATORS: Final = str.maketrans("", "", " :-_")
_SITE_KEY_FIELDS: Final = frozenset({"kind", "kid", "key", "scheme", "argon2id"})

# Inclusive bounds of the Argon2id parameters a site key file may carry. The floors catch a
# unit mistake (memory in MiB) and a key file that would make p2 no harder than p1; the
# ceilings keep one derivation within what a cabinet board can hold and do between badges.
ARGON2_BOUNDS: Final[Mapping[str, tuple[int, int]]] = {
    "memory_kib": (4096, 1048576),
    "iterations": (1, 16),
    "lanes": (1, 8),
}


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost of one p2 derivation: memory (KiB), passes over it, lanes."""

    memory_kib: int
    iterations: int
    lanes: int

    def __post_init__(self) -> None:
        for name, (low, high) in ARGON2_BOUNDS.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"argon2id.{name} must be an integer from {low} to {high}")

    @classmethod
    def from_table(cls, table: object) -> Argon2Params:
        """From the ``[argon2id]`` table of a site key file; ValueError names the field."""
        if not isinstance(table, Mapping):
            raise ValueError("argon2id must be a table (memory_kib, iterations, lanes)")
        unknown = sorted(str(k) for k in table if k not in ARGON2_BOUNDS)
        if unknown:
            raise ValueError(f"argon2id.{unknown[0]} is not a known parameter")
        values: dict[str, int] = {}
        for name, (low, high) in ARGON2_BOUNDS.items():
            value = table.get(name)
            if value is None:
                raise ValueError(f"argon2id.{name} is missing")
            # bool is an int to Python, not to a reader of the file.
            if type(value) is not int:
                raise ValueError(
                    f"argon2id.{name} must be an integer from {low} to {high}, "
                    f"found a {type(value).__name__}"
                )
            if not low <= value <= high:
                raise ValueError(
                    f"argon2id.{name} must be an integer from {low} to {high}, found {value}"
                )
            values[name] = value
        return cls(**values)

    def to_toml(self) -> str:
        return (
            "\n[argon2id]\n"
            f"memory_kib = {self.memory_kib}\n"
            f"iterations = {self.iterations}\n"
            f"lanes = {self.lanes}\n"
        )


# RFC 9106 / OWASP's 19 MiB, 2 passes, 1 lane: ~33 ms on the development machine
# (docs/privacy.md, bench/pseudonym.py), within the 50 ms a badge may take.
P2_DEFAULT: Final = Argon2Params(memory_kib=19456, iterations=2, lanes=1)


@dataclass(frozen=True, slots=True)
class SiteKey:
    """A site key: its id, its 32 secret bytes and the scheme it derives (``argon2`` → p2)."""

    kid: str
    key: bytes = field(repr=False)
    argon2: Argon2Params | None = None  # None: p1 (HMAC-SHA256), the legacy scheme

    @property
    def scheme(self) -> Scheme:
        return "p1" if self.argon2 is None else "p2"

    @property
    def prefix(self) -> str:
        """``<scheme>.<kid>``: what every pseudonym derived under this key starts with."""
        return f"{self.scheme}.{self.kid}"


def is_pseudonym(s: str) -> bool:
    """True if ``s`` has the shape of a badge pseudonym (``p1|p2.<kid>.<26 base32>``)."""
    return isinstance(s, str) and _PSEUDONYM_RE.fullmatch(s) is not None


def pseudonym_prefix(pseudonym: str) -> str:
    """``<scheme>.<kid>`` of a pseudonym: which site key (and scheme) produced it."""
    return pseudonym.rsplit(".", 1)[0]


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
    """Maps raw badge ids to stable per-site pseudonyms ``p1|p2.<kid>.<base32>`` under one key.

    ``badge()`` is pure and thread-safe; under p2 it costs one Argon2id derivation (tens of
    milliseconds), so the agent calls it off the event loop (``BadgePseudonyms.badge``).
    """

    __slots__ = ("_argon2", "_key", "_kid", "_prefix", "_salt", "_site_id")

    def __init__(
        self, site_id: str, kid: str, site_key: bytes, argon2: Argon2Params | None = None
    ) -> None:
        if not isinstance(site_id, str) or _SITE_RE.fullmatch(site_id) is None:
            raise ValueError(f"site id {site_id!r} is not a valid identifier")
        _check_kid(kid)
        if not isinstance(site_key, bytes) or len(site_key) < SITE_KEY_LEN:
            raise ValueError(f"site key must be at least {SITE_KEY_LEN} bytes")
        self._site_id = site_id
        self._kid = kid
        self._argon2 = argon2
        if argon2 is None:
            self._key = derive_purpose_key(site_key, site_id, BADGE_PURPOSE)
            self._salt = b""
            self._prefix = f"p1.{kid}"
        else:
            # Argon2id's secret input K (RFC 9106 §3.1) is the site's purpose key: without the
            # site key nobody can test a guess, with it every guess costs a full derivation.
            self._key = derive_purpose_key(site_key, site_id, BADGE_PURPOSE_V2)
            self._salt = hashlib.sha256(_ARGON2_SALT_PREFIX + site_id.encode("utf-8")).digest()[:16]
            self._prefix = f"p2.{kid}"
            self._argon2_kdf()  # refuse now, not at the first badge, if OpenSSL lacks it

    @classmethod
    def from_site_key(cls, site_id: str, site_key: SiteKey) -> Pseudonymizer:
        return cls(site_id, site_key.kid, site_key.key, site_key.argon2)

    @classmethod
    def from_key_file(cls, site_id: str, path: Path) -> Pseudonymizer:
        """Build from a site key file (see ``load_site_key``)."""
        return cls.from_site_key(site_id, load_site_key(path))

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def site_id(self) -> str:
        return self._site_id

    @property
    def scheme(self) -> Scheme:
        return "p1" if self._argon2 is None else "p2"

    @property
    def prefix(self) -> str:
        """``<scheme>.<kid>``, the part every pseudonym of this key starts with."""
        return self._prefix

    @property
    def argon2(self) -> Argon2Params | None:
        return self._argon2

    def badge(self, raw_id: str) -> str:
        """The pseudonym of a badge; ValueError (without the raw id) if it is not a badge id."""
        try:
            canonical = canonical_badge_id(raw_id)
        except ValueError as err:
            # The reason never quotes the input; it helps a technician spot a misread format.
            logger.debug("badge id refused: %s", err)
            raise
        if self._argon2 is None:
            tag = hmac.new(self._key, _HMAC_PREFIX + canonical, hashlib.sha256).digest()[:_TAG_LEN]
        else:
            tag = self._argon2_kdf().derive(_ARGON2_PREFIX + canonical)
        return f"{self._prefix}.{base64.b32encode(tag).decode('ascii').rstrip('=').lower()}"

    def _argon2_kdf(self) -> Argon2id:
        params = self._argon2
        assert params is not None
        return Argon2id(
            salt=self._salt,
            length=_TAG_LEN,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
            ad=self._prefix.encode("ascii"),
            secret=self._key,
        )

    def __repr__(self) -> str:
        return f"Pseudonymizer(site_id={self._site_id!r}, prefix={self._prefix!r})"


class BadgePseudonyms:
    """The cabinet's live site keys and the one place a badge read is pseudonymized.

    One key normally; two during a rotation (the current one and the previous one). Each read
    is derived under exactly one of them: the first, in that order, whose pseudonyms the
    installed allow-list uses (``listed``), else the current one. So a backend that lists every
    person under both keys while the cabinets change over denies nobody, and each read costs one
    derivation. Nothing maps a badge to its pseudonym between reads: every read derives afresh.
    """

    def __init__(
        self,
        site_id: str,
        current: SiteKey,
        previous: SiteKey | None = None,
        *,
        max_parallel: int = 1,
    ) -> None:
        self._site_id = site_id
        self._live = self._build(current, previous)
        # Bounds the threads (and Argon2id's memory) badge reads may hold at once.
        self._slots = asyncio.Semaphore(max_parallel)

    @property
    def live(self) -> tuple[Pseudonymizer, ...]:
        """The live keys' pseudonymizers, current first."""
        return self._live

    @property
    def prefixes(self) -> tuple[str, ...]:
        """``<scheme>.<kid>`` of each live key, current first."""
        return tuple(p.prefix for p in self._live)

    @property
    def kid(self) -> str:
        """The current key's id."""
        return self._live[0].kid

    def replace(self, current: SiteKey, previous: SiteKey | None = None) -> None:
        """Take a new set of live keys (SIGHUP); the next read uses them."""
        self._live = self._build(current, previous)

    def choose(self, listed: Collection[str]) -> Pseudonymizer:
        """The key to derive under, given the pseudonym prefixes the allow-list uses."""
        for pseudonymizer in self._live:
            if pseudonymizer.prefix in listed:
                return pseudonymizer
        return self._live[0]

    def badge_now(self, raw_id: str, listed: Collection[str] = ()) -> str:
        """``badge()`` on the calling thread (tests, CLIs; never on the agent's event loop)."""
        return self.choose(listed).badge(raw_id)

    async def badge(self, raw_id: str, listed: Collection[str] = ()) -> str:
        """The read's pseudonym, derived in a worker thread (bounded) so the loop runs on."""
        pseudonymizer = self.choose(listed)
        async with self._slots:
            return await asyncio.to_thread(pseudonymizer.badge, raw_id)

    def _build(self, current: SiteKey, previous: SiteKey | None) -> tuple[Pseudonymizer, ...]:
        live = [Pseudonymizer.from_site_key(self._site_id, current)]
        if previous is not None:
            if previous.prefix == current.prefix:
                raise ValueError(
                    f"the previous site key has the current one's id and scheme ({current.prefix})"
                )
            live.append(Pseudonymizer.from_site_key(self._site_id, previous))
        return tuple(live)

    def __repr__(self) -> str:
        return f"BadgePseudonyms(site_id={self._site_id!r}, live={self.prefixes!r})"


def derive_purpose_key(site_key: bytes, site_id: str, purpose: str) -> bytes:
    """HKDF-SHA256 of the site key, separated by site and purpose."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_HKDF_SALT_PREFIX + site_id.encode("utf-8"),
        info=purpose.encode("utf-8"),
    ).derive(site_key)


def load_site_key(path: Path) -> SiteKey:
    """Read a site key file; refuse it unless only its owner can use it.

    KeyFileError names the file and the field: a missing ``scheme`` is p1 (files written before
    p2); ``scheme = "p2"`` needs an ``[argon2id]`` table within ``ARGON2_BOUNDS``.
    """
    kid, key, data = read_key_table(path, SITE_KEY_KIND, secret=True, length=SITE_KEY_LEN)
    argon2 = _scheme_params(path, data)
    if argon2 is not None:
        try:
            Argon2id(salt=bytes(16), length=_TAG_LEN, iterations=1, lanes=1, memory_cost=8)
        except UnsupportedAlgorithm:
            raise KeyFileError(
                f"{path}: scheme p2 needs Argon2id, which this build of cryptography/OpenSSL "
                "lacks (cryptography >= 44 with OpenSSL >= 3.2)"
            ) from None
    return SiteKey(kid, key, argon2)


def write_site_key(path: Path, kid: str, key: bytes, argon2: Argon2Params | None = None) -> None:
    """Write a site key file with mode 0600 (the format ``load_site_key`` reads).

    With ``argon2`` the key derives p2 pseudonyms; without, p1 (for tests of the migration).
    """
    if len(key) != SITE_KEY_LEN:
        raise ValueError(f"site key must be {SITE_KEY_LEN} bytes")
    extra = "" if argon2 is None else 'scheme = "p2"\n' + argon2.to_toml()
    write_key_file(path, SITE_KEY_KIND, kid, key, secret=True, extra=extra)


def _scheme_params(path: Path, data: Mapping[str, Any]) -> Argon2Params | None:
    unknown = sorted(str(k) for k in data if k not in _SITE_KEY_FIELDS)
    if unknown:
        raise KeyFileError(f"{path}: {unknown[0]} is not a site key field")
    scheme = data.get("scheme", "p1")
    if scheme == "p1":
        if "argon2id" in data:
            raise KeyFileError(f'{path}: argon2id given but scheme is not "p2"')
        return None
    if scheme != "p2":
        raise KeyFileError(f'{path}: scheme must be "p1" or "p2"')
    try:
        return Argon2Params.from_table(data.get("argon2id", {}))
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None


def _check_kid(kid: object) -> None:
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {_KID_RE.pattern}, got {kid!r}")
