"""Child process for the kill -9 test: commits door cycles as fast as it can, forever.

Usage: python -m tests.store_crash_child DB_PATH. Prints ``ready <next_seq>`` after opening,
then ``committed <cycle> <first_seq> <last_seq>`` after each cycle is durable.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from agent.store import BaselineEntry, OutboxRow, Store, StoreConfig


async def main(path: Path) -> None:
    store = await Store.open(StoreConfig(path=path, synchronous="FULL"))
    session = await store.load_session()
    cycle = int(json.loads(session)["cycle"]) if session else 0
    print(f"ready {await store.next_seq()}", flush=True)
    rng = random.Random()
    while True:
        cycle += 1
        now = datetime.now(UTC)
        n = rng.randint(1, 8)
        first = store.next_seq_nowait()
        rows = [
            OutboxRow(
                first + i,
                uuid.uuid4(),
                0,
                "item.checked_out",
                now,
                json.dumps({"cycle": cycle, "i": i, "n": n}).encode() + bytes(rng.randint(0, 2000)),
            )
            for i in range(n)
        ]
        baseline = {f"e{cycle:06d}{j}": BaselineEntry(f"cycle-{cycle}", now) for j in range(3)}
        done = [store.submit_cycle(rows, baseline, json.dumps({"cycle": cycle}).encode())]
        # Single events from elsewhere share the group commit with the cycle.
        for _ in range(rng.randint(0, 3)):
            seq = store.next_seq_nowait()
            single = OutboxRow(
                seq, uuid.uuid4(), 1, "reader.offline", now, json.dumps({"single": cycle}).encode()
            )
            done.append(store.submit_events([single]))
        await asyncio.gather(*done)
        print(f"committed {cycle} {first} {first + n - 1}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
