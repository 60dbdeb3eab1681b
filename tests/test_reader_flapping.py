"""A flapping LLRP reader against the real agent: a bounded number of reader events, and the
driver reconnects ever more slowly (the simulator drops every session 0.5 s after it began)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from simulators.cabinet import bundled_scenarios, describe_events, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, cabinet_rig

FLAPS = 12
UP_S = 0.5
RETRY_RE = re.compile(r"reader dock-1 offline: .*; reconnecting in ([0-9.]+)s \(retry (\d+)\)")


async def test_a_flapping_reader_gives_one_alert_and_ever_longer_reconnect_delays(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    base = load_scenario(next(p for p in bundled_scenarios() if p.stem == "plain-checkout"))
    scenario = base.model_copy(update={"steps": ["wait 0"], "expect": []})
    backoff = {"initial_s": 0.05, "max_s": 4.0, "stable_s": 30.0}
    async with cabinet_rig(scenario, tmp_path, mosquitto, reader={"backoff": backoff}) as rig:
        sim, log = rig.llrp, rig.sink.log
        log.mark(await rig.mark())
        before = len(sim.connections.established_at)
        lines_before = len(RETRY_RE.findall(rig.agent.log_text()))
        sim.faults.flap(UP_S)
        await sim.wait_until(lambda: len(sim.connections.established_at) >= before + FLAPS, 120.0)
        sim.faults.clear()
        await sim.wait_until(lambda: sim.connections.active == 1, TIMEOUT_S)
        end = await rig.mark()
        events = log.since_mark(before_seq=end)
        text = rig.agent.log_text()
        established = sim.connections.established_at[before:]

    # One alert with counts, instead of an offline/online pair per reconnect.
    described = describe_events(events, rig.artefacts)
    assert [e["type"] for e in events] == ["reader.flapping"], described
    assert events[0]["state"] == "flapping"
    assert events[0]["outages"] == 3
    # Every drop counted one more retry: the backoff never started over on a configure...
    retries = RETRY_RE.findall(text)[lines_before:]
    steps = [int(n) for _, n in retries]
    assert len(steps) >= FLAPS - 1, text
    assert steps[: FLAPS - 1] == list(range(1, FLAPS)), steps
    # ... so the delays grew past the first step's bound (0.05 s) ...
    delays = [float(d) for d, _ in retries[: FLAPS - 1]]
    assert max(delays[-5:]) > 0.5, delays
    # ... and the simulator saw the reader come back more and more slowly.
    gaps = [b - a for a, b in itertools.pairwise(established)]
    assert max(gaps[-5:]) > UP_S + 0.7, gaps
    assert max(gaps[:3]) < max(gaps[-5:]), gaps
