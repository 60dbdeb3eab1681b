"""kill -9 the store mid-stream, many times: every committed cycle is whole, none is partial,
seqs are contiguous without duplicates, and the sequence continues after the last commit."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from agent.store import Store, StoreConfig

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 8


async def _run_and_kill(
    db: Path, lines_before_kill: int, delay_s: float
) -> list[tuple[int, int, int]]:
    """Start the child, let it report some commits, SIGKILL it; return what it reported."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store_crash_child",
        str(db),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    reported: list[tuple[int, int, int]] = []
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert ready.startswith(b"ready "), ready
        for _ in range(lines_before_kill):
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            word, cycle, first, last = line.split()
            assert word == b"committed"
            reported.append((int(cycle), int(first), int(last)))
        # A random moment inside the stream, usually in the middle of a transaction.
        await asyncio.sleep(delay_s)
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -9, err.decode(errors="replace")
    return reported


async def test_kill_9_never_loses_or_splits_a_cycle(tmp_path: Path) -> None:
    await _crash_rounds(tmp_path / "state.db", ROUNDS)


@pytest.mark.soak
async def test_kill_9_soak(tmp_path: Path) -> None:
    await _crash_rounds(tmp_path / "state.db", 150)


async def _crash_rounds(db: Path, rounds: int) -> None:
    rng = random.Random()
    reported: list[tuple[int, int, int]] = []
    for _ in range(rounds):
        reported += await _run_and_kill(db, rng.randint(0, 12), rng.uniform(0, 0.01))

    store = await Store.open(StoreConfig(path=db))
    try:
        next_seq = await store.next_seq()
        rows = await store.peek(100_000)
        session = await store.load_session()
        baseline = await store.load_baseline()
    finally:
        await store.close()

    seqs = [r.seq for r in rows]
    assert seqs == list(range(1, next_seq)), "seqs must be contiguous from 1, no duplicates"
    cycles: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for row in rows:
        if row.kind == "item.checked_out":
            body = json.loads(row.envelope[: row.envelope.index(b"}") + 1])
            cycles[body["cycle"]].append((row.seq, body["i"], body["n"]))
    # Every cycle present is whole and contiguous: never a partial cycle.
    for cycle, parts in cycles.items():
        n = parts[0][2]
        assert sorted(i for _, i, _ in parts) == list(range(n)), f"cycle {cycle} is partial"
        first = min(s for s, _, _ in parts)
        assert sorted(s for s, _, _ in parts) == list(range(first, first + n))
    # Nothing reported durable was lost, and no cycle in between went missing.
    assert reported, "the child never committed anything"
    for cycle, first, last in reported:
        assert sorted(s for s, _, _ in cycles[cycle]) == list(range(first, last + 1))
    last_cycle = max(cycles)
    assert sorted(cycles) == list(range(1, last_cycle + 1))
    # Baseline and session belong to the last committed cycle: same transaction.
    assert session is not None
    assert json.loads(session) == {"cycle": last_cycle}
    assert {e.location for e in baseline.values()} == {f"cycle-{last_cycle}"}
    assert len(baseline) == 3
