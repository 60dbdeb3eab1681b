"""Flow control: in-flight window, broker Receive Maximum, live-first replay, token bucket, v3.1.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.mqtt.publisher import Publisher, TokenBucket
from backend.subscriber import stop_client
from simulators.faultproxy import FaultProxy
from tests.delivery_helpers import (
    CABINET,
    SITE,
    Collector,
    append_sealed,
    assert_exact,
    backend,
    mqtt_cfg,
    open_store,
    running,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import Mosquitto


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_paces_after_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4, burst=3, clock=clock)  # binary fractions: exact arithmetic
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == 0.25
    clock.t += 0.125
    assert bucket.take() == 0.125
    clock.t += 0.125
    assert bucket.take() == 0.0
    clock.t += 100  # a long idle refills only up to the burst
    assert [bucket.take() for _ in range(4)][-1] > 0
    assert TokenBucket(rate=0, burst=1, clock=clock).take() == 0.0  # unthrottled


@pytest.mark.parametrize(("window", "expected_cap"), [(5, 5), (50, 20)])
async def test_in_flight_window_is_bounded_by_config_and_broker(
    tmp_path: Path, mosquitto: Mosquitto, window: int, expected_cap: int
) -> None:
    # mosquitto's max_inflight_messages 20 comes back as Receive Maximum in the v5 CONNACK.
    keys = backend(tmp_path / "backend")
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with FaultProxy(mosquitto.port) as proxy, open_store(tmp_path / "state.db") as store:
            proxy.delay_s = 0.02  # PUBACKs take a while: the window fills up
            rows = await append_sealed(store, sealer_for(keys), 200)
            pub = Publisher(mqtt_cfg(proxy.port, inflight_window=window), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: len(collector.events) >= 200, 60)
            assert pub.stats.window == expected_cap
            assert pub.stats.peak_in_flight <= expected_cap
            assert pub.stats.peak_in_flight == expected_cap, "the window should be used fully"
        assert_exact(collector, rows)
    finally:
        collector.stop()


async def test_live_events_overtake_a_throttled_backlog(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = backend(tmp_path / "backend")
    sealer = sealer_for(keys)
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(tmp_path / "state.db") as store:
            backlog = await append_sealed(store, sealer, 200)  # queued during the "outage"
            cfg = mqtt_cfg(mosquitto.port, replay_rate=100, replay_burst=5)
            pub = Publisher(cfg, SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: pub.stats.connected and pub.stats.acked >= 3)
                live = await append_sealed(store, sealer, 5)
                pub.notify()
                live_seqs = {r.seq for r in live}
                assert await until(lambda: live_seqs <= set(collector.seqs()), 30)
                backlog_seen = len(set(collector.seqs()) - live_seqs)
                assert backlog_seen < len(backlog), "live events waited for the whole backlog"
                assert pub.stats.backlog_mark == backlog[-1].seq
                assert await until(lambda: len(collector.events) >= 205, 60)
        assert_exact(collector, backlog + live)
        order = collector.seqs()
        # The backlog itself is replayed oldest first.
        backlog_order = [s for s in order if s not in live_seqs]
        assert backlog_order == sorted(backlog_order)
    finally:
        collector.stop()


async def test_mqtt_311_delivery(tmp_path: Path, mosquitto: Mosquitto) -> None:
    keys = backend(tmp_path / "backend")
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(tmp_path / "state.db") as store:
            rows = await append_sealed(store, sealer_for(keys), 50)
            pub = Publisher(mqtt_cfg(mosquitto.port, protocol="3.1.1"), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: len(collector.events) >= 50, 60)
                assert await until(lambda: pub.stats.acked == 50)
        assert_exact(collector, rows)
    finally:
        collector.stop()


async def test_status_is_retained_with_a_last_will(tmp_path: Path, mosquitto: Mosquitto) -> None:
    keys = backend(tmp_path / "backend")
    status_topic = f"cabinets/v1/{SITE}/{CABINET}/status"
    async with open_store(tmp_path / "state.db") as store, FaultProxy(mosquitto.port) as proxy:
        pub = Publisher(mqtt_cfg(proxy.port), SITE, CABINET, store, key_ids=["hpke1"])
        async with running(pub):
            assert await until(lambda: pub.stats.connected)
            online = _retained(mosquitto.port, status_topic, keys)
            assert online["state"] == "online"
            assert online["key_ids"] == ["hpke1"]
            assert set(online) == {"state", "agent", "version", "protocol", "key_ids"}
            proxy.refuse(True)
            proxy.cut()  # abrupt loss: the broker publishes the will
            assert await until(lambda: not pub.stats.connected)
            assert await until(
                lambda: _retained(mosquitto.port, status_topic, keys).get("state") == "offline"
            )
            proxy.refuse(False)
            assert await until(lambda: pub.stats.connected, 30)
        # Clean stop: an explicit retained offline status.
        last = _retained(mosquitto.port, status_topic, keys)
        assert last == {**online, "state": "offline", "reason": "shutdown"}


def _retained(port: int, topic: str, keys: object) -> dict[str, object]:
    """Read a retained message with a throwaway subscriber (bounded wait)."""
    import json
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe(topic, qos=1)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), f"no retained message on {topic}"
    finally:
        stop_client(client)
    value = json.loads(got[0])
    assert isinstance(value, dict)
    return value
