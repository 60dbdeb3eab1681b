"""An error escaping the daemon's task tree ends the real process: promptly, non-zero, one line.

Before: the tree unwound but a worker thread that never returned kept the interpreter alive (no
control socket, no publishing, nothing for systemd to restart). The faults are injected by
``tests.fault_agent`` (the real entry point plus test-only bugs); the trigger is a real message
from a real broker.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.lifecycle import EX_SOFTWARE
from backend.subscriber import stop_client
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto

CMD_TOPIC = "cabinets/v1/hangar-3/crib-07/cmd/allow-list"


def _publish(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-backend")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        stop_client(client)


@pytest.mark.parametrize(
    ("faults", "evidence"),
    [
        # The pool thread never returns: the process must not wait for it at exit.
        ("command-raises,stuck-pool-thread", r"not waiting for stuck thread\(s\): mqtt-worker"),
        # asyncio.run joins the default executor without a timeout: not any more.
        ("command-raises,stuck-default-thread", r"not waiting for stuck thread\(s\): asyncio"),
        # The tree never finishes unwinding: the exit guard ends the process.
        ("command-raises,unwind-hangs", r"exit forced \(code 70\): task mqtt-publisher failed"),
    ],
)
async def test_an_escaping_error_ends_the_process(
    tmp_path: Path, mosquitto: Mosquitto, faults: str, evidence: str
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=5) as sim:
        cfg.write_text(
            config_text(
                tmp_path, sim.port, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
            )
        )
        agent = AgentProcess(
            cfg,
            tmp_path / "agent.log",
            env={"CABINET_TEST_FAULTS": faults},
            module="tests.fault_agent",
        )
        async with agent:
            await agent.wait_log(r"MQTT connected as")
            await asyncio.to_thread(_publish, mosquitto.port, CMD_TOPIC, b"anything")
            # Bounded: before the fix the process never ended by itself.
            rc = await agent.wait_exit(timeout=60.0)
    log = agent.text()
    assert rc == EX_SOFTWARE, log
    fatal = re.findall(r"CRITICAL agent\.daemon: fatal: .*", log)
    assert len(fatal) == 1, log
    assert "task mqtt-publisher failed: RuntimeError: injected fault" in fatal[0]
    assert "Traceback" not in log
    assert re.search(evidence, log), log
    # The store was closed in order before the end (SQLite removes the WAL on the last close).
    assert (tmp_path / "state.db").exists()
    assert not (tmp_path / "state.db-wal").exists(), log
