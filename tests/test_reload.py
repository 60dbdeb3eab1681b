"""SIGHUP on a running daemon: applies what it can, names what needs a restart, drops nothing."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from agent.control.client import ControlClient
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision


async def _status(tmp: Path) -> dict[str, Any]:
    async with ControlClient(tmp / "control.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("status")
        return result


async def test_sighup_applies_log_level_and_thresholds_without_dropping_the_reader(
    tmp_path: Path,
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim:
        sim.add_random_tags(8, seed=1)
        cfg.write_text(config_text(tmp_path, sim.port, level="INFO"))
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"reader dock-1: \S+ -> online")
            await agent.wait_log(r"cabinet-agent \S+ ready")
            before = await _status(tmp_path)
            connections = sim.connections.total
            session = before["readers"][0]["session"]
            assert before["readers"][0]["state"] == "online"

            # Live: log level and a domain threshold. Needs a restart: the reader's keepalive.
            cfg.write_text(
                config_text(
                    tmp_path, sim.port, level="DEBUG", keepalive_s=2.0, domain="min_reads = 3"
                )
            )
            agent.signal(signal.SIGHUP)
            applied = await agent.wait_log(r"reload applied: (.*)")
            assert "level DEBUG" in applied.group(1)
            assert "domain min_reads" in applied.group(1)
            restart = await agent.wait_log(r"reload: changes to (.*) need a restart")
            assert restart.group(1) == "readers (dock-1)"

            after = await _status(tmp_path)
            assert after["reloads"] == 1
            assert after["readers"][0]["state"] == "online"
            assert after["readers"][0]["session"] == session, "reader session was re-opened"
            assert sim.connections.total == connections, "reader connection was dropped"
            assert sim.connections.active == 1

            # A broken file is refused as a whole; the daemon runs on with what it had.
            cfg.write_text(config_text(tmp_path, sim.port) + "\n[bogus]\nx = 1\n")
            agent.signal(signal.SIGHUP)
            refused = await agent.wait_log(r"reload refused: (.*)")
            assert "bogus" in refused.group(1)
            still = await _status(tmp_path)
            assert still["reloads"] == 2
            assert agent.proc is not None
            assert agent.proc.returncode is None
            assert sim.connections.total == connections
            rc = await agent.stop()
        text = agent.text()
        assert rc == 0, text
        errors = [
            line
            for line in text.splitlines()
            if " ERROR " in line and " agent." in line and "reload refused" not in line
        ]
        assert not errors, text
        # The DEBUG level took effect: debug lines only appear after the reload.
        head, _, tail = text.partition("reload applied")
        assert " DEBUG " not in head
        assert " DEBUG " in tail
