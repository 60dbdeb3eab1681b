"""The agent says so when its asset registry pins items to TIDs that none of its readers reads:
those items are judged by EPC alone (docs/domain.md, "TIDs"), and a clone passes for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.cabinet import bundled_scenarios, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import cabinet_rig

WARNING = "the asset registry pins 1 items to their TIDs but no reader reads TIDs"


@pytest.mark.parametrize(
    ("name", "warned"), [("cloned-tag-no-tid-reader", True), ("cloned-tag", False)]
)
async def test_pins_without_a_tid_reader_are_reported(
    name: str, warned: bool, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = next(p for p in bundled_scenarios() if p.stem == name)
    scenario = load_scenario(path)
    assert sum(1 for i in scenario.items if i.tid) == (1 if warned else 2)
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        # The rig returns once the agent has its documents (the registry among them) and a
        # first baseline: the check runs as the registry is installed, before that.
        if warned:
            await rig.agent.wait_log(WARNING)
        else:
            assert "no reader reads TIDs" not in rig.agent.log_text()
