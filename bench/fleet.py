"""Fleet benchmark: N cabinets on a 3-node RabbitMQ cluster through an outage and its recovery.

    .venv/bin/python bench/fleet.py [--cabinets 200] [--procs 4] [--steady-s 20] [--outage-s 20]

Starts a 3-node RabbitMQ cluster (simulators/rabbitmq.py: Debian's rabbitmq-server, MQTT 3.1.1,
quorum queues) and two ``cabinet-consumer consume --amqp`` processes competing for the fleet's
quorum queue and writing one SQLite record. N simulated cabinets — each its own SQLite outbox and
the real ``Publisher``, several per process — connect to the nodes in turn (cabinet i to node
i mod 3) with the default reconnect backoff and replay throttle, and commit events at a steady
rate (``--rate`` per cabinet per second, real sealed domain events). Then:

1. steady stream for ``--steady-s``;
2. the whole cluster is killed (-9) for ``--outage-s``: every cabinet's backlog grows;
3. the cluster restarts (each node's MQTT client-id tracker restarted as soon as the node
   runs, docs/decisions.md; ``--unaided-restart`` leaves RabbitMQ 3.10 to itself, ~100 s
   more); measured: connections per second during the reconnect storm (the jittered backoff
   must spread it), time until every backlog committed before the restart is
   delivered, events recorded per second by the backend during that drain;
4. the same cluster's bare throughput in the same run: 8 paho QoS 1 publishers (no outbox, no
   sealing, no echo, window 20) into a quorum queue drained by a bare AMQP consumer, messages
   acknowledged per second; compared with the best 5 s of the cabinets' drain, acknowledged
   (broker side) and recorded (backend side);
5. lost = committed events missing from the record (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SITE = "bench"
SAMPLE_S = 0.1


# ---------------------------------------------------------------- a cabinet process


async def _child(args: argparse.Namespace) -> None:
    """K cabinets in this process; reads commands on stdin, reports JSON lines on stdout."""
    import logging

    logging.basicConfig(level=logging.ERROR)  # the outage's warnings, 200 times over
    from backend.keys import load_backend_keys
    from tests.fleet_rig import FleetCabinet, fleet

    keys = load_backend_keys(Path(args.keys))
    ports = [int(p) for p in args.ports.split(",")]
    first = args.first
    cabinets: list[FleetCabinet] = []
    stop = asyncio.Event()
    marks: dict[str, int] = {}
    drained_at: dict[str, float] = {}
    samples: list[tuple[float, int, int]] = []  # (monotonic, connect attempts, connected)

    async def commands() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = line.decode().strip()
            if cmd == "mark":  # the cluster is back: the backlog to drain is what is committed
                for c in cabinets:
                    marks[c.cabinet] = c.committed
            elif cmd == "quiet":
                args.rate = 0.0
            elif cmd == "stop":
                break
        stop.set()

    async def produce() -> None:
        # Each cabinet commits at ``rate`` events/s, the cabinets of a process out of phase.
        tick = 0.1
        credit = 0.0
        while not stop.is_set():
            credit += args.rate * len(cabinets) * tick
            while credit >= 1.0 and cabinets:
                await cabinets[int(credit * 7919) % len(cabinets)].append(1)
                credit -= 1.0
            await asyncio.sleep(tick)

    async def watch() -> None:
        while not stop.is_set():
            now = time.monotonic()
            samples.append(
                (
                    now,
                    sum(c.publisher.stats.connect_attempts for c in cabinets),
                    sum(c.publisher.stats.connected for c in cabinets),
                )
            )
            for c in cabinets:
                mark = marks.get(c.cabinet)
                done = mark is not None and c.publisher.stats.acked >= mark
                if done and c.cabinet not in drained_at:
                    drained_at[c.cabinet] = now
            committed = sum(c.committed for c in cabinets)
            acked = sum(c.publisher.stats.acked for c in cabinets)
            print(
                json.dumps({"committed": committed, "acked": acked, "t": now}),
                flush=True,
            )
            await asyncio.sleep(SAMPLE_S)

    mqtt: dict[str, Any] = {"host": "127.0.0.1", "protocol": "3.1.1", "keepalive_s": 15}
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    async with fleet(
        Path(args.dir), keys, SITE, args.count, mqtt, first=first, ports=ports
    ) as cabs:
        cabinets.extend(cabs)
        tasks = [
            asyncio.create_task(commands(), name="commands"),
            asyncio.create_task(produce(), name="produce"),
            asyncio.create_task(watch(), name="watch"),
        ]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        appended = {
            eid: (c.stream.cabinet, seq) for c in cabinets for eid, seq in c.appended.items()
        }
        Path(args.report).write_text(
            json.dumps(
                {
                    "appended": appended,
                    "drained_at": drained_at,
                    "samples": samples,
                    "marks": marks,
                }
            )
        )


# ---------------------------------------------------------------- the bare client


def _bare_throughput(ports: list[int], urls: list[str], n: int, conns: int, window: int) -> float:
    """paho QoS 1 publishers into a quorum queue (drained by a bare consumer): msgs/s acked."""
    import paho.mqtt.client as mqtt
    import pika
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from backend.amqp import declare_events_queue

    connection = pika.BlockingConnection(pika.URLParameters(urls[0]))
    channel = connection.channel()
    declare_events_queue(channel, "bare-events", "cabinets/v1/bare/+/events")
    drained = [0]
    stop_drain = threading.Event()

    def drain() -> None:
        c2 = pika.BlockingConnection(pika.URLParameters(urls[1 % len(urls)]))
        ch2 = c2.channel()
        ch2.basic_qos(prefetch_count=500)

        def on(ch: Any, method: Any, props: Any, body: bytes) -> None:
            drained[0] += 1
            ch.basic_ack(method.delivery_tag)

        ch2.basic_consume("bare-events", on)
        while not stop_drain.is_set():
            c2.process_data_events(time_limit=0.2)
        c2.close()

    drainer = threading.Thread(target=drain, name="bare-drain")
    drainer.start()
    payload = os.urandom(420)  # about a sealed event's size
    per = n // conns
    done = threading.Event()
    acked = [0]
    lock = threading.Lock()
    clients = []
    for k in range(conns):
        sem = threading.Semaphore(window)
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bare-{k}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        c.max_inflight_messages_set(window)

        def on_publish(*a: Any, sem: threading.Semaphore = sem) -> None:
            sem.release()
            with lock:
                acked[0] += 1
                if acked[0] >= per * conns:
                    done.set()

        c.on_publish = on_publish
        c.connect("127.0.0.1", ports[k % len(ports)])
        c.loop_start()
        clients.append((c, sem))
    time.sleep(1.0)
    t0 = time.perf_counter()

    def send(c: Any, sem: threading.Semaphore, k: int) -> None:
        for _ in range(per):
            sem.acquire()
            c.publish(f"cabinets/v1/bare/b{k}/events", payload, qos=1)

    senders = [
        threading.Thread(target=send, args=(c, sem, k), name=f"bare-send-{k}")
        for k, (c, sem) in enumerate(clients)
    ]
    for s in senders:
        s.start()
    done.wait(600)
    elapsed = time.perf_counter() - t0
    for s in senders:
        s.join()
    for c, _ in clients:
        c.disconnect()
        c.loop_stop()
    stop_drain.set()
    drainer.join()
    channel.queue_delete("bare-events")
    connection.close()
    return acked[0] / elapsed


# ---------------------------------------------------------------- the run


def _peak_rate(points: list[tuple[float, int]], window_s: float = 5.0) -> float:
    """The highest rate over any ``window_s`` of a (time, cumulative count) trace."""
    best = 0.0
    j = 0
    for i, (t, n) in enumerate(points):
        while points[j][0] < t - window_s:
            j += 1
        if i > j and t - points[j][0] >= window_s / 2:
            best = max(best, (n - points[j][1]) / (t - points[j][0]))
    return best


def _bins(bins: Counter[int], upto: int) -> str:
    """Per-second counts from the restart on, as one line."""
    return " ".join(str(bins[b]) for b in range(max(upto, 0)))


def _recorded(db: Path) -> int:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0


async def main(args: argparse.Namespace) -> int:
    from backend.keys import generate_backend_keys
    from simulators.rabbitmq import RabbitCluster
    from tests.fleet_rig import AmqpConsumer

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    generate_backend_keys(work / "keys")
    cluster = RabbitCluster(work / "rabbitmq", nodes=3)
    t = time.monotonic()
    await asyncio.to_thread(cluster.start)
    boot_s = time.monotonic() - t
    print(f"cluster of 3 up in {boot_s:.1f} s ({work})", file=sys.stderr)
    db = work / "record.db"
    consumers = [
        AmqpConsumer(
            f"backend-{m}",
            cluster.amqp_urls[i:] + cluster.amqp_urls[:i],
            "fleet-events",
            f"cabinets/v1/{SITE}/+/events",
            work / "keys",
            db,
            work / f"consumer-{m}.log",
        )
        for i, m in enumerate("ab")
    ]
    children: list[asyncio.subprocess.Process] = []
    latest: dict[int, dict[str, Any]] = {}
    results: dict[str, Any] = {"cabinets": args.cabinets, "procs": args.procs}
    try:
        for c in consumers:
            await c.start()
        async with asyncio.timeout(60):
            while not any(
                q["name"] == "fleet-events" and int(q["consumers"]) >= 2  # type: ignore[call-overload]
                for q in await asyncio.to_thread(cluster.queues)
            ):
                await asyncio.sleep(0.5)
        per = -(-args.cabinets // args.procs)
        readers = []
        for p in range(args.procs):
            count = min(per, args.cabinets - p * per)
            if count <= 0:
                break
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--child",
                "--keys", str(work / "keys"), "--ports", ",".join(map(str, cluster.mqtt_ports)),
                "--first", str(p * per), "--count", str(count), "--rate", str(args.rate),
                "--dir", str(work / f"proc{p}"), "--report", str(work / f"report{p}.json"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                limit=1 << 20,
            )  # fmt: skip
            children.append(proc)

            async def read(i: int, proc: asyncio.subprocess.Process) -> None:
                assert proc.stdout is not None
                while line := await proc.stdout.readline():
                    with contextlib.suppress(ValueError):
                        latest[i] = json.loads(line)

            readers.append(asyncio.create_task(read(p, proc), name=f"read-{p}"))

        def totals() -> tuple[int, int]:
            return (
                sum(v["committed"] for v in latest.values()),
                sum(v["acked"] for v in latest.values()),
            )

        def tell(cmd: str) -> None:
            for proc in children:
                assert proc.stdin is not None
                proc.stdin.write(cmd.encode() + b"\n")

        # 1. steady stream
        async with asyncio.timeout(300):
            while len(latest) < len(children) or totals()[1] == 0:
                await asyncio.sleep(0.2)
        t_steady = time.monotonic()
        rec0 = _recorded(db)
        await asyncio.sleep(args.steady_s)
        rec1 = _recorded(db)
        steady_rate = (rec1 - rec0) / (time.monotonic() - t_steady)
        committed, acked = totals()
        print(f"steady: {steady_rate:.0f} events/s recorded; {committed - acked} waiting",
              file=sys.stderr)  # fmt: skip
        # 2. outage
        t_down = time.monotonic()
        await asyncio.to_thread(cluster.sync)  # see simulators/rabbitmq.py
        await asyncio.to_thread(cluster.kill_all)
        await asyncio.sleep(args.outage_s)
        committed, acked = totals()
        backlog = committed - acked
        print(f"outage: {backlog} events waiting in {args.cabinets} outboxes", file=sys.stderr)
        # 3. recovery
        t_restart = time.monotonic()
        await asyncio.to_thread(
            functools.partial(cluster.start_all, restart_tracker=not args.unaided_restart)
        )
        t_up = time.monotonic()
        tell("mark")
        rec_up = _recorded(db)
        committed_up, acked_up = totals()
        print(f"cluster restarted in {t_up - t_restart:.1f} s", file=sys.stderr)
        # (time, acked by the broker, recorded by the backend) through the drain
        trace: list[tuple[float, int, int]] = []
        async with asyncio.timeout(args.drain_timeout_s):
            while True:
                committed_now, acked_now = totals()
                trace.append((time.monotonic(), acked_now, _recorded(db)))
                if acked_now >= committed:  # at least the whole backlog has been delivered
                    break
                await asyncio.sleep(0.5)
        # Stop producing, let everything drain and be recorded.
        tell("quiet")
        async with asyncio.timeout(args.drain_timeout_s):
            while True:
                committed_now, acked_now = totals()
                recorded_now = _recorded(db)
                trace.append((time.monotonic(), acked_now, recorded_now))
                if acked_now >= committed_now and recorded_now >= committed_now:
                    break
                await asyncio.sleep(0.5)
        t_all = time.monotonic()
        rec_all = _recorded(db)
        tell("stop")
        for proc in children:
            assert proc.stdin is not None
            await proc.stdin.drain()
            proc.stdin.close()
        async with asyncio.timeout(120):
            for proc in children:
                await proc.wait()
        await asyncio.gather(*readers)
        reports = [json.loads((work / f"report{p}.json").read_text()) for p in range(len(children))]
        appended: dict[str, Any] = {}
        for r in reports:
            appended.update(r["appended"])
        drained = [t for r in reports for t in r["drained_at"].values()]
        # Connections during the storm: CONNACKs per second from the samples (connected count
        # rising) and connect attempts per second.
        conn_bins: Counter[int] = Counter()
        attempt_bins: Counter[int] = Counter()
        for r in reports:
            prev: tuple[float, int, int] | None = None
            for t, attempts, connected in r["samples"]:
                if prev is not None and t >= t_up:
                    b = int(t - t_up)
                    conn_bins[b] += max(0, connected - prev[2])
                    attempt_bins[b] += max(0, attempts - prev[1])
                prev = (t, attempts, connected)
        all_connected_s = max((b for b, n in conn_bins.items() if n), default=-1) + 1
        # 4. bare client on the same cluster
        bare = await asyncio.to_thread(
            _bare_throughput, cluster.mqtt_ports, cluster.amqp_urls, args.bare_n, 8, 20
        )
        for c in consumers:
            await c.stop()
        # 5. lost
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as conn:
            got = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT event_id, cabinet_id, seq FROM events")
            }
        lost = sorted(set(appended) - set(got))
        drain_s = (max(drained) - t_up) if drained and len(drained) == args.cabinets else None
        e2e = (rec_all - rec_up) / (t_all - t_up)
        acked_peak = _peak_rate([(t, a) for t, a, _r in trace])
        recorded_peak = _peak_rate([(t, r) for t, _a, r in trace])
        results.update(
            {
                "cluster_boot_s": round(boot_s, 1),
                "steady_recorded_per_s": round(steady_rate, 1),
                "backlog_at_outage_end": backlog,
                "backlog_at_restart_done": committed_up - acked_up,
                "outage_s": round(t_restart - t_down, 1),
                "cluster_restart_s": round(t_up - t_restart, 1),
                "connections_per_s_after_restart": _bins(conn_bins, all_connected_s),
                "connect_attempts_per_s_after_restart": _bins(attempt_bins, all_connected_s),
                "peak_connections_per_s": max(conn_bins.values(), default=0),
                "all_reconnected_within_s": all_connected_s,
                "drain_all_backlogs_s": None if drain_s is None else round(drain_s, 1),
                "recovery_recorded_per_s": round(e2e, 1),
                "peak_acked_per_s_5s": round(acked_peak, 1),
                "peak_recorded_per_s_5s": round(recorded_peak, 1),
                "bare_acked_per_s": round(bare, 1),
                "ratio_acked": round(acked_peak / bare, 3) if bare else None,
                "ratio_recorded": round(recorded_peak / bare, 3) if bare else None,
                "committed": len(appended),
                "recorded": len(got),
                "lost": len(lost),
            }
        )  # fmt: skip
        print(json.dumps(results, indent=1))
        return 0 if not lost else 1
    finally:
        for proc in children:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for c in consumers:
            await c.kill()
        await asyncio.to_thread(cluster.stop)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cabinets", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4, help="cabinet processes")
    ap.add_argument("--rate", type=float, default=0.5, help="events per cabinet per second")
    ap.add_argument("--steady-s", type=float, default=20.0)
    ap.add_argument("--outage-s", type=float, default=20.0)
    ap.add_argument("--drain-timeout-s", type=float, default=600.0)
    ap.add_argument("--bare-n", type=int, default=20000, help="messages for the bare client")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--unaided-restart",
        action="store_true",
        help="leave RabbitMQ's MQTT plugin to itself after the restart (~100 s more; "
        "by default each node's client-id tracker is restarted early, docs/decisions.md)",
    )
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    return ap.parse_args()


if __name__ == "__main__":
    a = _args()
    if a.child:
        asyncio.run(_child(a))
        sys.exit(0)
    sys.exit(asyncio.run(main(a)))
