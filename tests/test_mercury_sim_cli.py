"""``cabinet-sim mercury`` as a process: prints its URL and tags, serves them, exits on EOF."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from drivers.mercury.config import MercuryReaderConfig
from drivers.mercury.reader import MercuryReader
from drivers.types import ReaderState
from simulators.cli import SIMULATOR_MODULES
from tests.test_mercury_driver import RecordingSink

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0

CABINET_SIM = Path(sys.executable).parent / "cabinet-sim"


@pytest_asyncio.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


def test_mercury_is_registered_with_cabinet_sim() -> None:
    assert "simulators.mercury.cli" in SIMULATOR_MODULES


async def test_simulator_process_serves_the_tags_it_prints() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(CABINET_SIM),
        "mercury",
        "--tcp",
        "0",
        "--tags",
        "3",
        "--seed",
        "5",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT_S):
            banner = (await proc.stdout.readline()).decode()
            url = banner.rsplit(" at ", 1)[1].strip()
            assert url.startswith("socket://127.0.0.1:")
            printed = {}
            for _ in range(3):
                _, epc, _, antenna = (await proc.stdout.readline()).decode().split()
                printed[epc] = int(antenna)
            sink = RecordingSink()
            cfg = MercuryReaderConfig(id="sim", url=url, antennas=[1, 2, 3, 4])
            driver = MercuryReader(cfg, sink)
            task = asyncio.create_task(driver.run(), name="test-mercury-sim-cli")
            try:
                await driver.start_inventory()
                await sink.wait_for(lambda: printed.keys() <= {r.epc for r in sink.reads})
                assert all(r.antenna == printed[r.epc] for r in sink.reads)
                assert driver.health.state == ReaderState.INVENTORYING
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            proc.stdin.close()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_simulator_process_places_weak_neighbour_tags() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(CABINET_SIM),
        "mercury",
        *("--tcp", "0", "--tags", "2", "--neighbours", "2", "--neighbour-duty", "0.5"),
        *("--seed", "5"),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT_S):
            url = (await proc.stdout.readline()).decode().rsplit(" at ", 1)[1].strip()
            lines = [(await proc.stdout.readline()).decode().split() for _ in range(4)]
            assert [w[0] for w in lines] == ["tag", "tag", "neighbour", "neighbour"]
            neighbours = {w[1] for w in lines[2:]}
            sink = RecordingSink()
            driver = MercuryReader(MercuryReaderConfig(id="sim", url=url, antennas=[1, 2]), sink)
            task = asyncio.create_task(driver.run(), name="test-mercury-sim-neighbours")
            try:
                await driver.start_inventory()
                await sink.wait_for(lambda: neighbours <= {r.epc for r in sink.reads})
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            weak = [r.peak_rssi_dbm for r in sink.reads if r.epc in neighbours]
            assert all(rssi is not None and rssi <= -70 for rssi in weak), weak
            proc.stdin.close()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_neighbour_tag_answers_in_runs_in_a_share_of_the_cycles() -> None:
    import random

    from simulators.mercury.sim import SimTag

    tag = SimTag(b"\x30\x01", 1, -79.0, 2.0, 1.0, duty=0.3, burst_rounds=6.0)
    rng = random.Random(4)
    answered = [tag.next_round(rng) for _ in range(20_000)]
    runs = [len(r) for r in "".join("x" if a else " " for a in answered).split()]
    assert 0.26 < sum(answered) / len(answered) < 0.34
    assert 5.0 < sum(runs) / len(runs) < 7.0
