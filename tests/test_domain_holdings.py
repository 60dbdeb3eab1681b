"""Who holds what: returns by someone else name both people; an item out too long raises
``item.overdue`` once per check-out, from the cabinet, across restarts (fake clock)."""

from __future__ import annotations

import json

import pytest

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry, AssetRegistryError
from agent.domain.engine import CabinetEngine, EngineStateError
from tests.domain_harness import (
    ALICE,
    BOB,
    SUPER,
    Cabinet,
    Tag,
    domain_config,
    epc,
)


def stock(*drawers: str) -> dict[str, Tag]:
    return {epc(i): Tag(d) for i, d in enumerate(drawers)}


def returns(c: Cabinet, start: int = 0) -> list[ev.ItemReturned]:
    return [e for e in c.events[start:] if isinstance(e, ev.ItemReturned)]


def overdue(c: Cabinet, start: int = 0) -> list[ev.ItemOverdue]:
    return [e for e in c.events[start:] if isinstance(e, ev.ItemOverdue)]


# ---- returned by someone else ------------------------------------------------------------------


def test_a_return_by_someone_else_names_the_holder_and_the_returner() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.cycle(ALICE, take=[epc(0)])
    mark = len(c.events)
    c.cycle(BOB, put={epc(0): "top"})
    [back] = returns(c, mark)
    assert back.actors == [BOB]
    assert back.held_by == [ALICE]
    assert back.returned_by == [BOB]
    # On the wire too.
    body = json.loads(ev.to_json(back))
    assert body["held_by"] == [ALICE]
    assert body["returned_by"] == [BOB]


def test_a_return_by_the_holder_carries_no_holder_fields() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.cycle(ALICE, take=[epc(0)])
    mark = len(c.events)
    c.cycle(ALICE, put={epc(0): "top"})
    [back] = returns(c, mark)
    assert back.held_by is None
    assert back.returned_by is None


def test_a_holder_among_the_returning_session_counts_as_the_holder() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.cycle(ALICE, take=[epc(0)])
    mark = len(c.events)
    c.badge(BOB)
    c.advance(0.5)
    c.badge(ALICE)
    c.advance(0.5)
    c.open()
    c.advance(2.0)
    c.tags[epc(0)] = Tag("top")
    c.close()
    c.settle()
    [back] = returns(c, mark)
    assert back.actors == [BOB, ALICE]
    assert back.held_by is None


def test_a_return_of_an_item_never_checked_out_here_has_no_holder() -> None:
    c = Cabinet(tags=stock("top"))
    c.cycle(BOB, put={epc(7): "bottom"})
    [back] = returns(c)
    assert back.held_by is None


def test_a_second_check_out_has_its_own_holder() -> None:
    c = Cabinet(tags=stock("top", "bottom"))
    c.cycle(ALICE, take=[epc(0)])
    c.cycle(ALICE, put={epc(0): "top"})
    c.cycle(SUPER, take=[epc(0)])
    mark = len(c.events)
    c.cycle(BOB, put={epc(0): "top"})
    [back] = returns(c, mark)
    assert back.held_by == [SUPER]


# ---- overdue -----------------------------------------------------------------------------------


def test_an_item_out_longer_than_the_default_limit_is_overdue_once() -> None:
    c = Cabinet(tags=stock("top", "bottom"), config=domain_config(overdue_after_s=3600))
    c.cycle(ALICE, take=[epc(1)])
    [out] = [e for e in c.events if isinstance(e, ev.ItemCheckedOut)]
    taken_mono = c.now.mono  # the check-out was committed at the end of the cycle
    c.advance(3600 - 0.2 - (c.now.mono - taken_mono))
    assert overdue(c) == []
    c.advance(0.3)
    [late] = overdue(c)
    assert late.held_by == [ALICE]
    assert late.epc == epc(1)
    assert late.drawer == "bottom"
    assert late.session_id == out.session_id
    assert late.checked_out_at == out.time
    assert late.limit_s == 3600
    assert late.out_s == pytest.approx(3600, abs=0.2)
    assert ev.priority(late) == ev.PRIORITY_NORMAL
    c.advance(600)
    assert len(overdue(c)) == 1  # once per check-out, never repeated


def test_a_per_asset_limit_wins_and_zero_means_never() -> None:
    registry = AssetRegistry(
        [
            Asset(epc(0), "TW-1", "wrench", overdue_after_s=60.0),
            Asset(epc(1), "KEY-9", "key", overdue_after_s=0.0),  # never overdue
            Asset(epc(2), "MM-3", "multimeter"),  # the default
        ]
    )
    c = Cabinet(
        tags=stock("top", "top", "bottom"),
        assets=registry,
        config=domain_config(overdue_after_s=600),
    )
    c.cycle(ALICE, take=[epc(0), epc(1), epc(2)])
    c.advance(61)
    assert [(e.asset_id, e.limit_s) for e in overdue(c)] == [("TW-1", 60.0)]
    c.advance(600)
    assert [(e.asset_id, e.limit_s) for e in overdue(c)] == [("TW-1", 60.0), ("MM-3", 600.0)]
    c.advance(1200)
    assert len(overdue(c)) == 2


def test_no_overdue_for_an_item_returned_in_time_and_none_when_the_default_is_off() -> None:
    c = Cabinet(tags=stock("top", "bottom"), config=domain_config(overdue_after_s=600))
    c.cycle(ALICE, take=[epc(0)])
    c.advance(100)
    c.cycle(BOB, put={epc(0): "top"})
    c.advance(3600)
    assert overdue(c) == []

    off = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=0))
    off.cycle(ALICE, take=[epc(0)])
    off.advance(1800)  # past every limit the other tests use
    assert overdue(off) == []


def test_a_return_after_the_alert_is_an_ordinary_return() -> None:
    c = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=60))
    c.cycle(ALICE, take=[epc(0)])
    c.advance(61)
    assert len(overdue(c)) == 1
    mark = len(c.events)
    c.cycle(BOB, put={epc(0): "top"})
    [back] = returns(c, mark)
    assert (back.held_by, back.returned_by) == ([ALICE], [BOB])
    c.advance(3600)
    assert len(overdue(c)) == 1


def test_the_overdue_timer_survives_a_restart_and_counts_the_downtime() -> None:
    c = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=600))
    c.cycle(ALICE, take=[epc(0)])
    c.advance(100)
    c.restart(downtime_s=400)  # ~500 s out when it comes back: 100 s to go
    c.advance(90)
    assert overdue(c) == []
    c.advance(20)
    [late] = overdue(c)
    assert late.held_by == [ALICE]
    assert late.out_s == pytest.approx(600, abs=1.0)


def test_a_restart_after_the_alert_does_not_repeat_it() -> None:
    c = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=60))
    c.cycle(ALICE, take=[epc(0)])
    c.advance(61)
    assert len(overdue(c)) == 1
    c.restart(downtime_s=30)
    c.advance(120)
    c.restart(downtime_s=86_400)
    c.advance(10)
    assert len(overdue(c)) == 1
    # ... and the holder is still known after the restarts.
    mark = len(c.events)
    c.cycle(BOB, put={epc(0): "top"})
    assert returns(c, mark)[0].held_by == [ALICE]


def test_an_overdue_falling_due_while_down_is_raised_at_restart() -> None:
    c = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=60))
    c.cycle(ALICE, take=[epc(0)])
    c.restart(downtime_s=3600)
    c.advance(0.1)
    [late] = overdue(c)
    assert late.out_s >= 3600


def test_an_item_found_back_without_a_return_ends_its_holding_silently() -> None:
    c = Cabinet(tags=stock("top", "bottom"), config=domain_config(overdue_after_s=600))
    c.cycle(ALICE, take=[epc(0)])
    # The store lost cycles: the next session re-establishes the baseline, blaming nobody.
    c.engine.distrust_baseline(c.now)
    c.cycle(BOB, put={epc(0): "top"})
    assert returns(c) == []
    c.advance(3600)
    assert overdue(c) == []


def test_persisted_holdings_are_validated() -> None:
    c = Cabinet(tags=stock("top"), config=domain_config(overdue_after_s=600))
    c.cycle(ALICE, take=[epc(0)])
    state = json.loads(c.states[-1])
    assert list(state["holdings"]) == [epc(0)]
    assert state["holdings"][epc(0)]["held_by"] == [ALICE]
    for bad in (
        {"held_by": ["3F7A21C90B"]},  # not a pseudonym: never restored into an event
        {"at": "2026-03-02T08:00:00"},  # naive
        {"session": "nope"},
        {"remaining_s": float("nan")},
        {"limit_s": float("inf")},
    ):
        broken = json.loads(c.states[-1])
        broken["holdings"][epc(0)].update(bad)
        with pytest.raises(EngineStateError):
            CabinetEngine.from_bytes(
                json.dumps(broken).encode(),
                c.config,
                site_id="hangar-3",
                cabinet_id="crib-07",
                now=c.now,
            )
    broken = json.loads(c.states[-1])
    broken["holdings"] = {"NOT-HEX": broken["holdings"][epc(0)]}
    with pytest.raises(EngineStateError):
        CabinetEngine.from_bytes(
            json.dumps(broken).encode(),
            c.config,
            site_id="hangar-3",
            cabinet_id="crib-07",
            now=c.now,
        )


def test_a_state_without_holdings_still_loads() -> None:
    c = Cabinet(tags=stock("top"))
    c.cycle(ALICE, take=[epc(0)])
    state = json.loads(c.states[-1])
    del state["holdings"]
    engine = CabinetEngine.from_bytes(
        json.dumps(state).encode(), c.config, site_id="hangar-3", cabinet_id="crib-07", now=c.now
    )
    assert engine.baseline == {}


@pytest.mark.parametrize("bad", [-1, "60", True, 1.5, float("nan"), 10**9])
def test_a_registry_limit_must_be_sane_seconds(bad: object) -> None:
    with pytest.raises(AssetRegistryError, match="overdue_after_s"):
        AssetRegistry.from_body(
            {"assets": [{"epc": "abcd", "asset_id": "A", "overdue_after_s": bad}]}
        )
    ok = AssetRegistry.from_body(
        {"assets": [{"epc": "abcd", "asset_id": "A", "overdue_after_s": 90}]}
    )
    asset = ok.get("abcd")
    assert asset is not None
    assert asset.overdue_after_s == 90.0


def test_an_item_in_the_baseline_is_never_overdue_whatever_brought_it_back() -> None:
    """Defence in depth: a path that puts an item back into the baseline without ending its
    holding (a future re-baseline) must not make the cabinet cry wolf."""
    from agent.domain.inventory import Baseline

    c = Cabinet(tags=stock("top", "bottom"), config=domain_config(overdue_after_s=60))
    c.cycle(ALICE, take=[epc(0)])
    c.engine._contents.baseline = Baseline({epc(0): "top", epc(1): "bottom"})
    c.advance(120)
    assert overdue(c) == []
    assert c.engine.overdue() == []
    assert "holdings" in json.loads(c.states[-1])
    assert json.loads(c.states[-1])["holdings"] == {}


# ---- erasure ------------------------------------------------------------------------------------


def test_an_erased_holder_is_replaced_in_the_holding_and_what_it_reports_later() -> None:
    """docs/privacy.md §7: the backend erases alice while she holds the wrench. The persisted
    state names her nowhere; the item stays out, its limit runs on, and the overdue alert and
    the return by someone else name "erased" as the holder."""
    c = Cabinet(tags=stock("top", "bottom"), config=domain_config(overdue_after_s=3600))
    c.cycle(ALICE, take=[epc(0)])
    changed, out = c.engine.on_erasure(frozenset({ALICE}), c.now)
    c._apply(out)
    assert changed == 1
    assert out.session_state is not None
    assert ALICE.encode() not in out.session_state
    c.restart()  # from the persisted state
    mark = len(c.events)
    c.advance(3600)
    [late] = overdue(c, mark)
    assert late.held_by == [ev.ERASED_ACTOR]
    c.cycle(BOB, put={epc(0): "top"})
    [back] = returns(c, mark)
    assert (back.held_by, back.returned_by) == ([ev.ERASED_ACTOR], [BOB])
    assert all(ALICE.encode() not in state for state in c.states[-3:])


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("asset_id", "TW-\u202e1000"),  # a bidi override: the operator reads another id
        ("asset_id", "TW\x1b[2J"),
        ("asset_id", "TW\x9b2J"),  # a C1 control
        ("name", "wrench\u2028line two"),
        ("name", "w" * 201),
    ],
)
def test_a_registry_asset_id_and_name_are_printable_text(field: str, bad: str) -> None:
    """Shown as is by ``cabinetctl status`` (an overdue item's asset id) and in events: a
    signed registry still cannot put terminal controls in front of the operator."""
    with pytest.raises(AssetRegistryError, match=field):
        AssetRegistry.from_body({"assets": [{"epc": "abcd", "asset_id": "A", field: bad}]})
    ok = AssetRegistry.from_body(
        {"assets": [{"epc": "abcd", "asset_id": "Clé dynamométrique 工具", "name": "Zange"}]}
    )
    assert ok.get("abcd") is not None
