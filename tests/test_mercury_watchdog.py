"""A Mercury reader is under the systemd watchdog like an LLRP one.

The real ``cabinet-agent run`` under a fake systemd (NOTIFY_SOCKET + a short WATCHDOG_USEC) with
one Mercury module, the simulator on a real TCP socket. A reader whose loop hangs (a test-only
fault: every command waits forever for its answer) withholds the watchdog, so systemd restarts
the agent; a reader that is merely reconnecting to a module that is gone is doing its job, and
the pings go on.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from agent.cli.readers_cmd import EX_OK, EX_UNAVAILABLE
from agent.daemon import WATCHDOG_WINDOW_S
from simulators.mercury import MercurySimulator
from tests.daemon_rig import AgentProcess, NotifyListener, ctl, provision

WATCHDOG_USEC = 2_000_000  # pings every 1 s; systemd would kill after 2 s without one
READER = "shelf-1"


def _config(tmp: Path, url: str) -> str:
    creds = tmp / "creds"
    return f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-09"

[logging]
level = "INFO"

[[readers]]
type = "mercury"
id = "{READER}"
url = "{url}"
antennas = [1, 2]
keepalive_s = 0.5
watchdog_s = 2.0
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
drawers = {{ top = ["{READER}:1"], bottom = ["{READER}:2"] }}
"""


async def _reader_row(cfg: Path) -> dict[str, object]:
    rc, out, err = await ctl("readers", "ping", "--json", "--config", str(cfg))
    assert rc in (EX_OK, EX_UNAVAILABLE), err  # EX_UNAVAILABLE: the reader is not online
    (row,) = json.loads(out)["readers"]
    assert isinstance(row, dict)
    return row


async def test_a_mercury_reader_whose_loop_hangs_withholds_the_watchdog(tmp_path: Path) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    flag = tmp_path / "wedge-mercury"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    try:
        async with MercurySimulator("tcp", antennas=2, seed=5) as sim:
            cfg.write_text(_config(tmp_path, sim.url))
            env = {
                **listener.env(WATCHDOG_USEC),
                "CABINET_TEST_FAULTS": "mercury-hangs",
                "CABINET_TEST_FLAG": str(flag),
            }
            agent = AgentProcess(cfg, tmp_path / "agent.log", env=env, module="tests.fault_agent")
            async with agent:
                await listener.wait_for("READY", "1")
                await agent.wait_log(rf"reader {READER}: connecting -> online")
                pings = len(listener.ping_times())
                await listener.wait_for("WATCHDOG", "1", count=pings + 2)
                flag.touch()
                stalled = await listener.wait_for("STATUS", f"stalled: reader:{READER}", timeout=60)
                assert stalled == {"STATUS": f"stalled: reader:{READER}"}
                await agent.wait_log(rf"watchdog withheld: no progress from reader:{READER}")
                # Nothing else was wedged: the link itself never went down.
                assert f"reader {READER}: online -> offline" not in agent.text()
                assert await agent.stop() == 0, agent.text()
    finally:
        await listener.close()


async def test_a_mercury_reader_that_is_reconnecting_keeps_the_watchdog_fed(
    tmp_path: Path,
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    try:
        sim = MercurySimulator("tcp", antennas=2, seed=6)
        await sim.start()
        try:
            cfg.write_text(_config(tmp_path, sim.url))
            async with AgentProcess(
                cfg, tmp_path / "agent.log", env=listener.env(WATCHDOG_USEC)
            ) as agent:
                await listener.wait_for("READY", "1")
                await agent.wait_log(rf"reader {READER}: connecting -> online")
                await sim.stop()  # the module is gone: connection refused from now on
                await agent.wait_log(rf"reader {READER}: \w+ -> offline")
                gone_at = time.monotonic()
                # Keep watching for more than one progress window of the gate.
                n = len(listener.ping_times())
                while True:
                    pings = listener.ping_times(after=gone_at)
                    if pings and pings[-1] - gone_at > WATCHDOG_WINDOW_S + 3.0:
                        break
                    n += 1
                    await listener.wait_for("WATCHDOG", "1", count=n)
                assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_USEC / 1e6
                assert "watchdog withheld" not in agent.text()
                # Still reconnecting, and watched: its progress is recent.
                row = await _reader_row(cfg)
                assert row["state"] in ("connecting", "offline"), row
                age = row["last_progress_age_s"]
                assert isinstance(age, float | int), row
                assert 0 <= age < WATCHDOG_WINDOW_S, row
                assert await agent.stop() == 0, agent.text()
        finally:
            await sim.stop()
    finally:
        await listener.close()
