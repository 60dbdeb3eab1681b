"""TIDs in the engine: an item pinned to its TID, a cloned tag (same EPC, other TID) is
``item.counterfeit`` — never a return — and a reader that reads no TID is judged as before."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry, AssetRegistryError
from backend.record.recorder import alert_effects
from backend.signing import asset_registry_doc
from drivers.types import TagRead
from tests.domain_harness import ALICE, BOB, DRAWER_ANTENNA, Cabinet, Tag, epc

TID_TQ = "e2801160200074cf0a6b0a12"  # the torque wrench's own tag
TID_CAL = "e2801160200074cf0a6b0b34"
TID_CLONE = "e28011052000a1b2c3d4e5f6"  # another chip, programmed with the wrench's EPC


def _registry() -> AssetRegistry:
    return AssetRegistry(
        [
            Asset(epc(0), "TQ-100", "torque wrench", "top", tid=TID_TQ),
            Asset(epc(1), "CAL-7", "caliper", "top", tid=TID_CAL),
            Asset(epc(2), "MM-3", "multimeter", "bottom"),  # not pinned
        ]
    )


@dataclass
class TidCabinet(Cabinet):
    """The harness cabinet whose reader reads TIDs: each tag answers with its own, and clones
    (EPC → drawer, TID) answer beside them with the same EPC."""

    tids: dict[str, str] = field(default_factory=dict)
    clones: dict[str, tuple[str, str]] = field(default_factory=dict)
    reads_tid: bool = True

    def _read_round(self) -> list[TagRead]:
        reads = super()._read_round()
        if not self.reads_tid:
            return reads
        out = [replace(r, tid=self.tids.get(r.epc)) for r in reads]
        for e, (drawer, tid) in self.clones.items():
            rid, ant = DRAWER_ANTENNA[drawer]
            # Clones read stronger than the stock: their reads would pull the EPC their way.
            out.append(TagRead(rid, e, ant, -40.0, self.now.wall, tid=tid))
        return out


def _cabinet(*, with_wrench: bool = True, reads_tid: bool = True) -> TidCabinet:
    tags = {epc(1): Tag("top"), epc(2): Tag("bottom")}
    if with_wrench:
        tags[epc(0)] = Tag("top")
    return TidCabinet(
        tags=tags,
        assets=_registry(),
        tids={epc(0): TID_TQ, epc(1): TID_CAL},
        reads_tid=reads_tid,
    )


def test_clone_put_back_is_counterfeit_not_a_return() -> None:
    c = _cabinet(with_wrench=False)  # Alice holds the wrench
    c.badge(BOB)
    c.advance(1.0)
    c.open()
    c.advance(2.0)
    c.clones[epc(0)] = ("top", TID_CLONE)
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge bob",
        "item.counterfeit 000 top tid=e5f6 bob",
        "session.closed complete out=0 in=0 bob",
    ]
    fake = c.events[1]
    assert isinstance(fake, ev.ItemCounterfeit)
    assert (fake.asset_id, fake.tid) == ("TQ-100", TID_CLONE)
    assert epc(0) not in c.baselines[-1]
    # Reported once while the clone stays: the next cycle says nothing of it.
    start = len(c.events)
    c.cycle(ALICE)
    assert c.brief(start) == [
        "session.opened badge alice",
        "session.closed complete out=0 in=0 alice",
    ]
    # The real wrench comes back beside the clone: that one is a return.
    start = len(c.events)
    c.cycle(ALICE, put={epc(0): "top"})
    assert c.brief(start) == [
        "session.opened badge alice",
        "item.returned 000 top alice",
        "session.closed complete out=0 in=1 alice",
    ]


def test_item_swapped_for_a_clone_is_checked_out_and_counterfeit() -> None:
    c = _cabinet()
    c.badge(BOB)
    c.advance(1.0)
    c.open()
    c.advance(2.0)
    del c.tags[epc(0)]
    c.clones[epc(0)] = ("top", TID_CLONE)
    c.close()
    c.settle()
    assert c.brief() == [
        "session.opened badge bob",
        "item.checked_out 000 top bob",
        "item.counterfeit 000 top tid=e5f6 bob",
        "session.closed complete out=1 in=0 bob",
    ]


def test_clone_beside_the_item_leaves_the_item_in() -> None:
    c = _cabinet()
    c.clones[epc(0)] = ("bottom", TID_CLONE)
    c.cycle(BOB)
    assert c.brief() == [
        "session.opened badge bob",
        # Where the clone is, not where the EPC reads strongest overall.
        "item.counterfeit 000 bottom tid=e5f6 bob",
        "session.closed complete out=0 in=0 bob",
    ]
    # The item stays, where its own tag is (not moved, not misplaced by the clone's reads).
    assert c.baselines[-1][epc(0)] == "top"


def test_reader_without_tid_judges_pinned_items_by_epc() -> None:
    # The documented rule: no TID read, no TID judgement — a pinned item is handled as today.
    c = _cabinet(with_wrench=False, reads_tid=False)
    c.cycle(ALICE, put={epc(0): "top"})
    assert c.brief() == [
        "session.opened badge alice",
        "item.returned 000 top alice",
        "session.closed complete out=0 in=1 alice",
    ]


def test_unpinned_item_with_any_tid_is_itself() -> None:
    c = _cabinet()
    c.tids[epc(2)] = TID_CLONE  # the multimeter has no pin: its TID proves nothing
    c.cycle(ALICE, take=[epc(2)])
    c.cycle(ALICE, put={epc(2): "bottom"})
    assert [e.type for e in c.events if e.type.startswith("item.")] == [
        "item.checked_out",
        "item.returned",
    ]


def test_background_inventory_finds_a_clone_without_actors() -> None:
    c = _cabinet()
    c.engine.distrust_baseline(c.now)  # verify at once, as after a store recovery
    c.clones[epc(1)] = ("bottom", TID_CLONE)
    c.advance(0.1)  # the verification pass starts at the next tick
    c.settle()
    fake = [e for e in c.events if isinstance(e, ev.ItemCounterfeit)]
    assert len(fake) == 1
    assert (fake[0].epc, fake[0].actors, fake[0].session_id) == (epc(1), None, None)
    assert "inventory.snapshot" in c.types()


def test_clone_memory_survives_a_restart() -> None:
    c = _cabinet()
    c.clones[epc(0)] = ("top", TID_CLONE)
    c.cycle(BOB)
    assert c.types().count("item.counterfeit") == 1
    c.restart()
    start = len(c.events)
    c.cycle(ALICE)
    assert "item.counterfeit" not in c.types(start)
    # Once the clone is gone and the EPC is read with its own TID only, it is forgotten: a
    # clone coming back is reported again.
    del c.clones[epc(0)]
    c.cycle(ALICE)
    c.clones[epc(0)] = ("top", TID_CLONE)
    start = len(c.events)
    c.cycle(ALICE)
    assert c.types(start).count("item.counterfeit") == 1


def test_malformed_tid_on_a_read_is_ignored_not_the_read() -> None:
    c = _cabinet(with_wrench=False)
    c.tids[epc(0)] = "not-a-tid"
    c.cycle(ALICE, put={epc(0): "top"})
    assert "item.returned 000 top alice" in c.brief()


@pytest.mark.parametrize(
    ("read", "genuine", "foreign"),
    [
        ([TID_TQ], True, ()),
        ([TID_TQ + "0001"], True, ()),  # more words read than pinned
        ([TID_TQ[:8]], False, ()),  # a shorter read that agrees proves nothing
        ([TID_CLONE], False, (TID_CLONE,)),
        (["e2801170"], False, ("e2801170",)),  # shorter, but already different
        ([TID_TQ, TID_CLONE], True, (TID_CLONE,)),
        ([], False, ()),
    ],
)
def test_tid_verdict(read: list[str], genuine: bool, foreign: tuple[str, ...]) -> None:
    asset = Asset(epc(0), "TQ-100", tid=TID_TQ)
    verdict = asset.tid_verdict(read)
    assert (verdict.genuine, verdict.foreign) == (genuine, foreign)


@pytest.mark.parametrize(
    ("tid", "problem"),
    [
        ("E2801160200074CF0A6B0A12", "'tid' must be lower-case hex"),
        ("e28011", "'tid' must be lower-case hex"),  # not whole words
        ("e280", "'tid' must be lower-case hex"),  # one word identifies no chip
        ("e2" * 130, "'tid' must be lower-case hex"),
        (12, "'tid' must be lower-case hex"),
    ],
)
def test_registry_refuses_a_malformed_pin(tid: object, problem: str) -> None:
    body = {"assets": [{"epc": epc(0), "asset_id": "TQ-100", "tid": tid}]}
    with pytest.raises(AssetRegistryError, match=problem):
        AssetRegistry.from_body(body)


def test_registry_refuses_one_tid_pinned_twice() -> None:
    body = {
        "assets": [
            {"epc": epc(0), "asset_id": "TQ-100", "tid": TID_TQ},
            {"epc": epc(1), "asset_id": "CAL-7", "tid": TID_TQ},
        ]
    }
    with pytest.raises(AssetRegistryError, match="pinned twice"):
        AssetRegistry.from_body(body)
    ok = AssetRegistry.from_body({"assets": [body["assets"][0]]})
    asset = ok.get(epc(0))
    assert asset is not None
    assert asset.tid == TID_TQ


def test_the_backend_record_raises_an_alert_per_clone() -> None:
    c = _cabinet()
    c.clones[epc(0)] = ("bottom", TID_CLONE)
    c.cycle(BOB)
    (fake,) = [e for e in c.events if isinstance(e, ev.ItemCounterfeit)]
    raised, cleared = alert_effects(fake)
    assert raised == [
        (
            f"item.counterfeit:{epc(0)}:{TID_CLONE}",
            f"a tag with TQ-100's EPC but TID {TID_CLONE} in drawer bottom",
        )
    ]
    assert cleared == []


def test_the_backend_cannot_sign_a_registry_the_cabinet_refuses() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    pinned = [
        {"epc": epc(0), "asset_id": "TQ-100", "tid": TID_TQ},
        {"epc": epc(1), "asset_id": "CAL-7", "tid": TID_TQ},  # one chip, two items
    ]
    with pytest.raises(ValueError, match="pinned twice"):
        asset_registry_doc("hangar-3", "crib-07", 1, now + timedelta(days=1), pinned, issued_at=now)
    doc = asset_registry_doc(
        "hangar-3", "crib-07", 1, now + timedelta(days=1), pinned[:1], issued_at=now
    )
    assert doc["body"]["assets"][0]["tid"] == TID_TQ


def test_a_clone_put_in_during_a_technician_session_is_counterfeit_not_a_restock() -> None:
    c = _cabinet(with_wrench=False)
    start = len(c.events)
    c._apply(c.engine.open_technician("uid:1000", "restock drawer 1", c.now))
    c.advance(1.0)
    c.open()
    c.advance(2.0)
    c.clones[epc(0)] = ("top", TID_CLONE)
    c.close()
    c.settle()
    types = c.types(start)
    assert "item.restocked" not in types
    assert types.count("item.counterfeit") == 1
    (fake,) = [e for e in c.events[start:] if isinstance(e, ev.ItemCounterfeit)]
    assert (fake.epc, fake.tid, fake.drawer, fake.actors) == (epc(0), TID_CLONE, "top", None)
    assert epc(0) not in c.engine.baseline


def test_a_rebaseline_reports_a_clone_and_keeps_it_out_of_the_baseline() -> None:
    c = _cabinet(with_wrench=False)
    c.clones[epc(0)] = ("top", TID_CLONE)
    start = len(c.events)
    c._apply(c.engine.rebaseline("uid:1000", "recount", c.now))
    c.settle()
    assert c.types(start).count("item.counterfeit") == 1
    assert epc(0) not in c.engine.baseline
    # Remembered: the next door cycle does not report it again.
    start = len(c.events)
    c.cycle(ALICE)
    assert "item.counterfeit" not in c.types(start)
