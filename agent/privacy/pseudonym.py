"""Badge pseudonyms: the raw card number dies in ``Pseudonymizer.badge()``.

Three schemes, named by the pseudonym's first part: ``p2`` (Argon2id keyed by the site key: each
guess costs tens of milliseconds and ~7 MiB even to whoever holds the key), ``p3`` (p2 whose
secret input is an HMAC computed by a TPM that holds the key: a copied disk holds no key at all;
``agent.privacy.tpm``) and ``p1`` (HMAC-SHA256, the legacy scheme kept for sites that migrate).
Derivations, key file format and threat model: ``docs/privacy.md``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.domain.events import PSEUDONYM_BODY
from agent.privacy.keyfile import (
    KID_PATTERN,
    KeyFileError,
    read_key_table,
    read_key_toml,
    write_key_file,
    write_key_text,
)
from drivers.errors import CabinetError

if TYPE_CHECKING:
    from agent.privacy.tpm import TpmKeyBlob

logger = logging.getLogger(__name__)

__all__ = [
    "ARGON2_BOUNDS",
    "BADGE_PURPOSE",
    "BADGE_PURPOSE_V2",
    "BADGE_PURPOSE_V3",
    "P2_DEFAULT",
    "Argon2Params",
    "BadgePseudonyms",
    "KeyDevice",
    "KeyFileError",
    "Pseudonymizer",
    "Scheme",
    "SiteKey",
    "TpmSiteKey",
    "canonical_badge_id",
    "is_pseudonym",
    "load_cabinet_site_key",
    "load_site_key",
    "pseudonym_prefix",
    "write_site_key",
    "write_tpm_site_key",
]

Scheme = Literal["p1", "p2", "p3"]

BADGE_PURPOSE: Final = "badge-pseudonym/v1"
BADGE_PURPOSE_V2: Final = "badge-pseudonym/v2"
# p3: the key a cabinet's TPM holds (the backend derives it from the site key and wraps it).
BADGE_PURPOSE_V3: Final = "badge-pseudonym/v3/tpm-hmac"
SITE_KEY_KIND: Final = "site-key"
SITE_KEY_LEN: Final = 32
MAX_BADGE_HEX: Final = 64
_HMAC_PREFIX: Final = b"badge/v1\0"
_ARGON2_PREFIX: Final = b"badge/v2\0"
_ARGON2_SALT_PREFIX: Final = b"cabinet-agent/badge-pseudonym/v2\0"
_V3_PREFIX: Final = b"badge/v3\0"
_V3_SALT_PREFIX: Final = b"cabinet-agent/badge-pseudonym/v3\0"
_HKDF_SALT_PREFIX: Final = b"cabinet-agent/site\0"
_TAG_LEN: Final = 16
# A TPM's HMAC takes milliseconds; the kernel's driver bounds a command. A read waits this long.
DEVICE_TIMEOUT_S: Final = 5.0
_KID_RE: Final = re.compile(KID_PATTERN)
_SITE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# "p1|p2|p3.<kid>.<16 bytes in base32, 26 characters once the padding is removed>".
_PSEUDONYM_RE: Final = re.compile(PSEUDONYM_BODY)
# Separators some readers put between bytes; anything else that is not hex is an error.
_SEPARATORS: Final = str.maketrans("", "", " :-_")
_SITE_KEY_FIELDS: Final = frozenset({"kind", "kid", "key", "scheme", "argon2id", "source"})
_TPM_KEY_FIELDS: Final = frozenset({"kind", "kid", "scheme", "argon2id", "source", "site", "tpm"})

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


# 7 MiB, 6 passes, 1 lane: one pass more than OWASP's m=7 MiB t=5 (listed as the same defence as
# its 19 MiB t=2), so a guess costs about the core time of 19 MiB t=2 (0.9x, bench/pseudonym.py)
# with a third of the memory, for 1 GB boards (docs/decisions.md "Small boards").
P2_DEFAULT: Final = Argon2Params(memory_kib=7168, iterations=6, lanes=1)


@dataclass(frozen=True, slots=True)
class SiteKey:
    """A site key: its id, its 32 secret bytes and the scheme it derives.

    ``argon2`` None: p1 (HMAC-SHA256, legacy). With ``argon2``: p2, or p3 with ``tpm`` (the
    cabinets hold its HMAC step in a TPM; this is the backend's software copy).
    """

    kid: str
    key: bytes = field(repr=False)
    argon2: Argon2Params | None = None
    tpm: bool = False

    def __post_init__(self) -> None:
        if self.tpm and self.argon2 is None:
            raise ValueError("a p3 (TPM) site key needs Argon2id parameters")

    @property
    def scheme(self) -> Scheme:
        return "p1" if self.argon2 is None else "p3" if self.tpm else "p2"

    @property
    def prefix(self) -> str:
        """``<scheme>.<kid>``: what every pseudonym derived under this key starts with."""
        return f"{self.scheme}.{self.kid}"


@dataclass(frozen=True, slots=True)
class TpmSiteKey:
    """A cabinet's p3 site key as its disk holds it: a blob only its TPM can load (no key)."""

    kid: str
    site_id: str
    argon2: Argon2Params
    blob: TpmKeyBlob = field(repr=False)

    @property
    def scheme(self) -> Scheme:
        return "p3"

    @property
    def prefix(self) -> str:
        return f"p3.{self.kid}"


class KeyDevice(Protocol):
    """Where a p3 key's HMAC step runs when the cabinet does not hold the key (a TPM).

    ``mac`` raises a CabinetError whose message is one line saying why (never key material).
    """

    def mac(self, data: bytes) -> bytes: ...

    def close(self) -> None: ...


def is_pseudonym(s: str) -> bool:
    """True if ``s`` has the shape of a badge pseudonym (``p1|p2|p3.<kid>.<26 base32>``)."""
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
    """Maps raw badge ids to stable per-site pseudonyms ``p1|p2|p3.<kid>.<base32>`` under one key.

    ``badge()`` is pure and thread-safe; under p2/p3 it costs one Argon2id derivation (tens of
    milliseconds), so the agent calls it off the event loop (``BadgePseudonyms.badge``). A p3
    key is either the backend's software copy (``tpm=True``) or held by a ``KeyDevice``
    (``held_in``): the cabinet's TPM, which computes the HMAC step without ever releasing the key.
    """

    __slots__ = ("_argon2", "_device", "_key", "_kid", "_prefix", "_salt", "_scheme", "_site_id")

    def __init__(
        self,
        site_id: str,
        kid: str,
        site_key: bytes,
        argon2: Argon2Params | None = None,
        *,
        tpm: bool = False,
    ) -> None:
        if not isinstance(site_key, bytes) or len(site_key) < SITE_KEY_LEN:
            raise ValueError(f"site key must be at least {SITE_KEY_LEN} bytes")
        if tpm and argon2 is None:
            raise ValueError("a p3 (TPM) site key needs Argon2id parameters")
        scheme: Scheme = "p1" if argon2 is None else "p3" if tpm else "p2"
        purpose = {"p1": BADGE_PURPOSE, "p2": BADGE_PURPOSE_V2, "p3": BADGE_PURPOSE_V3}[scheme]
        # p2: Argon2id's secret input K (RFC 9106 §3.1) is the site's purpose key: without the
        # site key nobody can test a guess, with it every guess costs a full derivation.
        # p3: the HMAC key a cabinet's TPM holds; its HMAC of the badge is Argon2id's secret.
        self._setup(site_id, kid, scheme, argon2, derive_purpose_key(site_key, site_id, purpose))

    @classmethod
    def held_in(
        cls, site_id: str, kid: str, argon2: Argon2Params, device: KeyDevice
    ) -> Pseudonymizer:
        """A p3 key whose HMAC step runs in ``device`` (the cabinet's TPM): no key in memory."""
        self = cls.__new__(cls)
        self._setup(site_id, kid, "p3", argon2, None, device)
        return self

    @classmethod
    def from_site_key(cls, site_id: str, site_key: SiteKey) -> Pseudonymizer:
        return cls(site_id, site_key.kid, site_key.key, site_key.argon2, tpm=site_key.tpm)

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
        return self._scheme

    @property
    def prefix(self) -> str:
        """``<scheme>.<kid>``, the part every pseudonym of this key starts with."""
        return self._prefix

    @property
    def argon2(self) -> Argon2Params | None:
        return self._argon2

    @property
    def device(self) -> KeyDevice | None:
        """The TPM that holds this key's HMAC step (None: the key is in memory)."""
        return self._device

    def badge(self, raw_id: str) -> str:
        """The pseudonym of a badge; ValueError (without the raw id) if it is not a badge id.

        A p3 key held in a TPM raises the TPM's CabinetError (one line) if it cannot answer.
        """
        canonical = self.canonical(raw_id)
        return self.finish(canonical, self.keyed_mac(canonical))

    def canonical(self, raw_id: str) -> bytes:
        """``canonical_badge_id``, logging the reason (never the input) of a refusal."""
        try:
            return canonical_badge_id(raw_id)
        except ValueError as err:
            # The reason never quotes the input; it helps a technician spot a misread format.
            logger.debug("badge id refused: %s", err)
            raise

    def keyed_mac(self, canonical: bytes) -> bytes | None:
        """p3's HMAC step (in the TPM when it holds the key); None for p1/p2."""
        if self._scheme != "p3":
            return None
        data = _V3_PREFIX + canonical
        if self._device is not None:
            return self._device.mac(data)
        assert self._key is not None
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def finish(self, canonical: bytes, mac: bytes | None) -> str:
        """The pseudonym from the canonical id (and p3's HMAC from ``keyed_mac``)."""
        if self._scheme == "p1":
            assert self._key is not None
            tag = hmac.new(self._key, _HMAC_PREFIX + canonical, hashlib.sha256).digest()[:_TAG_LEN]
        elif self._scheme == "p2":
            assert self._key is not None
            tag = self._argon2_kdf(self._key).derive(_ARGON2_PREFIX + canonical)
        else:
            if mac is None or len(mac) != hashlib.sha256().digest_size:
                raise ValueError("p3 needs the 32-byte HMAC of the badge")
            tag = self._argon2_kdf(mac).derive(_V3_PREFIX + canonical)
        return f"{self._prefix}.{base64.b32encode(tag).decode('ascii').rstrip('=').lower()}"

    def _setup(
        self,
        site_id: str,
        kid: str,
        scheme: Scheme,
        argon2: Argon2Params | None,
        key: bytes | None,
        device: KeyDevice | None = None,
    ) -> None:
        if not isinstance(site_id, str) or _SITE_RE.fullmatch(site_id) is None:
            raise ValueError(f"site id {site_id!r} is not a valid identifier")
        _check_kid(kid)
        self._site_id = site_id
        self._kid = kid
        self._scheme = scheme
        self._argon2 = argon2
        self._key = key
        self._device = device
        self._prefix = f"{scheme}.{kid}"
        salt_prefix = _V3_SALT_PREFIX if scheme == "p3" else _ARGON2_SALT_PREFIX
        self._salt = hashlib.sha256(salt_prefix + site_id.encode("utf-8")).digest()[:16]
        if argon2 is not None:
            self._argon2_kdf(bytes(32))  # refuse now, not at the first badge, if OpenSSL lacks it

    def _argon2_kdf(self, secret: bytes) -> Argon2id:
        params = self._argon2
        assert params is not None
        return Argon2id(
            salt=self._salt,
            length=_TAG_LEN,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
            ad=self._prefix.encode("ascii"),
            secret=secret,
        )

    def __repr__(self) -> str:
        source = "" if self._device is None else f", device={self._device!r}"
        return f"Pseudonymizer(site_id={self._site_id!r}, prefix={self._prefix!r}{source})"


LiveKey = SiteKey | Pseudonymizer
"""A live site key: a key in memory (SiteKey) or one already bound to its device (a TPM)."""


class BadgePseudonyms:
    """The cabinet's live site keys and the one place a badge read is pseudonymized.

    One key normally; two during a rotation (the current one and the previous one). Each read
    is derived under exactly one of them: the first, in that order, whose pseudonyms the
    installed allow-list uses (``listed``), else the current one. So a backend that lists every
    person under both keys while the cabinets change over denies nobody, and each read costs one
    derivation. Nothing maps a badge to its pseudonym between reads: every read derives afresh.

    A key held in a TPM that cannot answer makes the read fail (the door stays shut) and is
    reported once per episode through ``on_device_problem(prefix, reason)``; ``(prefix, None)``
    when it answers again.
    """

    def __init__(
        self,
        site_id: str,
        current: LiveKey,
        previous: LiveKey | None = None,
        *,
        max_parallel: int = 1,
    ) -> None:
        self._site_id = site_id
        self._live = self._build(current, previous)
        # Bounds the threads (and Argon2id's memory) badge reads may hold at once.
        self._slots = asyncio.Semaphore(max_parallel)
        self.on_device_problem: Callable[[str, str | None], None] | None = None
        self._device_problems: dict[str, str] = {}

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

    @property
    def device_problems(self) -> dict[str, str]:
        """``<scheme>.<kid>`` → why its TPM did not answer the latest read (empty: all well)."""
        return dict(self._device_problems)

    def replace(self, current: LiveKey, previous: LiveKey | None = None) -> list[KeyDevice]:
        """Take a new set of live keys (SIGHUP); the next read uses them.

        Returns the devices no live key uses any more, for the caller to close.
        """
        old = self._live
        self._live = self._build(current, previous)
        kept = {id(p.device) for p in self._live if p.device is not None}
        for prefix in list(self._device_problems):
            if prefix not in self.prefixes:
                self._device_problem(prefix, None)
        return [p.device for p in old if p.device is not None and id(p.device) not in kept]

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
        """The read's pseudonym, derived in a worker thread (bounded) so the loop runs on.

        A TPM-held key's HMAC step is bounded by ``DEVICE_TIMEOUT_S``; its failure raises the
        device's CabinetError (or TimeoutError) after reporting it.
        """
        pseudonymizer = self.choose(listed)
        async with self._slots:
            if pseudonymizer.device is None:
                return await asyncio.to_thread(pseudonymizer.badge, raw_id)
            canonical = pseudonymizer.canonical(raw_id)
            try:
                async with asyncio.timeout(DEVICE_TIMEOUT_S):
                    mac = await asyncio.to_thread(pseudonymizer.keyed_mac, canonical)
            except TimeoutError:
                self._device_problem(
                    pseudonymizer.prefix, f"the TPM did not answer within {DEVICE_TIMEOUT_S:g} s"
                )
                raise
            except CabinetError as err:
                self._device_problem(pseudonymizer.prefix, str(err))
                raise
            self._device_problem(pseudonymizer.prefix, None)
            return await asyncio.to_thread(pseudonymizer.finish, canonical, mac)

    def close(self) -> None:
        """Close the devices of the live keys (the agent is stopping)."""
        for pseudonymizer in self._live:
            if pseudonymizer.device is not None:
                pseudonymizer.device.close()

    def _device_problem(self, prefix: str, reason: str | None) -> None:
        if self._device_problems.get(prefix) == reason:
            return
        if reason is not None and prefix not in self.prefixes:
            # A read that began under a key a reload has just retired (its device closed).
            logger.debug("site key %s (retired): %s", prefix, reason)
            return
        if reason is None:
            del self._device_problems[prefix]
            logger.warning("site key %s: the TPM answers again", prefix)
        else:
            self._device_problems[prefix] = reason
            logger.error("site key %s: badge reads fail: %s", prefix, reason)
        if self.on_device_problem is not None:
            self.on_device_problem(prefix, reason)

    def _build(self, current: LiveKey, previous: LiveKey | None) -> tuple[Pseudonymizer, ...]:
        live = [self._pseudonymizer(current)]
        if previous is not None:
            if previous.prefix == current.prefix:
                raise ValueError(
                    f"the previous site key has the current one's id and scheme ({current.prefix})"
                )
            live.append(self._pseudonymizer(previous))
        return tuple(live)

    def _pseudonymizer(self, key: LiveKey) -> Pseudonymizer:
        if isinstance(key, SiteKey):
            return Pseudonymizer.from_site_key(self._site_id, key)
        if key.site_id != self._site_id:
            raise ValueError(f"site key {key.prefix} is for site {key.site_id!r}")
        return key

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
    """Read a site key file that holds the key itself (the backend's, or a p1/p2 cabinet's).

    KeyFileError names the file and the field: a missing ``scheme`` is p1 (files written before
    p2); ``scheme = "p2"`` or ``"p3"`` needs an ``[argon2id]`` table within ``ARGON2_BOUNDS``.
    A cabinet's TPM key file (``source = "tpm"``) is refused: it holds no key
    (``load_cabinet_site_key`` reads it).
    """
    key = load_cabinet_site_key(path)
    if isinstance(key, TpmSiteKey):
        raise KeyFileError(
            f'{path}: this site key is held in a cabinet\'s TPM (source = "tpm"): it holds no '
            "key; use the backend's site key file"
        )
    return key


def load_cabinet_site_key(path: Path) -> SiteKey | TpmSiteKey:
    """Read a site key file as a cabinet may hold it: the key itself, or its TPM blob.

    KeyFileError names the file and the field. A TPM key file (``source = "tpm"``, written by
    ``cabinetctl tpm import``) is p3 and carries its site, Argon2id parameters and ``[tpm]``
    blob; whether the TPM can load it is for ``agent.privacy.tpm.TpmHmacKey`` to say.
    """
    data = read_key_toml(path, SITE_KEY_KIND, secret=True)
    source = data.get("source", "file")
    if source == "tpm":
        return _tpm_site_key(path, data)
    if source != "file":
        raise KeyFileError(f'{path}: source must be "file" or "tpm"')
    kid, key, data = read_key_table(path, SITE_KEY_KIND, secret=True, length=SITE_KEY_LEN)
    scheme, argon2 = _scheme_params(path, data, _SITE_KEY_FIELDS)
    return SiteKey(kid, key, argon2, tpm=scheme == "p3")


def write_site_key(
    path: Path, kid: str, key: bytes, argon2: Argon2Params | None = None, *, tpm: bool = False
) -> None:
    """Write a site key file with mode 0600 (the format ``load_site_key`` reads).

    With ``argon2`` the key derives p2 pseudonyms (p3 with ``tpm``: the backend's copy of a
    key the cabinets hold in their TPMs); without, p1 (for tests of the migration).
    """
    if len(key) != SITE_KEY_LEN:
        raise ValueError(f"site key must be {SITE_KEY_LEN} bytes")
    if tpm and argon2 is None:
        raise ValueError("a p3 (TPM) site key needs Argon2id parameters")
    scheme = "p3" if tpm else "p2"
    extra = "" if argon2 is None else f'scheme = "{scheme}"\n' + argon2.to_toml()
    write_key_file(path, SITE_KEY_KIND, kid, key, secret=True, extra=extra)


def write_tpm_site_key(path: Path, key: TpmSiteKey) -> None:
    """Write a cabinet's TPM key file (0600): ids, parameters and the TPM-wrapped blob only."""
    _check_kid(key.kid)
    if _SITE_RE.fullmatch(key.site_id) is None:
        raise ValueError(f"site id {key.site_id!r} is not a valid identifier")
    text = (
        f"# cabinet-agent {SITE_KEY_KIND} held in a TPM: this file holds no key, only a blob\n"
        "# that the TPM which imported it can load (docs/privacy.md §5). Keep mode 0600.\n"
        f'kind = "{SITE_KEY_KIND}"\n'
        f'kid = "{key.kid}"\n'
        'scheme = "p3"\n'
        'source = "tpm"\n'
        f'site = "{key.site_id}"\n' + key.argon2.to_toml() + key.blob.to_toml()
    )
    write_key_text(path, text, secret=True)


def _tpm_site_key(path: Path, data: Mapping[str, Any]) -> TpmSiteKey:
    if "key" in data:
        raise KeyFileError(f'{path}: a TPM key file (source = "tpm") must not hold a key')
    kid = data.get("kid")
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise KeyFileError(f"{path}: kid must match {KID_PATTERN}")
    scheme, argon2 = _scheme_params(path, data, _TPM_KEY_FIELDS)
    if scheme != "p3" or argon2 is None:
        raise KeyFileError(f'{path}: a TPM key file (source = "tpm") must have scheme = "p3"')
    site = data.get("site")
    if not isinstance(site, str) or _SITE_RE.fullmatch(site) is None:
        raise KeyFileError(f"{path}: site must be the site id the key was made for")
    try:
        from agent.privacy.tpm import TpmKeyBlob  # a TPM key file: the TPM code is needed now

        blob = TpmKeyBlob.from_table(data.get("tpm"))
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None
    return TpmSiteKey(kid, site, argon2, blob)


def _scheme_params(
    path: Path, data: Mapping[str, Any], fields: frozenset[str]
) -> tuple[Scheme, Argon2Params | None]:
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise KeyFileError(f"{path}: {unknown[0]} is not a site key field")
    scheme = data.get("scheme", "p1")
    if scheme == "p1":
        if "argon2id" in data:
            raise KeyFileError(f'{path}: argon2id given but scheme is "p1"')
        return "p1", None
    if scheme not in ("p2", "p3"):
        raise KeyFileError(f'{path}: scheme must be "p1", "p2" or "p3"')
    try:
        argon2 = Argon2Params.from_table(data.get("argon2id", {}))
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None
    try:
        Argon2id(salt=bytes(16), length=_TAG_LEN, iterations=1, lanes=1, memory_cost=8)
    except UnsupportedAlgorithm:
        raise KeyFileError(
            f"{path}: scheme {scheme} needs Argon2id, which this build of cryptography/OpenSSL "
            "lacks (cryptography >= 44 with OpenSSL >= 3.2)"
        ) from None
    return ("p3" if scheme == "p3" else "p2"), argon2


def _check_kid(kid: object) -> None:
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {_KID_RE.pattern}, got {kid!r}")
