"""A baseline the store could not prove current (recovered from damage): nobody is blamed for it."""

from __future__ import annotations

from agent.domain import events as ev
from agent.domain.engine import Phase
from tests.domain_harness import ALICE, BOB, Cabinet, Tag, epc


def _stock() -> dict[str, Tag]:
    return {epc(i): Tag(d) for i, d in enumerate(["top", "top", "bottom", "side", "side"])}


def _stale_cabinet() -> Cabinet:
    """The engine's baseline says epc 0-4; in truth, during door cycles the store lost, epc 3
    left and epc 7 came back into the bottom drawer."""
    c = Cabinet(tags=_stock())
    del c.tags[epc(3)]
    c.tags[epc(7)] = Tag("bottom")
    c.engine.distrust_baseline(c.now)
    assert not c.engine.baseline_trusted
    return c


def test_a_stale_baseline_is_reinventoried_at_once_without_blame() -> None:
    c = _stale_cabinet()
    c.advance(0.1)  # the readers are fine: the verification pass starts now, no door needed
    assert c.engine.phase is Phase.BACKGROUND
    c.settle()
    types = c.types()
    assert "item.checked_out" not in types
    assert "item.returned" not in types
    missing = [e for e in c.events if isinstance(e, ev.ItemMissing)]
    assert [m.epc for m in missing] == [epc(3)]
    (snapshot,) = [e for e in c.events if isinstance(e, ev.InventorySnapshot)]
    assert set(snapshot.items) == set(c.tags)
    assert c.engine.baseline_trusted
    # From now on, differences are someone's again.
    n = len(c.events)
    c.cycle(ALICE, take=[epc(0)])
    out = [e for e in c.events[n:] if isinstance(e, ev.ItemCheckedOut)]
    assert [(e.epc, e.actors) for e in out] == [(epc(0), [ALICE])]


def test_a_session_before_the_verification_names_nobody_for_what_differs() -> None:
    """Alice badges in before the verification pass could run: she takes epc 1. The stale
    baseline would have blamed her for epc 3 (gone long ago) and thanked her for returning
    epc 7; instead what differs is reported without an actor, and the pass becomes the
    baseline."""
    c = _stale_cabinet()
    c.badge(ALICE)  # before any tick: the verification pass has not started
    c.cycle(None, take=[epc(1)])
    types = c.types()
    assert "item.checked_out" not in types, types
    assert "item.returned" not in types, types
    assert sorted(e.epc for e in c.events if isinstance(e, ev.ItemMissing)) == [epc(1), epc(3)]
    closed = [e for e in c.events if isinstance(e, ev.SessionClosed)]
    assert [(s.actors, s.checked_out, s.returned, s.quality) for s in closed] == [
        ([ALICE], 0, 0, "complete")
    ]
    (snapshot,) = [e for e in c.events if isinstance(e, ev.InventorySnapshot)]
    assert set(snapshot.items) == set(c.tags)
    assert c.engine.baseline_trusted
    n = len(c.events)
    c.cycle(BOB, put={epc(1): "top"})
    back = [e for e in c.events[n:] if isinstance(e, ev.ItemReturned)]
    assert [(e.epc, e.actors) for e in back] == [(epc(1), [BOB])]


def test_the_distrust_survives_a_crash_before_the_verification() -> None:
    c = _stale_cabinet()
    c.advance(0.1)  # the verification pass starts (the state with the doubt is persisted)...
    assert c.engine.phase is Phase.BACKGROUND
    c.restart()  # ...and the agent is killed during it
    assert not c.engine.baseline_trusted
    c.settle()
    assert "item.checked_out" not in c.types()
    assert [e.epc for e in c.events if isinstance(e, ev.ItemMissing)] == [epc(3)]
    assert c.engine.baseline_trusted
