"""The site key held in a TPM (issue 11, item 2), through the real agent and the real CLIs.

A software TPM (swtpm, tests/tpm_fixtures.py) per "controller". The backend makes a p3 site
key and keeps it; the cabinet is enrolled the way docs/privacy.md §5 tells an operator to
(``cabinetctl tpm storage-key`` → ``cabinet-consumer tpm-wrap`` → ``cabinetctl tpm import``);
the real ``cabinet-agent run`` lets a listed person in by the pseudonym the backend computed in
software. Its TPM going away fails reads (reported, the agent runs on) until it is back. Its
disk copied to a second controller with another TPM is useless: refused with a reason, and no
key on it to compute a pseudonym with.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.config import EX_CONFIG
from agent.control.client import ControlClient
from agent.privacy.keyfile import KeyFileError
from agent.privacy.pseudonym import Argon2Params
from backend.keys import generate_site_key
from backend.signing import badge_pseudonyms
from simulators.badge import BadgeSimulator
from simulators.cabinet import Scenario, describe_events, load_scenario, to_toml
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto
from tests.offline_attack import harvest, stolen_site_keys
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS
from tests.tpm_fixtures import SwTpm

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CYCLE = ["wait_locked", "badge alice", "wait_unlock", "open", "close", "settle"]
LOW = Argon2Params(memory_kib=4096, iterations=1, lanes=1)  # the cheapest allowed: fast tests


@pytest.fixture
def tpm_a(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm(tmp_path / "tpm-a") as tpm:
        yield tpm


@pytest.fixture
def tpm_b(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm(tmp_path / "tpm-b") as tpm:
        yield tpm


async def _run(*argv: str | Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    async with asyncio.timeout(TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _enrol(tpm: SwTpm, site_key: Path, site: str, out: Path, work: Path) -> None:
    """The three enrolment commands of docs/privacy.md §5, as an operator runs them."""
    storage, wrapped = work / "tpm-storage.key", work / "site-key.tpm-import"
    rc, said, err = await _run(
        BIN / "cabinetctl", "tpm", "storage-key", "--tcti", tpm.tcti, "-o", storage
    )
    assert rc == 0, err
    assert "wrote this TPM's storage key" in said
    rc, said, err = await _run(
        BIN / "cabinet-consumer", "tpm-wrap", "--site-key", site_key, "--site", site,
        "--storage-key", storage, "-o", wrapped,
    )  # fmt: skip
    assert rc == 0, err
    rc, said, err = await _run(
        BIN / "cabinetctl", "tpm", "import", wrapped, "-o", out, "--tcti", tpm.tcti
    )
    assert rc == 0, err
    assert "wrote site key p3." in said


def _scenario() -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": CYCLE, "expect": []})


async def _door_cycle(rig: Rig) -> str:
    """Alice badges and opens the door; the actor her session.opened names."""
    events = await rig.play()
    opened = [e for e in events if e["type"] == "session.opened"]
    assert len(opened) == 1, describe_events(events, rig.artefacts)
    (actor,) = opened[0]["actors"]
    return str(actor)


async def _status(sock: Path) -> dict[str, Any]:
    async with ControlClient(sock, timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("status")
        return result


def _secrets(site_key: bytes, site: str) -> list[bytes]:
    """The site key and the p3 HMAC key, as raw bytes, base64 and hex: none may be on a disk."""
    hmac_key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cabinet-agent/site\x00" + site.encode(),
        info=b"badge-pseudonym/v3/tpm-hmac",
    ).derive(site_key)
    return [
        form
        for key in (site_key, hmac_key)
        for form in (key, base64.b64encode(key), key.hex().encode())
    ]


async def test_a_tpm_held_site_key_lets_listed_people_in_and_a_copied_disk_is_useless(
    tmp_path: Path, mosquitto: Mosquitto, tpm_a: SwTpm, tpm_b: SwTpm
) -> None:
    key_file = tmp_path / "agent" / "site-key.tpm"

    async def enrol(rig: Rig) -> None:
        site = rig.scenario.cabinet.site_id
        await _enrol(tpm_a, tmp_path / "keys" / "site.key", site, key_file, tmp_path)

    def use_the_tpm(cfg: dict[str, Any]) -> None:
        cfg["privacy"]["site_key"] = str(key_file)
        cfg["privacy"]["tpm_tcti"] = tpm_a.tcti

    async with cabinet_rig(
        _scenario(),
        tmp_path,
        mosquitto,
        site_argon2=LOW,
        site_tpm=True,
        before_start=enrol,
        config_hook=use_the_tpm,
    ) as rig:
        site = rig.scenario.cabinet.site_id
        alice = next(p for p in rig.scenario.people if p.name == "alice")
        # What the backend computed in software, with the site key the cabinet never held.
        backend = badge_pseudonyms(site, rig.keys.site, [alice.badge])[alice.badge]
        assert backend.startswith("p3.s1.")
        # Assertions compare pseudonyms only: a failure must not print a badge number.
        assert await _door_cycle(rig) == backend
        sock = Path(tomllib.loads(rig.agent.config.read_text())["control"]["socket_path"])
        assert (await _status(sock))["keys"]["pseudonym_keys"] == ["p3.s1"]

        # The TPM goes away: alice's read fails with a reason, the agent runs on and reports.
        port = tpm_a.port
        tpm_a.stop()
        await rig.badge.present(alice.badge)
        await rig.agent.wait_log("site key p3.s1: badge reads fail: ")
        await rig.sink.log.wait_for(
            lambda: bool(
                rig.sink.log.find(
                    lambda e: (
                        e.get("type") == "agent.alert"
                        and e.get("kind") == "privacy.site_key_unavailable"
                    )
                )
            ),
            TIMEOUT_S,
        )
        problems = (await _status(sock))["keys"]["site_key_problems"]
        assert "cannot reach the TPM" in problems["p3.s1"]
        assert rig.agent.proc is not None
        assert rig.agent.proc.poll() is None
        # Back: the next read reloads the key from its blob; alice is let in again.
        tpm_a.start(port)
        assert await _door_cycle(rig) == backend
        await rig.agent.wait_log("site key p3.s1: the TPM answers again")
        assert (await _status(sock))["keys"]["site_key_problems"] == {}
        rig.assert_no_pii()
    # The agent stopped: it flushed its key from the TPM (no resource manager here to do it).
    assert tpm_a.transient_objects() == 0

    # The controller's disk, copied to a second controller with its own TPM.
    disk = tmp_path / "agent"
    copy = tmp_path / "controller-b"
    shutil.copytree(disk, copy, ignore=shutil.ignore_patterns("*.sock"))
    config = tomllib.loads((copy / "agent.toml").read_text().replace(str(disk), str(copy)))
    config["privacy"]["tpm_tcti"] = tpm_b.tcti
    (copy / "agent.toml").write_text(to_toml(config))
    rc, _, err = await _run(BIN / "cabinet-agent", "run", "--config", copy / "agent.toml")
    assert rc == EX_CONFIG, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines  # one line naming the file and why, no traceback
    assert (
        f"{copy / 'site-key.tpm'}: site key p3.s1 held in a TPM: made for another TPM" in (lines[0])
    )
    rc, said, err = await _run(BIN / "cabinetctl", "config", "check", copy / "agent.toml")
    assert rc == EX_CONFIG
    assert "made for another TPM" in err
    # A controller without a TPM at all: refused the same way, saying so.
    config["privacy"]["tpm_tcti"] = f"device:{copy}/no-tpm"
    (copy / "agent.toml").write_text(to_toml(config))
    rc, _, err = await _run(BIN / "cabinet-agent", "run", "--config", copy / "agent.toml")
    assert rc == EX_CONFIG, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert (
        f"site key p3.s1 held in a TPM: cannot reach the TPM at device:{copy}/no-tpm" in (lines[0])
    )
    # Nothing on it computes a pseudonym: the backend's tool finds no key in the key file...
    rc, said, err = await _run(
        BIN / "cabinet-consumer", "pseudonym", "--site", site, "--site-key", copy / "site-key.tpm"
    )
    assert rc != 0
    assert "held in a cabinet's TPM" in err
    assert said == ""
    # ...the stolen-device attack (tests/offline_attack.py) harvests the pseudonyms but finds
    # no site key to guess with...
    public_keys = [tmp_path / "keys" / n for n in ("backend-hpke.pub", "signing.pub")]
    files = [*public_keys, *(p for p in copy.rglob("*") if p.is_file())]
    assert copy / "state.db" in files
    assert backend in harvest(files)
    with pytest.raises(KeyFileError, match="held in a cabinet's TPM"):
        stolen_site_keys(files)
    # ...and no file the controller holds has the site key or the TPM's HMAC key in any form.
    for path in files:
        raw = path.read_bytes()
        for secret in _secrets(rig.keys.site_key, site):
            assert secret not in raw, f"{path} holds key material"


async def test_sighup_moves_a_running_agent_to_a_tpm_key_and_refuses_another_tpms(
    tmp_path: Path, tpm_a: SwTpm, tpm_b: SwTpm
) -> None:
    """A p2 → p3 rotation by reload (the TPM is opened off the loop); then a reload naming a
    TPM the key was not made for is refused with the reason, the keys in force stay."""
    creds = provision(tmp_path)
    backend_p3 = tmp_path / "backend" / "site-s3.key"
    generate_site_key(backend_p3, "s3", LOW, tpm=True)
    tpm_key = creds / "site-s3.tpm"
    await _enrol(tpm_a, backend_p3, "hangar-3", tpm_key, tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim:
        base = config_text(tmp_path, sim.port)
        cfg.write_text(base)
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"cabinet-agent \S+ ready")
            sock = tmp_path / "control.sock"
            assert (await _status(sock))["keys"]["pseudonym_keys"] == ["p2.s1"]

            rotated = base.replace(
                f'site_key = "{creds}/site.key"',
                f'site_key = "{tpm_key}"\nprevious_site_key = "{creds}/site.key"\n'
                f'tpm_tcti = "{tpm_a.tcti}"',
            )
            cfg.write_text(rotated)
            agent.signal(signal.SIGHUP)
            await agent.wait_log(r"reload: site keys p3\.s3, p2\.s1")
            assert (await _status(sock))["keys"]["pseudonym_keys"] == ["p3.s3", "p2.s1"]

            cfg.write_text(rotated.replace(tpm_a.tcti, tpm_b.tcti))
            agent.signal(signal.SIGHUP)
            kept = await agent.wait_log(r"reload: site keys kept as they were: (.*)")
            assert f"{tpm_key}: site key p3.s3 held in a TPM: made for another TPM" in kept[1]
            assert (await _status(sock))["keys"]["pseudonym_keys"] == ["p3.s3", "p2.s1"]
            assert tpm_a.transient_objects() == 1  # the live key
            assert await agent.stop() == 0
    assert tpm_a.transient_objects() == 0  # flushed at the stop
    assert tpm_b.transient_objects() == 0  # the refused load left nothing behind


async def test_without_the_tpm_bindings_the_agent_runs_p2_and_refuses_a_tpm_key(
    tmp_path: Path, tpm_a: SwTpm
) -> None:
    """tpm2-pytss missing (hidden here): a TPM key file stops the start with one line saying
    so, exit 78; a p2 key file runs as ever."""
    hidden = tmp_path / "no-tpm2-pytss" / "tpm2_pytss"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("tpm2_pytss hidden by the test")\n')
    env = {"PYTHONPATH": str(hidden.parent)}
    creds = provision(tmp_path)
    backend_p3 = tmp_path / "backend" / "site-s3.key"
    generate_site_key(backend_p3, "s3", LOW, tpm=True)
    tpm_key = creds / "site-s3.tpm"
    await _enrol(tpm_a, backend_p3, "hangar-3", tpm_key, tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim:
        base = config_text(tmp_path, sim.port)
        cfg.write_text(
            base.replace(
                f'site_key = "{creds}/site.key"',
                f'site_key = "{tpm_key}"\ntpm_tcti = "{tpm_a.tcti}"',
            )
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(cfg),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, **env},
        )  # fmt: skip
        async with asyncio.timeout(TIMEOUT_S):
            _out, err = await proc.communicate()
        assert proc.returncode == EX_CONFIG, err
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert (
            f"{tpm_key}: site key p3.s3 held in a TPM: the TPM bindings are not installed"
            in (lines[0])
        )
        assert "pip install 'cabinet-agent[tpm]'" in lines[0]

        cfg.write_text(base)  # the p2 key of item 1: no TPM, no bindings needed
        async with AgentProcess(cfg, tmp_path / "agent.log", env=env) as agent:
            await agent.wait_log(r"cabinet-agent \S+ ready")
            assert (await _status(tmp_path / "control.sock"))["keys"]["pseudonym_keys"] == ["p2.s1"]
            assert await agent.stop() == 0


async def test_a_hung_tpm_fails_the_read_in_bounded_time_and_does_not_hold_up_the_stop(
    tmp_path: Path, tpm_a: SwTpm
) -> None:
    """The TPM stops answering mid-command (here: swtpm frozen): the read fails after the
    bound, with the reason; SIGTERM still stops the agent cleanly, without waiting for it."""
    creds = provision(tmp_path)
    backend_p3 = tmp_path / "backend" / "site-s3.key"
    generate_site_key(backend_p3, "s3", LOW, tpm=True)
    tpm_key = creds / "site-s3.tpm"
    await _enrol(tpm_a, backend_p3, "hangar-3", tpm_key, tmp_path)
    cfg = tmp_path / "agent.toml"
    async with (
        LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim,
        BadgeSimulator(transport="tcp") as badge,
    ):
        reader = (
            f'[[badge_readers]]\nid = "badge-1"\nurl = "{badge.url}"\n'
            "backoff = { initial_s = 0.05, max_s = 0.5 }\n"
        )
        cfg.write_text(
            config_text(tmp_path, sim.port, extra=reader).replace(
                f'site_key = "{creds}/site.key"',
                f'site_key = "{tpm_key}"\ntpm_tcti = "{tpm_a.tcti}"',
            )
        )
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"cabinet-agent \S+ ready")
            await agent.wait_log("badge reader badge-1: connected")
            assert tpm_a.proc is not None
            os.kill(tpm_a.proc.pid, signal.SIGSTOP)
            try:
                await badge.present("C0FFEE1234")
                await agent.wait_log(
                    r"site key p3\.s3: badge reads fail: the TPM did not answer within 5 s"
                )
                status = await _status(tmp_path / "control.sock")
                assert "did not answer" in status["keys"]["site_key_problems"]["p3.s3"]
                assert await agent.stop() == 0
                await agent.wait_log("the site key's TPM did not answer at stop")
            finally:
                os.kill(tpm_a.proc.pid, signal.SIGCONT)
        assert "C0FFEE1234" not in agent.text()
