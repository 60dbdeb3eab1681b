"""The liveness barrier: a reader that went silent (socket open, nothing sent) never looks like
an empty drawer. Drives the pure engine with the fake-clock cabinet harness."""

from __future__ import annotations

from tests.domain_harness import ALICE, Cabinet, Tag


def _cabinet() -> Cabinet:
    return Cabinet(
        tags={"e2801160600002000000a001": Tag("top"), "e2801160600002000000b002": Tag("side")}
    )


def test_silent_reader_blocks_the_pass_then_makes_it_incomplete() -> None:
    cab = _cabinet()
    cab.alive()  # both readers have proven they report liveness
    start = len(cab.events)
    cab.badge(ALICE)
    cab.advance(1.0)
    cab.open()
    cab.advance(2.0)
    # dock-2 goes silent: its tag is no longer read and it sends nothing at all — but its
    # health still says "inventorying" (the watchdog has not fired yet).
    del cab.tags["e2801160600002000000b002"]
    cab.close()
    for _ in range(200):  # 20 s of simulated time, dock-1 keeps talking, dock-2 is silent
        cab.advance(0.1)
        cab._apply(cab.engine.on_alive("dock-1", cab.now.mono, cab.now))
    types = cab.types(start)
    assert "item.checked_out" not in types, cab.brief(start)
    incomplete = [e for e in cab.events[start:] if e.type == "inventory.incomplete"]
    assert incomplete, cab.brief(start)
    assert any("dock-2 silent" in r for r in incomplete[0].reasons)  # type: ignore[union-attr]


def test_readers_heard_after_the_pass_end_let_it_complete() -> None:
    cab = _cabinet()
    cab.alive()
    start = len(cab.events)
    cab.badge(ALICE)
    cab.advance(1.0)
    cab.open()
    cab.advance(2.0)
    del cab.tags["e2801160600002000000b002"]
    cab.close()
    for _ in range(300):
        cab.advance(0.1)
        cab.alive()
        if cab.engine.phase.value == "idle" and not cab.scanning:
            break
    types = cab.types(start)
    assert types.count("item.checked_out") == 1, cab.brief(start)
    assert "inventory.incomplete" not in types


def test_readers_that_never_reported_liveness_are_not_gated() -> None:
    """Pure-domain callers that do not feed liveness keep the previous behaviour."""
    cab = _cabinet()
    start = len(cab.events)
    cab.cycle(ALICE, take=["e2801160600002000000a001"])
    assert cab.types(start).count("item.checked_out") == 1
