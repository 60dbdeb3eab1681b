"""Cabinet engine cost of a door cycle over many tags: read ingest, and door-closed → events ready.

Run: ``.venv/bin/python bench/engine.py [tags] [reads_per_tag] [repeats] [agent|reader]``
(default 5000 10 3 agent; ``reader``: the reads carry the reader's own clock, ``reader_clock``,
as an LLRP reader's with a plausible FirstSeenTimestampUTC).

Each scenario drives one whole door cycle (badge, open, close, settle scan, confirmation pass
when items are missing) through the pure engine with a simulated clock. Only the engine is
timed, in process CPU time around each call (other jobs on a shared box skew it less than wall
time). Reads arrive as reader reports of 100 tag reads. The baseline, measured in the same run
on the same reads, is the raw cost of building a ``set`` of the EPCs — the least any inventory
must do.

- *ingest*: time inside ``on_tags`` for every read of the cycle (it overlaps the physical scan);
- *close → events*: engine time not overlapped by the scan: door-closed handling plus the tick
  that ends the last pass (presence, location, diff, building and validating every event);
- *events/s*: events produced by the pass-ending ticks divided by the close → events time.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from agent.domain import events as ev
from agent.domain.access import AllowList
from agent.domain.commands import StartScan
from agent.domain.config import CabinetDomainConfig
from agent.domain.engine import CabinetEngine, EngineOutput, Phase
from agent.domain.ids import Uuid7Generator
from agent.domain.inventory import Baseline
from agent.domain.now import Now
from drivers.types import BadgeRead, DoorEdge, DoorState, ReaderHealth, ReaderState, TagRead

T0 = datetime(2026, 3, 2, 8, tzinfo=UTC)
HOLDER = "p1.k1.abcdefghijklmnopqrstuvwxyz"
DRAWERS = {f"d{i}": [f"dock-{i // 4 + 1}:{i % 4 + 1}"] for i in range(8)}
REPORT = 100  # tag reads per reader report
REPORT_GAP_S = 0.001  # simulated time between reports: all reads land within one settle window


@dataclass
class Run:
    scenario: str
    reads: int
    events: int
    ingest_s: float
    close_s: float
    final_events: int
    set_s: float

    @property
    def reads_per_s(self) -> float:
        return self.reads / self.ingest_s if self.ingest_s else 0.0

    @property
    def events_per_s(self) -> float:
        return self.final_events / self.close_s if self.close_s else 0.0


def _epc(i: int) -> str:
    return f"e280{i:020x}"


def _reads(epcs: list[str], per_tag: int, rng: random.Random) -> list[TagRead]:
    out = []
    for _ in range(per_tag):
        for e in epcs:
            d = int(e[-4:], 16) % 8
            out.append(TagRead(f"dock-{d // 4 + 1}", e, d % 4 + 1, -40.0 - rng.random() * 20, T0))
    rng.shuffle(out)
    return out


def _cycle(
    scenario: str,
    baseline: list[str],
    present: list[str],
    per_tag: int,
    seed: int,
    reader_clock: bool = False,
) -> Run:
    cfg = CabinetDomainConfig(
        drawers=DRAWERS,
        min_reads=2,
        stable_ms=1000,
        scan_min_ms=500,
        scan_max_ms=60_000,
        max_tags=50_000,
        background_period_s=0,
    )
    rng = random.Random(seed)
    now = Now(T0, 100.0)
    al = AllowList.from_body(1, T0 + timedelta(days=1), {"entries": {HOLDER: ["user"]}})
    engine = CabinetEngine(
        cfg,
        site_id="bench",
        cabinet_id="c1",
        now=now,
        baseline=Baseline({e: f"d{int(e[-4:], 16) % 8}" for e in baseline}),
        allow_list=al,
        ids=Uuid7Generator(rng.randbytes),
    )
    events = 0
    ingest = close = 0.0
    final_events = 0
    total_reads = 0

    def timed(fn: Callable[[], EngineOutput], n: Now) -> tuple[list[ev.Event], float]:
        """The events of ``fn``, and its CPU time; a StartScan it asks for is carried out at
        once, as the runner does (the pass counts reads from then on)."""
        t = time.process_time()
        out = fn()
        events = list(out.events)
        if any(isinstance(c, StartScan) for c in out.commands):
            events += engine.on_scan_started(n).events
        return events, time.process_time() - t

    engine.start(now)
    for rid in ("dock-1", "dock-2"):
        health = ReaderHealth(rid, ReaderState.INVENTORYING, T0, session=1)
        engine.on_health(health, now)
    engine.on_badge(BadgeRead("front", HOLDER, T0), now)
    now = now.after(1)
    events += len(engine.on_door(DoorEdge("door", DoorState.OPEN, now.wall), now).events)
    now = now.after(5)
    n = now
    out, close = timed(lambda: engine.on_door(DoorEdge("door", DoorState.CLOSED, n.wall), n), n)
    events += len(out)
    set_s = 0.0
    while engine.phase is not Phase.IDLE:
        reads = _reads(present, per_tag, rng)
        total_reads += len(reads)
        t = time.process_time()
        _ = {r.epc for r in reads}
        set_s += time.process_time() - t
        for i in range(0, len(reads), REPORT):
            now = now.after(REPORT_GAP_S)
            batch = reads[i : i + REPORT]
            if reader_clock:  # stamped as the reader made them (not timed)
                batch = [replace(r, first_seen=now.wall, reader_clock=True) for r in batch]
            n = now
            out, dt = timed(lambda b=batch, n=n: engine.on_tags(b, n), n)  # type: ignore[misc]
            ingest += dt
            events += len(out)
        # Quiet until the pass settles; the tick that ends it is the work after the scan.
        while engine.phase is not Phase.IDLE:
            phase = engine.phase
            now = now.after(0.1)
            n = now
            out, dt = timed(lambda n=n: engine.tick(n), n)  # type: ignore[misc]
            events += len(out)
            if out or engine.phase is not phase:
                close += dt
                final_events += len(out)
                if engine.phase is not Phase.IDLE:
                    break  # a confirmation pass started: it gets its reads in the outer loop
    return Run(scenario, total_reads, events, ingest, close, final_events, set_s)


def main(argv: list[str]) -> int:
    tags = int(argv[1]) if len(argv) > 1 else 5000
    per_tag = int(argv[2]) if len(argv) > 2 else 10
    repeats = int(argv[3]) if len(argv) > 3 else 3
    reader_clock = len(argv) > 4 and argv[4] == "reader"
    everything = [_epc(i) for i in range(tags)]
    tenth = tags // 10
    scenarios = [
        ("nothing changed", everything, everything),
        ("all returned", [], everything),
        ("10% out, 10% in", everything[tenth:], everything[: tags - tenth]),
        ("all checked out", everything, []),
    ]
    full = _reads(everything, per_tag, random.Random(0))
    t = time.process_time()
    _ = {r.epc for r in full}
    full_set_s = time.process_time() - t
    clock = "the reader's clock" if reader_clock else "no reader clock"
    print(f"cabinet engine: {tags} tags × {per_tag} reads per pass ({clock}), best of {repeats}")
    print(f"baseline: set of {tags} EPCs from {len(full):,} reads = {full_set_s * 1000:.1f} ms")
    print()
    print(
        "| scenario | reads | events | ingest ms | reads/s | ingest × set "
        "| close→events ms | close × set | events/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, base, present in scenarios:
        runs = [_cycle(name, base, present, per_tag, seed, reader_clock) for seed in range(repeats)]
        best = min(runs, key=lambda r: r.ingest_s + r.close_s)
        # The set of every EPC of a full cabinet, from the same reads, is the yardstick; a cycle
        # with no reads ("all checked out") is compared with the set of a full cabinet too.
        yard = best.set_s if best.reads else full_set_s
        ingest_x = f"{best.ingest_s / yard:.1f}×" if best.reads else "–"
        eps = f"{best.events_per_s:,.0f}" if best.final_events >= 100 else "–"
        rps = f"{best.reads_per_s:,.0f}" if best.reads else "–"
        print(
            f"| {name} | {best.reads:,} | {best.events:,} | {best.ingest_s * 1000:.1f} "
            f"| {rps} | {ingest_x} | {best.close_s * 1000:.1f} "
            f"| {best.close_s / yard:.1f}× | {eps} |"
        )
        spread = [r.ingest_s + r.close_s for r in runs]
        if len(spread) > 1:
            print(
                f"|  ↳ spread | | | total {min(spread) * 1000:.0f}–{max(spread) * 1000:.0f} ms "
                f"(median {statistics.median(spread) * 1000:.0f}) | | | | | |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
