"""The domain's parts on their own: config, scan accumulator and diff, allow-list, asset registry."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.config import parse_config
from agent.domain import events as ev
from agent.domain.access import AccessControl, AllowList, AllowListError, Role
from agent.domain.assets import AssetRegistry, AssetRegistryError
from agent.domain.config import CabinetDomainConfig
from agent.domain.inventory import Baseline, ScanAccumulator, diff
from agent.domain.now import Now
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import ALLOW_LIST, ASSET_REGISTRY, DocumentVerifier
from backend.signing import allow_list_doc, asset_registry_doc, sign_document
from drivers.types import ReaderHealth, ReaderState, SystemClock, TagRead
from tests.domain_harness import ALICE, AUDITOR, BOB, MALLORY, SUPER, T0, allow_list

# ---- config ------------------------------------------------------------------------------------

CFG = CabinetDomainConfig(
    drawers={"top": ["r1:1", "r1:2"], "low": ["r1:3", "r2:1"]},
    min_reads=3,
    rssi_floor_dbm=-70,
    rssi_floor_overrides={"r2:1": -60},
    max_tags=5,
)
ANTENNAS = CFG.antenna_map()


def test_config_defaults_and_agent_config_field() -> None:
    cfg = parse_config(
        {
            "cabinet": {"site_id": "s", "cabinet_id": "c"},
            "readers": [{"type": "llrp", "id": "dock-1", "host": "127.0.0.1"}],
        }
    )
    assert cfg.domain == CabinetDomainConfig()
    assert cfg.domain.antenna_map({"dock-1": [1, 2]}) == {
        ("dock-1", 1): "dock-1.1",
        ("dock-1", 2): "dock-1.2",
    }
    assert ANTENNAS == {("r1", 1): "top", ("r1", 2): "top", ("r1", 3): "low", ("r2", 1): "low"}
    assert CFG.rssi_floor("r2", 1) == -60
    assert CFG.rssi_floor("r1", 1) == -70


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"drawers": {"top": ["r1-1"]}}, 'not "reader:port"'),
        ({"drawers": {"top": ["r1:1"], "low": ["r1:1"]}}, "is in drawers"),
        ({"drawers": {"top": []}}, "has no antennas"),
        ({"drawers": {"bad name": ["r1:1"]}}, "drawer name"),
        ({"scan_min_ms": 5000, "scan_max_ms": 1000}, "scan_max_ms"),
        ({"rssi_floor_overrides": {"x": -50}}, "rssi_floor_overrides"),
        ({"min_reads": 0}, "min_reads"),
        ({"stable_msec": 100}, "stable_msec"),
    ],
)
def test_config_errors_name_the_problem(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        CabinetDomainConfig.model_validate(data)


def test_drawers_are_checked_against_the_configured_readers() -> None:
    assert CFG.check_readers({"r1": [1, 2, 3], "r2": [1]}) == []
    assert CFG.check_readers({"r1": [1, 2, 4]}) == [
        "domain.drawers.low: antenna 3 is not in reader 'r1''s antennas",
        "domain.drawers.low: reader 'r2' is not configured",
        "domain.drawers: antenna r1:4 is in use but in no drawer",
    ]
    assert CabinetDomainConfig().check_readers({"r1": [1]}) == []  # derived drawers


def test_no_drawers_and_no_readers_is_an_error() -> None:
    with pytest.raises(ValueError, match="no drawers"):
        CabinetDomainConfig().antenna_map()


# ---- scan accumulator ----------------------------------------------------------------------


def _healthy(rid: str, session: int = 1, ants: frozenset[int] | None = None) -> ReaderHealth:
    return ReaderHealth(rid, ReaderState.INVENTORYING, T0, antennas_connected=ants, session=session)


HEALTH = {"r1": _healthy("r1", ants=frozenset({1, 2, 3})), "r2": _healthy("r2")}


def _read(
    epc: str, rid: str = "r1", ant: int = 1, rssi: float | None = -50.0, n: int = 1
) -> TagRead:
    return TagRead(rid, epc, ant, rssi, T0, n)


def test_presence_needs_min_reads_above_the_floor() -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=0.0)
    acc.add([_read("aa"), _read("aa")], now=1.0)
    acc.add([_read("bb", rssi=-71.0)] * 5, now=1.0)  # below the floor
    acc.add([_read("cc", rid="r2", rssi=-65.0)] * 5, now=1.0)  # below r2's own floor (-60)
    acc.add([_read("dd", n=3)], now=2.0)  # one report aggregating three reads
    acc.add([_read("ee", rssi=None), _read("ee", rssi=None), _read("ee", rssi=None)], now=1.5)
    acc.add([_read("ff", ant=4), _read("ff", rid="r9")] * 3, now=1.0)  # unconfigured antennas
    acc.add([_read("AA")] * 3, now=1.0)  # not lower-case hex
    res = acc.result(now=3.0)
    assert dict(res.present) == {"dd": "top", "ee": "top"}
    assert acc.tags_present == 2
    assert res.reads == 2 + 3 + 3
    assert acc.ignored == 5 + 5 + 6 + 3
    assert res.complete
    assert res.duration_ms == 3000
    with pytest.raises(RuntimeError, match="ended"):
        acc.add([_read("aa")], now=4.0)


def test_location_is_the_drawer_with_the_strongest_mean_rssi() -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=0.0)
    # Seen by both antennas of "top" and by "low": top's mean (-50, -60 → -55) beats low (-58).
    acc.add([_read("aa", ant=1, rssi=-50.0), _read("aa", ant=2, rssi=-60.0)] * 2, now=1.0)
    acc.add([_read("aa", ant=3, rssi=-58.0)] * 2, now=1.0)
    # Many weak reads do not beat a few strong ones.
    acc.add([_read("bb", ant=1, rssi=-69.0)] * 20 + [_read("bb", ant=3, rssi=-40.0)] * 3, now=1.0)
    assert dict(acc.result(now=2.0).present) == {"aa": "top", "bb": "low"}


def test_settle_clock_moves_only_on_new_evidence() -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=10.0)
    assert acc.last_new == 10.0
    acc.add([_read("aa")], now=11.0)  # first sight
    assert acc.last_new == 11.0
    acc.add([_read("aa")], now=12.0)  # neither new nor present yet
    assert acc.last_new == 11.0
    acc.add([_read("aa")], now=13.0)  # third read: present now
    assert acc.last_new == 13.0
    acc.add([_read("aa")] * 10, now=20.0)  # already present: no change
    assert acc.last_new == 13.0


def test_tag_limit_makes_the_pass_incomplete() -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=0.0)
    acc.add([_read(f"{i:02x}") for i in range(7)], now=1.0)
    assert not acc.complete
    assert acc.problems == ("tag limit reached",)


@pytest.mark.parametrize(
    ("start", "during", "problem"),
    [
        ({"r1": HEALTH["r1"]}, [], "r2 not connected"),
        (
            {"r1": HEALTH["r1"], "r2": ReaderHealth("r2", ReaderState.CONNECTING, T0)},
            [],
            "r2 connecting",
        ),
        (HEALTH, [ReaderHealth("r1", ReaderState.OFFLINE, T0, session=1)], "r1 offline"),
        (HEALTH, [_healthy("r2", session=2)], "r2 reconnected"),
        (HEALTH, [_healthy("r1", ants=frozenset({1, 3}))], "r1 antenna 2 disconnected"),
        ({**HEALTH, "r1": _healthy("r1", ants=frozenset({1}))}, [], "r1 antenna 2 disconnected"),
    ],
)
def test_completeness(
    start: dict[str, ReaderHealth], during: list[ReaderHealth], problem: str
) -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, start, started=0.0)
    for h in during:
        acc.health(h)
    assert not acc.complete
    assert problem in acc.problems
    assert not acc.result(1.0).complete


def test_health_of_other_readers_and_same_session_keep_the_pass_complete() -> None:
    acc = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=0.0)
    acc.health(ReaderHealth("badge-reader", ReaderState.OFFLINE, T0))
    acc.health(ReaderHealth("r1", ReaderState.ONLINE, T0, session=1))  # same connection
    acc.health(_healthy("r1", ants=None))  # "does not say" is not a loss
    assert acc.complete


def test_merge_is_a_union_with_combined_location() -> None:
    a = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=0.0)
    a.add([_read("aa", ant=1, rssi=-60.0)] * 3 + [_read("bb")] * 3, now=1.0)
    b = ScanAccumulator(CFG, ANTENNAS, HEALTH, started=5.0)
    b.add([_read("aa", ant=3, rssi=-50.0)] * 3 + [_read("cc")] * 3, now=6.0)
    merged = a.result(2.0).merge(b.result(7.0))
    assert dict(merged.present) == {"aa": "low", "bb": "top", "cc": "top"}
    assert merged.passes == 2
    assert merged.reads == 12
    assert merged.duration_ms == 4000
    assert merged.complete


def test_diff_and_baseline() -> None:
    base = Baseline({"aa": "top", "bb": "top", "cc": "low"})
    d = diff(base, {"aa": "top", "cc": "top", "dd": "low"})
    assert d.missing == {"bb": "top"}
    assert d.new == {"dd": "low"}
    assert d.moved == {"cc": ("low", "top")}
    missing, new, moved = d  # also a plain tuple
    assert (missing, new, moved) == (d.missing, d.new, d.moved)
    assert base.by_drawer() == {"low": 1, "top": 2}
    assert Baseline.from_dict(base.to_dict()) == base
    assert base == {"aa": "top", "bb": "top", "cc": "low"}
    assert base.digest() == Baseline({"cc": "low", "bb": "top", "aa": "top"}).digest()
    assert base.digest() != Baseline({"aa": "top"}).digest()
    for bad in ([], {"AA": "top"}, {"aa": 3}, {"aa": "no drawer!"}):
        with pytest.raises(ValueError, match="baseline"):
            Baseline.from_dict(bad)


# ---- access ------------------------------------------------------------------------------------


def test_allow_list_from_a_verified_signed_document() -> None:
    key = Ed25519PrivateKey.generate()
    pz = Pseudonymizer("hangar-3", "k1", b"\x07" * 32)
    alice = pz.badge("0004123456")
    assert ev.event_adapter.validate_python(  # a real pseudonym is a valid actor
        {
            "type": "access.denied",
            "event_id": "01a22933-95c0-7341-946b-907949255679",
            "time": T0,
            "site_id": "s",
            "cabinet_id": "c",
            "actor": alice,
            "badge_reader": "front",
            "reason": "role",
        }
    )
    issued = datetime.now(UTC).replace(microsecond=0)
    doc = allow_list_doc(
        "hangar-3",
        "crib-07",
        4,
        issued + timedelta(days=7),
        {alice: ["user", "future-role"], SUPER: ["supervisor"]},
        issued_at=issued,
    )
    raw = sign_document(key, "b1", doc)
    verified = DocumentVerifier({"b1": key.public_key()}, "hangar-3", "crib-07").verify(
        raw, ALLOW_LIST, issued
    )
    al = AllowList.from_document(verified)
    assert al.version == 4
    assert al.roles(alice) == {Role.USER}
    assert al.unknown_roles == {"future-role"}
    assert al.roles(SUPER) == {Role.SUPERVISOR}
    assert not al.expired(issued)
    assert al.expired(issued + timedelta(days=7))


def test_pseudonym_pattern_agrees_with_the_privacy_module() -> None:
    import re

    from agent.privacy.pseudonym import is_pseudonym

    pz = Pseudonymizer("hangar-3", "site-key_2", b"\x01" * 32)
    samples = [pz.badge(f"{i:010d}") for i in range(50)]
    samples += [ALICE, "unknown", "0004123456", "p1.k1." + "a" * 25, "p1.K1." + "a" * 26]
    for s in samples:
        assert bool(re.fullmatch(ev.PSEUDONYM_PATTERN, s)) == is_pseudonym(s), s


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "entries"),
        ({"entries": []}, "entries"),
        ({"entries": {"0004123456": ["user"]}}, "not a badge pseudonym"),
        ({"entries": {ALICE: "user"}}, "list of strings"),
        ({"entries": {ALICE: [1]}}, "must be strings"),
    ],
)
def test_allow_list_errors_never_echo_a_raw_id(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(AllowListError, match=needle) as info:
        AllowList.from_body(1, T0 + timedelta(days=1), body)
    assert "0004123456" not in str(info.value)


def test_access_decisions() -> None:
    ac = AccessControl(CabinetDomainConfig(), allow_list())
    assert ac.decide(ALICE, T0).granted
    assert ac.decide(SUPER, T0).granted
    assert ac.decide(AUDITOR, T0).reason == "role"
    assert ac.decide(MALLORY, T0).reason == "unknown badge"
    assert ac.decide(BOB, T0 + timedelta(days=30)).reason == "allow-list expired"
    ac.allow_list = None
    assert ac.decide(ALICE, T0).reason == "no allow-list"


def test_lockout_window_is_sliding() -> None:
    cfg = CabinetDomainConfig(lockout_denials=3, lockout_window_s=60, lockout_duration_s=100)
    ac = AccessControl(cfg, allow_list())
    now = Now(T0, 0.0)
    outcomes = []
    for t in (0, 30, 61, 80):  # the first denial has left the window by the third
        outcomes.append(ac.badge("front", MALLORY, Now(T0, float(t))))
    assert [o.lockout.state if o.lockout else None for o in outcomes] == [
        None,
        None,
        None,
        "locked",
    ]
    assert ac.locked_out("front")
    assert ac.next_deadline() == 180.0
    assert ac.tick(Now(T0, 179.9)) == []
    assert [c.state for c in ac.tick(Now(T0, 180.0))] == ["expired"]
    assert not ac.locked_out("front")
    assert now.mono == 0.0


# ---- assets ------------------------------------------------------------------------------------


def test_asset_registry_from_a_signed_document_body() -> None:
    issued = datetime.now(UTC).replace(microsecond=0)
    doc = asset_registry_doc(
        "hangar-3",
        "crib-07",
        1,
        issued + timedelta(days=1),
        [
            {"epc": "e20001", "asset_id": "TQ-1", "name": "torque wrench", "home_drawer": "top"},
            {"epc": "e20002", "asset_id": "CAL-2", "calibration_due": "2026-03-01"},
        ],
        issued_at=issued,
    )
    key = Ed25519PrivateKey.generate()
    verified = DocumentVerifier({"b1": key.public_key()}, "hangar-3", "crib-07").verify(
        sign_document(key, "b1", doc), ASSET_REGISTRY, issued
    )
    reg = AssetRegistry.from_body(verified.body)
    assert len(reg) == 2
    wrench = reg.get("e20001")
    assert wrench is not None
    assert wrench.misplaced_in("low")
    assert not wrench.misplaced_in("top")
    assert not wrench.calibration_overdue(date(2100, 1, 1))
    cal = reg.get("e20002")
    assert cal is not None
    assert not cal.misplaced_in("anywhere")  # no home drawer
    assert not cal.calibration_overdue(date(2026, 3, 1))  # due today: still fine
    assert cal.calibration_overdue(date(2026, 3, 2))
    assert "e20003" not in reg


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "'assets' list"),
        ({"assets": "x"}, "'assets' list"),
        ({"assets": [3]}, "must be an object"),
        ({"assets": [{"asset_id": "a"}]}, "'epc'"),
        ({"assets": [{"epc": "aa"}]}, "'asset_id'"),
        ({"assets": [{"epc": "aa", "asset_id": "a", "home_drawer": "x y"}]}, "home_drawer"),
        ({"assets": [{"epc": "aa", "asset_id": "a", "calibration_due": "soon"}]}, "YYYY"),
        ({"assets": [{"epc": "aa", "asset_id": "a"}, {"epc": "aa", "asset_id": "b"}]}, "twice"),
    ],
)
def test_asset_registry_errors(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(AssetRegistryError, match=needle):
        AssetRegistry.from_body(body)


# ---- time --------------------------------------------------------------------------------------


def test_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        Now(datetime(2026, 1, 1), 0.0)
    n = Now.of(SystemClock())
    assert n.wall.tzinfo is UTC
    later = n.after(1.5)
    assert later.mono == n.mono + 1.5
    assert later.wall - n.wall == timedelta(seconds=1.5)
