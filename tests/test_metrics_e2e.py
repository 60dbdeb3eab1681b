"""Scrape a real daemon's /metrics while the LLRP simulator inventories for its background scans."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
        body: bytes = resp.read()
    return body.decode()


async def _scrape(port: int) -> Samples:
    text = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _reads(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["antenna"]: value
        for (name, labels), value in samples.items()
        if name == "cabinet_tag_reads_total" and dict(labels).get("reader") == "dock-1"
    }


async def _until(port: int, predicate: object, timeout: float = 30.0) -> Samples:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while True:
            samples = await _scrape(port)
            if predicate(samples):
                return samples
            await asyncio.sleep(0.25)


async def test_metrics_grow_while_the_simulator_inventories(tmp_path: Path) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=11) as sim:
        sim.add_random_tags(12, seed=4)
        cfg.write_text(
            config_text(
                tmp_path,
                sim.port,
                domain="background_period_s = 0.5\nscan_min_ms = 200\nstable_ms = 300",
            )
        )
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            port = int((await agent.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1))
            first = await _until(port, lambda s: len(_reads(s)) == 4 and all(_reads(s).values()))
            reads = _reads(first)
            # Background scans repeat: the counters keep growing on every antenna.
            later = await _until(
                port, lambda s: all(_reads(s)[a] > reads[a] for a in reads), timeout=45.0
            )
            assert set(_reads(later)) == {"1", "2", "3", "4"}

            state = {
                dict(labels)["cabinet_reader_state"]: value
                for (name, labels), value in later.items()
                if name == "cabinet_reader_state" and dict(labels).get("reader") == "dock-1"
            }
            # Exactly one state is active: healthy, between scans or in one.
            assert sum(state.values()) == 1.0
            assert state["online"] + state["inventorying"] == 1.0
            assert state["offline"] == 0.0

            # The first complete scan commits events; the outbox holds them (no broker here).
            final = await _until(
                port,
                lambda s: (
                    any(n == "cabinet_events_total" for n, _ in s)
                    and s[("cabinet_outbox_depth", ())] > 0
                ),
            )
            events = {
                dict(labels)["type"]: value
                for (name, labels), value in final.items()
                if name == "cabinet_events_total"
            }
            assert sum(events.values()) >= 1
            # Depth counts every committed, undelivered event (nothing is delivered here).
            assert final[("cabinet_outbox_depth", ())] >= sum(events.values())
            assert final[("cabinet_outbox_bytes", ())] > 0
            assert ("cabinet_agent_info", (("version", final_version(final)),)) in final

            # Background inventories are not door cycles: several snapshots, no cycle counted.
            snapshots = ("cabinet_events_total", (("type", "inventory.snapshot"),))
            seen = await _until(port, lambda s: s.get(snapshots, 0.0) >= 2.0, timeout=45.0)
            later = await _until(port, lambda s: s.get(snapshots, 0.0) > seen[snapshots])
            cycles = {k: v for k, v in later.items() if k[0] == "cabinet_door_cycles_total"}
            assert sum(cycles.values()) == 0.0, cycles

            # The reader drops its session; the agent re-establishes it: one reconnect counted.
            reconnects = ("cabinet_reader_reconnects_total", (("reader", "dock-1"),))
            assert final.get(reconnects, 0.0) == 0.0
            sim.close_client()
            await agent.wait_log(r"(?s)(reader dock-1: \S+ -> connecting.*){2}")
            after = await _until(port, lambda s: s.get(reconnects, 0.0) >= 1.0)
            assert after[reconnects] == 1.0
            rc = await agent.stop()
        assert rc == 0, agent.text()


def final_version(samples: Samples) -> str:
    for name, labels in samples:
        if name == "cabinet_agent_info":
            return dict(labels)["version"]
    raise AssertionError("no cabinet_agent_info")


async def test_metrics_show_delivery_to_the_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=12) as sim:
        sim.add_random_tags(6, seed=5)
        cfg.write_text(
            config_text(
                tmp_path,
                sim.port,
                domain="background_period_s = 0.5\nscan_min_ms = 200\nstable_ms = 300",
                extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n',
            )
        )
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            port = int((await agent.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1))
            # Events are committed, published and acknowledged: latency observed, outbox drains.
            samples = await _until(
                port,
                lambda s: (
                    s.get(("cabinet_publish_latency_seconds_count", ()), 0.0) >= 1.0
                    and s.get(("cabinet_events_total", (("type", "inventory.snapshot"),)), 0.0)
                    >= 2.0
                ),
                timeout=45.0,
            )
            assert samples[("cabinet_publish_latency_seconds_sum", ())] > 0.0
            drained = await _until(port, lambda s: s[("cabinet_outbox_depth", ())] == 0.0)
            assert drained[("cabinet_mqtt_reconnects_total", ())] == 0.0
            rc = await agent.stop()
        assert rc == 0, agent.text()


async def test_metrics_show_the_clock_provisional_then_trusted_after_time_sync(
    tmp_path: Path,
) -> None:
    """Hostile report 2, F7: a fleet can alert on a cabinet whose clock is not trusted."""
    provision(tmp_path)
    (tmp_path / "time-synced").unlink()  # the board booted, NTP has not synchronised yet
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=11) as sim:
        cfg.write_text(config_text(tmp_path, sim.port))
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            port = int((await agent.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1))
            early = await _until(port, lambda s: s.get(("cabinet_clock_provisional", ())) == 1.0)
            assert early[("cabinet_clock_trusted", ())] == 0.0
            assert early[("cabinet_clock_untrusted_seconds", ())] >= 0.0
            (tmp_path / "time-synced").touch()
            later = await _until(port, lambda s: s.get(("cabinet_clock_trusted", ())) == 1.0)
            assert later[("cabinet_clock_provisional", ())] == 0.0
            assert later[("cabinet_clock_untrusted_seconds", ())] == 0.0
            assert abs(later[("cabinet_clock_wall_offset_seconds", ())]) <= 2.0
            await agent.wait_log("clock: time synchronised")
            rc = await agent.stop()
        assert rc == 0, agent.text()
