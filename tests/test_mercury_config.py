"""The ``[[readers]] type = "mercury"`` section: valid forms accepted, mistakes named clearly."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import ConfigError, parse_config
from drivers.mercury.config import MercuryReaderConfig


def doc(**reader: Any) -> dict[str, object]:
    section: dict[str, Any] = {"type": "mercury", "id": "drawer-uhf", "url": "/dev/ttyUSB0"}
    section.update(reader)
    return {"cabinet": {"site_id": "hangar-3", "cabinet_id": "cab-7"}, "readers": [section]}


def problems(**reader: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc(**reader))
    return exc.value.problems


@pytest.mark.parametrize(
    "url", ["/dev/ttyUSB0", "/dev/ttyACM1?baud=921600", "socket://127.0.0.1:7001"]
)
def test_valid_sections_parse_into_the_mercury_model(url: str) -> None:
    cfg = parse_config(doc(url=url, antennas=[1, 2], region="EU3", read_power_dbm=27))
    reader = cfg.readers[0]
    assert isinstance(reader, MercuryReaderConfig)
    assert reader.region_code == 0x08
    assert reader.antennas == [1, 2]
    assert reader.read_power_dbm == 27.0


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ttyUSB0", "not a device path or URL"),
        ("/dev/ttyUSB0?speed=9600", "unknown serial URL option"),
        ("/dev/ttyUSB0?baud=fast", "baud must be an integer"),
        ("/dev/ttyUSB0?baud=12345", "baud must be one of"),
    ],
)
def test_bad_url_is_one_clear_line(url: str, needle: str) -> None:
    lines = problems(url=url)
    assert len(lines) == 1
    assert lines[0].startswith("readers[0].url:")
    assert needle in lines[0]


def test_unknown_key_is_named_with_its_path() -> None:
    lines = problems(baudrate=115200)
    assert lines == ["readers[0].baudrate: unknown key (typo?) [value 115200]"]


def test_every_mistake_is_reported() -> None:
    lines = problems(region="MARS", read_power_dbm=40, antennas=[1, 16], url="")
    joined = "\n".join(lines)
    assert any(line.startswith("readers[0].region:") and "'MARS'" in line for line in lines)
    assert any(line.startswith("readers[0].read_power_dbm:") for line in lines), joined
    assert any(line.startswith("readers[0].url:") for line in lines), joined


def test_cross_field_rules() -> None:
    assert any(
        "watchdog_s must exceed keepalive_s" in p for p in problems(watchdog_s=1, keepalive_s=2)
    )
    assert any("1..15" in p for p in problems(antennas=[16]))
    missing_url = doc()
    del missing_url["readers"][0]["url"]  # type: ignore[index]
    with pytest.raises(ConfigError) as exc:
        parse_config(missing_url)
    assert exc.value.problems == ["readers[0].url: required field is missing"]


def test_a_door_wired_to_a_reader_without_gpi_is_refused() -> None:
    data = doc()
    data["door"] = {"reader": "drawer-uhf", "sensor_gpi": 1, "lock_gpo": 1}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert len(exc.value.problems) == 1
    assert (
        "door.reader 'drawer-uhf' is a mercury reader, which cannot report GPI"
        in (exc.value.problems[0])
    )
