"""Shared bits for the delivery tests and the pipeline benchmark: sealed rows, a collecting consumer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.mqtt.config import MqttConfig
from agent.mqtt.publisher import Publisher
from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer
from agent.store import OutboxRow, Store, StoreAlert, StoreConfig
from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder
from backend.keys import BackendKeys, generate_backend_keys

SITE = "site1"
CABINET = "cab1"
# Every delivery fault test runs on both MQTT versions: 3.1.1 has no PUBACK reason codes, so the
# publisher confirms an event by its echo there (docs/delivery.md §2).
PROTOCOLS = ("5", "3.1.1")


def backend(dir: Path) -> BackendKeys:
    return generate_backend_keys(dir)


def plaintext_for(
    cabinet: str, seq: int, event_id: uuid.UUID, n: int | None = None, pad: int = 64
) -> bytes:
    """The event body the tests seal; content is compared at the consumer."""
    return json.dumps(
        {
            "type": "test.event",
            "cabinet_id": cabinet,
            "seq": seq,
            "event_id": str(event_id),
            "n": seq if n is None else n,
            "pad": "x" * pad,
        },
        separators=(",", ":"),
    ).encode()


def sealed_rows(
    sealer: Sealer,
    first_seq: int,
    n: int,
    *,
    cabinet: str = CABINET,
    priority: int = 1,
    pad: int = 64,
) -> list[OutboxRow]:
    """n sealed rows continuing at ``first_seq`` (``pad``: filler bytes in each body)."""
    rows = []
    now = datetime.now(UTC)
    for seq in range(first_seq, first_seq + n):
        eid = uuid.uuid4()
        header = EnvelopeHeader(sealer.key_id, cabinet, seq, eid)
        rows.append(
            OutboxRow(
                seq=seq,
                event_id=eid,
                priority=priority,
                kind="test.event",
                created_at=now,
                envelope=sealer.seal(header, plaintext_for(cabinet, seq, eid, pad=pad)),
            )
        )
    return rows


async def append_sealed(store: Store, sealer: Sealer, n: int, **kw: Any) -> list[OutboxRow]:
    rows = sealed_rows(sealer, store.next_seq_nowait(), n, **kw)
    await store.append_events(rows)
    return rows


def sealer_for(keys: BackendKeys) -> Sealer:
    return Sealer(keys.hpke_public, keys.hpke_kid)


def mqtt_cfg(port: int, **kw: Any) -> MqttConfig:
    """Fast-reacting test settings (short backoff, short keepalive, unthrottled replay)."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "keepalive_s": 5,
        "connect_timeout_s": 10,
        "replay_rate": 0,
        "poll_interval_s": 0.2,
        "backoff": {"initial_s": 0.05, "max_s": 0.5},
        "failure_backoff": {"initial_s": 0.05, "max_s": 0.2},
    }
    base.update(kw)
    return MqttConfig.model_validate(base)


@dataclass
class Collector:
    """A real subscriber (paho thread) that opens and de-duplicates; records every event."""

    port: int
    keys: BackendKeys
    client_id: str | None = None
    session_expiry_s: int = 0
    raw_payloads: list[bytes] = field(default_factory=list)
    events: list[Delivered] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    consumer: Consumer | None = None
    extra_opts: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Collector:
        decoder = EventDecoder(Opener({self.keys.hpke_kid: self.keys.hpke_private}))
        original = decoder.handle

        def handle(topic: str, payload: bytes) -> Delivered | None:
            with self._cond:
                self.raw_payloads.append(payload)
            return original(topic, payload)

        decoder.handle = handle  # type: ignore[method-assign]
        opts = ConsumerOptions(
            port=self.port,
            client_id=self.client_id,
            session_expiry_s=self.session_expiry_s,
            **self.extra_opts,
        )
        self.consumer = Consumer(opts, decoder, self._on_event)
        self.consumer.start()
        assert self.consumer.subscribed.wait(15), "consumer did not subscribe"
        return self

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()

    @property
    def decoder(self) -> EventDecoder:
        assert self.consumer is not None
        return self.consumer.decoder

    def _on_event(self, ev: Delivered) -> None:
        with self._cond:
            self.events.append(ev)
            self._cond.notify_all()

    def seqs(self) -> list[int]:
        with self._cond:
            return [e.header.seq for e in self.events]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def wait_count(self, n: int, timeout: float = 30.0) -> bool:
        return self.wait_for(lambda: len(self.events) >= n, timeout)


def assert_exact(collector: Collector, rows: Iterable[OutboxRow]) -> None:
    """Every row arrived exactly once (after dedup) with the sealed content."""
    expected = {r.seq: r for r in rows}
    got = {e.header.seq: e for e in collector.events}
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{len(missing)} event(s) missing, first {missing[:10]}"
    extra = sorted(set(got) - set(expected))
    assert not extra, f"unexpected events {extra[:10]}"
    assert len(collector.events) == len(expected), "duplicates passed the event-id filter"
    for seq, ev in got.items():
        row = expected[seq]
        assert ev.header.event_id == row.event_id
        assert ev.plaintext == plaintext_for(ev.cabinet, seq, row.event_id)


@contextlib.asynccontextmanager
async def open_store(
    path: Path, alerts: list[StoreAlert] | None = None, **kw: object
) -> AsyncIterator[Store]:
    cfg = StoreConfig.model_validate({"path": path, "synchronous": "NORMAL", **kw})
    store = await Store.open(cfg, on_alert=alerts.append if alerts is not None else None)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run(), name="test-publisher")
    try:
        yield task
    finally:
        publisher.stop()
        await asyncio.wait([task], timeout=20)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError("publisher did not stop within 20 s")
        task.result()


async def until(predicate: Callable[[], bool], limit_s: float = 30.0) -> bool:
    """Poll a cheap in-memory predicate (publisher counters) with a bound."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
