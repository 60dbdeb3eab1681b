"""Badge pseudonym cost: p2 (Argon2id) vs p1 (HMAC-SHA256) in the same run, and what it means.

Run: ``.venv/bin/python bench/pseudonym.py [--n N] [--memory-kib M --iterations T --lanes P]``.

Every row is one derivation as the cabinet (and an attacker holding the site key) computes it,
timed on one thread; "× p1" is its cost relative to p1 measured in the same run, so the ratio
stays comparable across machines. The projections multiply the measured cost per guess by the
size of a badge space: what it costs whoever holds the site key to test every badge number
(docs/privacy.md, "Stolen controller"). ``--memory-kib`` etc. time other parameters (the
defaults are the site key's, ``P2_DEFAULT``): run it on the target board to choose them.

The p3 rows (the site key held in a TPM, docs/privacy.md §5) run against a software TPM
(``swtpm``, started here on loopback ports with its own state directory, as the tests do): one
p3 derivation (the TPM's HMAC, then Argon2id) and the TPM's HMAC alone, the part an attacker
holding the powered device must ask that very chip for, one guess at a time. swtpm answers
far faster than a discrete TPM (milliseconds per command). Without swtpm or tpm2-pytss the
bench says so and prints no p3 row.

The last rows time a read as the agent does it (derived in a worker thread, off the event
loop) and the longest the event loop waited meanwhile (its timer lag).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.privacy.pseudonym import (  # noqa: E402
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
        Argon2Params(19456, 2, 1),  # OWASP's first choice, the default before issue 14
        Argon2Params(7168, 5, 1),  # OWASP: the same defence as 19 MiB t=2
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
    _p3_rows(key, chosen, args.n, baseline)
    ring = BadgePseudonyms(SITE, SiteKey("s1", key, chosen))
    read, lag = asyncio.run(_off_loop(ring, args.n))
    _, idle_lag = asyncio.run(_off_loop(None, args.n))
    print(f"{'agent read, worker thread (' + _name(chosen) + ')':<40} {read * 1e3:>9.3f}")
    print(f"{'  worst event-loop lag meanwhile':<40} {lag * 1e3:>9.3f}")
    print(f"{'  worst event-loop lag, loop idle':<40} {idle_lag * 1e3:>9.3f}")
    return 0


def _p3_rows(key: bytes, params: Argon2Params, n: int, baseline: float) -> None:
    """The p3 rows against a software TPM, or one line saying why there are none."""
    why = _no_tpm_reason()
    if why is not None:
        print(f"p3 (site key in a TPM): no row: {why}")
        return
    from agent.privacy.enrolment import import_into, wrap_for_cabinet
    from agent.privacy.tpm import TpmHmacKey, storage_parent

    site = SiteKey("s3", key, params, tpm=True)
    with _software_tpm() as tcti:
        held = import_into(tcti, wrap_for_cabinet(SITE, site, storage_parent(tcti)))
        device = TpmHmacKey(tcti, held.blob)
        try:
            p3 = Pseudonymizer.held_in(SITE, held.kid, held.argon2, device)
            # The same pseudonyms as the backend computes in software (docs/privacy.md §5).
            assert p3.badge("12AB") == Pseudonymizer.from_site_key(SITE, site).badge("12AB")
            cost = per_op(lambda i: p3.badge(f"{i:010X}"), n)
            mac = per_op(lambda i: device.mac(b"badge/v3\0%X" % i), n * 10)
        finally:
            device.close()
    name = f"p3 swtpm HMAC + {_name(params)[3:]}"
    projected = " ".join(f"{human(cost * size):>26}" for size in SPACES.values())
    print(f"{name:<40} {cost * 1e3:>9.3f} {cost / baseline:>9,.0f} {projected}")
    # Serial on the one chip: chip time, not core time, whatever the attacker's hardware.
    projected = " ".join(
        f"{human(mac * size):>26}".replace("core-", "chip-") for size in SPACES.values()
    )
    print(f"{'  p3 TPM HMAC alone (swtpm, one chip)':<40} {mac * 1e3:>9.4f} {'':>9} {projected}")


def _no_tpm_reason() -> str | None:
    """Why no software TPM can be used here (None: it can)."""
    if shutil.which("swtpm") is None:
        return "swtpm is not installed (apt-get install swtpm)"
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as err:
        return f"tpm2-pytss is not importable ({err}; pip install '.[tpm]')"
    return None


@contextlib.contextmanager
def _software_tpm() -> Iterator[str]:
    """A swtpm of its own (loopback ports, a temporary state directory); its TCTI string."""
    from tests.tpm_fixtures import SwTpm

    os.environ.setdefault("TSS2_LOG", "all+NONE")
    with tempfile.TemporaryDirectory(prefix="bench-swtpm-") as tmp, SwTpm(Path(tmp) / "tpm") as tpm:
        yield tpm.tcti


def _name(p: Argon2Params) -> str:
    return f"p2 Argon2id m={p.memory_kib // 1024} MiB t={p.iterations} p={p.lanes}"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
