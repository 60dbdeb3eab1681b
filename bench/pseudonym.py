"""Badge pseudonym cost: p2 (Argon2id) vs p1 (HMAC-SHA256) in the same run, and what it means.

Run: ``.venv/bin/python bench/pseudonym.py [--n N] [--memory-kib M --iterations T --lanes P]``.

Every row is one derivation as the cabinet (and an attacker holding the site key) computes it,
timed on one thread; "× p1" is its cost relative to p1 measured in the same run, so the ratio
stays comparable across machines. The projections multiply the measured cost per guess by the
size of a badge space: what it costs whoever holds the site key to test every badge number
(docs/privacy.md, "Stolen controller"). ``--memory-kib`` etc. time other parameters (the
defaults are the site key's, ``P2_DEFAULT``): run it on the target board to choose them.

The last rows time a read as the agent does it (derived in a worker thread, off the event
loop) and the longest the event loop waited meanwhile (its timer lag).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import statistics
import sys
import time
from collections.abc import Callable

from agent.privacy.pseudonym import (
    P2_DEFAULT,
    Argon2Params,
    BadgePseudonyms,
    Pseudonymizer,
    SiteKey,
)

SITE = "hangar-3"
SPACES = {"2^24 (one facility's range)": 2**24, "2^40 (all EM4100 numbers)": 2**40}
_HOUR = 3600.0
_YEAR = 365.25 * 24 * _HOUR


def per_op(fn: Callable[[int], object], n: int) -> float:
    """Median seconds per call of ``fn(i)`` over ``n`` calls (a new badge number each time)."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def human(seconds: float) -> str:
    """A duration of core time in the unit that reads best."""
    if seconds < 120:
        return f"{seconds:,.1f} core-s"
    if seconds < 2 * _HOUR:
        return f"{seconds / 60:,.1f} core-min"
    if seconds < 2 * 24 * _HOUR * 365:
        return f"{seconds / _HOUR:,.0f} core-h"
    return f"{seconds / _YEAR:,.0f} core-years"


async def _off_loop(ring: BadgePseudonyms | None, n: int) -> tuple[float, float]:
    """Median seconds per read derived via the agent's path, and the worst event-loop lag.

    ``ring=None``: the same loop idle for as long (the lag this machine gives anyway)."""
    lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal lag
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - start - 0.001)

    tick = asyncio.create_task(ticker(), name="lag-probe")
    times = []
    for i in range(n):
        start = time.perf_counter()
        if ring is None:
            await asyncio.sleep(0.03)
        else:
            await ring.badge(f"{0x4000000000 + i:010X}")
        times.append(time.perf_counter() - start)
    done = True
    await tick
    return statistics.median(times), lag


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="p2 derivations per row (default 30)")
    parser.add_argument("--memory-kib", type=int, default=P2_DEFAULT.memory_kib)
    parser.add_argument("--iterations", type=int, default=P2_DEFAULT.iterations)
    parser.add_argument("--lanes", type=int, default=P2_DEFAULT.lanes)
    args = parser.parse_args(argv[1:])
    key = os.urandom(32)
    chosen = Argon2Params(args.memory_kib, args.iterations, args.lanes)
    rows: list[tuple[str, Argon2Params | None]] = [("p1 HMAC-SHA256 (baseline)", None)]
    rows.append((_name(chosen), chosen))
    for extra in (
        Argon2Params(12288, 3, 1),  # about as costly per byte of memory, less memory
        Argon2Params(65536, 3, 1),  # RFC 9106's second recommendation
    ):
        if extra != chosen:
            rows.append((_name(extra), extra))

    mac_key = os.urandom(32)
    bare = per_op(
        lambda i: hmac.digest(mac_key, b"badge/v1\0%X" % (0x4000000000 + i), "sha256"),
        args.n * 500,
    )
    print(f"badge pseudonym derivation, one thread, median of n (p1: n={args.n * 500})")
    print(f"{'scheme':<40} {'ms/badge':>9} {'× p1':>9} " + " ".join(f"{s:>26}" for s in SPACES))
    baseline = 0.0
    for name, params in rows:
        pseudo = Pseudonymizer(SITE, "s1", key, params)
        n = args.n * 500 if params is None else args.n
        cost = per_op(lambda i, p=pseudo: p.badge(f"{i:010X}"), n)
        if params is None:
            baseline = cost
        projected = " ".join(f"{human(cost * size):>26}" for size in SPACES.values())
        print(f"{name:<40} {cost * 1e3:>9.3f} {cost / baseline:>9,.0f} {projected}")

    projected = " ".join(f"{human(bare * size):>26}" for size in SPACES.values())
    print(f"{'  p1 bare HMAC (an attacker loop)':<40} {bare * 1e3:>9.4f} {'':>9} {projected}")
    ring = BadgePseudonyms(SITE, SiteKey("s1", key, chosen))
    read, lag = asyncio.run(_off_loop(ring, args.n))
    _, idle_lag = asyncio.run(_off_loop(None, args.n))
    print(f"{'agent read, worker thread (' + _name(chosen) + ')':<40} {read * 1e3:>9.3f}")
    print(f"{'  worst event-loop lag meanwhile':<40} {lag * 1e3:>9.3f}")
    print(f"{'  worst event-loop lag, loop idle':<40} {idle_lag * 1e3:>9.3f}")
    return 0


def _name(p: Argon2Params) -> str:
    return f"p2 Argon2id m={p.memory_kib // 1024} MiB t={p.iterations} p={p.lanes}"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
