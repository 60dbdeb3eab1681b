"""State-store throughput: durable rows per second, group commit vs one transaction per row,
synchronous=FULL vs NORMAL, all measured in the same run on the same filesystem.

Run: ``.venv/bin/python bench/store.py [rows] [--dir DIR]``. Each burst scenario submits
``rows`` single-row appends at once (as a burst of alerts or a replay would) and times until
all are durable *and deliverable* (with NORMAL that includes the WAL fsync the delivery read
waits for). The engine-like scenario commits one row at a time, awaiting each commit as the
engine does, while a publisher task reads each new row for delivery: it reports how long the
engine waits per commit and how long a row takes from submit to deliverable. The DB lives in
DIR (default: a temp dir next to the repo, i.e. on real disk, not tmpfs, so fsync costs what it
costs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from agent.store import OutboxRow, Store, StoreConfig

ENVELOPE_BYTES = 400  # a sealed 300-byte event: header + HPKE enc + ciphertext + tag


@dataclass(frozen=True)
class Result:
    label: str
    synchronous: str
    rows: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def _remove(directory: Path, name: str) -> None:
    for p in directory.glob(name + "*"):
        p.unlink()


async def run(
    directory: Path, rows: int, synchronous: Literal["FULL", "NORMAL"], max_rows: int
) -> Result:
    path = directory / f"bench-{synchronous}-{max_rows}.db"
    cfg = StoreConfig(path=path, synchronous=synchronous, group_commit_max_rows=max_rows)
    store = await Store.open(cfg)
    try:
        now = datetime.now(UTC)
        envelope = os.urandom(ENVELOPE_BYTES)
        start = time.perf_counter()
        futs = []
        for _ in range(rows):
            seq = store.next_seq_nowait()
            row = OutboxRow(seq, uuid.uuid4(), 1, "reader.offline", now, envelope)
            futs.append(store.submit_events([row]))
        await asyncio.gather(*futs)
        # Deliverable: the publisher's read (which, with NORMAL, waits for the WAL fsync).
        assert (await store.peek(1, after_seq=rows - 1))[0].seq == rows
        seconds = time.perf_counter() - start
        stats = await store.stats()
    finally:
        await store.close()
    _remove(directory, path.name)
    label = "group commit" if max_rows > 1 else "tx per row"
    return Result(label, synchronous, rows, seconds, stats.transactions)


@dataclass(frozen=True)
class Latency:
    synchronous: str
    rows: int
    commit_ms: list[float]  # the engine's await of each commit
    deliverable_ms: list[float]  # submit -> handed out by the delivery read
    seconds: float

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def commit(self, q: float) -> float:
        return self._pct(self.commit_ms, q)

    def deliverable(self, q: float) -> float:
        return self._pct(self.deliverable_ms, q)


async def engine_like(
    directory: Path, rows: int, synchronous: Literal["FULL", "NORMAL"]
) -> Latency:
    """One commit at a time (awaited, as the engine does), a publisher reading each new row."""
    path = directory / f"bench-engine-{synchronous}.db"
    store = await Store.open(StoreConfig(path=path, synchronous=synchronous))
    submitted: dict[int, float] = {}
    delivered: dict[int, float] = {}
    wake = asyncio.Event()

    async def publisher() -> None:
        after = 0
        while after < rows:
            await wake.wait()
            wake.clear()
            got = await store.peek(256, after_seq=after)
            now = time.perf_counter()
            for row in got:
                delivered[row.seq] = now
                after = row.seq

    task = asyncio.create_task(publisher(), name="bench-publisher")
    commit_ms: list[float] = []
    try:
        now = datetime.now(UTC)
        envelope = os.urandom(ENVELOPE_BYTES)
        start = time.perf_counter()
        for _ in range(rows):
            seq = store.next_seq_nowait()
            t0 = time.perf_counter()
            submitted[seq] = t0
            await store.append_events(
                [OutboxRow(seq, uuid.uuid4(), 1, "access.denied", now, envelope)]
            )
            commit_ms.append((time.perf_counter() - t0) * 1000)
            wake.set()  # Publisher.notify()
        await task
        seconds = time.perf_counter() - start
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    _remove(directory, path.name)
    deliverable = [(delivered[s] - submitted[s]) * 1000 for s in submitted]
    return Latency(synchronous, rows, commit_ms, deliverable, seconds)


async def main_async(rows: int, directory: Path) -> tuple[list[Result], list[Latency]]:
    results = []
    for synchronous in ("FULL", "NORMAL"):
        for max_rows in (100, 1):
            results.append(await run(directory, rows, synchronous, max_rows))  # type: ignore[arg-type]
    latencies = [
        await engine_like(directory, min(rows, 500), sync)  # type: ignore[arg-type]
        for sync in ("FULL", "NORMAL")
    ]
    return results, latencies


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv[1:])
    base = args.dir or Path(__file__).resolve().parent
    directory = Path(tempfile.mkdtemp(prefix="store-bench-", dir=base))
    try:
        results, latencies = asyncio.run(main_async(args.rows, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(f"state store: {args.rows} single-row appends submitted at once, {ENVELOPE_BYTES} B each")
    print(f"{'mode':<14} {'sync':<7} {'rows/s':>10} {'seconds':>9} {'txns':>6} {'rows/txn':>9}")
    for r in results:
        print(
            f"{r.label:<14} {r.synchronous:<7} {r.rate:>10.0f} {r.seconds:>9.3f} "
            f"{r.transactions:>6} {r.rows / max(1, r.transactions):>9.1f}"
        )
    by = {(r.label, r.synchronous): r for r in results}
    for sync in ("FULL", "NORMAL"):
        ratio = by[("group commit", sync)].rate / by[("tx per row", sync)].rate
        print(f"group commit / tx per row ({sync}): {ratio:.1f}×")
    for label in ("group commit", "tx per row"):
        ratio = by[(label, "NORMAL")].rate / by[(label, "FULL")].rate
        print(f"NORMAL / FULL ({label}): {ratio:.2f}×")
    print()
    print(f"engine-like: {latencies[0].rows} commits one at a time, a publisher reading each row")
    print(
        f"{'sync':<7} {'commit p50 ms':>14} {'commit p99 ms':>14} "
        f"{'deliverable p50 ms':>19} {'deliverable p99 ms':>19} {'rows/s':>8}"
    )
    for lat in latencies:
        print(
            f"{lat.synchronous:<7} {lat.commit(0.5):>14.2f} {lat.commit(0.99):>14.2f} "
            f"{lat.deliverable(0.5):>19.2f} {lat.deliverable(0.99):>19.2f} "
            f"{lat.rows / lat.seconds:>8.0f}"
        )
    full, normal = latencies
    print(f"engine wait per commit, FULL / NORMAL: {full.commit(0.5) / normal.commit(0.5):.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
