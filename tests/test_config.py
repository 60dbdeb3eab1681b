"""Config validation: every problem named by field path, rule and value; unknown keys refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "agent.example.toml"


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.readers[0].type == "llrp"
    assert cfg.cabinet.cabinet_id


BAD = """
[cabinet]
site_id = "Hangar 3"

[logging]
levle = "DEBUG"

[[readers]]
type = "llrp"
id = "dock-1"
port = 70000
antennas = [1, 1]
"""


def test_every_problem_is_reported_once_with_its_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(BAD)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert any(line.startswith("cabinet.site_id:") and "'Hangar 3'" in line for line in problems)
    assert any(line.startswith("cabinet.cabinet_id: required") for line in problems)
    assert any(line.startswith("logging.levle: unknown key") for line in problems), joined
    assert any(line.startswith("readers[0].host: required") for line in problems), joined
    assert any(line.startswith("readers[0].port:") and "70000" in line for line in problems)


def test_unknown_reader_type_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[cabinet]\nsite_id="s"\ncabinet_id="c"\n[[readers]]\ntype="nfc"\nid="x"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems[0].startswith("readers[0]:")
    assert "'nfc'" in exc.value.problems[0]


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[cabinet\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert len(exc.value.problems) == 1
    assert "TOML syntax error" in exc.value.problems[0]


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "agent.cli.ctl", "config", "check"],
        [sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config"],
    ],
)
def test_cli_exits_78_and_starts_nothing(tmp_path: Path, argv: list[str]) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(BAD)
    proc = subprocess.run([*argv, str(p)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EX_CONFIG, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any("readers[0].port" in ln for ln in lines), proc.stderr
    assert any("logging.levle" in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_check_accepts_example(tmp_path: Path) -> None:
    """The example passes once its TLS files exist; its systemd credential keys are noted (only
    the service can read them), not failed."""
    from tests.mqtt_fixtures import Pki

    pki = Pki(tmp_path / "pki")
    crt, key, _ = pki.issue("crib-07", server=False)
    text = EXAMPLE.read_text()
    for old, new in (
        ("/etc/cabinet-agent/mqtt-ca.pem", str(pki.ca_file)),
        ("/etc/cabinet-agent/mqtt-client.pem", str(crt)),
        ("/etc/cabinet-agent/mqtt-client.key", str(key)),
    ):
        assert old in text
        text = text.replace(old, new)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", "config", "check", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout.lower()
    assert "note: privacy.site_key: systemd credential site-key" in proc.stdout


def test_config_check_refuses_what_the_daemon_would(tmp_path: Path) -> None:
    """Key files, TLS files and the socket's place: the same refusals as ``run``, one line
    each, exit 78 (the example's TLS files do not exist here)."""
    from tests.daemon_rig import config_text, provision

    creds = provision(tmp_path)
    (creds / "signing.pub").chmod(0o666)
    (tmp_path / "control.sock").mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, 9))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", "config", "check", "--json", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == EX_CONFIG, proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    assert any(
        p.startswith("privacy.signing_public_keys[0]:") and "chmod go-w" in p for p in problems
    )
    assert any(p.startswith("control.socket_path:") and "not a socket" in p for p in problems)
    missing = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", "config", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert missing.returncode == EX_CONFIG
    assert "mqtt.tls:" in missing.stderr
    assert "/etc/cabinet-agent/mqtt-ca.pem: file not found" in missing.stderr


def test_a_fifo_in_place_of_the_config_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as exc:
        load_config(fifo)
    assert exc.value.problems == [f"(file): {fifo} is not a regular file"]


def test_drawers_must_name_configured_reader_antennas(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(
        '[cabinet]\nsite_id="s"\ncabinet_id="c"\n'
        '[[readers]]\ntype="llrp"\nid="dock-1"\nhost="127.0.0.1"\nantennas=[1,2]\n'
        '[domain]\ndrawers = { top = ["dock-1:1", "dock-1:3"], low = ["dock-9:1"] }\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    problems = exc.value.problems
    assert any(line.startswith("domain.drawers.top:") and "antenna 3" in line for line in problems)
    assert any(line.startswith("domain.drawers.low:") and "dock-9" in line for line in problems)
    assert any("dock-1:2" in line and "no drawer" in line for line in problems)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('port = "15084"', "readers[0].port: Input should be a valid integer"),
        ("port = true", "readers[0].port: Input should be a valid integer"),
        ("port = " + "9" * 5000, "(file): unusable value"),
        ("port = 5084\nx = " + "[" * 5000 + "]" * 5000, "(file): nested too deeply"),
        (
            "port = 5084\n[store]\naudit_retention_days = 366",
            "store.audit_retention_days: Value error, at most 365 days",
        ),
        (
            'port = 5084\nkeepalive_s = "2"',
            "readers[0].keepalive_s: Input should be a valid number",
        ),
    ],
)
@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "agent.cli.ctl", "config", "check"],
        [sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config"],
    ],
)
def test_hostile_values_are_one_line_and_exit_78(
    tmp_path: Path, argv: list[str], body: str, says: str
) -> None:
    p = tmp_path / "hostile.toml"
    p.write_text(
        '[cabinet]\nsite_id = "a"\ncabinet_id = "b"\n'
        f'[[readers]]\ntype = "llrp"\nid = "r"\nhost = "h"\nantennas = [1]\n{body}\n'
    )
    proc = subprocess.run([*argv, str(p)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if "problem(s)" not in ln]
    assert len(problems) == 1, proc.stderr
    assert says in problems[0]


def test_config_check_json_reports_problems_on_stdout(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli.ctl", "config", "check", "--json", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == EX_CONFIG
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert any("readers[0].port" in line for line in doc["problems"]), doc


def test_an_unknown_time_source_is_named(tmp_path: Path) -> None:
    base = '[cabinet]\nsite_id="s"\ncabinet_id="c"\n[[readers]]\ntype="llrp"\nid="x"\nhost="h"\n'
    p = tmp_path / "bad.toml"
    for bad in ("ntp", "file:", "file:relative/path"):
        p.write_text(base + f'[time]\nsync_source = "{bad}"\n')
        with pytest.raises(ConfigError) as exc:
            load_config(p)
        [problem] = exc.value.problems
        assert problem.startswith("time.sync_source:"), problem
    for good in ("kernel", "none", "file:/run/time-synced"):
        p.write_text(base + f'[time]\nsync_source = "{good}"\n')
        assert load_config(p).time.sync_source == good


def _example_with(mqtt: str) -> str:
    """The example config with its ``protocol = "5"`` line replaced."""
    text = EXAMPLE.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith('protocol = "5"'))
    return text.replace(line, mqtt.rstrip("\n"))


@pytest.mark.parametrize(
    ("mqtt", "field"),
    [
        ('protocol = "3"', "mqtt.protocol"),
        ("protocol = 5", "mqtt.protocol"),
        ('protocol = "3.1.1"', "mqtt"),  # with the example's session_expiry_s
    ],
)
def test_mqtt_protocol_problems_are_one_line_naming_the_field_exit_78(
    tmp_path: Path, mqtt: str, field: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(_example_with(mqtt))
    argv = [sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(p)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EX_CONFIG, proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if ln.strip() and "nothing started" not in ln]
    assert len(problems) == 1, proc.stderr
    assert problems[0].split(": ")[1] == field, proc.stderr
    assert "Traceback" not in proc.stderr


def test_mqtt_311_is_a_valid_protocol(tmp_path: Path) -> None:
    p = tmp_path / "ok.toml"
    text = _example_with('protocol = "3.1.1"')
    p.write_text(text.replace("\nsession_expiry_s = 86400", "\n# session_expiry_s = 86400"))
    cfg = load_config(p)
    assert cfg.mqtt is not None
    assert cfg.mqtt.protocol == "3.1.1"


def test_the_site_time_zone_is_an_iana_name(tmp_path: Path) -> None:
    base = '[[readers]]\ntype="llrp"\nid="x"\nhost="h"\n'
    p = tmp_path / "tz.toml"
    p.write_text('[cabinet]\nsite_id="s"\ncabinet_id="c"\ntimezone="Europe/Paris"\n' + base)
    cfg = load_config(p)
    assert str(cfg.cabinet.zone()) == "Europe/Paris"
    p.write_text('[cabinet]\nsite_id="s"\ncabinet_id="c"\n' + base)
    assert load_config(p).cabinet.timezone == "UTC"  # the default
    for bad in ("Europe/Pariss", "CET+1", "../../etc/passwd", ""):
        p.write_text(f'[cabinet]\nsite_id="s"\ncabinet_id="c"\ntimezone="{bad}"\n' + base)
        with pytest.raises(ConfigError) as exc:
            load_config(p)
        [problem] = exc.value.problems
        assert problem.startswith("cabinet.timezone:"), problem
        assert "time zone" in problem


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "agent.cli.ctl", "config", "check"],
        [sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config"],
    ],
)
def test_an_unknown_time_zone_is_one_line_exit_78(tmp_path: Path, argv: list[str]) -> None:
    p = tmp_path / "bad.toml"
    text = EXAMPLE.read_text()
    assert 'timezone = "UTC"' in text
    p.write_text(text.replace('timezone = "UTC"', 'timezone = "Europe/Pariss"', 1))
    proc = subprocess.run([*argv, str(p)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if "cabinet.timezone" in ln]
    assert len(problems) == 1, proc.stderr
    assert "Europe/Pariss" in problems[0]


def test_night_hours_are_times_of_day(tmp_path: Path) -> None:
    base = '[cabinet]\nsite_id="s"\ncabinet_id="c"\n[[readers]]\ntype="llrp"\nid="x"\nhost="h"\n'
    p = tmp_path / "night.toml"
    p.write_text(base + '[domain]\nnight_left_open_s = 60.0\nnight_start = "24:00"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    [problem] = exc.value.problems
    assert problem.startswith("domain.night_start:"), problem
