"""Delivery under faults: link cuts and blackholes through a proxy, publisher killed -9."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.mqtt.publisher import Publisher
from agent.privacy.keys import HPKE_PUBLIC_FILE
from simulators.faultproxy import FaultProxy, MqttPublishTap
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
    plaintext_for,
    running,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import Mosquitto

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_link_cut_repeatedly_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    keys = backend(tmp_path / "backend")
    window = 10
    tap = MqttPublishTap()
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with (
            FaultProxy(mosquitto.port, client_tap=tap) as proxy,
            open_store(tmp_path / "state.db") as store,
        ):
            rows = await append_sealed(store, sealer_for(keys), 600)
            cfg = mqtt_cfg(
                proxy.port,
                inflight_window=window,
                replay_rate=600,
                replay_burst=20,
                protocol=protocol,
            )
            pub = Publisher(cfg, SITE, CABINET, store)
            async with running(pub):
                for step in range(1, 7):
                    assert await until(lambda s=step: pub.stats.acked >= 70 * s, 60), pub.stats
                    assert proxy.cut() >= 1
                assert await until(lambda: len(collector.events) >= len(rows), 60)
                assert await until(lambda: pub.stats.acked >= len(rows), 30)
            assert (await store.stats()).depth == 0
        assert_exact(collector, rows)
        cuts = proxy.cuts
        duplicates = len(collector.raw_payloads) - len(rows)
        assert cuts >= 6
        assert pub.stats.reconnects >= 6
        assert duplicates <= cuts * window, f"{duplicates} duplicates for {cuts} cuts"
        assert collector.decoder.stats.duplicates == duplicates
        # paho never re-sent anything itself (it would set DUP): the outbox is the only retry.
        assert tap.publishes >= len(rows)
        assert tap.dup_publishes == 0
    finally:
        collector.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_blackholed_link_is_detected_and_recovered(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    keys = backend(tmp_path / "backend")
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with FaultProxy(mosquitto.port) as proxy, open_store(tmp_path / "state.db") as store:
            sealer = sealer_for(keys)
            rows = await append_sealed(store, sealer, 20)
            cfg = mqtt_cfg(proxy.port, keepalive_s=5, connect_timeout_s=3, protocol=protocol)
            pub = Publisher(cfg, SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: pub.stats.acked >= 20)
                proxy.blackhole(True)
                rows += await append_sealed(store, sealer, 30)
                pub.notify()
                # The publisher notices on its own (no PUBACK within keepalive)...
                assert await until(lambda: pub.stats.in_flight > 0)
                assert await until(lambda: pub.stats.reconnects >= 1, 30)
                # ...and by then a whole keepalive window has passed in which nothing was
                # acknowledged through the black hole.
                assert pub.stats.acked == 20
                proxy.blackhole(False)
                assert await until(lambda: len(collector.events) >= len(rows), 60)
        assert_exact(collector, rows)
    finally:
        collector.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_publisher_killed_at_random_points_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    await _kill_loop(tmp_path, mosquitto, total=1000, kills=20, seed=1234, protocol=protocol)


@pytest.mark.soak
async def test_publisher_kill_soak(tmp_path: Path, mosquitto: Mosquitto) -> None:
    await _kill_loop(tmp_path, mosquitto, total=6000, kills=150, seed=99)


async def _kill_loop(
    tmp_path: Path, mosquitto: Mosquitto, *, total: int, kills: int, seed: int, protocol: str = "5"
) -> None:
    """Run the driver, SIGKILL it at random points ``kills`` times, then let it finish."""
    keys = backend(tmp_path / "backend")
    db = tmp_path / "state.db"
    cmd = [
        sys.executable,
        "-m",
        "tests.publisher_driver",
        str(db),
        str(mosquitto.port),
        str(tmp_path / "backend" / HPKE_PUBLIC_FILE),
        str(total),
        protocol,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(seed)
    collector = Collector(mosquitto.port, keys).start()
    try:
        killed = 0
        for _ in range(kills):
            proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            try:
                assert proc.stdout is not None
                async with asyncio.timeout(60):
                    line = await proc.stdout.readline()
                assert line.strip() == b"ready", line
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                    killed += 1
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
        final = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            async with asyncio.timeout(120):
                _out, err = await final.communicate()
        finally:
            if final.returncode is None:
                final.kill()
                await final.wait()
        assert final.returncode == 0, err.decode(errors="replace")[-2000:]
        assert killed >= kills, f"only {killed} kills landed mid-stream"
        assert await until(lambda: len(collector.events) >= total, 60)
        seqs = sorted(collector.seqs())
        assert seqs == list(range(1, total + 1)), (
            f"missing {sorted(set(range(1, total + 1)) - set(seqs))[:20]}"
        )
        for ev in collector.events:
            assert ev.plaintext == plaintext_for(CABINET, ev.header.seq, ev.header.event_id)
    finally:
        collector.stop()
