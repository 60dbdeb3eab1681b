"""Random operation sequences against a plain-Python model of the outbox rules.

Appends, acks, delivery failures, dead letters and revivals, with the byte cap and the
priority overflow policy in play: after every step the store must agree with the model on
which rows are deliverable, their order, byte total, dead count and drop counters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.store import AlertKind, OverflowPolicy, Store, StoreConfig
from tests.store_helpers import FakeClock, next_rows

CAP = 64 * 1024
DEAD_AFTER = 3


@dataclass
class ModelRow:
    priority: int
    size: int
    attempts: int = 0
    dead: bool = False


class Model:
    def __init__(self, droppable: list[int]) -> None:
        self.rows: dict[int, ModelRow] = {}
        self.droppable = droppable
        self.dropped: dict[int, int] = {}
        self.dead_lettered = 0

    def append(self, items: list[tuple[int, int, int]]) -> list[int]:
        for seq, prio, size in items:
            self.rows[seq] = ModelRow(prio, size)
        total = sum(r.size for r in self.rows.values())
        victims: list[int] = []
        if total > CAP:
            order = sorted(
                (s for s, r in self.rows.items() if r.priority in self.droppable),
                key=lambda s: (-self.rows[s].priority, s),
            )
            for seq in order:
                if total <= CAP:
                    break
                total -= self.rows[seq].size
                victims.append(seq)
        for seq in victims:
            prio = self.rows.pop(seq).priority
            self.dropped[prio] = self.dropped.get(prio, 0) + 1
        return sorted(victims)

    def fail(self, seq: int) -> bool:
        row = self.rows.get(seq)
        if row is None:
            return False
        row.attempts += 1
        if not row.dead and row.attempts >= DEAD_AFTER:
            row.dead = True
            self.dead_lettered += 1
            return True
        return False

    def live(self) -> list[int]:
        return sorted(s for s, r in self.rows.items() if not r.dead)


@pytest.mark.parametrize(("seed", "droppable"), [(1, [2, 1]), (2, [2]), (3, []), (4, [2, 1, 0])])
async def test_store_agrees_with_the_model(tmp_path: Path, seed: int, droppable: list[int]) -> None:
    rng = random.Random(seed)
    model = Model(droppable)
    cfg = StoreConfig(
        path=tmp_path / "s.db",
        max_bytes=CAP,
        synchronous="NORMAL",  # same rules, fewer fsyncs: keeps the test fast
        dead_letter_after=DEAD_AFTER,
        overflow=OverflowPolicy(droppable_priorities=droppable),
    )
    store = await Store.open(cfg, clock=FakeClock())
    try:
        for _step in range(200):
            op = rng.choices(["append", "ack", "fail", "revive"], weights=[5, 3, 3, 1])[0]
            if op == "append":
                rows = []
                for _ in range(rng.randint(1, 5)):
                    prio = rng.choice([0, 1, 2])
                    rows += next_rows(store, 1, priority=prio, size=rng.randint(100, 4000))
                    submitted = store.submit_events(rows[-1:])
                    await submitted
                    result = submitted.result()
                    expected = model.append([(rows[-1].seq, prio, len(rows[-1].envelope))])
                    got = [
                        s
                        for a in result.alerts
                        if a.kind is AlertKind.OVERFLOW_DROPPED
                        for s in a.seqs
                    ]
                    assert got == expected
            elif op == "ack":
                known = list(model.rows)
                chosen = [*rng.sample(known, min(len(known), rng.randint(0, 6))), 10**9]
                assert await store.ack(chosen) == len(chosen) - 1
                for seq in chosen:
                    model.rows.pop(seq, None)
            elif op == "fail" and model.rows:
                # Like a publisher retrying the head of the queue (dead ones included).
                seq = rng.choice(sorted(model.rows)[:3])
                assert await store.mark_failed(seq, "test") == model.fail(seq)
            elif op == "revive":
                revived = sum(1 for r in model.rows.values() if r.dead)
                assert await store.revive_dead() == revived
                for r in model.rows.values():
                    if r.dead:
                        r.dead, r.attempts = False, 0
            peeked = await store.peek(10_000)
            assert [r.seq for r in peeked] == model.live()
            assert [r.attempts for r in peeked] == [model.rows[s].attempts for s in model.live()]
            stats = await store.stats()
            assert stats.bytes == sum(r.size for r in model.rows.values())
            assert stats.dead == sum(1 for r in model.rows.values() if r.dead)
            assert dict(stats.dropped) == model.dropped
    finally:
        await store.close()
    # The sequence really exercised the policy (and dead letters), not just the happy path.
    assert bool(model.dropped) == bool(droppable)
    assert model.dead_lettered > 0
