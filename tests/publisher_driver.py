"""Subprocess driver for the kill -9 test: append a sealed stream and publish it.

Usage: python -m tests.publisher_driver DB PORT HPKE_PUB TOTAL [PROTOCOL]

Appends events (seq 1..TOTAL, sealed to HPKE_PUB) in small committed batches while a Publisher
drains the same store to the broker at 127.0.0.1:PORT. Prints "ready" once the store is open,
exits 0 when every event is appended and acknowledged. Killed at random points by the test.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.mqtt.publisher import Publisher
from agent.privacy.envelope import Sealer
from agent.privacy.keys import load_hpke_public
from agent.store import Store, StoreConfig
from tests.delivery_helpers import CABINET, SITE, mqtt_cfg, sealed_rows

BATCH = 3
PACE_S = 0.02  # a stream, not a burst: kills must land mid-stream


async def main(db: Path, port: int, hpke_pub: Path, total: int, protocol: str = "5") -> int:
    kid, public = load_hpke_public(hpke_pub)
    sealer = Sealer(public, kid)
    store = await Store.open(StoreConfig(path=db, synchronous="FULL"))
    print("ready", flush=True)
    pub = Publisher(mqtt_cfg(port, protocol=protocol), SITE, CABINET, store)
    task = asyncio.create_task(pub.run(), name="driver-publisher")
    try:
        while (first := store.next_seq_nowait()) <= total:
            rows = sealed_rows(sealer, first, min(BATCH, total - first + 1))
            await store.append_events(rows)
            pub.notify()
            await asyncio.sleep(PACE_S)
        while (await store.stats()).depth > 0:
            await asyncio.sleep(0.05)
    finally:
        pub.stop()
        await asyncio.wait([task], timeout=10)
        await store.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(
        asyncio.run(
            main(
                Path(sys.argv[1]),
                int(sys.argv[2]),
                Path(sys.argv[3]),
                int(sys.argv[4]),
                *sys.argv[5:6],
            )
        )
    )
