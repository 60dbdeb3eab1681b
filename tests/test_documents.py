"""agent/documents.py with a real store file: admission, version floor, stored documents, refusals."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit_policy import AuditTrail
from agent.documents import (
    Documents,
    Parsed,
    decode_floor,
    doc_key,
    expiry_warning,
    floor_key,
)
from agent.domain.access import AllowList
from agent.domain.assets import AssetRegistry
from agent.lifecycle import describe_error
from agent.mqtt.publisher import Publisher
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import (
    ALLOW_LIST,
    ASSET_REGISTRY,
    DocumentError,
    DocumentVerifier,
    SignedDocument,
    canonical_json,
    format_time,
)
from agent.store import Store, StoreConfig
from agent.trusted_time import BUILD_FLOOR, TrustedClock
from agent.trusted_time import KV_KEY as TIME_KEY
from agent.trusted_time import decode_floor as decode_time_floor
from backend.signing import allow_list_doc, sign_document
from tests.delivery_helpers import mqtt_cfg

SITE, CABINET = "hangar-3", "crib-07"
KEY = Ed25519PrivateKey.generate()
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, 0, 1, tzinfo=UTC)
ALICE = Pseudonymizer(SITE, "s1", bytes(32)).badge("12ab")


@dataclass
class Clock:
    wall: datetime = NOW
    mono: float = 100.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@dataclass
class Rig:
    store: Store
    clock: Clock
    docs: Documents
    applied: list[tuple[str, Parsed | None]] = field(default_factory=list)


def allow_list(version: int, *, issued: datetime = NOW, days: int = 7, roles: Any = None) -> bytes:
    doc = allow_list_doc(
        SITE,
        CABINET,
        version,
        issued + timedelta(days=days),
        {ALICE: roles or ["user"]},
        issued_at=issued,
    )
    return sign_document(KEY, "k1", doc)


def raw_doc(kind: str, version: int, body: dict[str, Any]) -> bytes:
    doc = {
        "kind": kind,
        "site_id": SITE,
        "cabinet_id": CABINET,
        "version": version,
        "issued_at": format_time(NOW),
        "expires_at": format_time(NOW + timedelta(days=7)),
        "body": body,
    }
    return sign_document(KEY, "k1", doc)


def make_docs(store: Store, clock: Clock, applied: list[tuple[str, Parsed | None]]) -> Documents:
    verifier = DocumentVerifier({"k1": KEY.public_key()}, SITE, CABINET)
    return Documents(
        verifier,
        TrustedClock(clock),
        AuditTrail(lambda: store),
        apply=lambda kind, parsed: applied.append((kind, parsed)),
    )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(StoreConfig(path=tmp_path / "state.db"))
    clock = Clock()
    applied: list[tuple[str, Parsed | None]] = []
    docs = make_docs(store, clock, applied)
    await docs.load(store)
    try:
        yield Rig(store, clock, docs, applied)
    finally:
        await docs.audit.flush()
        await store.close()


async def admit(rig: Rig, raw: bytes, kind: str = ALLOW_LIST) -> None:
    doc = rig.docs.verify(raw, kind, rig.docs.clock.now(), current=rig.docs.installed(kind))
    await rig.docs.install(doc, raw)


async def test_a_bad_body_is_refused_before_anything_is_stored(rig: Rig) -> None:
    raw = raw_doc(ASSET_REGISTRY, 1, {"assets": [{"epc": "e280", "name": "no id"}]})
    with pytest.raises(DocumentError) as info:
        rig.docs.verify(raw, ASSET_REGISTRY, NOW)
    assert info.value.reason == DocumentError.INVALID_BODY
    assert "asset_id" in info.value.detail
    raw_key = raw_doc(ALLOW_LIST, 1, {"entries": {"04A1B2C3D4": ["user"]}})
    with pytest.raises(DocumentError) as info:
        rig.docs.verify(raw_key, ALLOW_LIST, NOW)
    assert info.value.reason == DocumentError.INVALID_BODY
    assert "04A1B2C3D4" not in str(info.value)
    assert await rig.store.kv_get(doc_key(ASSET_REGISTRY)) is None
    assert rig.applied == []


async def test_install_stores_the_document_then_its_floor_and_applies_it(rig: Rig) -> None:
    await admit(rig, allow_list(3))
    assert await rig.store.kv_get(doc_key(ALLOW_LIST)) == allow_list(3)
    stored = await rig.store.kv_get(floor_key(ALLOW_LIST))
    assert stored is not None
    floor = decode_floor(stored)
    assert floor.version == 3
    assert floor.digest == rig.docs.documents[ALLOW_LIST].digest
    [(kind, parsed)] = rig.applied
    assert kind == ALLOW_LIST
    assert isinstance(parsed, AllowList)
    assert parsed.version == 3


async def test_a_dropped_document_still_cannot_be_rolled_back(rig: Rig, tmp_path: Path) -> None:
    await admit(rig, allow_list(3))
    # The stored document is damaged on disk: SIGHUP drops it (deny by default) ...
    await rig.store.kv_put(doc_key(ALLOW_LIST), allow_list(3).replace(b'"user"', b'"supervisor"'))
    parsed = await rig.docs.load(rig.store)
    assert parsed[ALLOW_LIST] is None
    assert rig.docs.installed(ALLOW_LIST) is None
    # ... and a replayed older one is still a rollback: the floor outlives the document.
    with pytest.raises(DocumentError) as info:
        rig.docs.verify(allow_list(2), ALLOW_LIST, NOW, current=None)
    assert info.value.reason == DocumentError.ROLLBACK
    with pytest.raises(DocumentError) as info:
        rig.docs.verify(allow_list(3, roles=["supervisor"]), ALLOW_LIST, NOW)
    assert info.value.reason == DocumentError.CONFLICT
    await admit(rig, allow_list(3))  # the same document again is fine


async def test_stored_documents_stay_in_force_whatever_the_wall_clock_reads(
    tmp_path: Path,
) -> None:
    store = await Store.open(StoreConfig(path=tmp_path / "state.db"))
    try:
        applied: list[tuple[str, Parsed | None]] = []
        clock = Clock()
        docs = make_docs(store, clock, applied)
        await docs.load(store)
        registry = raw_doc(ASSET_REGISTRY, 1, {"assets": [{"epc": "e280", "asset_id": "A-1"}]})
        for raw, kind in ((allow_list(4), ALLOW_LIST), (registry, ASSET_REGISTRY)):
            doc = docs.verify(raw, kind, NOW)
            await docs.install(doc, raw)
        await docs.audit.flush()

        # Reboot without RTC: the wall clock reads 1970.
        board = Clock(wall=EPOCH, mono=3.0)
        after = make_docs(store, board, [])
        parsed = await after.load(store)
        assert isinstance(parsed[ALLOW_LIST], AllowList)
        assert isinstance(parsed[ASSET_REGISTRY], AssetRegistry)
        await after.clock.load(store, evidence=after.evidence())
        now = after.clock.reading()
        assert not now.trusted
        assert now.wall >= NOW - timedelta(minutes=5), "the documents raised the floor"
        # Not expired by trusted time, so the allow-list grants:
        assert not parsed[ALLOW_LIST].expired(now.wall)
        # An old document replayed now is a rollback, judged before any clock rule.
        with pytest.raises(DocumentError) as info:
            after.verify(allow_list(2), ALLOW_LIST, now.wall, current=after.installed(ALLOW_LIST))
        assert info.value.reason == DocumentError.ROLLBACK
        # A fresh document is not refused as "not yet valid" by a clock known to lag.
        fresh = allow_list(5, issued=NOW + timedelta(days=2))
        assert after.verify(fresh, ALLOW_LIST, now.wall).version == 5
        await after.audit.flush()
    finally:
        await store.close()


async def test_a_crash_between_document_and_floor_is_repaired_at_start(rig: Rig) -> None:
    await admit(rig, allow_list(3))
    await rig.store.kv_put(doc_key(ALLOW_LIST), allow_list(4))  # the floor write never happened
    await rig.docs.load(rig.store)
    stored = await rig.store.kv_get(floor_key(ALLOW_LIST))
    assert stored is not None
    assert decode_floor(stored).version == 4


async def test_refusals_are_kept_for_status_and_audited_once(rig: Rig) -> None:
    for _ in range(3):  # a retained document comes back at every reconnect
        rig.docs.rejected(ASSET_REGISTRY, "invalid-body", "asset [0] needs an 'asset_id'")
    await rig.docs.audit.flush()
    status = rig.docs.status(NOW, 7)
    refused = status[ASSET_REGISTRY]["refused"]
    assert (refused["reason"], refused["count"]) == ("invalid-body", 3)
    assert status[ALLOW_LIST]["state"] == "none"
    records = [r for r in await rig.store.audit_tail(50) if r.action == "document.refused"]
    assert len(records) == 1
    assert records[0].details["reason"] == "invalid-body"


async def test_status_warns_before_the_allow_list_expires(rig: Rig) -> None:
    await admit(rig, allow_list(3, days=3))
    status = rig.docs.status(NOW, 7)[ALLOW_LIST]
    assert status["state"] == "valid"
    assert "expires in 3.0 days" in status["warning"]
    later = rig.docs.status(NOW + timedelta(days=4), 7)[ALLOW_LIST]
    assert later["state"] == "expired"
    assert "EXPIRED" in later["warning"]
    assert "warning" not in rig.docs.status(NOW, 1)[ALLOW_LIST]


class _Late:
    """A sink that learns of the newer installed document only at install time (a race)."""

    def __init__(self, docs: Documents) -> None:
        self.docs = docs

    def installed(self, kind: str) -> bytes | None:
        return None

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        await self.docs.install(doc, raw)

    def rejected(self, kind: str, reason: str, detail: str) -> None:
        self.docs.rejected(kind, reason, detail)


async def test_the_publisher_survives_a_sink_that_refuses_at_install(rig: Rig) -> None:
    """A DocumentError from install (a newer version won meanwhile) is a refusal, not a crash."""
    await admit(rig, allow_list(5))
    plain = DocumentVerifier({"k1": KEY.public_key()}, SITE, CABINET)  # knows no floor
    pub = Publisher(
        mqtt_cfg(1),
        SITE,
        CABINET,
        rig.store,
        verifier=plain,
        documents=_Late(rig.docs),
        now=lambda: NOW,
    )
    topic = f"cabinets/v1/{SITE}/{CABINET}/cmd/allow-list"
    assert not await pub.handle_command(topic, allow_list(4))
    assert pub.stats.commands_rejected == 1
    assert rig.docs.refusals[ALLOW_LIST].reason == DocumentError.ROLLBACK
    # Through the agent's own checker a bad body never even reaches install.
    pub2 = Publisher(
        mqtt_cfg(1),
        SITE,
        CABINET,
        rig.store,
        verifier=rig.docs,
        documents=rig.docs,
        now=lambda: NOW,
    )
    bad = raw_doc(ALLOW_LIST, 9, {"entries": {ALICE: "user"}})
    assert not await pub2.handle_command(topic, bad)
    assert rig.docs.refusals[ALLOW_LIST].reason == DocumentError.INVALID_BODY
    assert rig.docs.documents[ALLOW_LIST].version == 5
    assert json.loads(rig.docs.installed(ALLOW_LIST) or b"{}")["doc"]["version"] == 5


class _InstallDuringRead:
    """A store that lets an MQTT delivery install a document in the middle of a SIGHUP reload."""

    def __init__(self, store: Store, during: Any) -> None:
        self._store = store
        self._during = during

    async def kv_get(self, key: str) -> bytes | None:
        value = await self._store.kv_get(key)
        if key == floor_key(ASSET_REGISTRY) and self._during is not None:
            during, self._during = self._during, None
            await during()
        return value

    async def kv_put(self, key: str, value: bytes | None) -> None:
        await self._store.kv_put(key, value)


async def test_a_reload_racing_an_install_keeps_the_newer_document(rig: Rig) -> None:
    await admit(rig, allow_list(3))

    async def deliver_v4() -> None:
        await admit(rig, allow_list(4))

    parsed = await rig.docs.load(_InstallDuringRead(rig.store, deliver_v4))
    assert rig.docs.documents[ALLOW_LIST].version == 4
    assert isinstance(parsed[ALLOW_LIST], AllowList)
    assert parsed[ALLOW_LIST].version == 4
    assert json.loads(rig.docs.installed(ALLOW_LIST) or b"{}")["doc"]["version"] == 4


def hand_signed(issued_at: str, expires_at: str, version: int = 9) -> bytes:
    """Signed with the real key, times as given (``sign_document`` refuses absurd ones)."""
    doc = {
        "kind": ALLOW_LIST,
        "site_id": SITE,
        "cabinet_id": CABINET,
        "version": version,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "body": {"entries": {ALICE: ["user"]}},
    }
    canonical = canonical_json(doc)
    sig = base64.b64encode(KEY.sign(canonical)).decode()
    return canonical_json({"doc": doc, "kid": "k1", "sig": sig})


@pytest.mark.parametrize(
    ("issued", "expires"),
    [
        ("0001-01-01T00:00:00Z", "2027-12-31T23:59:59Z"),
        ("9999-12-31T23:56:00Z", "9999-12-31T23:59:59Z"),
    ],
)
async def test_an_absurd_document_is_refused_before_anything_is_stored(
    rig: Rig, issued: str, expires: str
) -> None:
    """F2/F3: it used to be stored first, then crash the agent at every start."""
    await admit(rig, allow_list(3))
    floor_before = await rig.store.kv_get(TIME_KEY)
    time_before = rig.docs.clock.reading().wall
    pub = Publisher(
        mqtt_cfg(1),
        SITE,
        CABINET,
        rig.store,
        verifier=rig.docs,
        documents=rig.docs,
        now=rig.docs.clock.now,
    )
    topic = f"cabinets/v1/{SITE}/{CABINET}/cmd/allow-list"
    assert not await pub.handle_command(topic, hand_signed(issued, expires))
    refusal = rig.docs.refusals[ALLOW_LIST]
    assert refusal.reason == DocumentError.MALFORMED
    assert issued[:4] in refusal.detail or expires[:4] in refusal.detail
    assert rig.docs.documents[ALLOW_LIST].version == 3
    assert await rig.store.kv_get(doc_key(ALLOW_LIST)) == allow_list(3)
    assert await rig.store.kv_get(TIME_KEY) == floor_before
    assert rig.docs.clock.reading().wall - time_before < timedelta(minutes=1)


async def test_a_reboot_into_a_wrong_clock_persists_nothing_and_a_fresh_document_proves_time(
    tmp_path: Path,
) -> None:
    """Booted while the wall clock read 2028 (no time sync): taken provisionally, so neither the
    persisted floor nor expiry follows it; NTP puts it right, a fresh document proves it."""
    store = await Store.open(StoreConfig(path=tmp_path / "state.db"))
    try:
        board = Clock(wall=datetime(2028, 1, 10, tzinfo=UTC), mono=3.0)
        docs = make_docs(store, board, [])
        await docs.load(store)
        await docs.clock.load(store, evidence=docs.evidence())
        first = docs.clock.reading()
        assert (first.wall.year, first.trusted) == (2028, False)
        assert docs.clock.provisional()
        await docs.clock.save(store)
        stored = await store.kv_get(TIME_KEY)
        assert stored is not None
        assert decode_time_floor(stored).floor.year == 2026, "2028 was never proven"
        board.wall, board.mono = NOW, 10.0
        assert not docs.clock.reading().trusted
        raw = allow_list(4, issued=NOW - timedelta(seconds=30))
        doc = docs.verify(raw, ALLOW_LIST, docs.clock.now())  # not expired: judged against NOW
        await docs.install(doc, raw)
        now = docs.clock.reading()
        assert now.trusted
        assert now.wall == NOW
        stored = await store.kv_get(TIME_KEY)
        assert stored is not None
        assert decode_time_floor(stored).floor == NOW
        assert await store.kv_get(doc_key(ALLOW_LIST)) == raw
        steps = docs.clock.take_steps()
        assert [(s.cause, s.trusted) for s in steps] == [("wall", False), ("document", True)]
        await docs.audit.flush()
    finally:
        await store.close()


def test_small_wording() -> None:
    """Hostile report F14: "expires in 1 minutes"; an empty reason after "not saved at shutdown:"."""
    at = NOW + timedelta(seconds=61)
    assert expiry_warning(ALLOW_LIST, at, NOW, 7) == (
        f"allow-list expires in 1 minute (at {format_time(at)})"
    )
    later = NOW + timedelta(minutes=5)
    assert "expires in 5 minutes" in (expiry_warning(ALLOW_LIST, later, NOW, 7) or "")
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(OSError("disk full")) == "disk full"


async def test_documents_refused_as_not_yet_valid_are_kept_one_per_kind_and_judged_again(
    rig: Rig,
) -> None:
    """Hostile report 2, F4: the latest such document per kind, installed once its time comes."""
    # A fresh cabinet without time sync: its time is a lower bound (the build date), and a
    # document may be issued up to 366 days after it; these are a little more.
    ahead = BUILD_FLOOR + timedelta(days=370)

    def refused(raw: bytes) -> None:
        with pytest.raises(DocumentError) as info:
            rig.docs.verify(raw, ALLOW_LIST, rig.docs.clock.now())
        assert info.value.reason == DocumentError.NOT_YET_VALID

    refused(allow_list(5, issued=ahead))
    refused(allow_list(6, issued=ahead + timedelta(days=1)))
    refused(allow_list(4, issued=ahead))  # older: the newest refused one is kept
    assert list(rig.docs.deferred) == [ALLOW_LIST]
    assert rig.docs.deferred[ALLOW_LIST].version == 6
    assert rig.docs.deferred_due() == []
    await rig.docs.reconsider([])  # nothing due: nothing happens
    assert rig.docs.documents == {}
    rig.clock.mono += 6 * 86400.0  # six days pass on the monotonic clock
    assert rig.docs.deferred_due() == [ALLOW_LIST]
    await rig.docs.reconsider(rig.docs.deferred_due())
    assert rig.docs.documents[ALLOW_LIST].version == 6
    assert rig.docs.deferred == {}
    assert ALLOW_LIST not in rig.docs.refusals


async def test_refusals_judged_by_an_old_clock_leave_status_once_it_is_trusted(rig: Rig) -> None:
    """Hostile report 2, F7: "REFUSED … expired" stayed next to a document valid again."""
    rig.docs.rejected(ALLOW_LIST, DocumentError.EXPIRED, "allow-list v1 expired at …")
    rig.docs.rejected(ASSET_REGISTRY, DocumentError.ROLLBACK, "asset-registry v1 is older")
    rig.docs.clock_changed()
    assert ALLOW_LIST not in rig.docs.refusals
    assert rig.docs.refusals[ASSET_REGISTRY].reason == DocumentError.ROLLBACK, "not a clock's"


def test_the_expiry_warning_starts_with_the_sites_day_and_shows_its_time() -> None:
    from agent.domain.localtime import zone

    paris = zone("Europe/Paris")
    expires = datetime(2026, 12, 12, 10, 0, tzinfo=UTC)  # 11:00 CET
    # Seven days ahead falls on 5 December, 11:00 CET; the warning starts with that day in
    # Paris (4 December, 23:00 UTC), not at 10:00 UTC on the 5th in the middle of a shift.
    assert (
        expiry_warning(ALLOW_LIST, expires, datetime(2026, 12, 4, 22, 59, tzinfo=UTC), 7, paris)
        is None
    )
    warned = expiry_warning(ALLOW_LIST, expires, datetime(2026, 12, 4, 23, 0, tzinfo=UTC), 7, paris)
    assert warned is not None
    assert "2026-12-12 11:00 CET site time" in warned
    assert format_time(expires) in warned
    # Judged in UTC, the same instant is no warning yet.
    assert expiry_warning(ALLOW_LIST, expires, datetime(2026, 12, 4, 23, 0, tzinfo=UTC), 7) is None
    gone = expiry_warning(ALLOW_LIST, expires, expires, 7, paris)
    assert gone == f"allow-list EXPIRED at {format_time(expires)}, 2026-12-12 11:00 CET site time"
