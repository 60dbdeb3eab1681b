"""A Mercury-read cabinet through the real agent: a cloned tag (a pinned item's EPC on another
chip) placed among the stock is ``item.counterfeit`` from the background inventory — the
module's embedded TID read, the driver, the engine rule, sealed events over real mosquitto."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backend.signing import asset_registry_doc, sign_document
from simulators.cabinet.provisioning import publish_retained
from simulators.mercury import MercurySimulator
from tests.daemon_rig import AgentProcess
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import EventSink
from tests.test_mercury_cabinet import READER, TIMEOUT_S, _config, _provision

WRENCH = "e2801160600002000000c001"
WRENCH_TID = "e2801160200074cf0a6b0a12"
DRILL = "e2801160600002000000c002"
CLONE_TID = "e28011052000a1b2c3d4e5f6"


async def test_clone_among_the_stock_is_counterfeit_from_a_background_inventory(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = _provision(tmp_path)
    (tmp_path / "state").mkdir()
    now = datetime.now(UTC)
    registry = asset_registry_doc(
        "hangar-3",
        "crib-09",
        1,
        now + timedelta(days=30),
        [
            {"epc": WRENCH, "asset_id": "TW-1", "tid": WRENCH_TID},
            {"epc": DRILL, "asset_id": "DR-2"},
        ],
        issued_at=now - timedelta(minutes=1),
    )
    signed = sign_document(keys.signing_private, keys.signing_kid, registry)
    await asyncio.to_thread(
        publish_retained, mosquitto.port, "cabinets/v1/hangar-3/crib-09/cmd/asset-registry", signed
    )
    async with MercurySimulator("pty", antennas=4, seed=3) as merc:
        merc.add_tag(
            WRENCH, 1, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0, tid=WRENCH_TID
        )
        merc.add_tag(DRILL, 3, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0)
        reader = (
            f'type = "mercury"\nurl = "{merc.url}"\ndetect_antennas = true\nread_tid = true\n'
            "backoff = { initial_s = 0.05, max_s = 0.5 }"
        )
        cfg = tmp_path / "agent.toml"
        cfg.write_text(_config(tmp_path, reader, mosquitto.port))
        sink = EventSink(mosquitto.port, keys, asyncio.get_running_loop())
        sink.start()
        log = sink.log
        agent = AgentProcess(cfg, tmp_path / "agent.log")

        def of(type_: str, after_seq: int = 0) -> list[dict[str, Any]]:
            return log.find(lambda e: e["type"] == type_ and int(e["seq"]) > after_seq)

        try:
            await agent.start()
            await agent.wait_log(rf"reader {READER}: connecting -> online", TIMEOUT_S)
            await agent.wait_log(r"installed asset.registry version", TIMEOUT_S)
            await log.wait_for(lambda: bool(of("inventory.snapshot")), TIMEOUT_S)
            merc.add_clone(WRENCH, 4, CLONE_TID)  # the clone in the bottom drawer
            await log.wait_for(lambda: bool(of("item.counterfeit")), TIMEOUT_S)
            found = log.last_seq()
            # Two more complete inventories with the clone still there: reported once.
            await log.wait_for(lambda: len(of("inventory.snapshot", found)) >= 2, TIMEOUT_S)
        finally:
            try:
                rc = await agent.stop()
            finally:
                sink.stop()
        assert rc == 0, agent.text()
    (fake,) = of("item.counterfeit")
    assert {k: fake.get(k) for k in ("epc", "asset_id", "tid", "drawer", "actors")} == {
        "epc": WRENCH,
        "asset_id": "TW-1",
        "tid": CLONE_TID,
        "drawer": "bottom",
        "actors": None,
    }
    # The wrench itself (its own TID read too) never left the inventory.
    for snap in of("inventory.snapshot"):
        assert snap["items"] == {WRENCH: "top", DRILL: "bottom"}
    assert not of("item.missing")
