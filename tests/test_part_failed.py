"""A part that fails for good stops alone: the real ``cabinet-agent run`` with two LLRP readers.

Reader ``dock-1`` is configured with eight antennas on a four-port reader: the reader's
capabilities refuse that, a reconnect cannot change it (a PermanentError), so the supervisor
stops that reader and reports it FAILED with the reason -- once, never retried. The other reader,
the control socket and the watchdog go on: a configuration problem is reported, not turned into
a reconnect storm or a systemd restart loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

from agent.cli.readers_cmd import EX_UNAVAILABLE
from agent.daemon import WATCHDOG_WINDOW_S
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import TIMEOUT_S, AgentProcess, NotifyListener, ctl, provision

WATCHDOG_USEC = 2_000_000  # pings every 1 s; systemd would kill after 2 s without one


def _config(tmp: Path, bad_port: int, good_port: int) -> str:
    creds = tmp / "creds"
    return f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-11"

[logging]
level = "INFO"

[[readers]]
type = "llrp"
id = "dock-1"
host = "127.0.0.1"
port = {bad_port}
antennas = [1, 2, 3, 4, 5, 6, 7, 8]
keepalive_s = 1.0
backoff = {{ initial_s = 0.05, max_s = 0.5 }}

[[readers]]
type = "llrp"
id = "dock-2"
host = "127.0.0.1"
port = {good_port}
antennas = [1, 2]
keepalive_s = 1.0
backoff = {{ initial_s = 0.05, max_s = 0.5 }}

[privacy]
site_key = "{creds}/site.key"
seal_public_key = "{creds}/backend-hpke.pub"
signing_public_keys = ["{creds}/signing.pub"]

[store]
path = "{tmp}/state.db"

[control]
socket_path = "{tmp}/control.sock"
group = "root"

[metrics]
enabled = false

[time]
sync_source = "file:{tmp}/time-synced"

[domain]
drawers = {{ top = ["dock-1:1", "dock-1:2", "dock-1:3", "dock-1:4"], low = ["dock-1:5", "dock-1:6", "dock-1:7", "dock-1:8"], bottom = ["dock-2:1", "dock-2:2"] }}
"""


async def test_a_reader_refusing_its_configuration_fails_alone_and_the_agent_runs_on(
    tmp_path: Path,
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    try:
        async with (
            LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as bad,
            LlrpSimulator(personality="impinj", antennas=4, port=0, seed=2) as good,
        ):
            cfg.write_text(_config(tmp_path, bad.port, good.port))
            async with AgentProcess(
                cfg, tmp_path / "agent.log", env=listener.env(WATCHDOG_USEC)
            ) as agent:
                await listener.wait_for("READY", "1")
                await agent.wait_log(r"reader dock-1: connecting -> failed")
                failed_at = time.monotonic()
                await agent.wait_log(r"reader dock-2: connecting -> online")
                # Watch for more than one progress window of the watchdog gate: the pings go
                # on (the failed reader is not a stalled loop) ...
                n = len(listener.ping_times())
                while True:
                    pings = listener.ping_times(after=failed_at)
                    if pings and pings[-1] - failed_at > WATCHDOG_WINDOW_S + 3.0:
                        break
                    n += 1
                    await listener.wait_for("WATCHDOG", "1", count=n)
                assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_USEC / 1e6
                text = agent.text()
                assert "watchdog withheld" not in text
                # ... and in all that time (dozens of 0.5 s backoffs) it never came back to try
                # again: one connection, one failure line, no offline/retry churn.
                assert len(bad.connections.established_at) == 1
                assert text.count("reader dock-1: connecting -> failed") == 1
                assert "reader dock-1 offline" not in text
                # The reason is where a technician looks.
                rc, out, err = await ctl("readers", "ping", "--json", "--config", str(cfg))
                assert rc == EX_UNAVAILABLE, err
                rows = {r["reader"]: r for r in json.loads(out)["readers"]}
                assert rows["dock-1"]["state"] == "failed"
                assert rows["dock-1"]["ok"] is False
                assert "cannot do what its configuration asks" in rows["dock-1"]["detail"]
                assert "available=1,2,3,4" in rows["dock-1"]["detail"]
                assert rows["dock-1"]["session"] == 1
                assert rows["dock-2"]["ok"] is True
                # The advice fits the fault: the reader answered, its configuration is wrong.
                rc, out, err = await ctl("readers", "ping", "--config", str(cfg))
                line = next(x for x in out.splitlines() if x.startswith("dock-1:"))
                assert "fix its configuration and restart the agent" in line, out
                assert "check power" not in line
                # systemd's status line counts it out too (refreshed by the metrics loop).
                async with asyncio.timeout(TIMEOUT_S):
                    while not any(
                        m.get("STATUS", "").startswith("1/2 readers online")
                        for m in listener.messages
                    ):
                        await asyncio.sleep(0.1)
                # The engine counts it out: a reader outage, never an empty cabinet.
                await agent.wait_log(r"event reader\.offline seq=\d+ committed")
                # The rest of the agent runs on, and stops cleanly.
                assert await agent.stop() == 0, agent.text()
                # sllurp's own line about the refusal is kept, its traceback is not.
                assert "Capabilities mismatch" in agent.text()
                assert "Traceback" not in agent.text()
            # With the daemon stopped, the CLI connects itself: the same verdict, one line on
            # stderr at most, no traceback.
            rc, out, err = await ctl(
                "readers", "ping", "--reader", "dock-1", "--config", str(cfg), "--timeout", "20"
            )
            assert rc == EX_UNAVAILABLE, out + err
            assert "fix its configuration and restart the agent" in out, out
            assert "Traceback" not in err, err
    finally:
        await listener.close()
