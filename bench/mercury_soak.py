"""Mercury driver soak: random faults in a row against the simulator, recovery time per fault.

After each fault ends, every placed tag must be read again and the reader must be back to
INVENTORYING; the table shows how long that took (median / worst) per fault kind, next to
the baseline: the time to read every tag once on a clean link, measured in the same run.

Run: ``.venv/bin/python bench/mercury_soak.py [--faults N] [--transport pty|tcp] [--seed S]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

# Run as a script, this directory comes first on sys.path, and bench/serial.py (the codec
# benchmark) would shadow pyserial's ``serial`` package that drivers.serialio imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from drivers.mercury.config import MercuryReaderConfig  # noqa: E402
from drivers.mercury.reader import MercuryReader  # noqa: E402
from drivers.types import GpiEdge, ReaderHealth, ReaderState, TagRead  # noqa: E402
from simulators.mercury import MercurySimulator  # noqa: E402

WAIT_S = 120.0


class Sink:
    def __init__(self) -> None:
        self.reads: list[TagRead] = []
        self.health: list[ReaderHealth] = []
        self.changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        self.reads.extend(reads)
        self.changed.set()

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.append(health)
        self.changed.set()

    async def gpi_edge(self, edge: GpiEdge) -> None:
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while True:
                self.changed.clear()
                if predicate():
                    return
                await self.changed.wait()


async def soak(transport: Literal["pty", "tcp"], faults: int, seed: int) -> None:
    rng = random.Random(seed)
    recovery: dict[str, list[float]] = defaultdict(list)
    async with MercurySimulator(transport, antennas=4, seed=seed) as sim:
        want = {t.epc.hex() for t in sim.add_random_tags(16)}
        cfg = MercuryReaderConfig(
            id="soak",
            url=sim.url,
            antennas=[1, 2, 3, 4],
            watchdog_s=1.0,
            keepalive_s=0.3,
            command_timeout_s=1.0,
            cycle_timeout_ms=250,
            backoff={"initial_s": 0.05, "max_s": 0.5},
        )
        sink = Sink()
        driver = MercuryReader(cfg, sink)
        task = asyncio.create_task(driver.run(), name="soak-mercury-driver")
        try:
            await driver.start_inventory()
            t0 = time.monotonic()
            await sink.wait_for(lambda: want <= {r.epc for r in sink.reads})
            baseline = time.monotonic() - t0
            for _ in range(faults):
                kind = rng.choice(["garbage", "garbage_long", "silence", "unplug", "trickle"])
                if kind == "garbage":
                    sim.faults.garbage(rng.randrange(1, 500))
                elif kind == "garbage_long":
                    sim.faults.garbage(64, seconds=rng.uniform(0.2, 2.0))
                elif kind == "silence":
                    sim.faults.silence(rng.uniform(0.2, 2.0))
                elif kind == "unplug":
                    sim.faults.unplug(rng.uniform(0.2, 2.0))
                else:
                    sim.faults.trickle(0.0005, seconds=rng.uniform(0.2, 1.0))
                await sim.wait_until(
                    lambda: (
                        not (
                            sim.unplugged
                            or sim.faults.silent
                            or sim.faults.garbling
                            or sim.faults.trickling
                        )
                    ),
                    WAIT_S,
                )
                ended = time.monotonic()
                mark = len(sink.reads)
                await sink.wait_for(lambda m=mark: want <= {r.epc for r in sink.reads[m:]})
                await sink.wait_for(lambda: driver.health.state == ReaderState.INVENTORYING)
                recovery[kind].append(time.monotonic() - ended)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stats = driver.link_stats
    print(f"{transport}: {faults} faults, {driver.health.session} sessions, link {stats}")
    print(f"{'after fault':<14} {'count':>5} {'median s':>9} {'worst s':>8} {'× baseline':>11}")
    print(f"{'(clean link)':<14} {1:>5} {baseline:>9.2f} {baseline:>8.2f} {1.0:>11.1f}")
    for kind, times in sorted(recovery.items()):
        median = statistics.median(times)
        print(
            f"{kind:<14} {len(times):>5} {median:>9.2f} {max(times):>8.2f}"
            f" {median / baseline:>11.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=40)
    parser.add_argument("--transport", choices=["pty", "tcp"], default="pty")
    parser.add_argument("--seed", type=int, default=43)
    args = parser.parse_args()
    asyncio.run(soak(args.transport, args.faults, args.seed))


if __name__ == "__main__":
    main()
