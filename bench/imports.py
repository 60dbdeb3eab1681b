"""What the daemon's imports cost: resident memory and import time per package, in one run.

    .venv/bin/python bench/imports.py [--rounds 3] [--compare DIR] [--top 30]

Every measurement is a fresh process. Baselines: the bare interpreter (``python -c pass``: it
reads its own ``/proc/self/status`` and exits) and a bare paho client (``import
paho.mqtt.client``). The daemon: the real ``cabinet-agent run`` on ``bench/board.py``'s cabinet
(LLRP simulator with the door on its GPI/GPO, badge reader on a pseudo-terminal, mosquitto,
metrics and control socket on), started through a tracer that wraps the import system's
``_load_unlocked``: each module's RssAnon / RssFile / time delta while it executes, minus the
modules it imports itself (exclusive). The daemon is sampled once ``READY=1`` has arrived, the
LLRP reader and the badge reader are connected and the publisher has met the broker (the
sample is taken in the process, at a signal, so imports made later, while stopping, are
counted apart). ``--compare DIR`` measures the daemon of another checkout (e.g. ``git
worktree add /tmp/before main``) in the same run, on the same cabinet; ``--no-metrics`` turns
the daemon's ``[metrics]`` off.

Rows group modules by top-level package; ``agent`` and ``drivers`` by subpackage. "anon" is
private memory (Python objects, heap, the .so files' data), "file" mapped files (shared
libraries; clean pages shared with other processes and reclaimable). Import times are self
times on this machine (the tracer's own reads excluded); they move with the load.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.board import cabinet  # noqa: E402
from simulators.cabinet import to_toml  # noqa: E402

STEP_TIMEOUT_S = 60.0
KIB = 1024

# Runs in the measured process before anything else: only builtins and modules the interpreter
# has loaded at start-up (sys, os, _frozen_importlib), so nothing is attributed to the tracer.
TRACER = r"""
import os, sys, time, _thread
_b = sys.modules["_frozen_importlib"]
_real = _b._load_unlocked
_stacks = {}
_rec = {}
_order = []
_mark = [None]

def _status():
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        data = os.read(fd, 8192)
    finally:
        os.close(fd)
    out = {}
    for key in (b"VmRSS:", b"RssAnon:", b"RssFile:", b"VmHWM:"):
        i = data.index(key) + len(key)
        out[key[:-1].decode()] = int(data[i:data.index(b"kB", i)])
    return out

def _load(spec):
    stack = _stacks.setdefault(_thread.get_ident(), [])
    outer0 = time.perf_counter_ns()
    m0 = _status()
    stack.append([0, 0, 0])
    t0 = time.perf_counter_ns()
    try:
        return _real(spec)
    finally:
        t1 = time.perf_counter_ns()
        m1 = _status()
        ca, cf, ct = stack.pop()
        da, df = m1["RssAnon"] - m0["RssAnon"], m1["RssFile"] - m0["RssFile"]
        if spec.name not in _rec:
            _order.append(spec.name)
        _rec[spec.name] = (da - ca, df - cf, (t1 - t0) - ct)
        if stack:
            up = stack[-1]
            up[0] += da
            up[1] += df
            up[2] += time.perf_counter_ns() - outer0

_start = _status()
_b._load_unlocked = _load

def _on_mark(*_):
    _mark[0] = {"status": _status(), "imports": len(_order)}

import signal
signal.signal(signal.SIGUSR2, _on_mark)
out_path = sys.argv[1]
sys.argv = ["cabinet-agent", *sys.argv[2:]]
rc = 1
try:
    from agent.cli.cabinet_agent import main
    rc = main(sys.argv[1:])
finally:
    with open(out_path, "w") as f:
        f.write(repr({"start": _start, "mark": _mark[0], "order": _order, "rec": _rec}))
sys.exit(rc)
"""

BARE = 'print(open("/proc/self/status").read())'
PAHO = 'import paho.mqtt.client\nprint(open("/proc/self/status").read())'


def parse_status(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def child_env(pycache: Path) -> dict[str, str]:
    """Bytecode as an installed package has it (pip compiles at install): written once by the
    warm-up run into ``pycache``, then loaded; ``PYTHONDONTWRITEBYTECODE`` would make every
    process compile every module from source (~2 MiB more and slower imports)."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def bare(code: str, pycache: Path) -> dict[str, int]:
    """A fresh interpreter running ``code``, which prints its own /proc/self/status."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=child_env(pycache),
    )
    return parse_status(out.stdout)


@dataclass
class DaemonSample:
    status: dict[str, int]  # at the mark (the daemon running)
    start: dict[str, int]  # the interpreter before the first traced import
    rec: dict[str, tuple[int, int, int]]  # module: exclusive anon KiB, file KiB, self ns
    at_mark: list[str]  # modules imported by the time of the mark, in order
    later: list[str] = field(default_factory=list)  # imported after it (stopping)


def spawn(argv: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The tracer, then ``cabinet-agent`` with ``argv``; output into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", TRACER, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )


async def run_daemon(cfg: Path, work: Path, code_root: Path, pycache: Path) -> DaemonSample:
    """The traced ``cabinet-agent run`` from ``code_root``; sampled once it is up."""
    notify = work / "notify.sock"
    notify.unlink(missing_ok=True)
    out_file = work / "trace.txt"
    log = work / "agent.log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    env = {**child_env(pycache), "NOTIFY_SOCKET": str(notify), "PYTHONPATH": str(code_root)}
    env.pop("WATCHDOG_USEC", None)
    proc = spawn([str(out_file), "run", "--config", str(cfg)], log, code_root, env)
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            ready = False
            while not ready:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"agent exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                    )
                with contextlib.suppress(BlockingIOError):
                    ready = b"READY=1" in sock.recv(4096).split(b"\n")
                if not ready:
                    await asyncio.sleep(0.05)
            for pattern in ("MQTT connected as", "badge reader badge-1: connected", "configured ("):
                while pattern not in log.read_text(errors="replace"):
                    if proc.poll() is not None:
                        raise RuntimeError(f"agent exited:\n{log.read_text()[-3000:]}")
                    await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # whatever the first seconds of running allocate
        proc.send_signal(signal.SIGUSR2)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while proc.poll() is None:
                await asyncio.sleep(0.05)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    data: dict[str, Any] = ast.literal_eval(out_file.read_text())
    if data["mark"] is None:
        raise RuntimeError(f"no sample taken:\n{log.read_text()[-3000:]}")
    n = data["mark"]["imports"]
    return DaemonSample(
        status=data["mark"]["status"],
        start=data["start"],
        rec=data["rec"],
        at_mark=data["order"][:n],
        later=data["order"][n:],
    )


def group_of(module: str, packages: set[str]) -> str:
    parts = module.split(".")
    if parts[0] in ("agent", "drivers"):
        if len(parts) > 1 and f"{parts[0]}.{parts[1]}" in packages:
            return f"{parts[0]}.{parts[1]}"
        return f"{parts[0]} (top-level modules)"
    return parts[0]


def by_group(sample: DaemonSample) -> dict[str, list[float]]:
    """group: [anon MiB, file MiB, self ms, modules] over the modules loaded by the mark."""
    names = sample.at_mark
    packages = {".".join(n.split(".")[:2]) for n in names if n.count(".") >= 2}
    out: dict[str, list[float]] = {}
    for name in names:
        anon, files, ns = sample.rec[name]
        row = out.setdefault(group_of(name, packages), [0.0, 0.0, 0.0, 0.0])
        row[0] += anon / KIB
        row[1] += files / KIB
        row[2] += ns / 1e6
        row[3] += 1
    return out


def median_rows(samples: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    groups = {g for s in samples for g in s}
    return {
        g: [statistics.median(s.get(g, [0.0] * 4)[i] for s in samples) for i in range(4)]
        for g in groups
    }


def mib(kib: float) -> str:
    return f"{kib / KIB:.1f}"


async def measure(args: argparse.Namespace) -> int:
    trees = [("after" if args.compare else "this checkout", ROOT)]
    if args.compare:
        trees.insert(0, ("before", Path(args.compare).resolve()))
    plain: list[dict[str, int]] = []
    paho: list[dict[str, int]] = []
    daemons: dict[str, list[DaemonSample]] = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory(prefix="cabinet-imports-") as tmp_name:
        work = Path(tmp_name)
        async with cabinet(work, 0) as cab:
            for r in range(-1, args.rounds):  # round -1: the warm-up, writes the bytecode
                cache = work / "pycache-baselines"
                plain.append(bare(BARE, cache))
                paho.append(bare(PAHO, cache))
                for label, tree in trees:
                    state = work / f"state-{label.split()[0]}-{r}"
                    state.mkdir()
                    cfg = cab.config(state, mqtt_port=cab.broker.port)
                    if args.no_metrics:
                        doc = tomllib.loads(cfg.read_text())
                        doc["metrics"] = {"enabled": False}
                        cfg.write_text(to_toml(doc))
                    cache = work / f"pycache-{label.split()[0]}"
                    daemons[label].append(await run_daemon(cfg, state, tree, cache))
                print(
                    f"round {r + 1}/{args.rounds} done" if r >= 0 else "warm-up done",
                    file=sys.stderr,
                    flush=True,
                )
    del plain[0], paho[0]
    for samples in daemons.values():
        del samples[0]

    def med(samples: list[dict[str, int]], key: str) -> float:
        return statistics.median(s[key] for s in samples)

    base_rss = med(plain, "VmRSS")
    paho_rss = med(paho, "VmRSS")
    print(f"## Totals (median of {args.rounds} fresh processes each, MiB)\n")
    print("| process | VmRSS | anon | file | × bare paho |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| python -c pass (baseline) | {mib(base_rss)} | {mib(med(plain, 'RssAnon'))}"
        f" | {mib(med(plain, 'RssFile'))} | {base_rss / paho_rss:.2f} |"
    )
    print(
        f"| import paho.mqtt.client (baseline) | {mib(paho_rss)} | {mib(med(paho, 'RssAnon'))}"
        f" | {mib(med(paho, 'RssFile'))} | 1.00 |"
    )
    for label, samples in daemons.items():
        st = [s.status for s in samples]
        rss = med(st, "VmRSS")
        print(
            f"| cabinet-agent run, up ({label}) | {mib(rss)} | {mib(med(st, 'RssAnon'))}"
            f" | {mib(med(st, 'RssFile'))} | {rss / paho_rss:.2f} |"
        )
        imported = [
            sum(v[0] + v[1] for k, v in s.rec.items() if k in set(s.at_mark)) for s in samples
        ]
        start = [s.start for s in samples]
        print(
            f"|   of which: interpreter before the first import ({label}) |"
            f" {mib(med(start, 'VmRSS'))} | {mib(med(start, 'RssAnon'))}"
            f" | {mib(med(start, 'RssFile'))} | |"
        )
        print(
            f"|   of which: imports, {statistics.median(len(s.at_mark) for s in samples):.0f}"
            f" modules ({label}) | {mib(statistics.median(imported))} | | | |"
        )
    print()
    tables = {
        label: median_rows([by_group(s) for s in samples]) for label, samples in daemons.items()
    }
    labels = list(tables)
    order = sorted(  # largest first, in whichever column it is largest
        {g for t in tables.values() for g in t},
        key=lambda g: -max(sum(t.get(g, [0.0, 0.0])[:2]) for t in tables.values()),
    )
    head = " | ".join(f"anon / file MiB, ms, modules ({lb})" for lb in labels)
    print(f"## Per package, exclusive (median of {args.rounds} daemons)\n")
    print(f"| package | {head} |")
    print("|---|" + "---:|" * len(labels))
    rest = {lb: [0.0] * 4 for lb in labels}
    shown = 0
    for g in order:
        cells = []
        for lb in labels:
            a, f, ms, n = tables[lb].get(g, [0.0] * 4)
            cells.append(f"{a:.2f} / {f:.2f}, {ms:.0f}, {n:.0f}" if n else "—")
        if shown < args.top:
            std = " (stdlib)" if g in sys.stdlib_module_names else ""
            print(f"| {g}{std} | " + " | ".join(cells) + " |")
            shown += 1
        else:
            for lb in labels:
                for i, v in enumerate(tables[lb].get(g, [0.0] * 4)):
                    rest[lb][i] += v
    if len(order) > args.top:
        cells = [f"{a:.2f} / {f:.2f}, {ms:.0f}, {n:.0f}" for a, f, ms, n in rest.values()]
        print(f"| {len(order) - args.top} more packages | " + " | ".join(cells) + " |")
    if args.modules:
        sample = daemons[labels[-1]][0]
        print(f"\n## Modules of the daemon ({labels[-1]}), first run: anon / file KiB, self ms\n")
        for name in sorted(sample.at_mark, key=lambda n: -sum(sample.rec[n][:2])):
            anon, files, ns = sample.rec[name]
            print(f"{name:60s} {anon:6d} {files:6d} {ns / 1e6:7.1f}")
    for lb, samples in daemons.items():
        later = sorted({m for s in samples for m in s.later})
        print(f"\nimported only while stopping ({lb}): {', '.join(later) or 'nothing'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=30, help="rows shown; the rest summed")
    parser.add_argument("--compare", metavar="DIR", help="another checkout measured alongside")
    parser.add_argument("--no-metrics", action="store_true", help="the daemon with [metrics] off")
    parser.add_argument("--modules", action="store_true", help="list every module, largest first")
    args = parser.parse_args()
    started = time.monotonic()
    rc = asyncio.run(measure(args))
    print(f"\n({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
