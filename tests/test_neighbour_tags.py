"""Neighbour cabinet tags on a Mercury module, through the real agent's background inventories.

The Mercury simulator (TCP) holds three tools and two tags of the cabinet next door, heard
weakly and now and then (``add_neighbour_tag``); ``cabinet-agent run`` inventories every
half second with no asset registry, so only the RSSI floors and read consistency decide. Every
snapshot must hold exactly the three tools, and nothing may be reported missing — the path in
the field report: a neighbour's tag entered the baseline during a background inventory, and
when it faded the next person was charged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from simulators.mercury import MercurySimulator
from tests.daemon_rig import AgentProcess
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import EventSink
from tests.test_mercury_cabinet import _provision

TIMEOUT_S = 60.0
SNAPSHOTS = 12
TOOLS = {
    "e2801160600002000000c001": 1,
    "e2801160600002000000c002": 2,
    "e2801160600002000000c003": 2,
}
NEIGHBOURS = {"e2801160600002000000f001": (1, -79.0), "e2801160600002000000f002": (2, -77.0)}
DRAWER = {1: "left", 2: "right"}


def _config(tmp: Path, url: str, mqtt_port: int) -> str:
    creds, state = tmp / "creds", tmp / "state"
    return f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-11"

[[readers]]
type = "mercury"
id = "shelf-1"
url = "{url}"
antennas = [1, 2]
backoff = {{ initial_s = 0.05, max_s = 0.5 }}

[privacy]
site_key = "{creds}/site.key"
seal_public_key = "{creds}/backend-hpke.pub"
signing_public_keys = ["{creds}/signing.pub"]

[store]
path = "{state}/state.db"

[control]
socket_path = "{state}/control.sock"
group = "root"

[metrics]
port = 0

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}

[domain]
drawers = {{ left = ["shelf-1:1"], right = ["shelf-1:2"] }}
background_period_s = 0.5
scan_min_ms = 1200
stable_ms = 300
scan_max_ms = 10000
presence_round_ms = 250
"""


async def test_neighbour_tags_never_enter_the_inventory_of_background_scans(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = _provision(tmp_path)
    (tmp_path / "state").mkdir()
    async with MercurySimulator("tcp", antennas=2, seed=11) as merc:
        for epc, port in TOOLS.items():
            merc.add_tag(epc, port, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0)
        for epc, (port, rssi) in NEIGHBOURS.items():
            merc.add_neighbour_tag(epc, port, rssi_mean=rssi, duty=0.35)
        cfg = tmp_path / "agent.toml"
        cfg.write_text(_config(tmp_path, merc.url, mosquitto.port))
        sink = EventSink(mosquitto.port, keys, asyncio.get_running_loop())
        sink.start()
        log = sink.log
        agent = AgentProcess(cfg, tmp_path / "agent.log")
        try:
            await agent.start()
            await log.wait_for(
                lambda: sum(e["type"] == "inventory.snapshot" for e in log.events) >= SNAPSHOTS,
                TIMEOUT_S,
            )
            # The agent did hear the neighbours, now and then.
            heard = {e: merc.records_by_epc[bytes.fromhex(e)] for e in NEIGHBOURS}
        finally:
            try:
                rc = await agent.stop()
            finally:
                sink.stop()
        assert rc == 0, agent.text()
    assert all(n >= 20 for n in heard.values()), heard
    events = sorted(log.events, key=lambda e: int(e["seq"]))
    tools = {epc: DRAWER[port] for epc, port in TOOLS.items()}
    snapshots = [e for e in events if e["type"] == "inventory.snapshot"]
    assert len(snapshots) >= SNAPSHOTS
    assert all(s["items"] == tools for s in snapshots), [s["items"] for s in snapshots]
    others = {e["type"] for e in events} - {"inventory.snapshot"}
    assert others == set(), others
