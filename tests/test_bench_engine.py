"""bench/engine.py measures whole door cycles: its passes count the reads it hands over and end
with the events the cabinet's change calls for. A bench whose engine never counted a read (it
did not carry out the StartScan, so every pass waited for its start and ran into
``scan_max_ms``) measured incomplete passes and printed their cost as the engine's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("clock", ["agent", "reader"])
def test_the_engine_bench_counts_its_reads_into_the_events_they_call_for(clock: str) -> None:
    """50 tags read 10 times a pass: nothing changed is one pass of 500 reads (session opened
    and closed); 5 out and 5 in takes a confirmation pass (45 tags read twice: 900 reads) and
    gives 5 check-outs, 5 returns and the session's two events; all returned, 50 returns."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "50", "10", "1", clock],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        cells[0]: (cells[1], cells[2])
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| scenario")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["nothing changed"] == ("500", "2"), proc.stdout
    assert rows["10% out, 10% in"] == ("900", "12"), proc.stdout
    assert rows["all returned"] == ("1,000", "52"), proc.stdout
