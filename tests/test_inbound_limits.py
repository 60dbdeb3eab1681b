"""Inbound messages cannot make the agent's memory grow: a 50 MiB command against the real agent.

Before: the size limit was checked after paho had buffered the whole message (a 200 MiB publish
peaked the agent at ~726 MiB). Now the CONNECT advertises a Maximum Packet Size (MQTT v5: the
broker drops larger messages for this client) and the session refuses to buffer more than the
limit whatever the protocol (MQTT 3.1.1 has no such property: the payload is discarded unread).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from backend.keys import load_backend_keys
from backend.signing import allow_list_doc, sign_document
from backend.subscriber import stop_client
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto

CMD_TOPIC = "cabinets/v1/hangar-3/crib-07/cmd/allow-list"
MIB = 1024 * 1024
HUGE = 50 * MIB
MAX_COMMAND_BYTES = 1 * MIB  # the default [mqtt] max_command_bytes
# What the agent may hold beyond its idle peak while this happens: a couple of copies of the
# largest command it accepts, plus room for ordinary work. Buffering the 50 MiB message even
# once would exceed it threefold.
BOUND = 2 * MAX_COMMAND_BYTES + 12 * MIB


def _kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


def _reset_peak(pid: int) -> None:
    """Start VmHWM (peak RSS) again from the current RSS (proc(5): clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _publish(port: int, payloads: list[bytes], protocol: MQTTProtocolVersion) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-backend", protocol=protocol)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(CMD_TOPIC, payload, qos=1).wait_for_publish(120)
    finally:
        stop_client(client)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_50_mib_command_leaves_memory_bounded_and_the_agent_working(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    provision(tmp_path)
    backend = load_backend_keys(tmp_path / "backend")
    doc = allow_list_doc("hangar-3", "crib-07", 1, datetime.now(UTC) + timedelta(days=1), {})
    valid = sign_document(backend.signing_private, backend.signing_kid, doc)
    cfg = tmp_path / "agent.toml"
    paho_protocol = MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=31) as sim:
        extra = (
            f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nprotocol = "{protocol}"\n'
            f"max_command_bytes = {MAX_COMMAND_BYTES}\n"
        )
        cfg.write_text(config_text(tmp_path, sim.port, extra=extra))
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"MQTT connected as")
            await agent.wait_log(r"reader dock-1: connecting -> online")
            _reset_peak(agent.pid)
            idle = _kib(agent.pid, "VmHWM")
            # The huge one, then a valid document: the broker delivers in order, so once the
            # second is installed the first has been dealt with.
            await asyncio.to_thread(
                _publish, mosquitto.port, [b"\x7b" * HUGE, valid], paho_protocol
            )
            await agent.wait_log(r"installed allow-list", timeout=120)
            peak = _kib(agent.pid, "VmHWM")
            assert peak - idle < BOUND, (idle, peak)
            log = agent.text()
            assert "MQTT connection lost" not in log  # stayed connected throughout
            if protocol == "3.1.1":
                # No Maximum Packet Size in 3.1.1: the broker sends it, the agent discards it
                # unread and refuses it with a reason.
                assert re.search(r"inbound message of \d+ bytes on \S+ exceeds the limit", log)
                assert re.search(r"refused allow-list document: malformed \(\d+ bytes exceeds", log)
            rc = await agent.stop()
        assert rc == 0, agent.text()
