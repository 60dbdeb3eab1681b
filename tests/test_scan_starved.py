"""End-to-end: a closing scan's verdict does not depend on the agent keeping up in wall-clock
time. The real ``cabinet-agent run``, the LLRP simulator, mosquitto and the consumer play
demo-loop; when Bob closes the door the agent is starved (SIGSTOP, then SIGCONT) while its
reader has not started reading yet (the simulator holds the START/ENABLE_ROSPEC: a start sent
late), and the reader is heard from meanwhile (keepalives). The returns are still found.

Before the scan pass waited for its readers to inventory, the pass's clock ran from the door's
closing: it ended empty at the first keepalive after its settle window, and the tools Bob put
back were never returned (docs/domain.md, "Scan pass").
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from simulators.cabinet import find_scenario, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, cabinet_rig

STARTS = ("START_ROSPEC", "ENABLE_ROSPEC")
# Longer than the scenario's scan_min_ms (0.5 s) + stable_ms (0.3 s) and its keepalive (1 s).
STARVED_S = 1.5


async def test_a_starved_agent_with_a_late_reader_start_misses_no_return(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    base = load_scenario(find_scenario("demo-loop"))
    steps = list(base.steps)
    assert steps[-2:] == ["close", "settle"]
    scenario = base.model_copy(update={"steps": steps[:-2]})  # Bob's door stays open
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        llrp, log = rig.llrp, rig.sink.log
        rig.start_seq = await rig.mark()
        log.mark(rig.start_seq)
        await rig.runner().run()  # Alice takes two tools; Bob opens and puts them back

        def starts() -> int:
            return sum(llrp.received_counts.get(name, 0) for name in STARTS)

        def acks() -> int:
            return llrp.received_counts.get("KEEPALIVE_ACK", 0)

        before = starts()
        llrp.faults.hold_starts()
        await rig.door.close()
        # The agent began its closing scan and asked the reader to read: held.
        await llrp.wait_until(lambda: starts() > before, TIMEOUT_S)
        assert rig.agent.proc is not None
        pid = rig.agent.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(STARVED_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        # Running again, its pass older than the settle window: two keepalives answered (the
        # reader heard from, the loop turning) while the reader still reads nothing. A pass
        # that timed the agent's clock ends here, empty.
        heard = acks()
        await llrp.wait_until(lambda: acks() >= heard + 2, TIMEOUT_S)
        assert rig.agent.proc.poll() is None
        llrp.faults.release_starts()
        await log.wait_count("session.closed", 2, TIMEOUT_S)
        end = await rig.mark()
        events = log.since_mark(before_seq=end)
        rig.check(events)  # demo-loop's expected list, exactly: both tools returned by Bob
