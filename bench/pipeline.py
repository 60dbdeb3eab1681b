"""Pipeline benchmark: seal+commit rate, outbox drain rate and peak RSS, against baselines.

    .venv/bin/python bench/pipeline.py [--events N] [--window W]

(a) drain an N-event sealed backlog through the Publisher vs a bare paho QoS 1 publisher sending
    the same payloads with the same in-flight window (both in fresh subprocesses, same broker);
(b) events sealed and committed per second (HPKE seal + Store.append_events, FULL sync) vs HPKE
    seal alone;
(c) peak RSS (VmHWM) of the drain subprocess.
Targets: (a) ratio >= 0.6, (b) ratio >= 0.5, (c) <= 80 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SITE = "bench"
CABINET = "cab1"
TOPIC = f"cabinets/v1/{SITE}/{CABINET}/events"


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------- children


async def _child_drain(db: Path, port: int, n: int, window: int) -> dict[str, float]:
    from agent.mqtt.config import MqttConfig
    from agent.mqtt.publisher import Publisher
    from agent.store import Store, StoreConfig

    store = await Store.open(StoreConfig(path=db, synchronous="FULL"))
    cfg = MqttConfig(host="127.0.0.1", port=port, replay_rate=0, inflight_window=window)
    pub = Publisher(cfg, SITE, CABINET, store)
    t0 = time.perf_counter()
    task = asyncio.create_task(pub.run(), name="bench-publisher")
    while pub.stats.acked < n:
        if task.done():
            task.result()
            raise RuntimeError("publisher stopped early")
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    pub.stop()
    await asyncio.wait([task], timeout=30)
    depth = (await store.stats()).depth
    await store.close()
    return {"elapsed": elapsed, "acked": pub.stats.acked, "depth": depth}


def _child_bare(db: Path, port: int, n: int, window: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    conn = sqlite3.connect(db)
    payloads = [bytes(r[0]) for r in conn.execute("SELECT envelope FROM outbox ORDER BY seq")]
    conn.close()
    assert len(payloads) == n, (len(payloads), n)
    done = threading.Event()
    window_free = threading.Condition()
    acked = 0
    in_flight = 0

    def on_publish(*_: object) -> None:
        nonlocal acked, in_flight
        with window_free:
            acked += 1
            in_flight -= 1
            window_free.notify()
        if acked == n:
            done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.perf_counter()
    # Our own window, like any real QoS 1 producer: paho's internal queue rescans itself on
    # every PUBACK (quadratic), so dumping 100k messages into it would measure paho, not MQTT.
    for p in payloads:
        with window_free:
            while in_flight >= window:
                window_free.wait(10)
            in_flight += 1
        client.publish(TOPIC, p, qos=1)
    if not done.wait(600):
        raise RuntimeError(f"bare publisher: only {acked}/{n} acknowledged")
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return {"elapsed": elapsed, "acked": acked}


def child_main(argv: list[str]) -> int:
    mode, db, port, n, window = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    if mode == "drain":
        result = asyncio.run(_child_drain(db, port, n, window))
    else:
        result = _child_bare(db, port, n, window)
    result["vmhwm_kb"] = vm_hwm_kb()
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- parent


async def seal_and_commit(
    db: Path, n: int, batch: int, group_rows: int | None = None
) -> tuple[float, float]:
    """(seal-only events/s, seal+commit events/s); leaves n committed rows in ``db``."""
    import uuid
    from datetime import UTC, datetime

    from agent.privacy.envelope import EnvelopeHeader, Sealer
    from agent.store import OutboxRow, Store, StoreConfig
    from backend.keys import generate_backend_keys

    keys = generate_backend_keys(db.parent / "keys")
    sealer = Sealer(keys.hpke_public, keys.hpke_kid)
    body = json.dumps({"type": "item.checked_out", "epc": "e2" * 12, "pad": "x" * 120}).encode()

    def rows_for(first: int, count: int) -> list[OutboxRow]:
        now = datetime.now(UTC)
        out = []
        for seq in range(first, first + count):
            eid = uuid.uuid4()
            env = sealer.seal(EnvelopeHeader(sealer.key_id, CABINET, seq, eid), body)
            out.append(OutboxRow(seq, eid, 1, "item.checked_out", now, env))
        return out

    cfg = StoreConfig(path=db, synchronous="FULL")
    if group_rows is not None:
        cfg = cfg.model_copy(update={"group_commit_max_rows": group_rows})
    store = await Store.open(cfg)

    async def commit(first: int, count: int) -> None:
        pending: list[asyncio.Future[object]] = []
        for at in range(first, first + count, batch):
            rows = rows_for(at, min(batch, first + count - at))
            pending.append(store.submit_events(rows))  # type: ignore[arg-type]
            if len(pending) > 4:  # bounded pipeline: seal the next batch while this one commits
                await pending.pop(0)
                await asyncio.sleep(0)
        for fut in pending:
            await fut

    # The two modes alternate in rounds (A B B A ...) so both see the same load on a shared
    # machine: measured one after the other, a load change between them moved the ratio by
    # ±0.3 on its own.
    rounds = 8
    per = max(batch, n // rounds)
    seal_s = commit_s = 0.0
    sealed = committed = 0
    for r in range(rounds):
        count = per if r < rounds - 1 else n - committed
        for mode in ("seal", "commit") if r % 2 == 0 else ("commit", "seal"):
            t0 = time.perf_counter()
            if mode == "seal":
                for at in range(1, count + 1, batch):
                    rows_for(at, min(batch, count - at + 1))
                seal_s += time.perf_counter() - t0
                sealed += count
            else:
                await commit(committed + 1, count)
                commit_s += time.perf_counter() - t0
                committed += count
    seal_rate, commit_rate = sealed / seal_s, committed / commit_s
    await store.close()
    return seal_rate, commit_rate


def run_child(mode: str, db: Path, port: int, n: int, window: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(db), str(port), str(n), str(window)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100, help="rows per append_events call")
    parser.add_argument(
        "--group-commit-rows",
        type=int,
        default=None,
        help="store group_commit_max_rows (default: the product default)",
    )
    args = parser.parse_args()

    from simulators.broker import Mosquitto

    n = args.events
    with tempfile.TemporaryDirectory(prefix="cabinet-bench-") as tmp:
        tmpdir = Path(tmp)
        db = tmpdir / "state.db"
        print(f"sealing and committing {n} events ...", flush=True)
        seal_rate, commit_rate = asyncio.run(
            seal_and_commit(db, n, args.batch, args.group_commit_rows)
        )
        # The drain deletes rows: give each contender its own copy of the backlog.
        bare_db = tmpdir / "bare.db"
        src = sqlite3.connect(db)
        dst = sqlite3.connect(bare_db)
        src.backup(dst)
        src.close()
        dst.close()
        broker = Mosquitto(tmpdir / "broker", persistence=False)
        broker.start()
        try:
            print("draining with a bare paho publisher ...", flush=True)
            bare = run_child("bare", bare_db, broker.port, n, args.window)
            print("draining with the Publisher ...", flush=True)
            drain = run_child("drain", db, broker.port, n, args.window)
        finally:
            broker.stop()
    if drain.get("depth"):
        raise SystemExit(f"the Publisher left {drain['depth']} rows in the outbox")
    drain_rate = n / drain["elapsed"]
    bare_rate = n / bare["elapsed"]
    rss_mb = drain["vmhwm_kb"] / 1024
    rows = [
        ("(a) drain: Publisher (store→MQTT, PUBACK→delete)", f"{drain_rate:,.0f} msg/s"),
        ("(a) drain: bare paho QoS1, same payloads/window", f"{bare_rate:,.0f} msg/s"),
        ("(a) ratio (target >= 0.6)", f"{drain_rate / bare_rate:.2f}"),
        ("(b) HPKE seal only", f"{seal_rate:,.0f} ev/s"),
        ("(b) seal + Store.append_events (FULL)", f"{commit_rate:,.0f} ev/s"),
        ("(b) ratio (target >= 0.5)", f"{commit_rate / seal_rate:.2f}"),
        ("(c) peak RSS of the drain process (target <= 80 MB)", f"{rss_mb:.1f} MB"),
        ("    peak RSS of the bare paho process", f"{bare['vmhwm_kb'] / 1024:.1f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    group = args.group_commit_rows or "default"
    print(
        f"\npipeline benchmark: {n} events, window {args.window}, batch {args.batch}, "
        f"group commit rows {group}"
    )
    print("-" * (width + 18))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")
    print("-" * (width + 18))
    return 0


if __name__ == "__main__":
    sys.exit(main())
