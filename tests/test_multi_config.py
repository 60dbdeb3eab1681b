"""The ``[[cabinets]]`` form of the config: several cabinets on one controller.

Every problem is one line naming the field, exit 78 from ``cabinet-agent run`` and
``cabinetctl config check``; one-cabinet files are read exactly as before.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, ConfigError, load_config, load_controller

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "agent.example.toml"

MULTI = """
[cabinet]
site_id = "hangar-3"

[[readers]]
type = "llrp"
id = "dock-1"
host = "127.0.0.1"
antennas = [1, 2, 3, 4]
gpi_ports = [1, 2]

[[badge_readers]]
id = "bank"
url = "socket://127.0.0.1:7001"

[store]
path = "{tmp}/state.db"

[control]
socket_path = "{tmp}/control.sock"

[metrics]
port = 9800

[[cabinets]]
cabinet_id = "crib-a"
readers = {{ dock-1 = [1, 2] }}
badge_readers = ["bank"]
door = {{ reader = "dock-1", sensor_gpi = 1, lock_gpo = 1 }}
domain = {{ drawers = {{ top = ["dock-1:1"], bottom = ["dock-1:2"] }} }}

[[cabinets]]
cabinet_id = "crib-b"
readers = {{ dock-1 = [3, 4] }}
badge_readers = ["bank"]
door = {{ reader = "dock-1", sensor_gpi = 2, lock_gpo = 2 }}
domain = {{ drawers = {{ top = ["dock-1:3"], bottom = ["dock-1:4"] }} }}
{extra}
"""


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def _multi(tmp: Path, extra: str = "", **subst: str) -> Path:
    text = MULTI.format(tmp=tmp, extra=extra)
    for old, new in subst.items():
        text = text.replace(old.replace("_", " "), new)
    return _write(tmp, text)


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_controller(path)
    return err.value.problems


def test_each_cabinet_gets_its_share_and_its_own_places(tmp_path: Path) -> None:
    ctrl = load_controller(_multi(tmp_path))
    assert ctrl.multi
    assert ctrl.names == ["crib-a", "crib-b"]
    assert [r.id for r in ctrl.readers] == ["dock-1"]
    assert ctrl.readers[0].antennas == [1, 2, 3, 4]  # the driver reads every port once
    a, b = ctrl.cabinets
    assert (a.readers[0].antennas, b.readers[0].antennas) == ([1, 2], [3, 4])
    assert (a.cabinet.site_id, b.cabinet.site_id) == ("hangar-3", "hangar-3")
    assert a.store.path == tmp_path / "crib-a" / "state.db"
    assert b.store.path == tmp_path / "crib-b" / "state.db"
    assert a.control.socket_path == tmp_path / "crib-a.sock"
    assert (a.metrics.port, b.metrics.port) == (9801, 9802)
    assert a.door is not None
    assert b.door is not None
    assert (a.door.sensor_gpi, b.door.sensor_gpi) == (1, 2)
    assert [x.id for x in a.badge_readers] == [x.id for x in b.badge_readers] == ["bank"]
    # One cabinet's config by name; without a name the choices are named.
    assert load_config(tmp_path / "agent.toml", "crib-b") == b
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "agent.toml")
    assert err.value.problems == [
        "cabinets: 2 cabinets (crib-a, crib-b): choose one (--cabinet NAME)"
    ]


def test_a_cabinet_may_name_its_own_places(tmp_path: Path) -> None:
    path = _multi(tmp_path)
    text = path.read_text().replace(
        'cabinet_id = "crib-b"\n',
        f'cabinet_id = "crib-b"\nstore = {{ path = "{tmp_path}/b.db" }}\n'
        "metrics = { enabled = false }\n",
    )
    _, b = load_controller(_write(tmp_path, text)).cabinets
    assert b.store.path == tmp_path / "b.db"
    assert b.metrics.enabled is False


def test_wiring_problems_are_one_line_each(tmp_path: Path) -> None:
    text = MULTI.format(tmp=tmp_path, extra="")
    text = text.replace('site_id = "hangar-3"', 'site_id = "hangar-3"\ncabinet_id = "x"')
    text = text.replace("dock-1 = [3, 4]", "dock-1 = [2, 3, 9]")
    text = text.replace("sensor_gpi = 2, lock_gpo = 2", "sensor_gpi = 1, lock_gpo = 1")
    text = text.replace(
        'badge_readers = ["bank"]\ndoor = { reader = "dock-1", sensor_gpi = 1',
        'badge_readers = ["bank", "nope"]\ndoor = { reader = "dock-1", sensor_gpi = 1',
        1,
    )
    assert _problems(_write(tmp_path, text)) == [
        "cabinet.cabinet_id: not allowed beside [[cabinets]] (each has its own)",
        "cabinets[0].badge_readers: no badge reader 'nope' in [[badge_readers]]",
        "cabinets[1].readers.dock-1: antenna 2 already belongs to cabinet 'crib-a' "
        "(a port belongs to one cabinet)",
        "cabinets[1].readers.dock-1: antenna 9 is not in reader 'dock-1''s antennas",
        "cabinets[1].door.sensor_gpi: GPI 1 of reader 'dock-1' is already wired to cabinet "
        "'crib-a''s door",
        "cabinets[1].door.lock_gpo: GPO 1 of reader 'dock-1' is already wired to cabinet "
        "'crib-a''s door",
    ]


def test_places_and_names_must_not_clash(tmp_path: Path) -> None:
    text = MULTI.format(tmp=tmp_path, extra="")
    text = text.replace('cabinet_id = "crib-b"', 'cabinet_id = "crib-a"')
    text = text.replace(
        "readers = { dock-1 = [3, 4] }",
        f'readers = {{ dock-1 = [3, 4] }}\ncontrol = {{ socket_path = "{tmp_path}/crib-a.sock" }}',
    )
    problems = _problems(_write(tmp_path, text))
    assert "cabinets: cabinet_id 'crib-a' is used more than once" in problems
    assert (
        f"cabinets[1].store.path: {tmp_path}/crib-a/state.db is already used by cabinet 'crib-a'"
        in problems
    )
    assert (
        f"cabinets[1].control.socket_path: {tmp_path}/crib-a.sock is already used by cabinet "
        "'crib-a'" in problems
    )


def test_a_cabinets_own_sections_are_checked_by_the_one_cabinet_rules(tmp_path: Path) -> None:
    text = MULTI.format(tmp=tmp_path, extra="").replace(
        'top = ["dock-1:3"], bottom = ["dock-1:4"]', 'top = ["dock-1:3"]'
    )
    text = text.replace(
        "dock-1 = [1, 2] }", 'dock-1 = [1, 2] }\nstore = { synchronous = "SOMETIMES" }'
    )
    problems = _problems(_write(tmp_path, text))
    assert len(problems) == 2, problems
    assert problems[0].startswith("cabinets[0].store.synchronous: ")
    assert problems[1] == "cabinets[1].domain.drawers: antenna dock-1:4 is in use but in no drawer"


def test_only_llrp_readers_are_split_and_every_reader_has_a_cabinet(tmp_path: Path) -> None:
    extra = '\n[[readers]]\ntype = "llrp"\nid = "spare"\nhost = "127.0.0.1"\n'
    extra += '\n[[badge_readers]]\nid = "lobby"\nurl = "/dev/ttyUSB1"\n'
    problems = _problems(_multi(tmp_path, extra=extra))
    assert problems == [
        "badge_readers: badge reader 'lobby' belongs to no cabinet",
        "readers: reader 'spare' belongs to no cabinet",
    ]
    text = MULTI.format(tmp=tmp_path, extra="").replace(
        'type = "llrp"\nid = "dock-1"\nhost = "127.0.0.1"\nantennas = [1, 2, 3, 4]\n'
        "gpi_ports = [1, 2]",
        'type = "mercury"\nid = "dock-1"\nurl = "/dev/ttyUSB0"\nantennas = [1, 2, 3, 4]',
    )
    problems = _problems(_write(tmp_path, text))
    assert (
        "readers: reader 'dock-1' is a mercury reader; only LLRP readers can be split between "
        "cabinets (crib-a, crib-b)" in problems
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "agent.cli.cabinet_agent", "run", "--config"],
        ["-m", "agent.cli.ctl", "config", "check"],
    ],
    ids=["run", "config-check"],
)
def test_cli_exits_78_one_line_per_problem(tmp_path: Path, argv: list[str]) -> None:
    text = MULTI.format(tmp=tmp_path, extra="").replace("sensor_gpi = 2", "sensor_gpi = 1")
    text = text.replace('id = "bank"', 'id = "bank"\nbaud = "fast"')
    path = _write(tmp_path, text)
    proc = subprocess.run(
        [sys.executable, *argv, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == EX_CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1] == f"{path}: {len(lines) - 1} problem(s); nothing started"
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_config_check_names_the_cabinets(tmp_path: Path) -> None:
    path = _multi(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", "config", "check", str(path), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["ok"], doc["readers"], doc["cabinets"]) == (True, 1, ["crib-a", "crib-b"])
    # Key names relative to $CREDENTIALS_DIRECTORY: noted once, not once per cabinet.
    assert len(doc["notes"]) == len(set(doc["notes"])) == 3, doc


def test_the_example_multi_cabinet_file_is_valid(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = re.search(
        r"^# --- several cabinets: begin\n(.*?)^# --- several cabinets: end", text, re.M | re.S
    )
    assert block is not None
    body = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block[1].splitlines())
    ctrl = load_controller(_write(tmp_path, body))
    assert ctrl.names == ["crib-a", "crib-b"]
    assert [c.store.path.parent.name for c in ctrl.cabinets] == ["crib-a", "crib-b"]
    # And the example keeps naming every key of a cabinet entry.
    from agent.controller_config import CabinetEntry

    for key in CabinetEntry.model_fields:
        assert re.search(rf"^# {key} = ", text, re.M), key


def test_one_cabinet_files_are_read_as_before(tmp_path: Path) -> None:
    ctrl = load_controller(EXAMPLE)
    assert not ctrl.multi
    assert ctrl.cabinets == [load_config(EXAMPLE)]
    name = ctrl.names[0]
    assert load_config(EXAMPLE, name) == ctrl.cabinets[0]
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLE, "other")
    assert err.value.problems == [f"cabinet.cabinet_id: this file configures {name!r}, not 'other'"]


def test_selftest_without_a_name_checks_every_cabinet(tmp_path: Path) -> None:
    path = _multi(tmp_path)
    argv = ["selftest", "--config", str(path), "--json", "--timeout", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    checks = [c["check"] for c in json.loads(proc.stdout)["checks"]]
    for cab in ("crib-a", "crib-b"):
        assert f"{cab}/config" in checks, checks
        assert f"{cab}/agent" in checks, checks
        assert f"{cab}/reader dock-1" in checks, checks
    assert all(c.split("/", 1)[0] in ("crib-a", "crib-b") for c in checks), checks


def test_the_cabinet_section_beside_cabinets_is_every_cabinets(tmp_path: Path) -> None:
    text = MULTI.format(tmp=tmp_path, extra="")
    text = text.replace('site_id = "hangar-3"', 'site_id = "hangar-3"\ntimezone = "Europe/Paris"')
    ctrl = load_controller(_write(tmp_path, text))
    assert [c.cabinet.timezone for c in ctrl.cabinets] == ["Europe/Paris", "Europe/Paris"]
    problems = _problems(_write(tmp_path, text.replace("Europe/Paris", "Mars/Olympus")))
    assert len(problems) == 1, problems  # said once, not once per cabinet
    assert problems[0].startswith("cabinet.timezone: "), problems
