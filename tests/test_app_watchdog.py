"""The engine's watchdog probe: a commit held on a full disk is deliberate waiting, not a hang."""

from __future__ import annotations

import time
from types import SimpleNamespace

from agent.engine_runner import EngineRunner


def _runner(*, committing: bool, disk_full: bool, progress: float) -> EngineRunner:
    # Only the probe's inputs are set: the probe reads nothing else.
    runner = object.__new__(EngineRunner)
    runner.store = SimpleNamespace(disk_full=disk_full)  # type: ignore[assignment]
    runner._committing = committing
    runner._parked = False
    runner.engine_progress = progress
    return runner


def test_stalled_engine_is_reported_as_stalled() -> None:
    assert _runner(committing=False, disk_full=True, progress=12.5).engine_alive() == 12.5
    assert _runner(committing=True, disk_full=False, progress=12.5).engine_alive() == 12.5


def test_commit_waiting_for_disk_space_counts_as_progress() -> None:
    before = time.monotonic()
    assert _runner(committing=True, disk_full=True, progress=12.5).engine_alive() >= before
