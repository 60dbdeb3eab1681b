"""Ed25519-signed documents from the backend: the allow-list and the asset registry.

Wire format, canonical JSON and the acceptance rules are specified in ``docs/privacy.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.privacy.keyfile import KID_PATTERN
from agent.trusted_time import BUILD_FLOOR, LATEST_TIME, ClockView, plus

__all__ = [
    "ALLOW_LIST",
    "ASSET_REGISTRY",
    "EARLIEST_DOCUMENT_TIME",
    "ERASURE",
    "KINDS",
    "Admission",
    "DocumentChecker",
    "DocumentError",
    "DocumentVerifier",
    "SignedDocument",
    "VersionFloor",
    "canonical_json",
    "check_fields",
    "format_time",
    "parse_time",
]

ALLOW_LIST: Final = "allow-list"
ASSET_REGISTRY: Final = "asset-registry"
# A request to erase people (docs/privacy.md §7): applied once, never stored (it names them).
ERASURE: Final = "erasure"
KINDS: Final = frozenset({ALLOW_LIST, ASSET_REGISTRY, ERASURE})
ANY_CABINET: Final = "*"
MAX_DOCUMENT_BYTES: Final = 4 * 1024 * 1024
MAX_DEPTH: Final = 16
# Integers beyond this lose precision in JavaScript and other double-based JSON stacks.
MAX_SAFE_INT: Final = (1 << 53) - 1
DEFAULT_CLOCK_SKEW: Final = timedelta(minutes=5)
# While the cabinet's wall clock is untrusted, how far after the agent's time a document may be
# issued: its time is then only a lower bound (no RTC, a long storage), but not by centuries.
DEFAULT_MAX_AHEAD: Final = timedelta(days=366)
# No document can be issued before this (a year before this build) nor have a time after
# LATEST_TIME: such times are absurd, and refused before anything computes with them.
EARLIEST_DOCUMENT_TIME: Final = BUILD_FLOOR - timedelta(days=365)

_DOC_FIELDS: Final = frozenset(
    {"kind", "site_id", "cabinet_id", "version", "issued_at", "expires_at", "body"}
)
_TIME_RE: Final = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z")
_KID_RE: Final = re.compile(KID_PATTERN)  # the one key-id rule (docs/privacy.md, "Key files")


class DocumentError(ValueError):
    """A signed document is refused; ``reason`` is a stable machine-readable word."""

    BAD_SIGNATURE: Final = "bad-signature"
    UNKNOWN_KID: Final = "unknown-kid"
    WRONG_KIND: Final = "wrong-kind"
    WRONG_SITE: Final = "wrong-site"
    WRONG_CABINET: Final = "wrong-cabinet"
    EXPIRED: Final = "expired"
    NOT_YET_VALID: Final = "not-yet-valid"
    ROLLBACK: Final = "rollback"
    CONFLICT: Final = "conflict"  # same version as the current one, different content
    MALFORMED: Final = "malformed"
    INVALID_BODY: Final = "invalid-body"  # validly signed, but the cabinet cannot use the body

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class SignedDocument:
    """A verified document. ``body`` is read-only (nested dicts/lists become proxies/tuples)."""

    kind: str
    site_id: str
    cabinet_id: str
    version: int
    issued_at: datetime
    expires_at: datetime
    body: Mapping[str, Any]
    kid: str
    digest: str = ""  # SHA-256 hex of the canonical doc bytes: the identity of this version


@dataclass(frozen=True, slots=True)
class Admission:
    """A document that passed every check, and how its times were judged."""

    doc: SignedDocument
    at: datetime  # the time its validity window was judged against
    # Its issued_at vouches for the untrusted wall clock (a newer version, signed "now"):
    # the window was judged against the wall clock, which the agent may trust again.
    corroborates: bool = False


@dataclass(frozen=True, slots=True)
class VersionFloor:
    """The highest version of a kind ever installed, and the digest of that document.

    Kept apart from the document itself, so that no-rollback holds even when the installed
    document was dropped (it no longer verified) and never depends on the clock.
    """

    version: int
    digest: str


class DocumentChecker(Protocol):
    """What a transport needs to admit a document (``DocumentVerifier`` or a policy around it)."""

    def verify(
        self,
        raw: bytes,
        kind: str,
        now: datetime,
        min_version: int = 0,
        *,
        current: bytes | None = None,
    ) -> SignedDocument: ...


class DocumentVerifier:
    """Verifies signed documents for one cabinet against the backend's signing keys."""

    def __init__(
        self,
        public_keys: Mapping[str, Ed25519PublicKey],
        site_id: str,
        cabinet_id: str,
        *,
        max_clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
        max_ahead: timedelta = DEFAULT_MAX_AHEAD,
    ) -> None:
        if not public_keys:
            raise ValueError("a verifier needs at least one public key")
        for kid, key in public_keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"signing key {kid!r} is not an Ed25519 public key")
        if max_clock_skew < timedelta(0):
            raise ValueError("max_clock_skew must not be negative")
        if max_ahead < max_clock_skew:
            raise ValueError("max_ahead must not be less than max_clock_skew")
        self._keys = dict(public_keys)
        self._site_id = site_id
        self._cabinet_id = cabinet_id
        self._skew = max_clock_skew
        self._max_ahead = max_ahead

    @property
    def max_clock_skew(self) -> timedelta:
        """How far in the future a document's ``issued_at`` may be (our clock may lag)."""
        return self._skew

    @property
    def max_document_ahead(self) -> timedelta:
        """How far after a cabinet time that is only a lower bound ``issued_at`` may be."""
        return self._max_ahead

    def authenticate(self, raw: bytes, kind: str) -> SignedDocument:
        """Signature, field types, kind and addressing only: no version, no clock.

        For documents that were fully verified before and stored: they stay in force whatever
        the wall clock says (DESIGN §7b); their version and expiry are the caller's to judge.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown document kind {kind!r}")
        doc, kid, sig = _parse_wire(raw)
        key = self._keys.get(kid)
        if key is None:
            raise DocumentError(DocumentError.UNKNOWN_KID, f"signing key id {kid!r} is not trusted")
        canonical = canonical_json(doc)
        try:
            key.verify(sig, canonical)
        except InvalidSignature:
            raise DocumentError(
                DocumentError.BAD_SIGNATURE, f"signature does not verify with key {kid!r}"
            ) from None
        signed = _fields(doc, kid, canonical)
        if signed.kind != kind:
            raise DocumentError(
                DocumentError.WRONG_KIND, f"expected a {kind!r} document, got {signed.kind!r}"
            )
        if signed.site_id != self._site_id:
            raise DocumentError(
                DocumentError.WRONG_SITE,
                f"document is for site {signed.site_id!r}, this is {self._site_id!r}",
            )
        if signed.cabinet_id not in (ANY_CABINET, self._cabinet_id):
            raise DocumentError(
                DocumentError.WRONG_CABINET,
                f"document is for cabinet {signed.cabinet_id!r}, this is {self._cabinet_id!r}",
            )
        return signed

    def verify(
        self,
        raw: bytes,
        kind: str,
        now: datetime,
        min_version: int = 0,
        *,
        current: bytes | None = None,
        floor: VersionFloor | None = None,
        clock_trusted: bool = True,
    ) -> SignedDocument:
        """Check signature, addressing, version and validity window; return the document.

        ``min_version`` is the lowest acceptable version. Pass the currently installed
        document as ``current`` to also refuse a lower version than its own and to accept
        an equal version only when the content is identical (idempotent re-delivery);
        ``floor`` does the same from the persisted highest installed version, which outlives
        the document. With ``clock_trusted=False`` ``now`` is the cabinet's own estimate of the
        time while its wall clock is untrusted (see ``admit``).
        """
        view = ClockView(now, clock_trusted, lower_bound=not clock_trusted)
        return self.admit(raw, kind, view, min_version, current=current, floor=floor).doc

    def admit(
        self,
        raw: bytes,
        kind: str,
        clock: ClockView,
        min_version: int = 0,
        *,
        current: bytes | None = None,
        floor: VersionFloor | None = None,
    ) -> Admission:
        """Every check of ``verify``, judging the validity window against ``clock``.

        Trusted clock: ``issued_at`` may be at most the skew allowance ahead of it. Untrusted:
        a newer version issued within the skew allowance of the wall clock corroborates the
        wall clock (the backend signed it just now) and is judged against it; any other
        document is judged against the agent's time: while that is only a lower bound of the
        true time (``clock.lower_bound``: after a reboot without proof) it may be issued up to
        ``max_ahead`` after it, else (a proven time carried on) the skew holds. Expiry always
        holds.
        """
        if clock.time.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        signed = self.authenticate(raw, kind)
        newest = self._check_version(signed, min_version, current, floor)
        corroborates = False
        at = clock.time
        if clock.trusted:
            if plus(at, self._skew) < signed.issued_at:
                raise DocumentError(
                    DocumentError.NOT_YET_VALID,
                    f"{kind} v{signed.version} issued at {format_time(signed.issued_at)}, "
                    f"now is {format_time(at)}",
                )
        else:
            wall = clock.wall
            corroborates = (
                (newest is None or signed.version > newest)
                and wall is not None
                and wall < LATEST_TIME
                and abs(signed.issued_at - wall) <= self._skew
            )
            if corroborates and wall is not None:
                at = wall
            elif not clock.lower_bound and plus(at, self._skew) < signed.issued_at:
                # The agent's time is carried on exactly from a proven reading: a wall-clock
                # glitch does not make it a mere lower bound, the skew holds as if trusted.
                raise DocumentError(
                    DocumentError.NOT_YET_VALID,
                    f"{kind} v{signed.version} issued at {format_time(signed.issued_at)}, "
                    f"now is {format_time(at)} (the cabinet's own time: its wall clock is "
                    "not trusted)",
                )
            elif plus(at, self._max_ahead) < signed.issued_at:
                raise DocumentError(
                    DocumentError.NOT_YET_VALID,
                    f"{kind} v{signed.version} issued at {format_time(signed.issued_at)}, more "
                    f"than {self._max_ahead.days} days after the cabinet's time "
                    f"{format_time(at)} (its wall clock is not trusted)",
                )
        if at >= signed.expires_at:
            raise DocumentError(
                DocumentError.EXPIRED,
                f"{kind} v{signed.version} expired at {format_time(signed.expires_at)}",
            )
        return Admission(signed, at, corroborates)

    @staticmethod
    def _check_version(
        signed: SignedDocument,
        min_version: int,
        current: bytes | None,
        floor: VersionFloor | None,
    ) -> int | None:
        """Refuse rollbacks and conflicts; the highest version already installed, if known."""
        if signed.version < min_version:
            raise DocumentError(
                DocumentError.ROLLBACK,
                f"{signed.kind} v{signed.version} is older than the minimum v{min_version}",
            )
        if floor is not None:
            check_floor(signed, floor)
        if current is None:
            return None if floor is None else floor.version
        try:
            cur_doc, _, _ = _parse_wire(current)
            cur_canonical = canonical_json(cur_doc)
            cur_version = cur_doc["version"]
        except (DocumentError, KeyError, TypeError) as err:
            raise DocumentError(
                DocumentError.MALFORMED, f"the current document is unreadable ({err})"
            ) from None
        if not isinstance(cur_version, int):
            raise DocumentError(DocumentError.MALFORMED, "the current document has no version")
        check_floor(signed, VersionFloor(cur_version, hashlib.sha256(cur_canonical).hexdigest()))
        return cur_version if floor is None else max(cur_version, floor.version)


def floor_digest(signed: SignedDocument) -> str:
    """What a version floor keeps of a document to recognise it: its digest; for an erasure,
    the digest of everything but its body. The floor outlives the erasure on the cabinet's
    disk, and a digest over the pseudonyms would let whoever holds the site key confirm a
    guess of whom it erased (docs/privacy.md §7). Two erasures of one version and one
    validity window that name different people are not told apart: the second counts as
    applied (a backend that reuses a version number for another erasure has a bug)."""
    if signed.kind != ERASURE:
        return signed.digest
    meta = {
        "kind": signed.kind,
        "site_id": signed.site_id,
        "cabinet_id": signed.cabinet_id,
        "version": signed.version,
        "issued_at": format_time(signed.issued_at),
        "expires_at": format_time(signed.expires_at),
    }
    return hashlib.sha256(b"erasure-floor\x00" + canonical_json(meta)).hexdigest()


def check_floor(signed: SignedDocument, floor: VersionFloor) -> None:
    """Refuse a version below ``floor`` (rollback) or equal to it with other content (conflict)."""
    if signed.version < floor.version:
        raise DocumentError(
            DocumentError.ROLLBACK,
            f"{signed.kind} v{signed.version} is older than the installed v{floor.version}",
        )
    if signed.version == floor.version and floor_digest(signed) != floor.digest:
        raise DocumentError(
            DocumentError.CONFLICT,
            f"{signed.kind} v{signed.version} differs from the installed document "
            "of the same version",
        )


def check_fields(canonical: bytes, kid: str) -> SignedDocument:
    """What the verifier makes of a canonical document signed under ``kid``, without the
    signature: a signer refuses to sign what every cabinet would refuse."""
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {_KID_RE.pattern}, got {kid!r}")
    return _fields(json.loads(canonical), kid, canonical)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; only the JSON subset every language agrees on."""
    _check_json(value, 0)
    return json.dumps(
        _thaw(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z``; fractional seconds only when there are some."""
    if value.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    utc = value.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str) -> datetime:
    """Parse the RFC 3339 UTC form ``format_time`` writes (``Z`` suffix required)."""
    m = _TIME_RE.fullmatch(text)
    if m is None:
        # The text is not quoted: a document's field may hold anything, a badge number too.
        raise ValueError(
            f"not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SS[.ffffff]Z), {len(text)} characters"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "0").ljust(6, "0"))
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def _parse_wire(raw: bytes) -> tuple[dict[str, Any], str, bytes]:
    """Split the wire object into (doc, kid, signature bytes); nothing is trusted yet."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DocumentError(DocumentError.MALFORMED, "document must be bytes")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentError(
            DocumentError.MALFORMED, f"document of {len(raw)} bytes exceeds {MAX_DOCUMENT_BYTES}"
        )
    try:
        wire = json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DocumentError(DocumentError.MALFORMED, f"not valid JSON: {err}") from None
    if not isinstance(wire, dict) or set(wire) != {"doc", "kid", "sig"}:
        raise DocumentError(
            DocumentError.MALFORMED, 'expected an object with exactly "doc", "kid" and "sig"'
        )
    doc, kid, sig = wire["doc"], wire["kid"], wire["sig"]
    if not isinstance(doc, dict):
        raise DocumentError(DocumentError.MALFORMED, '"doc" must be an object')
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise DocumentError(DocumentError.MALFORMED, '"kid" is not a valid key id')
    try:
        sig_bytes = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except (binascii.Error, ValueError):
        sig_bytes = b""
    # Only the canonical encoding: otherwise unused trailing bits give one signature many spellings.
    if len(sig_bytes) != 64 or base64.b64encode(sig_bytes).decode("ascii") != sig:
        raise DocumentError(DocumentError.MALFORMED, '"sig" must be 64 bytes in base64')
    try:
        _check_json(doc, 0)
    except ValueError as err:
        raise DocumentError(DocumentError.MALFORMED, str(err)) from None
    return doc, kid, sig_bytes


def _fields(doc: Mapping[str, Any], kid: str, canonical: bytes) -> SignedDocument:
    """Type-check the (already authenticated) fields of ``doc``."""
    keys = set(doc)
    if keys != _DOC_FIELDS:
        missing = sorted(_DOC_FIELDS - keys)
        extra = sorted(keys - _DOC_FIELDS)
        raise DocumentError(
            DocumentError.MALFORMED, f"doc fields wrong: missing {missing}, unknown {extra}"
        )
    for name in ("kind", "site_id", "cabinet_id", "issued_at", "expires_at"):
        if not isinstance(doc[name], str):
            raise DocumentError(DocumentError.MALFORMED, f"{name} must be a string")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise DocumentError(DocumentError.MALFORMED, "version must be a non-negative integer")
    if not isinstance(doc["body"], dict):
        raise DocumentError(DocumentError.MALFORMED, "body must be an object")
    try:
        issued_at = parse_time(doc["issued_at"])
        expires_at = parse_time(doc["expires_at"])
    except ValueError as err:
        raise DocumentError(DocumentError.MALFORMED, str(err)) from None
    if expires_at <= issued_at:
        raise DocumentError(DocumentError.MALFORMED, "expires_at is not after issued_at")
    if issued_at < EARLIEST_DOCUMENT_TIME:
        raise DocumentError(
            DocumentError.MALFORMED,
            f"issued_at {doc['issued_at']} is before {format_time(EARLIEST_DOCUMENT_TIME)}: "
            "no backend of this cabinet signed it then",
        )
    if expires_at >= LATEST_TIME:
        raise DocumentError(
            DocumentError.MALFORMED,
            f"expires_at {doc['expires_at']} is not before {format_time(LATEST_TIME)}",
        )
    body = _freeze(doc["body"])
    assert isinstance(body, Mapping)
    return SignedDocument(
        kind=doc["kind"],
        site_id=doc["site_id"],
        cabinet_id=doc["cabinet_id"],
        version=version,
        issued_at=issued_at,
        expires_at=expires_at,
        body=body,
        kid=kid,
        digest=hashlib.sha256(canonical).hexdigest(),
    )


def _check_json(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if not _utf8_ok(value):
            raise ValueError("string with a lone surrogate cannot be encoded as UTF-8")
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError("an integer is outside ±(2**53-1)")  # not quoted: a card number?
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str) or not k.isascii():  # ASCII: one sort order everywhere
                raise ValueError("object keys must be ASCII strings")  # the key is not quoted
            _check_json(v, depth + 1)
        return
    if isinstance(value, list | tuple):
        for v in value:
            _check_json(v, depth + 1)
        return
    raise ValueError(f"{type(value).__name__} is not allowed in a signed document")


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _thaw(value: Any) -> Any:
    """Plain dicts and lists again, so a frozen body re-serializes to the same bytes."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key in an object")  # not quoted: it may be a badge id
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise ValueError("a number with a fraction or exponent is not allowed")  # not quoted
