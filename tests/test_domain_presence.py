"""Which tags count as inventory (pure engine, fake clock): neighbour cross-reads, registry.

A tag new to the cabinet joins only if it was read *steadily* — in enough of a pass's read
rounds, clearly above its antenna's floor — in every pass of the cycle; a tag already known stays
while it is present at all. With an asset registry, unregistered tags are never inventory.
"""

from __future__ import annotations

from datetime import date

from agent.domain.assets import Asset, AssetRegistry
from agent.domain.inventory import ScanAccumulator
from drivers.types import ReaderHealth, ReaderState, TagRead
from tests.domain_harness import ALICE, BOB, T0, Cabinet, Tag, domain_config, epc

NEIGHBOUR_WEAK = epc(90)  # read every round, but barely above the floor (-70 dBm)
NEIGHBOUR_FADING = epc(91)  # strong when it answers, but only now and then


def _fading(ticks: int) -> bool:
    """Answers for 0.6 s out of every 3.7 s (100 ms ticks): a tag in and out of a fade."""
    return ticks % 37 < 6


def _acc(**cfg: object) -> ScanAccumulator:
    config = domain_config(presence_round_ms=1000, **cfg)
    health = {
        r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r in ("dock-1", "dock-2")
    }
    return ScanAccumulator(config, config.antenna_map(), health, started=0.0)


def _read(e: str, rssi: float | None = -50.0) -> TagRead:
    return TagRead("dock-1", e, 1, rssi, T0)


def test_steady_needs_most_rounds_and_a_margin_above_the_floor() -> None:
    acc = _acc()
    for k in range(40):  # 4 s of reads every 100 ms, from t = 1 s
        now = 1.0 + k / 10
        batch = [_read("aa"), _read("bb", rssi=-67.0), _read("cc", rssi=None)]
        if k < 10:  # only in the first of four rounds
            batch.append(_read("dd"))
        acc.add(batch, now)
    res = acc.result(5.05)
    assert set(res.present) == {"aa", "bb", "cc", "dd"}
    # bb: 3 dB above the -70 floor (< 6); dd: 1 round in 4; cc: no RSSI, every round.
    assert res.steady == {"aa", "cc"}


def test_a_pass_shorter_than_a_round_judges_by_the_margin_only() -> None:
    acc = _acc()
    acc.add([_read("aa"), _read("aa")], 0.2)
    assert acc.result(0.5).steady == {"aa"}


def test_a_peak_over_many_reads_is_one_observation_and_few_are_not_enough() -> None:
    """A report of n reads carries their *peak* RSSI: a neighbour's tag read through the wall
    at -68 dBm on average peaks higher the more reads a report aggregates (a slow or busy
    reader). Counted n times, two lucky peaks 6.5 dB above the floor made it "steady"; as two
    observations, their mean's noise does not clear the margin. A tag in the cabinet, read
    well above the floor, is steady however its reads are aggregated."""
    acc = _acc()
    for k in range(4):  # one report per round, in each of four rounds
        now = 1.0 + k
        neighbour = [TagRead("dock-1", "ee", 1, -63.5, T0, seen_count=12)] if k in (0, 3) else []
        acc.add([*neighbour, TagRead("dock-1", "aa", 1, -50.0, T0, seen_count=12)], now)
        if k in (1, 2):  # the neighbour also answers weakly in the other rounds
            acc.add([TagRead("dock-1", "ee", 1, -69.0, T0)], now + 0.5)
    res = acc.result(5.05)
    assert set(res.present) == {"aa", "ee"}
    assert res.steady == {"aa"}


def _with_neighbours(**cfg: object) -> Cabinet:
    config = domain_config(background_period_s=60, **cfg)
    c = Cabinet(config=config, tags={epc(0): Tag("top"), epc(1): Tag("bottom")})
    c.tags[NEIGHBOUR_WEAK] = Tag("side", rssi=-68.0)
    c.tags[NEIGHBOUR_FADING] = Tag("top", rssi=-55.0, answers=_fading)
    return c


def test_neighbour_tags_never_join_the_baseline_nor_cause_events() -> None:
    c = _with_neighbours()
    for i in range(12):
        c.cycle(ALICE if i % 2 else BOB)
        c.advance(65)  # a background inventory between two door cycles
        c.settle()
    kinds = {e.type for e in c.events}
    assert kinds == {"session.opened", "session.closed", "inventory.snapshot"}, c.brief()
    assert all(b == {epc(0): "top", epc(1): "bottom"} for b in c.baselines)
    # ... while the real items still come and go as usual.
    start = len(c.events)
    c.cycle(ALICE, take=[epc(1)])
    c.cycle(BOB, put={epc(1): "bottom"})
    assert c.brief(start) == [
        "session.opened badge alice",
        "item.checked_out 001 bottom alice",
        "session.closed complete out=1 in=0 alice",
        "session.opened badge bob",
        "item.returned 001 bottom bob",
        "session.closed complete out=0 in=1 bob",
    ]


def test_a_known_tag_read_weakly_stays_present() -> None:
    c = Cabinet(tags={epc(0): Tag("top", rssi=-68.0), epc(1): Tag("bottom")})
    c.cycle(ALICE)
    assert c.brief() == ["session.opened badge alice", "session.closed complete out=0 in=0 alice"]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "bottom"}


def test_a_steady_tag_that_appears_with_the_door_shut_joins_after_confirmation() -> None:
    c = Cabinet(config=domain_config(background_period_s=60), tags={epc(0): Tag("top")})
    c.tags[epc(5)] = Tag("bottom")  # missed by earlier scans (say, a tag behind a case)
    c.advance(61)
    c.settle()
    assert c.brief() == ["inventory.snapshot 2"]
    assert c.baselines[-1] == {epc(0): "top", epc(5): "bottom"}
    assert c.scan_steps >= 40  # two 2 s passes: it joined only once a second pass saw it steady


_ASSETS = [
    Asset(epc(0), "TQ-1", "torque", "top", None),
    Asset(epc(1), "CA-2", "caliper", "bottom", date(2030, 1, 1)),
]


def _registry() -> AssetRegistry:
    return AssetRegistry(_ASSETS)


def test_with_a_registry_unregistered_tags_are_never_inventory() -> None:
    # The baseline still holds an unregistered tag from before the registry was installed.
    c = Cabinet(tags={epc(0): Tag("top"), epc(1): Tag("bottom"), epc(7): Tag("side")})
    c.engine.set_assets(_registry())
    c.tags[epc(8)] = Tag("side")  # an unregistered tag put in with the door shut
    c.cycle(ALICE, take=[epc(7)])  # the old unregistered one leaves: nobody is charged
    assert c.brief() == [
        "session.opened badge alice",
        "item.unknown 008 side",
        "session.closed complete out=0 in=0 alice",
    ]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "bottom"}
    start = len(c.events)
    c.cycle(BOB)  # reported once per stay, not at every scan
    assert c.brief(start) == ["session.opened badge bob", "session.closed complete out=0 in=0 bob"]
    # Registered later, while it lies there: it joins the baseline, nobody "returned" it.
    c.engine.set_assets(AssetRegistry([*_ASSETS, Asset(epc(8), "X-8")]))
    c.cycle(ALICE)
    assert c.brief(start + 2) == [
        "session.opened badge alice",
        "session.closed complete out=0 in=0 alice",
    ]
    assert c.baselines[-1] == {epc(0): "top", epc(1): "bottom", epc(8): "side"}


def test_rounds_in_which_nothing_was_reported_do_not_count() -> None:
    acc = _acc()
    for now in (1.0, 1.5, 4.2, 4.6, 5.1):  # nothing came in from 1.5 to 4.2 s (a busy loop)
        acc.add([_read("aa"), _read("aa")], now)
    assert acc.result(5.5).steady == {"aa"}
