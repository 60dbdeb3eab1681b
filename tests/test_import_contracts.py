"""The package boundaries in pyproject.toml ([tool.importlinter]) hold, and a forbidden import
breaks them (a contract that nothing could break would prove nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.daemon_rig import ROOT

LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("agent", "backend", "drivers", "simulators", "tests")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _copy(tmp: Path) -> Path:
    root = tmp / "tree"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for pkg in PACKAGES:
        shutil.copytree(
            ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "data")
        )
    return root


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_engine_importing_sqlite_breaks_its_contract(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    engine = root / "agent" / "domain" / "engine.py"
    engine.write_text("import sqlite3  # a shortcut someone took\n" + engine.read_text())
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "the engine is pure" in done.stdout
    assert "agent.domain.engine -> sqlite3" in done.stdout


def test_the_control_commands_importing_the_daemon_break_the_layers(tmp_path: Path) -> None:
    """The control handlers get the agent passed in; reaching back for the daemon (the cycle
    agent/control_api.py once hid behind TYPE_CHECKING) breaks the layering."""
    root = _copy(tmp_path)
    api = root / "agent" / "control_api.py"
    api.write_text(api.read_text() + "\nfrom agent.daemon import Daemon  # noqa: E402\n")
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "the process wraps the app" in done.stdout
    assert "agent.control_api -> agent.daemon" in done.stdout


def test_a_part_importing_the_composition_root_breaks_the_layers(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    runner = root / "agent" / "engine_runner.py"
    runner.write_text(runner.read_text() + "\nfrom agent.app import CabinetApp  # noqa: E402\n")
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "agent.engine_runner -> agent.app" in done.stdout


def test_a_driver_importing_the_store_breaks_its_contract(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    types = root / "drivers" / "types.py"
    types.write_text(types.read_text() + "\nfrom agent.store import Store  # noqa: E402\n")
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "drivers never reach into the agent" in done.stdout


def test_the_agent_importing_the_backend_breaks_its_contract(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    app = root / "agent" / "audit_policy.py"
    app.write_text(app.read_text() + "\nfrom backend.signing import sign_document  # noqa: E402\n")
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "the edge agent imports no backend or simulator code" in done.stdout
    assert "agent.audit_policy -> backend.signing" in done.stdout


def test_a_simulator_importing_the_agent_breaks_its_contract(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    badge = root / "simulators" / "badge.py"
    badge.write_text(
        badge.read_text() + "\nfrom agent.privacy.envelope import Opener  # noqa: E402\n"
    )
    done = _lint(root)
    assert done.returncode == 1, done.stdout
    assert "simulators import the backend, never the agent" in done.stdout
    assert "simulators.badge -> agent.privacy.envelope" in done.stdout
