"""A fleet for the cluster tests and bench/fleet.py: simulated cabinets (the real outbox and
publisher, several per process) and ``cabinet-consumer consume --amqp`` processes that keep the
record from the cluster's replicated queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.domain.events import ItemCheckedOut, ItemReturned, ReaderOnline
from agent.mqtt.config import MqttConfig
from agent.mqtt.publisher import Publisher
from agent.store import OutboxRow, Store, StoreConfig
from backend.keys import BackendKeys
from tests.record_helpers import CabinetStream, pseudonym

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FleetCabinet:
    """One cabinet: its own SQLite outbox and Publisher, and a stream of real sealed events."""

    site: str
    cabinet: str
    store: Store
    publisher: Publisher
    stream: CabinetStream
    appended: dict[str, int] = field(default_factory=dict)  # event id -> seq
    task: asyncio.Task[None] | None = None

    async def append(self, n: int) -> None:
        """Commit the next ``n`` events (door-cycle-like: reader online, check-out, return)."""
        who = pseudonym(f"tech{self.cabinet}")
        rows = []
        for _ in range(n):
            k = self.stream.seq + 1
            epc = f"e2801160{k % 65536:04x}{zlib.crc32(self.cabinet.encode()) % 65536:04x}"
            if k % 3 == 0:
                m = self.stream.next(ReaderOnline, reader_id="dock-1", connection=k)
            elif k % 3 == 1:
                m = self.stream.next(ItemCheckedOut, session_id=uuid.uuid4(), actors=[who], epc=epc)
            else:
                m = self.stream.next(
                    ItemReturned, session_id=uuid.uuid4(), actors=[who], epc=epc, drawer="top"
                )
            assert m.event is not None
            rows.append(
                OutboxRow(
                    seq=m.event.seq,
                    event_id=m.event.event_id,
                    priority=0,
                    kind=m.event.type,
                    created_at=m.event.time,
                    envelope=m.payload,
                )
            )
        await self.store.append_events(rows)
        self.appended.update({str(r.event_id): r.seq for r in rows})
        self.publisher.notify()

    @property
    def committed(self) -> int:
        return len(self.appended)

    @property
    def delivered(self) -> bool:
        return self.publisher.stats.acked >= self.committed


@contextlib.asynccontextmanager
async def fleet(
    dir: Path,
    keys: BackendKeys,
    site: str,
    count: int,
    mqtt: dict[str, Any],
    *,
    synchronous: str = "NORMAL",
    first: int = 0,
    ports: Sequence[int] = (),
) -> AsyncIterator[list[FleetCabinet]]:
    """``count`` cabinets (``crib-<first>``…) publishing with ``mqtt`` (MqttConfig fields), all
    running; with ``ports``, cabinet n connects to ``ports[n % len(ports)]``."""
    cabinets: list[FleetCabinet] = []
    try:
        for n in range(first, first + count):
            name = f"crib-{n:03d}"
            cfg = StoreConfig.model_validate(
                {"path": dir / f"{name}.db", "synchronous": synchronous}
            )
            store = await Store.open(cfg)
            assert store.epoch is not None
            seq = store.next_seq_nowait() - 1
            stream = CabinetStream(keys, name, site=site, epoch=store.epoch, seq=seq)
            port = {"port": ports[n % len(ports)]} if ports else {}
            pub = Publisher(MqttConfig.model_validate({**mqtt, **port}), site, name, store)
            cab = FleetCabinet(site, name, store, pub, stream)
            cab.task = asyncio.create_task(pub.run(), name=f"publisher-{name}")
            cabinets.append(cab)
        yield cabinets
    finally:
        for cab in cabinets:
            cab.publisher.stop()
        tasks = [c.task for c in cabinets if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cab in cabinets:
            await cab.store.close()


class AmqpConsumer:
    """``cabinet-consumer consume --amqp …`` as a child process (one competing consumer)."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        queue: str,
        topic: str,
        keys_dir: Path,
        db: Path,
        log: Path,
    ) -> None:
        self.name = name
        self.urls = list(urls)
        self.queue = queue
        self.topic = topic
        self.keys_dir = keys_dir
        self.db = db
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        amqp = [a for url in self.urls for a in ("--amqp", url)]
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backend.consumer", "consume", *amqp,
                "--queue", self.queue, "--topic", self.topic, "--keys", str(self.keys_dir),
                "--client-id", self.name, "--db", str(self.db), "--quiet",
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, bounded wait; the summary it printed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rc = await self.proc.wait()
        assert rc == 0, self.log.read_text()[-3000:]
        summary: dict[str, Any] = json.loads(self.log.read_text().strip().splitlines()[-1])
        return summary

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
