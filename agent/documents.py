"""The cabinet's signed backend documents: admitted, stored, re-verified, kept in force.

DESIGN §7b. Everything inbound — even validly signed — is validated before it is used:

- **Admission** (``verify``, the publisher's ``DocumentChecker``; runs in its worker thread):
  signature, addressing and sane times (``issued_at``/``expires_at`` within what this software
  can have seen), the persisted *version floor* (no rollback, whatever the clock says), the
  validity window against the agent's time (``DocumentVerifier.admit``: a newer version signed
  "now" by the wall clock's reckoning corroborates an untrusted wall clock), then the body with
  the very models the engine uses (``AllowList.from_body``, ``AssetRegistry.from_body``). Any
  refusal is a ``DocumentError`` with a reason, before anything is stored.
- **Install** (``install``): re-checks the floor; moves the agent's time (a corroborated wall
  clock is trusted again, else ``issued_at`` minus the skew is evidence that time has passed)
  and saves it; then stores the document, then its version floor; applies it, audits it.
- **Refusal** (``rejected``): logged, audited (repeats of the same refusal are counted, not
  re-audited), kept for ``cabinetctl status``; the cabinet runs on with what it had.
- **Start and SIGHUP** (``load``): stored documents are re-authenticated (signature, addressing,
  floor) but never refused for their time: a document verified once stays in force across
  reboots whatever the wall clock reads; an expired allow-list stays installed so that
  denials say "allow-list expired" (and the grace policy can apply).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final, TypeAlias

from agent.audit_policy import AuditTrail
from agent.domain.access import AllowList, AllowListError
from agent.domain.assets import AssetRegistry, AssetRegistryError
from agent.domain.localtime import site_time, warning_start
from agent.logging_setup import ThrottledLog
from agent.privacy.erasure import ErasureError, ErasureRequest
from agent.privacy.signed import (
    ALLOW_LIST,
    ASSET_REGISTRY,
    ERASURE,
    Admission,
    DocumentError,
    DocumentVerifier,
    SignedDocument,
    VersionFloor,
    check_floor,
    floor_digest,
    format_time,
)
from agent.store.store import Store
from agent.trusted_time import TrustedClock, plus
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

DOC_KINDS: Final = (ALLOW_LIST, ASSET_REGISTRY)
MAX_PARSED_CACHE = 4
ERASE_AUDIT_WAIT_S = 5.0  # an erasure waits this long for the audit appends already on their way
Parsed: TypeAlias = AllowList | AssetRegistry | ErasureRequest


def doc_key(kind: str) -> str:
    """The store kv key of the installed document of ``kind`` (raw, as signed)."""
    return f"doc:{kind}"


def floor_key(kind: str) -> str:
    """The store kv key of the version floor of ``kind`` (outlives the document)."""
    return f"doc-floor:{kind}"


@dataclass(frozen=True, slots=True)
class Deferred:
    """The latest document of a kind refused only as not yet valid: judged again later."""

    raw: bytes  # as received (already within MAX_DOCUMENT_BYTES: it authenticated)
    version: int
    issued_at: datetime


# Refusals judged by the clock: stale once the clock's trust changes.
TIME_REFUSALS: Final = frozenset({DocumentError.EXPIRED, DocumentError.NOT_YET_VALID})


@dataclass
class Refusal:
    """The last refusal of one kind, for ``cabinetctl status``."""

    reason: str
    detail: str
    at: datetime
    count: int = 1


def parse_body(doc: SignedDocument) -> Parsed:
    """The body through the engine's own model; DocumentError(INVALID_BODY) if unusable."""
    try:
        if doc.kind == ALLOW_LIST:
            return AllowList.from_document(doc)
        if doc.kind == ASSET_REGISTRY:
            return AssetRegistry.from_body(doc.body)
        if doc.kind == ERASURE:
            return ErasureRequest.from_body(doc.body)
    except (AllowListError, AssetRegistryError, ErasureError) as err:
        raise DocumentError(DocumentError.INVALID_BODY, str(err)[:300]) from None
    raise DocumentError(DocumentError.WRONG_KIND, f"no model for {doc.kind!r} documents")


def encode_floor(floor: VersionFloor) -> bytes:
    return json.dumps({"version": floor.version, "digest": floor.digest}, sort_keys=True).encode()


def decode_floor(raw: bytes) -> VersionFloor:
    """Inverse of ``encode_floor``; ValueError if it is not that."""
    try:
        data = json.loads(raw)
        version, digest = data["version"], data["digest"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(type(err).__name__) from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError("version is not a non-negative integer")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError("digest is not a SHA-256 hex digest")
    return VersionFloor(version, digest)


class Documents:
    """The installed allow-list and asset registry, with their version floors and refusals.

    ``apply(kind, parsed)`` hands a newly installed (or, on reload, re-read) document to the
    engine; ``None`` means "none in force".
    """

    def __init__(
        self,
        verifier: DocumentVerifier,
        clock: TrustedClock,
        audit: AuditTrail,
        apply: Callable[[str, Parsed | None], None],
        on_refused: Callable[[str, str], None] | None = None,
        erase_engine: Callable[[frozenset[str]], Awaitable[int]] | None = None,
    ) -> None:
        self.verifier = verifier
        self._erase_engine = erase_engine
        self.clock = clock
        self.audit = audit
        self._apply = apply
        self._on_refused = on_refused
        # Told when a document is deferred until its time (the clock watch then looks often).
        self.on_deferred: list[Callable[[], None]] = []
        self._store: Store | None = None
        self.documents: dict[str, SignedDocument] = {}
        self.floors: dict[str, VersionFloor] = {}
        self.refusals: dict[str, Refusal] = {}
        self.rejected_total = 0
        # A flood of bad commands costs a line per kind, reason and interval (with a count).
        self._refusal_log = ThrottledLog(logger)
        self._live_raw: dict[str, bytes] = {}  # what installed() answers (swapped atomically)
        # digest -> what admission found: the parsed body, and whether it corroborates the clock
        self._admitted: dict[str, tuple[Parsed, bool]] = {}
        self._installs = 0
        # kind -> the latest document refused only as not yet valid (one per kind, bounded by
        # the document size limit): re-judged when its time comes, and on SIGHUP.
        self.deferred: dict[str, Deferred] = {}
        self._install_lock = asyncio.Lock()

    # -- start and SIGHUP -------------------------------------------------------------------

    async def load(self, store: Store) -> dict[str, Parsed | None]:
        """Re-read, re-authenticate and parse the stored documents; returns what is in force."""
        self._store = store
        for _ in range(3):
            installs = self._installs
            parsed = await self._load(store)
            if self._installs == installs:
                break
            # A document was installed while we read (SIGHUP during an MQTT delivery): the
            # snapshot may predate it; read again rather than put the older one back in force.
        return parsed

    async def _load(self, store: Store) -> dict[str, Parsed | None]:
        documents: dict[str, SignedDocument] = {}
        raws: dict[str, bytes] = {}
        parsed: dict[str, Parsed | None] = {}
        for kind in DOC_KINDS:
            parsed[kind] = None
            floor = await self._load_floor(store, kind)
            raw = await store.kv_get(doc_key(kind))
            if raw is None:
                continue
            try:
                # Signature and addressing: a tampered state file must not grant access. Not
                # the clock: a document verified once stays in force whatever the clock says.
                doc = self.verifier.authenticate(raw, kind)
                if floor is not None:
                    check_floor(doc, floor)
                body = parse_body(doc)
            except DocumentError as err:
                logger.error("stored %s refused: %s", kind, err)
                self._refused(kind, err.reason, f"stored document: {err.detail}")
                continue
            if floor is None or doc.version > floor.version:
                # Written after the document at install: a crash in between left it behind.
                await self._save_floor(store, kind, VersionFloor(doc.version, doc.digest))
            documents[kind] = doc
            raws[kind] = raw
            parsed[kind] = body
        # Erasures are never stored, only their floor: a replayed one must not apply again.
        await self._load_floor(store, ERASURE)
        self.documents = documents
        self._live_raw = raws
        return parsed

    def evidence(self) -> list[datetime]:
        """Times the stored documents prove have passed (for the trusted-time floor)."""
        return [self._proves(doc) for doc in self.documents.values()]

    def log_in_force(self, now: datetime) -> None:
        for kind, doc in sorted(self.documents.items()):
            state = "EXPIRED" if now >= doc.expires_at else "valid"
            log = logger.warning if state == "EXPIRED" else logger.info
            log(
                "%s version %d in force (%s; expires %s)",
                kind,
                doc.version,
                state,
                format_time(doc.expires_at),
            )

    # -- admission (the publisher's DocumentChecker; called in a worker thread) --------------

    def verify(
        self,
        raw: bytes,
        kind: str,
        now: datetime,
        min_version: int = 0,
        *,
        current: bytes | None = None,
    ) -> SignedDocument:
        """Every check an inbound document must pass before it may be installed.

        Its times are judged against a fresh reading of the agent's clock (``now``, the
        ``DocumentChecker`` argument, is that clock's time a moment earlier).
        """
        try:
            admission: Admission = self.verifier.admit(
                raw,
                kind,
                self.clock.view(),
                min_version,
                current=current,
                floor=self.floors.get(kind),
            )
        except DocumentError as err:
            if err.reason == DocumentError.NOT_YET_VALID:
                self._defer(raw, kind)
            raise
        doc = admission.doc
        body = parse_body(doc)
        if len(self._admitted) >= MAX_PARSED_CACHE:
            self._admitted.clear()
        self._admitted[doc.digest] = (body, admission.corroborates)
        return doc

    # -- DocumentSink (the publisher calls these on the loop) --------------------------------

    def installed(self, kind: str) -> bytes | None:
        return self._live_raw.get(kind)

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        """Store and apply an admitted document. DocumentError if it may not be installed."""
        # One at a time: the publisher and a deferred document judged again may both install;
        # the floor check and the writes must not interleave (an older one written last).
        async with self._install_lock:
            await self._install(doc, raw)

    async def _install(self, doc: SignedDocument, raw: bytes) -> None:
        store = self._store
        if store is None:
            raise DocumentError("not-ready", "the state store is not open yet")
        floor = self.floors.get(doc.kind)
        if floor is not None:
            check_floor(doc, floor)  # a newer one may have been installed since admission
        admitted = self._admitted.pop(doc.digest, None)
        body, corroborates = (parse_body(doc), False) if admitted is None else admitted
        # Every check has passed. The time it proves first: a crash after this leaves the
        # agent's time raised by a valid document, never a stored document whose time
        # was not taken into account.
        skew = self.verifier.max_clock_skew.total_seconds()
        moved = corroborates and self.clock.corroborate(doc.issued_at, skew)
        if not moved:
            moved = self.clock.raise_floor(self._proves(doc))
        if moved:
            await self.clock.save(store)
        if isinstance(body, ErasureRequest):
            await self._erase(store, doc, body)
            return
        # Then the document (a live document must survive a restart), then its version floor.
        await store.kv_put(doc_key(doc.kind), raw)
        await self._save_floor(store, doc.kind, VersionFloor(doc.version, doc.digest))
        self._apply(doc.kind, body)
        self.documents[doc.kind] = doc
        self._live_raw[doc.kind] = raw
        self._installs += 1
        self.refusals.pop(doc.kind, None)
        deferred = self.deferred.get(doc.kind)
        if deferred is not None and deferred.version <= doc.version:
            del self.deferred[doc.kind]
        self.audit.record(
            "backend",
            "document.installed",
            {"kind": doc.kind, "version": doc.version, "digest": doc.digest},
        )
        logger.info("installed %s version %d", doc.kind, doc.version)

    async def _erase(self, store: Store, doc: SignedDocument, request: ErasureRequest) -> None:
        """Apply an erasure (docs/privacy.md §7): the audit records naming them are redacted
        and their bytes scrubbed. The document itself is never stored (it names them): only its
        version floor is, so a replay or an older one is refused."""
        mark = floor_digest(doc)  # not the document's digest: it would confirm whom it named
        done = self.floors.get(doc.kind)
        if done is not None and (done.version, done.digest) == (doc.version, mark):
            return  # the retained message again, at a reconnect: applied already
        listed = self.documents.get(ALLOW_LIST)
        if listed is not None:
            entries = listed.body.get("entries")
            still = len(request.pseudonyms & set(entries)) if isinstance(entries, Mapping) else 0
            if still:
                raise DocumentError(
                    "still-listed",
                    f"allow-list version {listed.version} still lists {still} of the "
                    f"{len(request.pseudonyms)} pseudonyms: publish an allow-list without "
                    "them first, then the erasure again",
                )
        # The engine state first (an open session, a badge in the unlock window): "erased"
        # stands in for them there. Then every audit record naming them, the ones the commits
        # before this point are still appending included; then the store scrubs the old
        # versions of all of it from the file's free pages and the WAL.
        in_engine = 0
        if self._erase_engine is not None:
            try:
                in_engine = await self._erase_engine(request.pseudonyms)
            except TimeoutError:
                raise DocumentError(
                    "not-ready",
                    "the engine did not take the erasure in time: publish it again",
                ) from None
        await self.audit.settle(ERASE_AUDIT_WAIT_S)
        redacted = await store.audit_redact(request.pseudonyms)
        await self._save_floor(store, doc.kind, VersionFloor(doc.version, mark))
        self._installs += 1
        self.refusals.pop(doc.kind, None)
        self.deferred.pop(doc.kind, None)
        # Counts only: the record must not name whom it erased.
        await self.audit.append(
            "backend",
            "erasure.applied",
            {
                "version": doc.version,
                "floor": mark,
                "pseudonyms": len(request.pseudonyms),
                "audit_records_redacted": redacted,
                "engine_state_redacted": in_engine,
            },
        )
        logger.info(
            "erasure version %d applied: %d pseudonym(s), %d audit record(s) redacted, "
            "%d place(s) in the engine state",
            doc.version,
            len(request.pseudonyms),
            redacted,
            in_engine,
        )

    def rejected(self, kind: str, reason: str, detail: str) -> None:
        """A document was refused (never applied): count, keep for status, audit, log."""
        self.rejected_total += 1
        self._refusal_log.log(
            logging.WARNING, (kind, reason), "backend %s refused (%s): %s", kind, reason, detail
        )
        self._refused(kind, reason, detail)
        if self._on_refused is not None:
            self._on_refused(kind, reason)

    # -- documents refused as not yet valid ---------------------------------------------------

    def deferred_due(self) -> list[str]:
        """Kinds whose deferred document the time rules may now admit (its time has come, or
        the wall clock it may corroborate is now the one to judge by)."""
        if not self.deferred:
            return []
        view = self.clock.view()
        skew = self.verifier.max_clock_skew
        ahead = self.verifier.max_document_ahead if view.lower_bound and not view.trusted else skew
        due = []
        for kind, doc in self.deferred.items():
            wall = view.wall
            corroborates = (
                not view.trusted and wall is not None and abs(doc.issued_at - wall) <= skew
            )
            if corroborates or doc.issued_at <= plus(view.time, ahead):
                due.append(kind)
        return due

    async def reconsider(self, kinds: list[str] | None = None) -> None:
        """Judge deferred documents again (``kinds``; None: all, as on SIGHUP): installed if
        they now pass every check, refused again (with the reason) if not."""
        for kind in list(self.deferred) if kinds is None else kinds:
            deferred = self.deferred.pop(kind, None)
            if deferred is None:
                continue
            current = self.installed(kind)
            logger.info(
                "judging again %s version %d, refused earlier as not yet valid",
                kind,
                deferred.version,
            )
            try:
                # Off the loop: a signature check and a body of up to the document size limit.
                doc = await asyncio.to_thread(
                    self.verify, deferred.raw, kind, self.clock.now(), current=current
                )
                if current == deferred.raw:
                    continue
                await self.install(doc, deferred.raw)
            except DocumentError as err:
                self.rejected(kind, err.reason, err.detail)
            except CabinetError as err:
                self.rejected(kind, "install-failed", str(err))

    def clock_changed(self) -> None:
        """The wall clock became trusted: refusals judged by the old time are stale."""
        for kind, refusal in list(self.refusals.items()):
            if refusal.reason in TIME_REFUSALS and kind not in self.deferred:
                del self.refusals[kind]

    # -- status ------------------------------------------------------------------------------

    def status(
        self, now: datetime, warn_days: float, tz: tzinfo = UTC
    ) -> dict[str, dict[str, object]]:
        """Per kind: what is in force and until when, warnings (from the start of the site's
        day in ``tz``), the last refusal."""
        out: dict[str, dict[str, object]] = {}
        for kind in DOC_KINDS:
            doc = self.documents.get(kind)
            entry: dict[str, object] = {}
            if doc is not None:
                left = (doc.expires_at - now).total_seconds()
                entry.update(
                    version=doc.version,
                    issued_at=doc.issued_at.isoformat(),
                    expires_at=doc.expires_at.isoformat(),
                    expires_in_s=round(left),
                    state="expired" if left <= 0 else "valid",
                )
                warning = expiry_warning(kind, doc.expires_at, now, warn_days, tz)
                if warning is not None:
                    entry["warning"] = warning
            else:
                entry["state"] = "none"
            refusal = self.refusals.get(kind)
            if refusal is not None:
                entry["refused"] = {
                    "reason": refusal.reason,
                    "detail": refusal.detail,
                    "at": refusal.at.isoformat(),
                    "count": refusal.count,
                }
            out[kind] = entry
        return out

    # -- internals ---------------------------------------------------------------------------

    def _proves(self, doc: SignedDocument) -> datetime:
        # issued_at is the backend's clock: it may run up to the accepted skew ahead of ours.
        return plus(doc.issued_at, -self.verifier.max_clock_skew)

    def _defer(self, raw: bytes, kind: str) -> None:
        """Keep the latest document of ``kind`` refused as not yet valid (runs in the
        admission thread: one dict assignment)."""
        try:
            doc = self.verifier.authenticate(raw, kind)
        except DocumentError:
            return
        old = self.deferred.get(kind)
        if old is None or doc.version >= old.version:
            self.deferred[kind] = Deferred(raw, doc.version, doc.issued_at)
            for listener in self.on_deferred:
                listener()

    def _refused(self, kind: str, reason: str, detail: str) -> None:
        detail = detail[:300]
        last = self.refusals.get(kind)
        if last is not None and (last.reason, last.detail) == (reason, detail):
            # A retained document comes back at every reconnect: count it, audit it once.
            last.count += 1
            last.at = self.clock.now()
            return
        self.refusals[kind] = Refusal(reason, detail, self.clock.now())
        self.audit.record(
            "backend",
            "document.refused",
            {"kind": kind, "reason": reason, "detail": detail},
        )

    async def _load_floor(self, store: Store, kind: str) -> VersionFloor | None:
        raw = await store.kv_get(floor_key(kind))
        floor: VersionFloor | None = None
        if raw is not None:
            try:
                floor = decode_floor(raw)
            except ValueError as err:
                logger.error("stored version floor of %s unreadable (%s)", kind, err)
        if floor is not None:
            self.floors[kind] = floor
        return self.floors.get(kind)

    async def _save_floor(self, store: Store, kind: str, floor: VersionFloor) -> None:
        old = self.floors.get(kind)
        if old is not None and old.version > floor.version:
            return
        await store.kv_put(floor_key(kind), encode_floor(floor))
        self.floors[kind] = floor


def expiry_warning(
    kind: str, expires_at: datetime, now: datetime, warn_days: float, tz: tzinfo = UTC
) -> str | None:
    """A one-line warning when ``kind`` has expired, or expires within ``warn_days`` — from the
    start of that day at the site (``tz``), with the site's time beside UTC."""
    left = expires_at - now
    local = site_time(expires_at, tz)
    at = format_time(expires_at) + (f", {local} site time" if local else "")
    if left <= timedelta(0):
        return f"{kind} EXPIRED at {at}"
    if now >= warning_start(expires_at, warn_days, tz):
        return f"{kind} expires in {_human(left)} (at {at})"
    return None


def _human(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 2 * 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    minutes = max(1, round(seconds / 60))
    return "1 minute" if minutes == 1 else f"{minutes} minutes"
