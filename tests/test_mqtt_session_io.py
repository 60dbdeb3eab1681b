"""System calls per packet on a real broker connection (``agent/mqtt/session.py``).

paho reads a packet with three ``recv()`` (type, length, rest) and writes each queued packet
with its own ``send()``; the session reads through a buffer and joins queued packets, so a
window of publishes and their PUBACKs costs a few system calls, not a few per message; a
plain PUBACK is decoded without paho's per-packet ``Properties`` and ``ReasonCode`` objects.
"""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties

from agent.mqtt.config import MqttConfig
from agent.mqtt.session import EndKind, MqttSession
from simulators.fakebroker import FakeBroker
from tests.mqtt_fixtures import Mosquitto

N = 20
TOPIC = "cabinets/v1/site/cab/events"


@pytest.fixture(name="syscalls")
def syscalls_fixture(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts paho's socket primitives (each one is one system call)."""
    counts = {"send": 0, "recv": 0, "properties": 0}
    send, recv = mqtt.Client._sock_send, mqtt.Client._sock_recv
    properties_init = Properties.__init__

    def counting_properties(self: Properties, packet_type: int) -> None:
        counts["properties"] += 1
        properties_init(self, packet_type)

    def counting_send(self: mqtt.Client, buf: bytes) -> int:
        counts["send"] += 1
        return send(self, buf)

    def counting_recv(self: mqtt.Client, bufsize: int) -> bytes:
        counts["recv"] += 1
        return recv(self, bufsize)

    monkeypatch.setattr(mqtt.Client, "_sock_send", counting_send)
    monkeypatch.setattr(mqtt.Client, "_sock_recv", counting_recv)
    monkeypatch.setattr(Properties, "__init__", counting_properties)
    return counts


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_window_of_publishes_costs_fewer_syscalls_than_messages(
    mosquitto: Mosquitto, syscalls: dict[str, int], protocol: str
) -> None:
    cfg = MqttConfig(host="127.0.0.1", port=mosquitto.port, protocol=protocol)
    session = MqttSession(cfg, "io-test", will=None, tls_context=None)
    async with asyncio.timeout(10):
        await session.connect()
    try:
        before = dict(syscalls)
        # Queued in one loop iteration, as the publisher fills its window.
        futs: list[asyncio.Future[Any]] = [
            session.publish(TOPIC, b"x" * 300 + bytes([i])) for i in range(N)
        ]
        async with asyncio.timeout(10):
            codes = await asyncio.gather(*futs)
        # Taken (v5 says 0x10, no matching subscribers: a success code).
        assert all(code < 0x80 for code in codes), codes
        sends = syscalls["send"] - before["send"]
        recvs = syscalls["recv"] - before["recv"]
        # One send for the whole window (paho alone: one per publish).
        assert sends < N, sends
        # At most one read that returns data and one that finds the socket drained per
        # wake-up, however the PUBACKs arrive (paho alone: three reads per PUBACK, plus one).
        assert recvs < 3 * N, recvs
        # A PUBACK without properties is decoded without paho's per-packet objects (paho
        # alone: a Properties object per PUBACK).
        assert syscalls["properties"] - before["properties"] < N
        assert session.acks == N
    finally:
        await session.disconnect(2.0)
        assert session.closed.done()


async def test_an_idle_session_wakes_for_its_keepalive_not_every_second(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """loop_misc runs when the keepalive (or an ack timeout) is due, yet the PINGREQs go out
    and are answered, one keepalive after another."""
    misc_calls = 0
    pongs = 0
    answered = asyncio.Event()
    loop_misc, handle_pingresp = mqtt.Client.loop_misc, mqtt.Client._handle_pingresp

    def counting_misc(self: mqtt.Client) -> mqtt.MQTTErrorCode:
        nonlocal misc_calls
        misc_calls += 1
        return loop_misc(self)

    def counting_pingresp(self: mqtt.Client) -> mqtt.MQTTErrorCode:
        nonlocal pongs
        pongs += 1
        answered.set()
        return handle_pingresp(self)

    monkeypatch.setattr(mqtt.Client, "loop_misc", counting_misc)
    monkeypatch.setattr(mqtt.Client, "_handle_pingresp", counting_pingresp)
    cfg = MqttConfig(host="127.0.0.1", port=mosquitto.port, keepalive_s=5)
    session = MqttSession(cfg, "idle-test", will=None, tls_context=None)
    async with asyncio.timeout(10):
        await session.connect()
    try:
        for n in (1, 2):
            async with asyncio.timeout(20):
                while pongs < n:
                    answered.clear()
                    await answered.wait()
            # One look a second after the connect, then one per keepalive (each sends the
            # PINGREQ); a timer every second would have looked about five times per ping.
            assert misc_calls <= n + 1, (n, misc_calls)
        assert not session.closed.done()
    finally:
        await session.disconnect(2.0)
        assert session.closed.done()


async def test_a_broker_gone_silent_while_idle_is_noticed_within_two_keepalives() -> None:
    """Nothing in flight, no traffic: the only thing that can notice a broker (or a link) that
    went silent is paho's keepalive, which loop_misc runs only when due. The PINGREQ goes out
    one keepalive after the last traffic and its missing answer ends the connection one more
    keepalive later, as paho alone would (a timer that slipped would leave it up)."""
    keepalive = 5
    async with FakeBroker(ack_publishes=False) as broker:  # CONNACK, then no PINGRESP
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, keepalive_s=keepalive)
        session = MqttSession(cfg, "silent-test", will=None, tls_context=None)
        async with asyncio.timeout(10):
            await session.connect()
        try:
            # Bounded at three keepalives: two is paho's own detection time.
            async with asyncio.timeout(3 * keepalive):
                await asyncio.shield(session.closed)
            assert session.end_kind is EndKind.KEEPALIVE, (session.end_kind, session.closed)
        finally:
            await session.disconnect(2.0)
