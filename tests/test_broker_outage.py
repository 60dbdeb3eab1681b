"""Liveness is "the loop does its job", never "the broker answers" (issue: restart loop).

The real ``cabinet-agent run`` under a fake systemd (NOTIFY_SOCKET + a short WATCHDOG_USEC), a
real mosquitto and the LLRP simulator. Before: with the broker gone the publisher stopped
reporting progress, the watchdog was withheld after 20 s and systemd restarted the agent every
~50 s for the whole outage.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.privacy.envelope import parse_header
from backend.subscriber import stop_client
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, NotifyListener, config_text, ctl, provision
from tests.delivery_helpers import PROTOCOLS
from tests.mqtt_fixtures import Mosquitto, free_port

EVENTS_TOPIC = "cabinets/v1/hangar-3/crib-07/events"
WATCHDOG_USEC = 2_000_000  # pings every 1 s; systemd would kill after 2 s without one
OUTAGE_S = 65.0
BUSY_DOMAIN = "background_period_s = 0.5\nscan_min_ms = 200\nstable_ms = 300"


class _Backend:
    """A consumer with a persistent session: sees every event, across broker restarts."""

    def __init__(self, port: int) -> None:
        self.seqs: set[int] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="test-backend", clean_session=False
        )
        self.client.on_connect = lambda c, *_: c.subscribe(EVENTS_TOPIC, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.seqs.add(parse_header(msg.payload).seq)

    def received(self) -> set[int]:
        with self._lock:
            return set(self.seqs)

    def close(self) -> None:
        stop_client(self.client)


async def _status(cfg: Path) -> dict[str, object]:
    rc, out, err = await ctl("status", "--config", str(cfg), "--json")
    assert rc == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#") and "{" not in line
    }


def _max_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_broker_outage_keeps_the_watchdog_fed_and_events_are_delivered_after(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    backend = _Backend(mosquitto.port)
    try:
        async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=21) as sim:
            sim.add_random_tags(6, seed=8)
            # The default backoff (up to 30 s between attempts, longer than the 20 s window).
            mqtt_section = (
                f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nprotocol = "{protocol}"\n'
                "keepalive_s = 5\nconnect_timeout_s = 3\n"
            )
            cfg.write_text(config_text(tmp_path, sim.port, domain=BUSY_DOMAIN, extra=mqtt_section))
            async with AgentProcess(
                cfg, tmp_path / "agent.log", env=listener.env(WATCHDOG_USEC)
            ) as agent:
                await listener.wait_for("READY", "1")
                ready_at = time.monotonic()
                metrics_port = int(
                    (await agent.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/")).group(1)
                )
                async with asyncio.timeout(60):
                    while not backend.received():
                        await asyncio.sleep(0.1)

                mosquitto.stop()
                outage_start = time.monotonic()
                # Events keep being committed; status says since when the broker is gone and
                # how many events wait for it.
                async with asyncio.timeout(60):
                    while True:
                        st = await _status(cfg)
                        broker = st["broker"]
                        outbox = st["outbox"]
                        assert isinstance(broker, dict)
                        assert isinstance(outbox, dict)
                        if broker["state"] == "unreachable" and int(outbox["depth"]) > 0:
                            break
                        await asyncio.sleep(0.5)
                assert broker["connected"] is False
                assert broker["unreachable_since"]
                assert broker["last_error"]
                rc, human, _ = await ctl("status", "--config", str(cfg))
                assert rc == 0
                line = next(x for x in human.splitlines() if x.strip().startswith("broker"))
                assert "UNREACHABLE since " in line, human
                assert "event(s) waiting" in line, human
                rc, out, _ = await ctl("selftest", "--config", str(cfg), "--json", "--timeout", "5")
                checks = {c["check"]: c for c in json.loads(out)["checks"]}
                assert checks["broker"]["status"] == "FAIL"
                assert "agent: broker UNREACHABLE since" in checks["broker"]["reason"]
                assert "event(s) waiting" in checks["broker"]["reason"]
                samples = await asyncio.to_thread(_scrape, metrics_port)
                assert samples["cabinet_mqtt_connected"] == 0.0
                # Sampled every 2 s by the daemon (gauges may be one sample apart).
                async with asyncio.timeout(30):
                    while (
                        samples["cabinet_mqtt_broker_unreachable_seconds"] <= 0.0
                        or samples["cabinet_outbox_depth"] <= 0.0
                    ):
                        await asyncio.sleep(0.5)
                        samples = await asyncio.to_thread(_scrape, metrics_port)

                # The outage lasts (the requirement: >= 60 s, three times the progress window).
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_start)))
                committed = (await _status(cfg))["last_event"]
                assert isinstance(committed, dict)
                last_seq = int(committed["seq"])
                mosquitto.start()
                outage_end = time.monotonic()

                # Everything committed up to the end of the outage reaches the backend.
                async with asyncio.timeout(90):
                    while not set(range(1, last_seq + 1)) <= backend.received():
                        await asyncio.sleep(0.2)
                async with asyncio.timeout(30):
                    while (await _status(cfg))["broker"]["state"] != "connected":  # type: ignore[index]
                        await asyncio.sleep(0.5)
                pings = listener.ping_times(after=ready_at)
                assert pings[0] < outage_start
                assert pings[-1] > outage_end
                # Never a gap systemd would have punished, before, during or after the outage.
                assert _max_gap(pings) < WATCHDOG_USEC / 1_000_000, pings
                assert "watchdog withheld" not in agent.text()
                rc = await agent.stop()
            assert rc == 0, agent.text()
    finally:
        backend.close()
        await listener.close()


async def _silent_broker(port: int, accepted: list[int]) -> asyncio.Server:
    """Accepts TCP connections, reads whatever comes, never answers (no CONNACK)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while await reader.read(4096):
                pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_a_broker_that_never_answers_is_an_outage_not_a_hang(tmp_path: Path) -> None:
    """Connect attempts that each wait longer than the 20 s progress window, then time out and
    retry: the publisher is doing its job, the watchdog stays fed."""
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    port = free_port()
    accepted: list[int] = []
    server = await _silent_broker(port, accepted)
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    try:
        async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=22) as sim:
            mqtt_section = (
                f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nconnect_timeout_s = 25\n'
                "backoff = { initial_s = 0.5, max_s = 1.0 }\n"
            )
            cfg.write_text(config_text(tmp_path, sim.port, extra=mqtt_section))
            async with AgentProcess(
                cfg, tmp_path / "agent.log", env=listener.env(WATCHDOG_USEC)
            ) as agent:
                await listener.wait_for("READY", "1")
                ready_at = time.monotonic()
                # Two attempts, each ended by its own 25 s timeout: > 2 progress windows.
                await agent.wait_log(r"(?s)(no CONNACK within 25 s.*){2}", timeout=90)
                assert len(accepted) >= 2
                st = await _status(cfg)
                assert st["broker"]["state"] == "unreachable"  # type: ignore[index]
                pings = listener.ping_times(after=ready_at)
                assert pings[-1] - pings[0] > 2 * 20.0  # two progress windows (WATCHDOG_WINDOW_S)
                assert _max_gap(pings) < WATCHDOG_USEC / 1_000_000, pings
                assert "watchdog withheld" not in agent.text()
                assert await agent.stop() == 0, agent.text()
    finally:
        server.close()
        await server.wait_closed()
        await listener.close()


async def test_a_publisher_that_stops_turning_withholds_the_watchdog(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A wedged store under a live loop: the publisher's drain waits forever on an outbox read.
    That is a hang, and the watchdog must say so (systemd restarts the service)."""
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    flag = tmp_path / "wedge-outbox"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    try:
        async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=23) as sim:
            sim.add_random_tags(4, seed=9)
            extra = f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
            cfg.write_text(config_text(tmp_path, sim.port, domain=BUSY_DOMAIN, extra=extra))
            env = {
                **listener.env(WATCHDOG_USEC),
                "CABINET_TEST_FAULTS": "outbox-hangs",
                "CABINET_TEST_FLAG": str(flag),
            }
            agent = AgentProcess(cfg, tmp_path / "agent.log", env=env, module="tests.fault_agent")
            async with agent:
                await listener.wait_for("READY", "1")
                await agent.wait_log(r"MQTT connected as")
                pings = len(listener.ping_times())
                await listener.wait_for("WATCHDOG", "1", count=pings + 2)
                flag.touch()
                stalled = await listener.wait_for("STATUS", "stalled: publisher", timeout=60)
                assert stalled == {"STATUS": "stalled: publisher"}
                await agent.wait_log(r"watchdog withheld: no progress from publisher")
                assert await agent.stop() == 0, agent.text()
    finally:
        await listener.close()
