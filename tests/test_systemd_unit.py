"""The shipped systemd unit: verified, hardened to exposure <= 2.0, sysusers/tmpfiles usable.

Needs the Debian packages `systemd` (systemd-analyze, systemd-sysusers, systemd-tmpfiles) and
`procps` (/bin/kill, the unit's ExecReload=); all of it works offline in a container without systemd
running as PID 1.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "cabinet-agent.service"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "cabinet-agent.conf"
TMPFILES = ROOT / "systemd" / "tmpfiles.d" / "cabinet-agent.conf"
MAX_EXPOSURE = 2.0
TIMEOUT_S = 60


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install the 'systemd' package (apt-get install -y systemd)"
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _bytes(value: str) -> int:
    """A systemd size (``160M``) in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart is the installed entry point (verify needs a real file)."""
    script = Path(sys.executable).parent / "cabinet-agent"
    assert script.is_file(), f"{script} missing: install the project (pip install -e .)"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/cabinet-agent " in text
    unit = tmp_path / "cabinet-agent.service"
    unit.write_text(text.replace("ExecStart=/usr/bin/cabinet-agent ", f"ExecStart={script} "))
    return unit


def test_unit_verifies_without_any_warning(installed_unit: Path) -> None:
    # ExecReload= must exist too: /bin/kill comes from Debian's procps package.
    assert Path("/bin/kill").exists(), "/bin/kill missing: apt-get install -y procps"
    # verify exits 0 even on unknown keys; any output at all means something is off.
    proc = _run(_tool("systemd-analyze"), "verify", str(installed_unit))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
    assert proc.stderr.strip() == ""


def test_unit_exposure_is_at_most_2_0(installed_unit: Path) -> None:
    analyze = _tool("systemd-analyze")
    proc = _run(analyze, "security", "--offline=true", "--no-pager", str(installed_unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, proc.stdout
    # --threshold takes the score x10 as an integer and exits non-zero when exceeded.
    gate = _run(analyze, "security", "--offline=true", "--threshold=20", str(installed_unit))
    assert gate.returncode == 0, gate.stdout + gate.stderr


def test_threshold_gate_does_fail_a_weak_unit(tmp_path: Path) -> None:
    # Guards the test above: the gate must reject an unhardened unit.
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/bin/true\n")
    gate = _run(_tool("systemd-analyze"), "security", "--offline=true", "--threshold=20", str(weak))
    assert gate.returncode != 0


def test_unit_keeps_the_design_contract() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["ExecStart"] == ["/usr/bin/cabinet-agent run --config /etc/cabinet-agent/agent.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["User"] == ["cabinet-agent"]
    assert "cabinet-tech" in d["SupplementaryGroups"][0].split()
    assert d["RuntimeDirectory"] == ["cabinet-agent"]
    assert d["StateDirectory"] == ["cabinet-agent"]
    # Serial ports stay reachable: PrivateDevices= would hide them.
    assert "PrivateDevices" not in d
    assert d["DevicePolicy"] == ["closed"]
    assert "char-ttyUSB rw" in d["DeviceAllow"]
    # Memory limits (sized in docs/deployment.md): a soft bound that reclaims, then a hard one.
    high, hard = _bytes(d["MemoryHigh"][0]), _bytes(d["MemoryMax"][0])
    assert 0 < high < hard
    # No core dump of a process holding badge numbers and the site key (docs/privacy.md §4).
    assert d["LimitCORE"] == ["0"]
    assert d["MemorySwapMax"] == ["0"]  # nor swapped to the flash
    creds = {v.split(":", 1)[0] for v in d["LoadCredential"]}
    assert creds == {"site-key", "backend-seal.pub", "backend-sign.pub", "mqtt-client.key"}


def test_security_json_has_no_capabilities_or_new_privileges(installed_unit: Path) -> None:
    proc = _run(
        _tool("systemd-analyze"), "security", "--offline=true", "--json=short", str(installed_unit)
    )
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    for name in (
        "NoNewPrivileges=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "ProtectSystem=",
        "ProtectHome=",
        "RestrictAddressFamilies=~AF_PACKET",
        "RestrictAddressFamilies=~AF_NETLINK",
    ):
        assert checks[name]["set"] is True, checks[name]
        assert not checks[name]["exposure"], checks[name]


def test_sysusers_creates_daemon_user_and_technician_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = _run(_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS))
    assert proc.returncode == 0, proc.stderr
    passwd = {
        ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {ln.split(":")[0] for ln in (tmp_path / "etc/group").read_text().splitlines()}
    assert {"cabinet-agent", "cabinet-tech"} <= groups
    user = passwd["cabinet-agent"]
    assert int(user[2]) < 1000, "must be a system uid"
    assert user[6] == "/usr/sbin/nologin"


def test_tmpfiles_creates_a_root_only_credstore(tmp_path: Path) -> None:
    proc = _run(_tool("systemd-tmpfiles"), "--create", f"--root={tmp_path}", str(TMPFILES))
    assert proc.returncode == 0, proc.stderr
    st = (tmp_path / "etc/credstore").stat()
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == 0
