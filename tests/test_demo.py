"""``cabinet-agent demo`` as a real process: with mosquitto, and falling back to the outbox."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simulators.cabinet import INSTALLER, find_scenario, load_scenario
from simulators.demo import EX_USAGE, NO_MOSQUITTO_ENV, find_mosquitto, run_demo
from tests.pii import assert_no_raw_ids, find_raw_ids

ROOT = Path(__file__).resolve().parent.parent
DEMO = (sys.executable, "-m", "agent.cli.cabinet_agent", "demo")
RUN_TIMEOUT_S = 120.0
CHECKED_OUT = re.compile(r"item\.checked_out\s+p[12]\.\w+\.\w+")
RETURNED = re.compile(r"item\.returned\s+p[12]\.\w+\.\w+")


def _raw_ids() -> list[str]:
    scenario = load_scenario(find_scenario("demo-shift"))
    return [p.badge for p in (*scenario.people, INSTALLER)]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1", **extra}


def _processes_mentioning(text: str) -> list[str]:
    """Live processes (not us) whose command line names ``text`` (the demo's work dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {shown}")
    return found


def _assert_left_nothing(tmp: Path) -> None:
    assert _processes_mentioning(str(tmp)) == [], "the demo left processes behind"


def _read_until(proc: subprocess.Popen[str], done: Callable[[str], bool], timeout: float) -> str:
    """Read the child's stdout until ``done(output)`` holds (bounded; fails on early exit)."""
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not done(out):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; output so far:\n{out}"
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            assert line, f"the demo exited early ({proc.wait()}):\n{out}"
            out += line
    return out


def _run_demo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, *args],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def test_demo_with_mosquitto_plays_a_round_end_to_end(tmp_path: Path) -> None:
    assert find_mosquitto() is not None, "mosquitto is a test prerequisite (tests/run installs it)"
    # --rounds ends it when the round is over (no race with a clock on a loaded machine);
    # --seconds only bounds it.
    result = _run_demo(tmp_path, "--rounds", "1", "--seconds", str(RUN_TIMEOUT_S - 30))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "mosquitto on 127.0.0.1:" in out
    assert CHECKED_OUT.search(out), out
    assert RETURNED.search(out), out
    assert "round 1: ✓ exactly the 12 events the scenario expects" in out, out
    # The technician session and the consumable (docs/domain.md).
    assert "technician.opened" in out, out
    assert "item.consumed" in out, out
    assert "item.restocked" in out, out
    (tmp_path / "stdout").write_text(out + result.stderr)
    assert find_raw_ids([tmp_path / "stdout"], _raw_ids()) == []
    _assert_left_nothing(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == [], "the work directory was not removed"


def test_demo_stops_after_the_given_seconds(tmp_path: Path) -> None:
    result = _run_demo(tmp_path, "--seconds", "3")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Stops after 3 s, or on Ctrl-C." in out
    assert "stopping: the cabinet, then the agent" in out
    assert "events opened by the backend" in out
    _assert_left_nothing(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == [], "the work directory was not removed"


@pytest.mark.parametrize("broker", ["mosquitto", "none"])
def test_demo_stops_on_ctrl_c(tmp_path: Path, broker: str) -> None:
    if broker == "none":
        path = os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.endswith("sbin")
        )
        env = _env(tmp_path, PATH=path, **{NO_MOSQUITTO_ENV: "1"})
    else:
        env = _env(tmp_path)
    proc = subprocess.Popen(
        [*DEMO, "--keep"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the terminal's whole foreground group
    )
    try:
        out = _read_until(proc, lambda o: bool(RETURNED.search(o)), RUN_TIMEOUT_S)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"no stop after Ctrl-C:\n{out}{err.output}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out += rest
    assert proc.returncode == 0, out
    if broker == "none":
        assert "mosquitto not installed: showing events straight from the sealed outbox" in out
    else:
        assert "mosquitto on 127.0.0.1:" in out
    assert CHECKED_OUT.search(out), out
    assert "stopping:" in out
    (tmp_path / "stdout").write_text(out)
    assert find_raw_ids([tmp_path / "stdout"], _raw_ids()) == []
    _assert_left_nothing(tmp_path)
    # --keep: the agent's files (database, log, config) hold no raw badge id either.
    kept = re.search(r"kept the work directory: (\S+)", out)
    assert kept is not None, out
    workdir = Path(kept.group(1))
    assert workdir.parent == tmp_path / "tmp"
    assert sorted(p.name for p in (workdir / "cabinet" / "credentials").iterdir()) == [
        "backend-hpke.pub",
        "signing.pub",
        "site.key",
    ]
    assert (workdir / "cabinet" / "state.db").stat().st_size > 0
    assert_no_raw_ids([workdir / "cabinet", workdir / "agent.log"], _raw_ids())
    if broker == "mosquitto":
        # The agent said goodbye (MQTT DISCONNECT) before the broker was stopped.
        log = (workdir / "broker" / "mosquitto.log").read_text()
        assert "Client cabinet-hangar-3-crib-07 disconnected." in log, log
        assert_no_raw_ids([workdir / "broker"], _raw_ids())


def test_demo_refuses_bad_arguments_before_starting_anything(tmp_path: Path) -> None:
    result = _run_demo(tmp_path, "--antennas", "2")
    assert result.returncode == EX_USAGE
    assert "--antennas must be within 3..8" in result.stdout
    assert run_demo(seconds=-1, tags=60, antennas=4) == EX_USAGE
    assert run_demo(seconds=0, tags=2, antennas=4) == EX_USAGE
    assert run_demo(seconds=0, tags=60, antennas=4, rounds=-1) == EX_USAGE
    assert list((tmp_path / "tmp").iterdir()) == []


def test_find_mosquitto_looks_beyond_path_and_honours_the_override() -> None:
    # Debian puts it in /usr/sbin, often not on a user's PATH.
    assert find_mosquitto({"PATH": "/nonexistent"}) == Path("/usr/sbin/mosquitto")
    assert find_mosquitto({NO_MOSQUITTO_ENV: "1", "PATH": "/usr/sbin:/usr/bin"}) is None
