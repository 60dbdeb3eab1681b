"""Tag ingest through the LLRP driver vs bare sllurp decoding of the same bytes, same run.

The simulator runs in another process and streams RO_ACCESS_REPORTs of 100 tags as fast as its
inventory loop allows. The driver's cost is measured as this process's CPU time (the simulator's
speed then does not matter), and the exact report frames the driver received are decoded again
with bare ``sllurp.llrp.LLRPMessage`` as the baseline. The ratio is driver rate / bare rate
(target ≥ 0.8). Event-loop lag during ingest is sampled by a 5 ms ticker.

    .venv/bin/python bench/ingest.py [--seconds 8] [--tags 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sllurp.llrp import LLRPMessage  # noqa: E402

import drivers.llrp.reader as reader_mod  # noqa: E402
from drivers.llrp.config import LlrpReaderConfig  # noqa: E402
from drivers.llrp.reader import LlrpReader  # noqa: E402
from drivers.llrp.session import LlrpSession  # noqa: E402
from drivers.types import GpiEdge, ReaderHealth, ReaderState, TagRead  # noqa: E402


class CountingSink:
    def __init__(self) -> None:
        self.tags = 0
        self.reads = 0

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        self.tags += len(reads)

    async def reader_health(self, health: ReaderHealth) -> None:
        pass

    async def gpi_edge(self, edge: GpiEdge) -> None:
        pass


class RecordingReader(LlrpReader):
    """The real driver, also keeping a copy of every report frame for the baseline."""

    recording = False
    frames: list[bytes]

    async def _handle(self, sess: LlrpSession, data: bytes, msg_type: int, msg_id: int) -> None:
        if self.recording and msg_type == 61:
            self.frames.append(data)
        await super()._handle(sess, data, msg_type, msg_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _lag_probe(samples: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.005)
        samples.append(max(0.0, loop.time() - t - 0.005))


async def measure_driver(
    port: int, seconds: float
) -> tuple[int, float, float, list[bytes], list[float]]:
    sink = CountingSink()
    cfg = LlrpReaderConfig(
        id="bench",
        host="127.0.0.1",
        port=port,
        antennas=[1, 2, 3, 4],
        report_every_n_tags=100,
        report_timeout_ms=1000,
        keepalive_s=5.0,
    )
    reader = RecordingReader(cfg, sink)
    reader.frames = []
    task = asyncio.create_task(reader.run(), name="bench-reader")
    lag: list[float] = []
    stop = asyncio.Event()
    try:
        await reader.start_inventory()
        async with asyncio.timeout(30):
            await reader.wait_health(lambda h: h.state == ReaderState.INVENTORYING)
        await asyncio.sleep(1.0)  # warm-up
        probe = asyncio.create_task(_lag_probe(lag, stop), name="lag-probe")
        reader.recording = True
        tags0, wall0, cpu0 = sink.tags, time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        tags, wall, cpu = sink.tags - tags0, time.perf_counter() - wall0, time.process_time() - cpu0
        reader.recording = False
        stop.set()
        await probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return tags, wall, cpu, reader.frames, lag


def measure_bare(frames: list[bytes]) -> tuple[int, float]:
    tags = 0
    cpu0 = time.process_time()
    for data in frames:
        msg = LLRPMessage(msgbytes=data)
        tags += len(msg.msgdict["RO_ACCESS_REPORT"].get("TagReportData") or [])
    return tags, time.process_time() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--tags", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    port = _free_port()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "llrp",
            "--port",
            str(port),
            "--tags",
            str(args.tags),
            "--antennas",
            "4",
            "--cycle-ms",
            "1",
            "--seed",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tags, wall, cpu, frames, lag = asyncio.run(measure_driver(port, args.seconds))
        # The same driver with its fast report decoder disabled (everything through sllurp).
        real_decode = reader_mod.decode_report
        reader_mod.decode_report = lambda frame: None
        try:
            s_tags, s_wall, s_cpu, _, _ = asyncio.run(measure_driver(port, args.seconds))
        finally:
            reader_mod.decode_report = real_decode
    finally:
        sim.terminate()
        sim.wait(10)
    bare_tags, bare_cpu = measure_bare(frames)
    drv_rate = tags / cpu if cpu else 0.0
    bare_rate = bare_tags / bare_cpu if bare_cpu else 0.0
    print(f"{'path':<34} {'tags':>9} {'CPU s':>8} {'tags/CPU s':>12} {'tags/wall s':>12}")
    print(
        f"{'driver (socket→TagRead→sink)':<34} {tags:>9} {cpu:>8.2f} {drv_rate:>12.0f} {tags / wall:>12.0f}"
    )
    s_rate = s_tags / s_cpu if s_cpu else 0.0
    print(
        f"{'driver, sllurp decode only':<34} {s_tags:>9} {s_cpu:>8.2f} {s_rate:>12.0f} "
        f"{s_tags / s_wall:>12.0f}"
    )
    print(
        f"{'bare sllurp LLRPMessage decode':<34} {bare_tags:>9} {bare_cpu:>8.2f} {bare_rate:>12.0f} {'-':>12}"
    )
    ratio = drv_rate / bare_rate if bare_rate else 0.0
    print(f"ratio driver/bare = {ratio:.2f} (target ≥ 0.80); {len(frames)} report frames")
    print(f"ratio driver (sllurp decode only)/bare = {s_rate / bare_rate if bare_rate else 0:.2f}")
    if lag:
        lag_ms = sorted(x * 1000 for x in lag)
        p99 = lag_ms[int(len(lag_ms) * 0.99) - 1]
        print(
            f"event-loop lag during ingest: median {statistics.median(lag_ms):.2f} ms, "
            f"p99 {p99:.2f} ms, max {lag_ms[-1]:.2f} ms ({len(lag_ms)} samples)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
