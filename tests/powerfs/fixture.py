"""The ``powerfs`` pytest fixture (import it in a test module, like the mosquitto fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.powerfs import PowerFsError, PowerLossFs, unavailable_reason


def require_powerfs() -> None:
    """Fail (never skip) the calling test when powerfs cannot run on this machine."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the power-loss filesystem cannot run here: {reason}")


@pytest.fixture(name="powerfs")
def powerfs_fixture(tmp_path: Path) -> Iterator[PowerLossFs]:
    """A mounted power-loss filesystem under ``tmp_path``; unmounted even if the test fails."""
    require_powerfs()
    fs = PowerLossFs(tmp_path / "powerfs")
    try:
        fs.mount()
    except PowerFsError as err:
        pytest.fail(f"the power-loss filesystem did not mount: {err}")
    try:
        yield fs
    finally:
        fs.unmount()
