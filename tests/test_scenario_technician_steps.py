"""The scenario format's technician steps and consumable items: checked at load time, and the
cabinetctl steps refused by a runner that has no control socket."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from simulators.cabinet import ScenarioError, ScenarioRunner, parse_scenario
from simulators.cabinet.expectations import describe_event
from tests.test_cabinet_sim import MINIMAL


def _scenario(**changes: Any) -> Any:
    return parse_scenario({**MINIMAL, **changes})


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (["technician dance"], "technician open | open_by_badge | close"),
        (["technician open"], "open needs a reason"),
        (["technician close now"], "close takes none"),
        (["rebaseline"], "wrong number of arguments"),
        (["door_test now"], "wrong number of arguments"),
    ],
)
def test_bad_technician_steps_say_what_and_where(steps: list[str], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        _scenario(steps=steps)
    assert message in str(info.value)
    assert "step 1" in str(info.value)


def test_a_consumable_item_needs_its_sku() -> None:
    items = [{"name": "gloves", "epc": "e2801160600002000000c001", "consumable": True}]
    with pytest.raises(ScenarioError, match="needs its sku"):
        _scenario(items=items, steps=["wait 0"])
    ok = _scenario(
        items=[{**items[0], "sku": "GLOVE-M", "drawer": "top"}],
        steps=["technician open restock gloves", "rebaseline count", "door_test"],
    )
    assert ok.item("gloves").sku == "GLOVE-M"


async def test_a_runner_without_cabinetctl_refuses_the_technician_steps() -> None:
    scenario = _scenario(steps=["technician open restock"])
    runner = ScenarioRunner(scenario, llrp=None, badge=None, door=None)  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match="cannot run cabinetctl"):
        await runner.run()


def test_a_technician_is_described_by_name_or_as_uid_self(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {"p2.s1.aaaaaaaaaaaaaaaaaaaaaaaaaa": "sam"}
    art: Any = SimpleNamespace(items={}, name_of=lambda actor: names.get(actor, actor))
    monkeypatch.setattr("os.getuid", lambda: 1234)
    assert describe_event({"technician": "uid:1234"}, art) == {"technician": "uid:self"}
    assert describe_event({"technician": "uid:99"}, art) == {"technician": "uid:99"}
    got = describe_event({"technician": "p2.s1.aaaaaaaaaaaaaaaaaaaaaaaaaa"}, art)
    assert got == {"technician": "sam"}
