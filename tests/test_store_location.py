"""Where the state store cannot live is a configuration problem: one line, exit 78, at start
and in ``cabinetctl config check`` / ``selftest`` -- never a crash that systemd restarts forever.

Real ``cabinet-agent run`` and ``cabinetctl`` processes; the small filesystem is a real tmpfs
this test mounts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import EX_CONFIG
from simulators.tmpfs import tmpfs
from tests.daemon_rig import AgentProcess, config_text, ctl, provision

MiB = 1024 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: smaller than the store's default reserves (16 MiB kept free)."""
    with tmpfs(tmp_path / "tiny", 8 * MiB) as mnt:
        yield mnt


async def _refused_everywhere(tmp_path: Path, store_path: str, *needles: str) -> str:
    """``run``, ``config check`` and ``selftest`` all refuse the config with exit 78 and one
    line naming the problem; returns that line."""
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, 9, store_path=Path(store_path)))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    await agent.start()
    try:
        rc = await agent.wait_exit()
    finally:
        await agent.stop()  # never leave an agent running if it did not exit by itself
    out = agent.text()
    assert rc == EX_CONFIG, out
    assert "Traceback" not in out
    assert "fatal" not in out
    lines = [line for line in out.splitlines() if "store.path" in line]
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], out
    rc, stdout, stderr = await ctl("config", "check", str(cfg))
    assert rc == EX_CONFIG, stdout + stderr
    assert any(all(n in line for n in needles) for line in stderr.splitlines()), stderr
    rc, stdout, stderr = await ctl("config", "check", "--json", str(cfg))
    assert rc == EX_CONFIG
    assert '"ok": false' in stdout
    rc, stdout, stderr = await ctl("selftest", "--config", str(cfg), "--timeout", "0.5")
    assert rc == EX_CONFIG, stdout + stderr
    fails = [line for line in stdout.splitlines() if line.startswith("FAIL") and "store" in line]
    assert len(fails) == 1, stdout
    for needle in needles:
        assert needle in fails[0], stdout
    return lines[0]


async def test_a_filesystem_smaller_than_the_reserves_is_refused(
    tmp_path: Path, tiny_disk: Path
) -> None:
    line = await _refused_everywhere(
        tmp_path,
        str(tiny_disk / "state.db"),
        "8.0 MiB",
        "store.min_free_disk_bytes (16.0 MiB)",
        "WAL budget",
    )
    assert "larger filesystem" in line


async def test_the_same_filesystem_with_smaller_reserves_is_accepted(
    tmp_path: Path, tiny_disk: Path
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        config_text(
            tmp_path, 9, store_path=tiny_disk / "state.db", store="min_free_disk_bytes = 1048576"
        )
    )
    rc, stdout, stderr = await ctl("config", "check", str(cfg))
    assert rc == 0, stdout + stderr
    assert "ok" in stdout


async def test_a_directory_as_store_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "statedir").mkdir()
    await _refused_everywhere(tmp_path, str(tmp_path / "statedir"), "is a directory")


async def test_a_store_path_under_proc_is_refused(tmp_path: Path) -> None:
    await _refused_everywhere(tmp_path, "/proc/cabinet/state.db", "/proc", "kernel filesystem")


async def test_a_store_path_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("x")
    await _refused_everywhere(
        tmp_path, str(tmp_path / "plainfile" / "state.db"), "is not a directory"
    )


async def test_a_relative_store_path_is_refused(tmp_path: Path) -> None:
    await _refused_everywhere(tmp_path, "state.db", "absolute path")
