"""State-store throughput: durable rows per second, group commit vs one transaction per row,
synchronous=FULL vs NORMAL, all measured in the same run on the same filesystem.

Run: ``.venv/bin/python bench/store.py [rows] [--dir DIR]``. Each scenario submits ``rows``
single-row appends at once (as a burst of alerts or a replay would) and times until all are
durable. The DB lives in DIR (default: a temp dir next to the repo, i.e. on real disk, not
tmpfs, so fsync costs what it costs).
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
        seconds = time.perf_counter() - start
        stats = await store.stats()
    finally:
        await store.close()
    _remove(directory, path.name)
    label = "group commit" if max_rows > 1 else "tx per row"
    return Result(label, synchronous, rows, seconds, stats.transactions)


async def main_async(rows: int, directory: Path) -> list[Result]:
    results = []
    for synchronous in ("FULL", "NORMAL"):
        for max_rows in (100, 1):
            results.append(await run(directory, rows, synchronous, max_rows))  # type: ignore[arg-type]
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv[1:])
    base = args.dir or Path(__file__).resolve().parent
    directory = Path(tempfile.mkdtemp(prefix="store-bench-", dir=base))
    try:
        results = asyncio.run(main_async(args.rows, directory))
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
