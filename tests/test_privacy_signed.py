"""Signed backend documents: every acceptance rule of docs/privacy.md, one test each."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import (
    ALLOW_LIST,
    ASSET_REGISTRY,
    DocumentError,
    DocumentVerifier,
    VersionFloor,
    canonical_json,
    format_time,
)
from agent.trusted_time import ClockView
from backend.signing import allow_list_doc, asset_registry_doc, sign_document

SIGNER = Ed25519PrivateKey.generate()
OTHER_SIGNER = Ed25519PrivateKey.generate()
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ISSUED = NOW - timedelta(hours=1)
EXPIRES = NOW + timedelta(days=7)
PSEUDO = Pseudonymizer("hangar-3", "s1", bytes(32))
ALICE = PSEUDO.badge("0012ab")
BOB = PSEUDO.badge("00beef")


def verifier(cabinet_id: str = "crib-07", site_id: str = "hangar-3") -> DocumentVerifier:
    return DocumentVerifier({"sig1": SIGNER.public_key()}, site_id, cabinet_id)


def allow_list(version: int = 3, cabinet_id: str = "*", **kw: Any) -> dict[str, Any]:
    entries = kw.pop("entries", {ALICE: ["tech"], BOB: ["tech", "calibration"]})
    return allow_list_doc(
        kw.pop("site_id", "hangar-3"),
        cabinet_id,
        version,
        kw.pop("expires_at", EXPIRES),
        entries,
        issued_at=kw.pop("issued_at", ISSUED),
    )


def signed(doc: dict[str, Any], key: Ed25519PrivateKey = SIGNER, kid: str = "sig1") -> bytes:
    return sign_document(key, kid, doc)


def reason(raw: bytes, **kw: Any) -> str:
    with pytest.raises(DocumentError) as info:
        verifier(**kw.pop("v", {})).verify(
            raw, kw.pop("kind", ALLOW_LIST), kw.pop("now", NOW), **kw
        )
    return info.value.reason


def test_valid_allow_list() -> None:
    doc = verifier().verify(signed(allow_list()), ALLOW_LIST, NOW)
    assert doc.kind == ALLOW_LIST
    assert (doc.site_id, doc.cabinet_id, doc.version, doc.kid) == ("hangar-3", "*", 3, "sig1")
    assert doc.issued_at == ISSUED
    assert doc.expires_at == EXPIRES
    assert doc.body["entries"][BOB] == ("calibration", "tech")
    assert len(doc.digest) == 64
    with pytest.raises(TypeError):
        doc.body["entries"][ALICE] = ("admin",)


def test_valid_asset_registry_for_this_cabinet() -> None:
    assets = [
        {
            "epc": "e2801160600002084b3c1a2f",
            "asset_id": "TW-20",
            "name": "torque wrench 20Nm",
            "drawer": "d1",
        },
        {"epc": "e2801160600002084b3c1a30", "asset_id": "CAL-1", "calibration_due": "2027-01-31"},
    ]
    raw = signed(asset_registry_doc("hangar-3", "crib-07", 1, EXPIRES, assets, issued_at=ISSUED))
    doc = verifier().verify(raw, ASSET_REGISTRY, NOW)
    assert doc.cabinet_id == "crib-07"
    assert [a["epc"] for a in doc.body["assets"]] == [a["epc"] for a in assets]


def test_wire_format_is_canonical_json() -> None:
    raw = signed(allow_list())
    wire = json.loads(raw)
    assert set(wire) == {"doc", "kid", "sig"}
    assert raw == canonical_json(wire)
    assert b" " not in raw
    SIGNER.public_key().verify(base64.b64decode(wire["sig"]), canonical_json(wire["doc"]))


def test_reformatted_wire_json_still_verifies() -> None:
    """Verification uses the canonical re-serialization of doc, not the bytes received."""
    wire = json.loads(signed(allow_list()))
    pretty = json.dumps(wire, indent=4, sort_keys=False).encode()
    assert verifier().verify(pretty, ALLOW_LIST, NOW).version == 3


def test_bad_signature() -> None:
    wire = json.loads(signed(allow_list()))
    sig = bytearray(base64.b64decode(wire["sig"]))
    sig[0] ^= 1
    wire["sig"] = base64.b64encode(bytes(sig)).decode()
    assert reason(json.dumps(wire).encode()) == DocumentError.BAD_SIGNATURE


def test_signed_by_another_key_under_a_trusted_kid() -> None:
    assert reason(signed(allow_list(), key=OTHER_SIGNER)) == DocumentError.BAD_SIGNATURE


def test_tampered_body() -> None:
    wire = json.loads(signed(allow_list()))
    wire["doc"]["body"]["entries"][ALICE] = ["tech", "admin"]
    assert reason(json.dumps(wire).encode()) == DocumentError.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", 99), ("expires_at", "2099-01-01T00:00:00Z"), ("cabinet_id", "crib-07")],
)
def test_tampered_envelope_fields(field: str, value: object) -> None:
    wire = json.loads(signed(allow_list()))
    wire["doc"][field] = value
    assert reason(json.dumps(wire).encode()) == DocumentError.BAD_SIGNATURE


def test_unknown_kid() -> None:
    assert reason(signed(allow_list(), key=OTHER_SIGNER, kid="sig9")) == DocumentError.UNKNOWN_KID


def test_wrong_kind() -> None:
    assert reason(signed(allow_list()), kind=ASSET_REGISTRY) == DocumentError.WRONG_KIND


def test_wrong_site() -> None:
    assert reason(signed(allow_list(site_id="hangar-4"))) == DocumentError.WRONG_SITE


def test_wrong_cabinet() -> None:
    raw = signed(allow_list(cabinet_id="crib-08"))
    assert reason(raw) == DocumentError.WRONG_CABINET
    assert verifier(cabinet_id="crib-08").verify(raw, ALLOW_LIST, NOW).cabinet_id == "crib-08"


def test_expired() -> None:
    raw = signed(allow_list())
    assert reason(raw, now=EXPIRES) == DocumentError.EXPIRED
    assert verifier().verify(raw, ALLOW_LIST, EXPIRES - timedelta(microseconds=1)).version == 3


def test_not_yet_valid_beyond_clock_skew() -> None:
    raw = signed(allow_list(issued_at=NOW + timedelta(minutes=10)))
    assert reason(raw) == DocumentError.NOT_YET_VALID
    # Within the tolerated skew (cabinets often have no RTC): accepted.
    soon = signed(allow_list(issued_at=NOW + timedelta(minutes=4)))
    assert verifier().verify(soon, ALLOW_LIST, NOW).version == 3


def test_rollback_refused() -> None:
    assert reason(signed(allow_list(version=2)), min_version=3) == DocumentError.ROLLBACK
    current = signed(allow_list(version=3))
    assert reason(signed(allow_list(version=2)), current=current) == DocumentError.ROLLBACK


def test_newer_version_accepted() -> None:
    current = signed(allow_list(version=3))
    new = verifier().verify(signed(allow_list(version=4)), ALLOW_LIST, NOW, 3, current=current)
    assert new.version == 4


def test_same_version_identical_accepted() -> None:
    current = signed(allow_list(version=3))
    redelivered = json.dumps(json.loads(current), indent=1).encode()  # same doc, other bytes
    doc = verifier().verify(redelivered, ALLOW_LIST, NOW, 3, current=current)
    assert doc.version == 3
    assert doc.digest == verifier().verify(current, ALLOW_LIST, NOW).digest


def test_same_version_different_refused() -> None:
    current = signed(allow_list(version=3))
    other = signed(allow_list(version=3, entries={ALICE: ["tech"]}))
    assert reason(other, min_version=3, current=current) == DocumentError.CONFLICT


def test_persisted_version_floor_refuses_rollback_and_conflict_without_current() -> None:
    """The floor outlives the installed document: no rollback even after it was dropped."""
    v3 = verifier().verify(signed(allow_list(version=3)), ALLOW_LIST, NOW)
    floor = VersionFloor(v3.version, v3.digest)
    assert reason(signed(allow_list(version=2)), floor=floor) == DocumentError.ROLLBACK
    other = signed(allow_list(version=3, entries={ALICE: ["tech"]}))
    assert reason(other, floor=floor) == DocumentError.CONFLICT
    same = verifier().verify(signed(allow_list(version=3)), ALLOW_LIST, NOW, floor=floor)
    assert same.digest == v3.digest
    assert verifier().verify(signed(allow_list(version=4)), ALLOW_LIST, NOW, floor=floor)


def test_rollback_is_judged_before_the_clock() -> None:
    """At a 1970 wall clock an old document is a rollback, not merely 'not yet valid'."""
    v3 = verifier().verify(signed(allow_list(version=3)), ALLOW_LIST, NOW)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    old = signed(allow_list(version=2))
    assert reason(old, now=epoch, floor=VersionFloor(3, v3.digest)) == DocumentError.ROLLBACK


def test_untrusted_clock_is_a_lower_bound_not_a_refusal() -> None:
    """A clock known to lag does not refuse a newer document as not yet valid; expiry holds."""
    lagging = NOW - timedelta(days=3)
    raw = signed(allow_list())
    assert reason(raw, now=lagging) == DocumentError.NOT_YET_VALID
    doc = verifier().verify(raw, ALLOW_LIST, lagging, clock_trusted=False)
    assert doc.version == 3
    assert reason(raw, now=EXPIRES, clock_trusted=False) == DocumentError.EXPIRED


def test_authenticate_checks_signature_and_addressing_but_not_time() -> None:
    raw = signed(allow_list(issued_at=NOW + timedelta(days=1), expires_at=NOW + timedelta(days=2)))
    assert verifier().authenticate(raw, ALLOW_LIST).version == 3
    wire = json.loads(raw)
    wire["doc"]["version"] = 4
    with pytest.raises(DocumentError) as info:
        verifier().authenticate(json.dumps(wire).encode(), ALLOW_LIST)
    assert info.value.reason == DocumentError.BAD_SIGNATURE
    with pytest.raises(DocumentError) as info:
        verifier(cabinet_id="crib-09").authenticate(
            signed(allow_list(cabinet_id="crib-08")), ALLOW_LIST
        )
    assert info.value.reason == DocumentError.WRONG_CABINET


def test_builders_refuse_what_the_cabinet_refuses() -> None:
    """The builders run the cabinet's own body models: no asset without an asset_id."""
    with pytest.raises(ValueError, match="asset_id"):
        asset_registry_doc("hangar-3", "*", 1, EXPIRES, [{"epc": "ab"}], issued_at=ISSUED)
    with pytest.raises(ValueError, match="calibration_due"):
        asset_registry_doc(
            "hangar-3",
            "*",
            1,
            EXPIRES,
            [{"epc": "ab", "asset_id": "A", "calibration_due": "2026-02-30"}],
            issued_at=ISSUED,
        )
    long_epc = "ab" * 64  # the longest EPC the cabinet accepts can also be signed
    doc = asset_registry_doc(
        "hangar-3", "*", 1, EXPIRES, [{"epc": long_epc, "asset_id": "A"}], issued_at=ISSUED
    )
    assert doc["body"]["assets"][0]["epc"] == long_epc


def test_doc_cannot_be_signed_with_floats_or_unknown_fields() -> None:
    doc = allow_list()
    with pytest.raises(ValueError, match="float"):
        sign_document(SIGNER, "sig1", {**doc, "body": {"x": 1.5}})
    with pytest.raises(DocumentError, match="unknown"):
        sign_document(SIGNER, "sig1", {**doc, "extra": 1})


def _sign_raw(doc: object) -> bytes:
    sig = base64.b64encode(SIGNER.sign(canonical_json(doc))).decode()
    return canonical_json({"doc": doc, "kid": "sig1", "sig": sig})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"doc":{},"kid":"sig1"}',
        b'{"doc":{},"kid":"sig1","sig":"AAAA"}',
        b'{"doc":{},"kid":"sig1","sig":"' + b"A" * 86 + b'==","extra":1}',
        b'{"doc":{"a":1.5},"kid":"sig1","sig":"' + b"A" * 86 + b'=="}',
        b'{"doc":{"a":NaN},"kid":"sig1","sig":"' + b"A" * 86 + b'=="}',
        b'{"doc":{"a":1,"a":2},"kid":"sig1","sig":"' + b"A" * 86 + b'=="}',
        b'{"doc":{"a":"\\ud800"},"kid":"sig1","sig":"' + b"A" * 86 + b'=="}',
        b'{"doc":{"a":9007199254740993},"kid":"sig1","sig":"' + b"A" * 86 + b'=="}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_malformed_wire(raw: bytes) -> None:
    assert reason(raw) == DocumentError.MALFORMED


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("body"),
        lambda d: d.update(version="3"),
        lambda d: d.update(version=-1),
        lambda d: d.update(version=True),
        lambda d: d.update(body=[]),
        lambda d: d.update(issued_at="2026-11-29 12:00:00"),
        lambda d: d.update(expires_at="2026-11-29T12:00:00+01:00"),
        lambda d: d.update(expires_at=d["issued_at"]),
    ],
)
def test_malformed_but_validly_signed_doc(mutate: Any) -> None:
    doc = allow_list()
    mutate(doc)
    assert reason(_sign_raw(doc)) == DocumentError.MALFORMED


def test_oversized_document_refused_before_parsing() -> None:
    assert reason(b" " * (4 * 1024 * 1024 + 1)) == DocumentError.MALFORMED


def test_builders_validate_their_input() -> None:
    with pytest.raises(ValueError, match="pseudonyms"):
        allow_list(entries={"0012AB": ["tech"]})
    with pytest.raises(ValueError, match="not one string"):
        allow_list(entries={ALICE: "tech"})
    with pytest.raises(ValueError, match="roles"):
        allow_list(entries={ALICE: ["Tech Lead"]})
    with pytest.raises(ValueError, match="epc"):
        asset_registry_doc("hangar-3", "*", 1, EXPIRES, [{"name": "x"}], issued_at=ISSUED)
    with pytest.raises(ValueError, match="twice"):
        asset_registry_doc(
            "hangar-3", "*", 1, EXPIRES, [{"epc": "ab"}, {"epc": "ab"}], issued_at=ISSUED
        )
    with pytest.raises(ValueError, match="after"):
        allow_list(expires_at=ISSUED)


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verifier().verify(signed(allow_list()), ALLOW_LIST, datetime(2026, 11, 29))


def test_error_messages_carry_no_badge_pseudonyms_or_body() -> None:
    wire = json.loads(signed(allow_list()))
    wire["doc"]["body"]["entries"][ALICE] = ["admin"]
    with pytest.raises(DocumentError) as info:
        verifier().verify(json.dumps(wire).encode(), ALLOW_LIST, NOW)
    assert ALICE not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_only_document_error(raw: bytes) -> None:
    with pytest.raises(DocumentError):
        verifier().verify(raw, ALLOW_LIST, NOW)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(max_codepoint=127), max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("abc"), inner),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_any_json_body_round_trips(body: dict[str, Any]) -> None:
    doc = allow_list()
    doc["body"] = body
    verified = verifier().verify(_sign_raw(doc), ALLOW_LIST, NOW)
    assert canonical_json(verified.body) == canonical_json(body)


def test_format_time() -> None:
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert (
        format_time(datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)) == "2026-01-02T03:04:05.5Z"
    )


def test_non_canonical_base64_signature_refused() -> None:
    wire = json.loads(signed(allow_list()))
    sig = wire["sig"]
    assert sig.endswith("==")
    # The last data character carries 4 unused bits: flip one and the bytes decode the same.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + "=="
    assert base64.b64decode(twin) == base64.b64decode(sig)
    wire["sig"] = twin
    assert reason(json.dumps(wire).encode()) == DocumentError.MALFORMED


VALID_WIRE = signed(allow_list())


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID_WIRE) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_refused(index: int, flip: int) -> None:
    tampered = bytearray(VALID_WIRE)
    tampered[index] ^= flip
    with pytest.raises(DocumentError):
        verifier().verify(bytes(tampered), ALLOW_LIST, NOW)


def _hand_signed(issued_at: str, expires_at: str) -> bytes:
    """Signed as given: ``sign_document`` itself refuses to sign absurd times."""
    doc = {**allow_list(), "issued_at": issued_at, "expires_at": expires_at}
    canonical = canonical_json(doc)
    sig = base64.b64encode(SIGNER.sign(canonical)).decode()
    return canonical_json({"doc": doc, "kid": "sig1", "sig": sig})


@pytest.mark.parametrize(
    ("issued", "expires"),
    [
        ("0001-01-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        ("2024-12-31T23:59:59Z", "2026-12-01T00:00:00Z"),
        ("2026-11-29T11:00:00Z", "2200-01-01T00:00:00Z"),
        ("9999-12-31T23:56:00Z", "9999-12-31T23:59:59Z"),
    ],
)
def test_rule_4_absurd_times_are_malformed(issued: str, expires: str) -> None:
    raw = _hand_signed(issued, expires)
    assert reason(raw) == DocumentError.MALFORMED
    assert reason(raw, clock_trusted=False) == DocumentError.MALFORMED
    with pytest.raises(DocumentError):
        verifier().authenticate(raw, ALLOW_LIST)
    with pytest.raises(ValueError):
        signed({**allow_list(), "issued_at": issued, "expires_at": expires})


def test_rule_10_an_untrusted_clock_allows_max_ahead_not_more() -> None:
    raw = signed(allow_list())
    assert verifier().verify(raw, ALLOW_LIST, ISSUED - timedelta(days=366), clock_trusted=False)
    assert (
        reason(raw, now=ISSUED - timedelta(days=367), clock_trusted=False)
        == DocumentError.NOT_YET_VALID
    )


def test_rule_10_a_newer_document_signed_by_the_wall_clocks_reckoning_corroborates_it() -> None:
    """Untrusted wall clock at NOW, the agent's time a year ahead (set by a wrong clock)."""
    wrong = ClockView(NOW + timedelta(days=365), trusted=False, wall=NOW)
    fresh = signed(allow_list(issued_at=NOW - timedelta(minutes=1)))
    admitted = verifier().admit(fresh, ALLOW_LIST, wrong)
    assert admitted.corroborates
    assert admitted.at == NOW, "judged against the wall clock: not expired"
    with pytest.raises(DocumentError) as info:
        # Not newer than the installed version: judged against the agent's time, expired.
        verifier().admit(fresh, ALLOW_LIST, wrong, floor=VersionFloor(3, admitted.doc.digest))
    assert info.value.reason == DocumentError.EXPIRED
    old = signed(allow_list(version=4, issued_at=NOW - timedelta(hours=1)))
    assert not verifier().admit(old, ALLOW_LIST, ClockView(NOW, False, NOW)).corroborates
