"""Resident memory of the real ``cabinet-agent run`` process, idle and under load.

``.venv/bin/python bench/rss.py [--tags N] [--busy-s S] [--outage-s S]`` starts mosquitto, the
LLRP simulator (N tags on 4 antennas) and the agent (a subprocess, exactly as systemd runs it),
then goes through the phases below, reading ``VmRSS`` and ``VmHWM`` (peak) from
``/proc/<pid>/status`` after each; the peak is reset between phases (``clear_refs`` 5, root).
The numbers size ``MemoryHigh=``/``MemoryMax=`` in systemd/cabinet-agent.service.

1. idle: reader online, broker connected, no scan running;
2. busy: background inventories every 0.5 s (an ``inventory.snapshot`` per scan), delivered;
3. outage: broker stopped, events pile up in the outbox; then it returns and the backlog replays;
4. commands: a 50 MiB message and a max-size (1 MiB) one on a cmd topic (both refused).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulators.broker import Mosquitto  # noqa: E402
from simulators.llrp import LlrpSimulator  # noqa: E402
from tests.daemon_rig import AgentProcess, config_text, provision  # noqa: E402

MIB = 1024 * 1024


def _mem(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"^VmHWM:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _fresh_store(tmp: Path) -> None:
    for old in tmp.glob("state.db*"):
        old.unlink()


def _publish(port: int, payloads: list[bytes]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-backend")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(
                "cabinets/v1/hangar-3/crib-07/cmd/allow-list", payload, qos=1
            ).wait_for_publish(120)
    finally:
        client.loop_stop()
        client.disconnect()


async def _depth(agent: AgentProcess) -> int:
    """The last committed seq (from the agent's INFO log)."""
    matches = re.findall(r"seq=(\d+) committed", agent.text())
    return int(matches[-1]) if matches else 0


async def run(tags: int, busy_s: float, outage_s: float) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="cabinet-rss-") as tmp_name:
        tmp = Path(tmp_name)
        provision(tmp)
        broker = Mosquitto(tmp / "broker")
        broker.start()
        try:
            async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=7) as sim:
                sim.add_random_tags(tags, seed=3)
                cfg = tmp / "agent.toml"
                mqtt = f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                # Idle first: no background scans until the config is swapped for the busy one.
                cfg.write_text(config_text(tmp, sim.port, extra=mqtt))
                async with AgentProcess(cfg, tmp / "idle.log") as agent:
                    await agent.wait_log(r"MQTT connected as")
                    await asyncio.sleep(20)
                    rows.append(("idle (reader online, broker connected), 20 s", *_mem(agent.pid)))
                _fresh_store(tmp)  # a fresh engine: no idle timer carried over
                cfg.write_text(
                    config_text(
                        tmp,
                        sim.port,
                        level="INFO",
                        domain="background_period_s = 0.5\nscan_min_ms = 200\nstable_ms = 300",
                        extra=mqtt,
                    )
                )
                async with AgentProcess(cfg, tmp / "agent.log") as agent:
                    await agent.wait_log(r"MQTT connected as")
                    _reset_peak(agent.pid)
                    await asyncio.sleep(busy_s)
                    label = f"busy: scans every 0.5 s, {tags} tags, {busy_s:g} s"
                    rows.append((f"{label} ({await _depth(agent)} events)", *_mem(agent.pid)))
                    _reset_peak(agent.pid)
                    broker.stop()
                    before = await _depth(agent)
                    await asyncio.sleep(outage_s)
                    piled = await _depth(agent) - before
                    broker.start()
                    started = time.monotonic()
                    await agent.wait_log(r"MQTT connected as(?s:.*)MQTT connected as", timeout=120)
                    await asyncio.sleep(max(0.0, 30 - (time.monotonic() - started)))
                    rows.append(
                        (f"outage {outage_s:g} s (~{piled} events) + replay", *_mem(agent.pid))
                    )
                    _reset_peak(agent.pid)
                    await asyncio.to_thread(_publish, broker.port, [b"{" * 50 * MIB, b"{" * MIB])
                    # MQTT v5: the broker drops the 50 MiB one (Maximum Packet Size); the 1 MiB
                    # one reaches the agent and fails verification.
                    await agent.wait_log(r"refused allow-list", timeout=120)
                    rows.append(("commands: 50 MiB (dropped) + 1 MiB (refused)", *_mem(agent.pid)))
                    if "--keep-log" in sys.argv:
                        print(agent.text()[-3000:])
        finally:
            broker.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--busy-s", type=float, default=120.0)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--keep-log", action="store_true", help="print the end of the agent log")
    args = parser.parse_args()
    rows = asyncio.run(run(args.tags, args.busy_s, args.outage_s))
    print("| phase | VmRSS at end (MiB) | VmHWM peak in phase (MiB) |")
    print("|---|---:|---:|")
    for name, rss, hwm in rows:
        print(f"| {name} | {rss:.1f} | {hwm:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
