"""One card at a bank opens one door: once a door of the bank opens, the unlock the same card
gave the other cabinets is withdrawn (else a second person could open a neighbour within the
window, and their check-outs would be the first one's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.domain.engine import Phase, Relock
from agent.hub import BadgeBank, BadgeClient
from drivers.badge.config import BadgeReaderConfig
from drivers.types import BadgeRead, ReaderHealth
from tests.domain_harness import ALICE, BOB, Cabinet

TECH = "uid:1000"


def test_an_unused_unlock_of_the_card_alone_is_withdrawn() -> None:
    c = Cabinet(tags={})
    c.badge(ALICE, reader="bank")
    assert c.engine.phase is Phase.UNLOCKED
    mark = len(c.events)
    c._apply(c.engine.withdraw_unlock(frozenset({ALICE}), c.now))
    assert c.engine.phase is Phase.IDLE
    assert c.commands[-1] == Relock()
    assert c.events[mark:] == []  # like a window that lapsed: nothing happened here
    c.open()  # opened now, it is forced: nobody holds this door any more
    assert sorted(e.type for e in c.events[mark:]) == ["door.forced", "session.opened"]


def test_an_unlock_someone_else_shares_an_open_door_or_a_technician_stay() -> None:
    c = Cabinet(tags={})
    c.badge(ALICE, reader="bank")
    c.badge(BOB, reader="front")  # Bob badged at this cabinet's own reader too
    c._apply(c.engine.withdraw_unlock(frozenset({ALICE}), c.now))
    assert c.engine.phase is Phase.UNLOCKED
    c.open()
    phase = c.engine.phase
    c._apply(c.engine.withdraw_unlock(frozenset({ALICE, BOB}), c.now))
    assert c.engine.phase is phase  # the door is open: a session, not an unlock
    c.close()
    c.settle()
    c._apply(c.engine.open_technician(TECH, "swap drawer 2", c.now))
    c._apply(c.engine.withdraw_unlock(frozenset({ALICE}), c.now))
    assert c.engine.phase is Phase.UNLOCKED
    assert c.engine.technician is not None


@dataclass
class _Client:
    cabinet_id: str
    reads: list[BadgeRead] = field(default_factory=list)
    withdrawn: list[frozenset[str]] = field(default_factory=list)
    open: bool = False

    async def badge_read(self, read: BadgeRead) -> None:
        self.reads.append(read)

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        return None

    def client(self) -> BadgeClient:
        async def pseudonymize(raw: str, listed: frozenset[str]) -> str:
            raise AssertionError("not used")

        return BadgeClient(
            self,
            lambda: frozenset(),
            pseudonymize,
            lambda: self.open,
            withdraw=self.withdrawn.append,
            cabinet_id=self.cabinet_id,
        )


class _Clock:
    def __init__(self) -> None:
        self.mono = 100.0

    def now(self) -> datetime:
        return datetime(2026, 12, 5, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.mono


async def test_the_bank_withdraws_the_card_from_the_doors_that_did_not_open() -> None:
    clock = _Clock()
    bank = BadgeBank(BadgeReaderConfig(id="bank", url="socket://127.0.0.1:9"), clock)
    a, b, c = _Client("crib-a"), _Client("crib-b"), _Client("crib-c")
    bank.clients += [a.client(), b.client(), c.client()]
    await bank.badge_read(BadgeRead("bank", ALICE, clock.now()))
    assert [len(x.reads) for x in (a, b, c)] == [1, 1, 1]
    a.open = True
    bank.door_opened("crib-a")
    assert a.withdrawn == []
    assert b.withdrawn == c.withdrawn == [frozenset({ALICE})]
    assert bank.withdrawals == 2
    # A card shown long ago no longer counts.
    clock.mono += 3601
    await bank.badge_read(BadgeRead("bank", BOB, clock.now()))
    bank.door_opened("crib-b")
    assert a.withdrawn == [frozenset({BOB})]  # Alice's old card is not in it
