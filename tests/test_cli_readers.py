"""``cabinetctl readers ping|scan`` as a technician runs them: subprocesses against the simulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from simulators.llrp import LlrpSimulator
from tests.daemon_rig import ctl

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: Path, readers: list[tuple[str, int]]) -> Path:
    text = '[cabinet]\nsite_id = "s1"\ncabinet_id = "c1"\n'
    text += f'[control]\nsocket_path = "{tmp}/none.sock"\n'
    for rid, port in readers:
        text += f"""
[[readers]]
type = "llrp"
id = "{rid}"
host = "127.0.0.1"
port = {port}
antennas = [1, 2, 3, 4]
keepalive_s = 1.0
connect_timeout_s = 3.0
inventory_deadline_s = 10.0
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


async def _dead_port() -> int:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    return port


async def test_ping_reports_ready_reader_and_advises_on_dead_one(tmp_path: Path) -> None:
    dead = await _dead_port()
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        cfg = _config(tmp_path, [("dock-1", sim.port), ("dock-2", dead)])
        rc, out, err = await ctl(
            "readers", "ping", "--config", str(cfg), "--json", "--timeout", "8"
        )
    assert rc == 69, err
    result = {r["reader"]: r for r in json.loads(out)["readers"]}
    assert result["dock-1"]["ok"] is True
    assert result["dock-2"]["ok"] is False
    assert "connection refused" in result["dock-2"]["detail"]
    assert "powered" in result["dock-2"]["detail"]


async def test_ping_human_output_all_ok(tmp_path: Path) -> None:
    async with LlrpSimulator(personality="zebra", antennas=4, port=0, seed=1) as sim:
        cfg = _config(tmp_path, [("dock-1", sim.port)])
        rc, out, _ = await ctl("readers", "ping", "--config", str(cfg))
    assert rc == 0
    assert out.startswith("dock-1: OK")


async def test_scan_lists_every_tag_with_its_antenna(tmp_path: Path) -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=4) as sim:
        tags = sim.add_random_tags(n=40, antennas=[1, 2, 3, 4], seed=9)
        cfg = _config(tmp_path, [("dock-1", sim.port)])
        rc, out, err = await ctl(
            "readers", "scan", "--config", str(cfg), "--seconds", "3", "--json"
        )
    assert rc == 0, err
    doc = json.loads(out)
    seen = {t["epc"]: t for t in doc["tags"]}
    assert set(seen) == {t.epc for t in tags}
    for t in tags:
        assert seen[t.epc]["antenna"] == t.antenna
        assert seen[t.epc]["reads"] >= 1
        assert -100 < seen[t.epc]["peak_rssi_dbm"] < 0
    assert doc["readers_failed"] == {}


async def test_scan_table_without_terminal_and_failed_reader_exit_code(tmp_path: Path) -> None:
    dead = await _dead_port()
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=4) as sim:
        sim.add_random_tags(n=3, antennas=[2], seed=1)
        cfg = _config(tmp_path, [("dock-1", sim.port), ("dock-9", dead)])
        rc, out, err = await ctl("readers", "scan", "--config", str(cfg), "--seconds", "2")
    assert rc == 69
    assert "3 tags" in out
    assert "dock-9" in err
    assert "connection refused" in err
