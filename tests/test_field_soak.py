"""The short field soak (bench/field.py, ≈ 1 min): the real agent under random chaos keeps every
invariant (docs/reliability.md). The 10-minute run is recorded in docs/reliability.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INVARIANTS = (
    "every committed event delivered",
    "seq contiguous per epoch",
    "no seq reused, no event re-issued",
    "duplicates within the in-flight window",
    "no false check-out",
    "no restart loop (watchdog never starved)",
)


@pytest.mark.timeout(900)
def test_the_short_field_soak_keeps_every_invariant(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "field.py"),
            "--seconds", "60",
            "--seed", "7",
            "--chaos-min", "2",
            "--chaos-max", "4",
            "--storm", "35",
            "--calm", "25",
            "--min-actions", "6",
            "--workdir", str(tmp_path / "soak"),
        ],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name in INVARIANTS:
        assert re.search(rf"^\| {re.escape(name)} \| PASS \|", out, re.M), out[-6000:]
    chaos = re.search(r"^chaos: (.*)$", out, re.M)
    assert chaos is not None, out[-3000:]
    kinds = re.findall(r"(\w+) ×(\d+)", chaos.group(1))
    # The deck deals every kind once before any repeats, and the run goes on until 6 actions
    # were played (a loaded machine plays fewer in 60 s): at least 6 kinds.
    assert len(kinds) >= 6, chaos.group(0)
    rounds = re.search(r"(\d+) rounds: (\d+) undisturbed", out)
    assert rounds is not None, out[-3000:]
    assert int(rounds.group(2)) >= 1, "no round ran undisturbed: nothing was compared exactly"
