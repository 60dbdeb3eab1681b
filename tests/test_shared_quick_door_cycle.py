"""End-to-end: a reader shared by a bank, kept inventorying by one cabinet's scan, never lets a
report of that read cycle hide a check-out in the other cabinet (docs/domain.md, "Scan pass").

The real ``cabinet-agent run`` with two cabinets on one LLRP simulator, mosquitto and the
consumer. Alice's closing scan in crib-a keeps the reader inventorying (a long pass); Bob has
crib-b open meanwhile, its drill read (for crib-a's scan, routed to nobody). The reader's
reports lag its GPI events (held): the one holding the drill reaches the agent only after Bob
took it, closed the door and crib-b's scan started. Joined to crib-a's running read cycle,
crib-b's pass counted that report and kept the drill present: no check-out. The reader is
restarted for crib-b's start instead (drivers/shared.py), so the report comes before crib-b
hears the stop, and its pass counts from the new cycle.
"""

from __future__ import annotations

from pathlib import Path

from simulators.cabinet import describe_events, match_events
from simulators.cabinet.scenario import Expected
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S
from tests.test_multi_cabinet import ALICE, BOB, BOTH, CAB_B, _cabinet, _expect, bank_rig

# crib-a's pass lasts long enough for Bob's whole door cycle to happen during it.
SLOW_A = _cabinet(
    "crib-a",
    1,
    [1, 2],
    {"name": "wrench", "epc": "e2801160600002000000a001"},
    {"scan_min_ms": 8000, "scan_max_ms": 20_000},
)


async def test_a_report_of_another_cabinets_read_cycle_never_hides_a_check_out(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    drill = CAB_B.item("drill").epc
    async with bank_rig(tmp_path, mosquitto, pair=(SLOW_A, CAB_B)) as bank:
        llrp = bank.llrp
        a, b = bank.doors["crib-a"], bank.doors["crib-b"]
        start = await bank.mark()
        await bank.present(ALICE, receivers=BOTH)
        await bank.wait_lock("crib-a", locked=False)
        await a.open()
        await bank.wait_lock("crib-b", locked=True)
        await bank.present(BOB, receivers=("crib-b",))
        await bank.wait_lock("crib-b", locked=False)
        await b.open()
        await a.close()  # crib-a's closing scan: the reader inventories (all four antennas)
        await llrp.wait_inventorying(TIMEOUT_S)

        def acks() -> int:
            return llrp.received_counts.get("KEEPALIVE_ACK", 0)

        llrp.faults.hold_reports()
        llrp.faults.hold_stops()  # a stop is acted on after the reports before it, as LLRP orders
        await llrp.wait_until(lambda: llrp.faults.holds_report_of(drill), TIMEOUT_S)
        llrp.remove_tag(drill)
        await b.close()
        # crib-b's Relock, then its StartScan: its reads are routed from now.
        await bank.wait_lock("crib-b", locked=True)
        heard = acks()
        await llrp.wait_until(lambda: acks() >= heard + 1, TIMEOUT_S)
        llrp.faults.release_reports()
        heard = acks()
        await llrp.wait_until(lambda: acks() >= heard + 1, TIMEOUT_S)  # the agent took them
        llrp.faults.release_stops()
        await bank.wait_count("crib-b", "session.closed", 2)
        await bank.wait_count("crib-a", "session.closed", 2)
        end = await bank.mark()
        expected = {
            "crib-a": [
                Expected(type="session.opened", actors=["alice"], trigger="badge"),
                Expected(
                    type="session.closed",
                    actors=["alice"],
                    quality="complete",
                    checked_out=0,
                    returned=0,
                ),
            ],
            "crib-b": _expect("bob", "drill"),
        }
        for cab, want in expected.items():
            got = bank.between(cab, start[cab], end[cab])
            problems = match_events(want, got, bank.arts[cab])
            assert not problems, (
                f"{cab}:\n"
                + "\n".join(problems)
                + "\n--- got:\n"
                + describe_events(got, bank.arts[cab])
            )
