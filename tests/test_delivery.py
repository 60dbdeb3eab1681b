"""Delivery against a real mosquitto: exact content, broker crash, ACL refusals, commands."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.mqtt.publisher import Publisher
from agent.mqtt.states import BrokerState
from agent.store import StoreAlert
from backend.keys import BackendKeys
from tests.delivery_helpers import (
    CABINET,
    PROTOCOLS,
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
from tests.mqtt_fixtures import Mosquitto, dynsec_broker


@pytest.fixture
def keys(tmp_path: Path) -> BackendKeys:
    return backend(tmp_path / "backend")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_events_arrive_exactly_with_content(
    tmp_path: Path, mosquitto: Mosquitto, keys: BackendKeys, protocol: str
) -> None:
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(tmp_path / "state.db") as store:
            sealer = sealer_for(keys)
            rows = await append_sealed(store, sealer, 150)
            cfg = mqtt_cfg(mosquitto.port, protocol=protocol)
            pub = Publisher(cfg, SITE, CABINET, store, key_ids=["hpke1"])
            async with running(pub):
                more = await append_sealed(store, sealer, 50)
                pub.notify()
                ok = await until(lambda: len(collector.events) >= 200, 60)
                assert ok, f"got {len(collector.events)} of 200"
                assert await until(lambda: pub.stats.acked == 200)
            assert (await store.stats()).depth == 0, "acknowledged rows must be deleted"
        assert_exact(collector, rows + more)
        assert pub.stats.failed == 0
        assert pub.stats.last_publish_latency_s is not None
    finally:
        collector.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_broker_killed_and_restarted_mid_stream(
    tmp_path: Path, mosquitto: Mosquitto, keys: BackendKeys, protocol: str
) -> None:
    # What mosquitto holds for a subscriber beyond its in-flight window lives in its memory until
    # the subscriber acknowledges earlier messages: a collector slowed by a loaded machine then
    # leaves acknowledged events in the broker's queue, and a kill -9 loses them (broker
    # durability, not ours; CI saw it once). Unlimited in flight puts each on the socket at once.
    mosquitto.stop()
    mosquitto.extra_conf += "max_inflight_messages 0\n"  # later lines win over the defaults
    mosquitto.start()
    # Persistent consumer session: the broker keeps its subscription and queue across restarts.
    collector = Collector(mosquitto.port, keys, client_id="backend-1", session_expiry_s=3600)
    collector.start()
    # The consumer's session must be on disk before the crash, or the restarted broker would
    # not know to queue for it.
    mosquitto.wait_saved()  # nothing else runs on the loop yet
    try:
        async with open_store(tmp_path / "state.db") as store:
            sealer = sealer_for(keys)
            rows = await append_sealed(store, sealer, 300)
            # A paced stream keeps the broker's per-subscriber queue empty: what mosquitto has
            # acknowledged but not yet forwarded or autosaved dies with a kill -9 (broker
            # durability, not ours). Everything the publisher had in flight must survive.
            cfg = mqtt_cfg(mosquitto.port, replay_rate=400, replay_burst=5, protocol=protocol)
            pub = Publisher(cfg, SITE, CABINET, store)
            async with running(pub):

                def mid_stream_and_forwarded() -> bool:
                    # Killed mid-stream (publishes in flight), at a moment when every event the
                    # publisher already took as delivered has reached the consumer: an event
                    # mosquitto acknowledged but had not yet written to the consumer's socket
                    # (its next loop turn does) dies with it -- broker durability, not ours,
                    # seen under load. What is in flight must survive the kill.
                    inflight = pub._inflight
                    if pub.stats.acked < 50 or not inflight:
                        return False
                    have = set(collector.seqs())
                    top = max(inflight)
                    return all(r.seq in have for r in rows if r.seq < top and r.seq not in inflight)

                assert await until(mid_stream_and_forwarded)
                mosquitto.kill()  # no await since the predicate held: nothing moved meanwhile
                rows += await append_sealed(store, sealer, 100)  # written while the broker is down
                await asyncio.sleep(0.3)
                mosquitto.start()
                pub.notify()
                ok = await until(lambda: len(collector.events) >= len(rows), 60)
                missing = sorted({r.seq for r in rows} - set(collector.seqs()))
                assert ok, (
                    f"got {len(collector.events)} of {len(rows)}: missing {missing}; log:\n{mosquitto.log_tail()}"
                )
                assert pub.stats.reconnects >= 1
        assert_exact(collector, rows)
    finally:
        collector.stop()


async def test_acl_denied_publish_is_not_delivered(
    tmp_path: Path, keys: BackendKeys, caplog: pytest.LogCaptureFixture
) -> None:
    # Anonymous clients may read everything but publish only the status topic, not events.
    acl = f"topic read #\ntopic write cabinets/v1/{SITE}/{CABINET}/status\n"
    broker = Mosquitto(tmp_path / "broker", acl=acl)
    broker.start()
    alerts: list[StoreAlert] = []
    try:
        async with open_store(tmp_path / "state.db", alerts, dead_letter_after=3) as store:
            rows = await append_sealed(store, sealer_for(keys), 2)
            pub = Publisher(mqtt_cfg(broker.port), SITE, CABINET, store)
            with caplog.at_level(logging.WARNING):
                async with running(pub):
                    assert await until(lambda: pub.stats.dead_lettered == 2, 60), pub.stats
            stats = await store.stats()
            assert pub.stats.acked == 0, "a refused publish must not count as delivered"
            assert stats.depth == 0, stats
            assert stats.dead == 2, stats
            assert pub.stats.failed >= 2 * 3
            assert any(a.kind == "store.dead_lettered" for a in alerts)
            assert {s for a in alerts for s in a.seqs} >= {r.seq for r in rows}
            assert "0x87" in caplog.text
    finally:
        broker.stop()


async def test_acl_denied_publish_on_mqtt_311_is_kept_and_shown(
    tmp_path: Path, keys: BackendKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT 3.1.1 has no PUBACK reason code: mosquitto acknowledges a publish its ACL refuses
    and drops it (only its log says so). The agent must not take that PUBACK for delivery."""
    acl = f"topic read #\ntopic write cabinets/v1/{SITE}/{CABINET}/status\n"
    broker = Mosquitto(tmp_path / "broker", acl=acl)
    broker.start()
    try:
        async with open_store(tmp_path / "state.db", dead_letter_after=3) as store:
            rows = await append_sealed(store, sealer_for(keys), 2)
            cfg = mqtt_cfg(broker.port, protocol="3.1.1", keepalive_s=5)
            pub = Publisher(cfg, SITE, CABINET, store)
            with caplog.at_level(logging.WARNING):
                async with running(pub):
                    # The broker acknowledged the publishes (that is what mosquitto does)...
                    assert await until(
                        lambda: pub.stats.state is BrokerState.NOT_ACKNOWLEDGING, 60
                    ), pub.stats
                    assert await until(lambda: pub.stats.reconnects >= 2, 60), pub.stats
            stats = await store.stats()
            # ...but never delivered them: they are still in the outbox, nothing dead-lettered.
            assert pub.stats.acked == 0, "a PUBACK alone is no delivery on MQTT 3.1.1"
            assert stats.depth == len(rows), stats
            assert stats.dead == 0, stats
            assert "not delivered back" in caplog.text
            assert "does not acknowledge publishes" in caplog.text
    finally:
        broker.stop()


async def test_a_refused_echo_subscription_on_mqtt_311_keeps_the_events_and_says_why(
    tmp_path: Path, keys: BackendKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """On 3.1.1 the cabinet must read its own events topic to confirm its events; a broker that
    refuses that subscription (SUBACK 0x80) can never confirm one: nothing is deleted."""
    broker = dynsec_broker(tmp_path / "broker", deny_subscribe=["cabinets/v1/+/+/events"])
    broker.start()
    try:
        async with open_store(tmp_path / "state.db") as store:
            rows = await append_sealed(store, sealer_for(keys), 3)
            pub = Publisher(mqtt_cfg(broker.port, protocol="3.1.1"), SITE, CABINET, store)
            with caplog.at_level(logging.WARNING):
                async with running(pub):
                    assert await until(
                        lambda: pub.stats.state is BrokerState.NOT_ACKNOWLEDGING, 60
                    ), pub.stats
                    assert await until(lambda: pub.stats.reconnects >= 2, 60), pub.stats
            assert pub.stats.acked == 0
            assert (await store.stats()).depth == len(rows)
            assert "broker refused our subscription to cabinets/v1/site1/cab1/events" in caplog.text
            # The command subscriptions were granted: they are not what is reported refused.
            assert pub.stats.commands_refused == {}
    finally:
        broker.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cancelled_publisher_cleans_up_and_a_successor_finishes(
    tmp_path: Path, mosquitto: Mosquitto, keys: BackendKeys, protocol: str
) -> None:
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(tmp_path / "state.db") as store:
            rows = await append_sealed(store, sealer_for(keys), 300)
            cfg = mqtt_cfg(mosquitto.port, replay_rate=300, replay_burst=5, protocol=protocol)
            first = Publisher(cfg, SITE, CABINET, store)
            task = asyncio.create_task(first.run(), name="doomed-publisher")
            assert await until(lambda: first.stats.acked >= 20)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=20)
            assert done, "cancellation must end run() promptly"
            assert task.cancelled(), "CancelledError must propagate, not be swallowed"
            second = Publisher(cfg, SITE, CABINET, store)
            async with running(second):
                assert await until(lambda: len(collector.events) >= len(rows), 60)
            assert (await store.stats()).depth == 0
        assert_exact(collector, rows)
    finally:
        collector.stop()
