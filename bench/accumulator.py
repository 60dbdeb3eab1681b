"""Scan pass state per tag: memory and ``ScanAccumulator.add`` time, by how many readers read a tag.

Run: ``.venv/bin/python bench/accumulator.py [--tags 5000] [--repeats 7] [--against main]``

Each scenario feeds one scan pass of ``tags`` tags, 10 reads a tag (50,000 reads for 5,000
tags), every tag read by each of the scenario's readers in turn, as reader reports of 100 reads
(one reader each), 10 ms of agent time apart (a 5 s pass: five presence rounds). With *own
clock* the reads carry the reader's time (``reader_clock``, each reader's clock an hour off the
last's), else the agent's time counts them.

- *memory*: what the accumulator holds once every read is in (tracemalloc, in a separate run:
  tracing slows the timed runs), and per tag;
- *add ms*: process CPU time inside ``add`` for all reads, best of ``repeats``.

Baseline, same run: the first scenario (one reader without its own clock). With ``--against
REF``, the accumulator of the git revision REF (its ``agent/domain/inventory.py``, loaded next to
this checkout's other modules) runs the same scenarios in the same process, the two alternated
repeat by repeat, and the table adds its numbers and the ratio this/REF.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.domain import inventory  # noqa: E402
from agent.domain.config import CabinetDomainConfig  # noqa: E402
from drivers.types import ReaderHealth, ReaderState, TagRead  # noqa: E402

T0 = datetime(2026, 3, 2, 8, tzinfo=UTC)
READERS = ("dock-1", "dock-2", "dock-3")
DRAWERS = {f"d{r}{p}": [f"{reader}:{p}"] for r, reader in enumerate(READERS) for p in (1, 2)}
READS_PER_TAG = 10
REPORT = 100
REPORT_GAP_S = 0.01


@dataclass(frozen=True)
class Scenario:
    name: str
    readers: int
    own_clock: bool


SCENARIOS = (
    Scenario("one reader", 1, False),
    Scenario("one reader, own clock", 1, True),
    Scenario("two readers", 2, False),
    Scenario("two readers, own clocks", 2, True),
    Scenario("three readers", 3, False),
    Scenario("three readers, own clocks", 3, True),
)


def _batches(tags: int, sc: Scenario) -> list[tuple[list[TagRead], float]]:
    """Reader reports of the pass with the agent's time each is handled at."""
    queues: list[list[tuple[str, int]]] = [[] for _ in range(sc.readers)]
    for k in range(READS_PER_TAG):
        for i in range(tags):
            r = (i + k) % sc.readers
            queues[r].append((f"e280{i:020x}", 1 + i % 2))
    reports = []
    for q in range(0, max(len(q) for q in queues), REPORT):
        for r, queue in enumerate(queues):
            if queue[q : q + REPORT]:
                reports.append((r, queue[q : q + REPORT]))
    out = []
    for n, (r, reads) in enumerate(reports):
        now = n * REPORT_GAP_S
        at = T0 + timedelta(hours=r, seconds=now)
        out.append(
            (
                [
                    TagRead(READERS[r], epc, ant, -50.0, at, reader_clock=sc.own_clock)
                    for epc, ant in reads
                ],
                now,
            )
        )
    return out


def _pass(module: ModuleType, batches: Sequence[tuple[list[TagRead], float]]) -> Any:
    cfg = CabinetDomainConfig(
        drawers=DRAWERS,
        min_reads=2,
        stable_ms=1000,
        scan_min_ms=500,
        scan_max_ms=60_000,
        max_tags=50_000,
        background_period_s=0,
    )
    health = {r: ReaderHealth(r, ReaderState.INVENTORYING, T0, session=1) for r in READERS}
    acc = module.ScanAccumulator(cfg, cfg.antenna_map(), health, started=0.0)
    for reads, now in batches:
        acc.add(reads, now)
    return acc


def _memory(module: ModuleType, batches: Sequence[tuple[list[TagRead], float]]) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        acc = _pass(module, batches)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del acc
    return held


def _seconds(module: ModuleType, batches: Sequence[tuple[list[TagRead], float]]) -> float:
    t = time.process_time()
    _pass(module, batches)
    return time.process_time() - t


def _load(ref: str) -> ModuleType:
    """``agent/domain/inventory.py`` as it is at git revision ``ref``."""
    source = subprocess.run(
        ["git", "show", f"{ref}:agent/domain/inventory.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inventory_ref.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("inventory_ref", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", metavar="REF", help="a git revision to compare with")
    args = parser.parse_args(argv[1:])
    impls: list[tuple[str, ModuleType]] = [("this", inventory)]
    if args.against:
        impls.append((args.against, _load(args.against)))
    tags = args.tags
    print(
        f"scan pass: {tags} tags × {READS_PER_TAG} reads ({tags * READS_PER_TAG:,} reads), "
        f"reports of {REPORT}, best of {args.repeats}"
    )
    ref = args.against
    head = "| scenario | memory MB | bytes/tag | × one reader | add ms | ns/read | × one reader |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if ref:
        head += f" {ref} MB | {ref} add ms | memory × {ref} | add × {ref} |"
        rule += "---:|---:|---:|---:|"
    print()
    print(head)
    print(rule)
    base: tuple[int, float] | None = None
    for sc in SCENARIOS:
        batches = _batches(tags, sc)
        for _, mod in impls:  # once untraced: first-use allocations are not the pass's
            _pass(mod, batches)
        held = {name: _memory(mod, batches) for name, mod in impls}
        best = {name: float("inf") for name, _ in impls}
        for _ in range(args.repeats):  # alternated: both see the same load on a shared box
            for name, mod in impls:
                best[name] = min(best[name], _seconds(mod, batches))
        if base is None:
            base = (held["this"], best["this"])
        reads = sum(len(b) for b, _ in batches)
        row = (
            f"| {sc.name} | {held['this'] / 1e6:.2f} | {held['this'] / tags:,.0f} "
            f"| {held['this'] / base[0]:.2f}× | {best['this'] * 1000:.1f} "
            f"| {best['this'] / reads * 1e9:,.0f} | {best['this'] / base[1]:.2f}× |"
        )
        if ref:
            row += (
                f" {held[ref] / 1e6:.2f} | {best[ref] * 1000:.1f} "
                f"| {held['this'] / held[ref]:.2f}× | {best['this'] / best[ref]:.2f}× |"
            )
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
