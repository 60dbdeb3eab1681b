"""Power cuts under the real agent: the store survives them in every ``synchronous`` mode.

The agent (``cabinet-agent run``) keeps its database on the power-loss filesystem
(simulators/powerfs), commits a steady stream of events (unknown badges at a real badge reader
simulator, plus the reader's own events) and delivers them to a real mosquitto, where a
backend subscriber records every envelope (tests/stream_ledger.py). At a random moment of each
run the power is cut: the agent is SIGKILLed and every write it did not fsync is thrown away;
then the agent starts again on what the disk kept. After the last cut the agent drains its
outbox and the stream must show:

* the database opened every time, with what it held (the agent reached ready, nothing was
  quarantined, the store never had to start a new epoch);
* 0 acknowledged events lost: an event the broker received keeps its (epoch, seq) and its
  event id forever -- no other event is ever issued under that seq, the event itself is never
  re-issued under another one, and the agent's counter never falls back below it;
* 0 seq reused, and no hole inside an epoch once everything is delivered.

Every run waits until a newly issued event has reached the backend before its cut, so each
restart is probed: a counter that went backwards shows as a reused seq. Now and then an extra
cut hits the agent while it is still starting (opening and recovering the database).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from backend.keys import load_backend_keys
from simulators.badge import BadgeSimulator
from simulators.llrp import LlrpSimulator
from simulators.powerfs import PowerLossFs
from tests.daemon_rig import ROOT, AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto
from tests.stream_ledger import StreamLedger, epoch_name

CUTS = 15
SOAK_CUTS = 60
READY = r"cabinet-agent \S+ ready"
START_TIMEOUT_S = 60.0
FRESH_EVENT_TIMEOUT_S = 30.0
MAX_RUN_S = 1.0  # a cut comes at a random moment up to this long after the run's probe event
STARTUP_CUT_P = 0.25  # chance of an extra cut while the agent is starting, before a run
COMMITTED = re.compile(r"event (\S+) seq=(\d+) committed")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\S+Z) ", re.MULTILINE)


def _agent_config(
    tmp: Path, llrp_port: int, badge_url: str, mqtt_port: int, db: Path, sync: str
) -> str:
    extra = f"""
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
keepalive_s = 5
connect_timeout_s = 5.0
poll_interval_s = 0.2
replay_rate = 0
backoff = {{ initial_s = 0.1, max_s = 1.0 }}

[[badge_readers]]
id = "badge-1"
url = "{badge_url}"
protocol = "em4100"
backoff = {{ initial_s = 0.05, max_s = 0.5 }}
"""
    return config_text(tmp, llrp_port, store_path=db, store=f'synchronous = "{sync}"', extra=extra)


async def _present_unknown_cards(badge: BadgeSimulator, rng: random.Random) -> None:
    """A steady stream of ``access.denied`` events: a new unknown card every 50 ms."""
    while True:
        await badge.send_frame(f"{rng.randrange(16**10):010X}")
        await asyncio.sleep(0.05)


async def _ctl(sock: Path, *argv: str, timeout: float = 90.0) -> tuple[int, str, str]:
    """cabinetctl ARGV --json: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli.ctl",
        *argv,
        "--json",
        "--socket",
        str(sock),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _start_up_s(log: str) -> float | None:
    """Seconds from the first log line to ready, by the log's own timestamps."""
    first = STAMP.search(log)
    ready = re.search(r"^(\S+) .*" + READY, log, re.MULTILINE)
    if first is None or ready is None:
        return None
    return (
        datetime.fromisoformat(ready.group(1)) - datetime.fromisoformat(first.group(1))
    ).total_seconds()


def _committed(log: str) -> str:
    """The seq range the agent's log says it committed in one run (durable or not)."""
    seqs = [int(m.group(2)) for m in COMMITTED.finditer(log)]
    return f"{min(seqs)}..{max(seqs)} ({len(seqs)})" if seqs else "none"


@dataclass
class _PowerCuts:
    """The agent on powerfs, started and cut again and again; what each run did."""

    tmp: Path
    fs: PowerLossFs
    ledger: StreamLedger
    cfg: Path
    rng: random.Random
    runs: list[str] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)
    agent: AgentProcess | None = None
    open_s: float = 0.1  # first log line to ready, as last seen

    async def start(self, name: str) -> AgentProcess:
        self.agent = AgentProcess(self.cfg, self.tmp / f"agent-{name}.log")
        self.agents.append(self.agent)
        await self.agent.start()
        return self.agent

    async def cut(self, what: str) -> None:
        agent = self.agent
        assert agent is not None
        assert agent.proc is not None
        report = await asyncio.to_thread(self.fs.cut, agent.proc.pid)
        await agent.proc.wait()
        self.runs.append(
            f"{what}: committed {_committed(agent.text())}; the cut dropped "
            f"{report.discarded_bytes} B in {report.discarded_files} file(s) and undid "
            f"{report.undone_metadata} metadata op(s)"
        )

    async def start_up_cut(self, run: int) -> None:
        """Cut the power while the agent opens and recovers its database (before ready)."""
        agent = await self.start(f"{run}-startup")
        # Its first log line comes once the interpreter is up; the store opens soon after.
        async with asyncio.timeout(START_TIMEOUT_S):
            while not agent.text():
                await asyncio.sleep(0.002)
        at = self.rng.uniform(0, self.open_s)
        await asyncio.sleep(at)
        await self.cut(f"run {run} start-up, cut {at * 1000:.0f} ms after its first log line")

    async def run(self, run: int, *, last: bool) -> None:
        """Start, reach ready, get a new event to the backend, run a while, cut (unless last)."""
        self.ledger.tag = run
        since = self.ledger.count()
        agent = await self.start(str(run))
        # The database opens every time: the agent gets to ready on what the disk kept.
        await agent.wait_log(READY, timeout=START_TIMEOUT_S)
        self.open_s = _start_up_s(agent.text()) or self.open_s
        try:
            await self.ledger.wait_new_event(since, FRESH_EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(
                f"run {run}: no new event reached the backend in {FRESH_EVENT_TIMEOUT_S} s:\n"
                + agent.text()[-3000:]
            ) from None
        if not last:
            at = self.rng.uniform(0, MAX_RUN_S)
            await asyncio.sleep(at)
            await self.cut(f"run {run}")

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.stop()


async def _power_cuts(
    tmp: Path, broker: Mosquitto, fs: PowerLossFs, synchronous: str, cuts: int
) -> None:
    provision(tmp)
    keys = load_backend_keys(tmp / "backend")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ledger = StreamLedger(broker.port, keys)
    ledger.start()
    try:
        async with (
            LlrpSimulator(personality="impinj", antennas=4, port=0, seed=5) as sim,
            BadgeSimulator(transport="tcp") as badge,
        ):
            cfg = tmp / "agent.toml"
            cfg.write_text(
                _agent_config(
                    tmp, sim.port, badge.url, broker.port, fs.path / "state.db", synchronous
                )
            )
            rig = _PowerCuts(tmp, fs, ledger, cfg, rng)
            driver = asyncio.create_task(_present_unknown_cards(badge, rng), name="badge-driver")
            try:
                for run in range(cuts + 1):
                    if run and rng.random() < STARTUP_CUT_P:
                        await rig.start_up_cut(run)
                    since = ledger.count()
                    await rig.run(run, last=run == cuts)
                # Quiet now: everything the agent holds must reach the backend.
                driver.cancel()
                await asyncio.gather(driver, return_exceptions=True)
                sock = tmp / "control.sock"
                rc, out, err = await _ctl(sock, "queue", "drain", "--wait", "--timeout", "60")
                assert rc == 0, f"outbox not drained: {out}{err}"
                rc, out, err = await _ctl(sock, "queue", "stats")
                assert rc == 0, err
                next_seq = int(json.loads(out)["next_seq"])
                # The current epoch is that of the events first issued in this last run (a
                # re-sent copy from an earlier epoch may arrive after them).
                got = ledger.received()
                old = {r.event_id for r in got[:since]}
                epoch = [r for r in got[since:] if r.event_id not in old][-1].key[0]
                try:
                    await ledger.wait_for(
                        lambda got: (epoch, next_seq - 1) in {r.key for r in got}, 30
                    )
                except TimeoutError:
                    raise AssertionError(
                        f"drained, but seq {next_seq - 1} (epoch {epoch_name(epoch)}) never "
                        "reached the backend"
                    ) from None
                assert rig.agent is not None
                assert await rig.agent.stop() == 0, rig.agent.text()[-3000:]
            finally:
                driver.cancel()
                await asyncio.gather(driver, return_exceptions=True)
                await rig.stop()
    finally:
        ledger.stop()

    check = ledger.check()
    problems = check.problems()
    quarantined = [a.log.name for a in rig.agents if "moved aside" in a.text()]
    if quarantined:
        problems.append(f"database quarantined as corrupt by {quarantined}")
    # A cut must not cost the database: a new epoch means the store found it lost or rolled
    # back (an empty database "opens" too, that is not what surviving a cut means).
    epochs = ledger.epochs()
    if len(epochs) > 1:
        problems.append(
            f"the store started {len(epochs) - 1} new epoch(s) over the cuts: "
            + ", ".join(epoch_name(e) for e in epochs)
        )
    # The agent's history covers everything the backend holds: its counter in the current
    # epoch is past every seq the backend has there.
    held = max((r.key[1] for r in ledger.received() if r.key[0] == epoch), default=0)
    if next_seq <= held:
        problems.append(
            f"the agent's counter fell back: its next seq is {next_seq}"
            + ("" if epoch is None else f" in epoch {epoch_name(epoch)}")
            + f", the backend already holds seq {held}"
        )
    summary = (
        f"{len(rig.runs)} power cuts, synchronous={synchronous}, seed {seed}: "
        f"{check.received} envelopes received, {check.events} events, "
        f"{check.duplicates} duplicate copies, next seq {next_seq}, "
        f"alerts {dict(ledger.alerts) or 'none'}"
    )
    print("\n".join([summary, *rig.runs]))
    assert not problems, "\n".join([summary, *problems, *rig.runs])


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_power_cuts_lose_no_acknowledged_event_and_reuse_no_seq(
    tmp_path: Path, mosquitto: Mosquitto, powerfs: PowerLossFs, synchronous: str
) -> None:
    await _power_cuts(tmp_path, mosquitto, powerfs, synchronous, CUTS)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_power_cuts_soak(
    tmp_path: Path, mosquitto: Mosquitto, powerfs: PowerLossFs, synchronous: str
) -> None:
    await _power_cuts(tmp_path, mosquitto, powerfs, synchronous, SOAK_CUTS)
