"""The engine's watchdog probe: a commit held on a full disk is deliberate waiting, not a hang."""

from __future__ import annotations

import time
from types import SimpleNamespace

from agent.app import CabinetApp


def _app(*, committing: bool, disk_full: bool, progress: float) -> CabinetApp:
    # Only the probe's inputs are set: the probe reads nothing else.
    app = object.__new__(CabinetApp)
    app.store = SimpleNamespace(disk_full=disk_full)  # type: ignore[assignment]
    app._committing = committing
    app.engine_progress = progress
    return app


def test_stalled_engine_is_reported_as_stalled() -> None:
    assert _app(committing=False, disk_full=True, progress=12.5).engine_alive() == 12.5
    assert _app(committing=True, disk_full=False, progress=12.5).engine_alive() == 12.5


def test_commit_waiting_for_disk_space_counts_as_progress() -> None:
    before = time.monotonic()
    assert _app(committing=True, disk_full=True, progress=12.5).engine_alive() >= before
