"""One event the broker always refuses without saying which (docs/delivery.md §2, "An event
refused without a reason code"): it is found by sending one event at a time, dead-lettered after
``[store] dead_letter_after`` strikes while the other events go through, and kept.

The poison here is an event over the broker's size limit. mosquitto (``message_size_limit``),
on MQTT 3.1.1, acknowledges it and drops it (the echo never comes); on MQTT 5 it answers with a
PUBACK reason (0x95) that paho takes for a protocol error, ending the connection. RabbitMQ 3.10
(``max_message_size``, MQTT 3.1.1 only) fails its internal channel and leaves the connection
open with nothing acknowledged any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.mqtt.publisher import Publisher
from agent.privacy.envelope import Sealer
from agent.store import Store, StoreAlert
from agent.store.types import OutboxRow
from backend.keys import BackendKeys
from simulators.rabbitmq import RabbitCluster
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
    sealed_rows,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import Mosquitto

LIMIT = 4096  # mosquitto's message_size_limit; a test event is ~300 bytes


@pytest.fixture
def keys(tmp_path: Path) -> BackendKeys:
    return backend(tmp_path / "backend")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_event_the_broker_always_refuses_silently_is_dead_lettered_and_the_rest_flow(
    tmp_path: Path, keys: BackendKeys, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(tmp_path / "broker", extra_conf=f"message_size_limit {LIMIT}\n")
    broker.start()
    collector = Collector(broker.port, keys).start()
    try:
        rows = await _poison_among_others(tmp_path, keys, broker.port, protocol, caplog)
        assert await asyncio.to_thread(
            collector.wait_for, lambda: len(collector.events) >= len(rows)
        )
        assert_exact(collector, rows)  # every other event, exactly once; not the poison
    finally:
        collector.stop()
        broker.stop()


@pytest.mark.timeout(300)  # a RabbitMQ boot on a shared 2-core box
async def test_an_event_rabbitmq_refuses_is_dead_lettered_and_the_rest_flow(
    tmp_path: Path, keys: BackendKeys, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = RabbitCluster(
        tmp_path / "rabbitmq", nodes=1, extra_conf=f"max_message_size = {LIMIT}\n"
    )
    await asyncio.to_thread(cluster.start)
    try:
        # Confirmed on MQTT 3.1.1 = acknowledged and delivered back (docs/delivery.md §2):
        # every other event is in RabbitMQ's queues once the publisher counts it acked.
        await _poison_among_others(tmp_path, keys, cluster.mqtt_ports[0], "3.1.1", caplog)
        assert "larger than configured max size" in cluster.log_tail(0, 400)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _poison_among_others(
    tmp_path: Path,
    keys: BackendKeys,
    port: int,
    protocol: str,
    caplog: pytest.LogCaptureFixture,
) -> list[OutboxRow]:
    """10 events with a poison in the middle and one more every 0.5 s until the poison is
    dead-lettered (dead_letter_after = 2); every other one acknowledged. Returns the others."""
    alerts: list[StoreAlert] = []
    async with open_store(tmp_path / "state.db", alerts, dead_letter_after=2) as store:
        sealer = sealer_for(keys)
        rows = await append_sealed(store, sealer, 5)
        (poison,) = await append_sealed(store, sealer, 1, pad=2 * LIMIT)
        rows += await append_sealed(store, sealer, 5)
        cfg = mqtt_cfg(port, protocol=protocol, keepalive_s=5)
        pub = Publisher(cfg, SITE, CABINET, store)
        with caplog.at_level(logging.INFO):
            async with running(pub):
                # A door cycle now and then: the events that go through while the poison is
                # refused alone are what make its strikes count.
                feeder = asyncio.create_task(
                    _trickle(store, sealer, pub.notify, rows), name="trickle"
                )
                try:
                    assert await until(lambda: pub.stats.dead_lettered == 1, 120), pub.stats
                finally:
                    feeder.cancel()
                    await asyncio.gather(feeder, return_exceptions=True)
                assert await until(lambda: pub.stats.acked == len(rows), 60), pub.stats
                assert await until(lambda: not pub.stats.isolating, 30), pub.stats
            stats = await store.stats()
    assert stats.depth == 0, stats
    assert stats.dead == 1, "the poison is kept (sealed, dead-lettered), never deleted"
    dead = [a for a in alerts if a.kind == "store.dead_lettered"]
    assert [a.seqs for a in dead] == [(poison.seq,)], dead
    assert "only this event in flight" in dead[0].detail
    assert "sending one event at a time" in caplog.text
    return rows


async def _trickle(
    store: Store, sealer: Sealer, notify: Callable[[], None], rows: list[OutboxRow]
) -> None:
    while True:
        await asyncio.sleep(0.5)
        # Recorded before the append is awaited: the write is handed to the database thread
        # when append_events is called, so a cancel that lands while its commit is awaited
        # (the test ending the trickle) cancels the wait, not the write. Recorded after, that
        # row went to the broker unrecorded: an "unexpected event", and an acked count that
        # never equals len(rows) (seen once under load).
        new = sealed_rows(sealer, store.next_seq_nowait(), 1)
        rows.extend(new)
        await store.append_events(new)
        notify()
