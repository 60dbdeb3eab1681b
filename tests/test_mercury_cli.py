"""``cabinetctl readers scan`` builds the Mercury driver through the registry and reports tags."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from simulators.mercury import MercurySimulator

ROOT = Path(__file__).resolve().parent.parent
CABINETCTL = Path(sys.executable).parent / "cabinetctl"
WAIT_S = 90.0


@pytest_asyncio.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


async def test_readers_scan_lists_every_tag_of_a_mercury_reader(tmp_path: Path) -> None:
    async with MercurySimulator("tcp", antennas=2, seed=41) as sim:
        tags = sim.add_random_tags(6)
        for tag in tags:
            tag.read_probability = 1.0  # the scan is short; make every cycle count
        config = tmp_path / "agent.toml"
        config.write_text(
            '[cabinet]\nsite_id = "hangar-3"\ncabinet_id = "crib-07"\n\n'
            f'[[readers]]\ntype = "mercury"\nid = "uhf-1"\nurl = "{sim.url}"\n'
            "antennas = [1, 2]\nread_power_dbm = 25.0\n"
        )
        proc = await asyncio.create_subprocess_exec(
            str(CABINETCTL),
            "readers",
            "scan",
            "--config",
            str(config),
            "--seconds",
            "2",
            "--json",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(WAIT_S):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    seen = {t["epc"]: t for t in report["tags"]}
    assert set(seen) == {t.epc.hex() for t in tags}
    for tag in tags:
        row = seen[tag.epc.hex()]
        assert row["reader"] == "uhf-1"
        assert row["antenna"] == tag.antenna
        assert row["reads"] >= 1
    assert report["readers_failed"] == {}
