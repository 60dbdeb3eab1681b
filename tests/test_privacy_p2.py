"""p2 pseudonyms (Argon2id keyed by the site key): derivation, key file parameters, live keys.

Issue 11, items 1 and 3: the derivation is the documented one, its parameters come from the
site key file (bad ones stop the real daemon with one line, exit 78), a read is derived off the
event loop, and during a rotation a read is derived under the live key the allow-list uses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.config import EX_CONFIG, parse_config
from agent.control.client import ControlClient
from agent.privacy.config import PrivacyConfig, load_cabinet_privacy
from agent.privacy.keyfile import KeyFileError, write_key_file
from agent.privacy.pseudonym import (
    P2_DEFAULT,
    Argon2Params,
    BadgePseudonyms,
    Pseudonymizer,
    SiteKey,
    is_pseudonym,
    load_site_key,
    write_site_key,
)
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, provision

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
# A badge that is easy to spot anywhere it might leak.
SECRET_BADGE = "00C0FFEE1234"
LOW = Argon2Params(memory_kib=4096, iterations=1, lanes=1)  # the cheapest allowed: fast tests


def test_p2_matches_the_documented_derivation() -> None:
    """Recompute docs/privacy.md §1 by hand: HKDF purpose key, Argon2id with it as the secret."""
    k2 = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cabinet-agent/site\x00hangar-3",
        info=b"badge-pseudonym/v2",
    ).derive(KEY)
    salt = hashlib.sha256(b"cabinet-agent/badge-pseudonym/v2\x00hangar-3").digest()[:16]
    tag = Argon2id(
        salt=salt,
        length=16,
        iterations=P2_DEFAULT.iterations,
        lanes=P2_DEFAULT.lanes,
        memory_cost=P2_DEFAULT.memory_kib,
        ad=b"p2.s1",
        secret=k2,
    ).derive(b"badge/v2\x00" + b"12AB")
    expected = "p2.s1." + base64.b32encode(tag).decode().rstrip("=").lower()
    pseudo = Pseudonymizer("hangar-3", "s1", KEY, P2_DEFAULT)
    assert pseudo.badge("0012ab") == expected
    assert pseudo.badge("00000012AB") == expected  # the canonical id, as for p1
    assert is_pseudonym(expected)
    assert (pseudo.scheme, pseudo.prefix) == ("p2", "p2.s1")


def test_p2_is_keyed_and_separated_from_p1_sites_kids_and_parameters() -> None:
    p2 = Pseudonymizer("hangar-3", "s1", KEY, LOW).badge("12ab")
    tag = p2.split(".")[2]
    others = {
        "p1 of the same key": Pseudonymizer("hangar-3", "s1", KEY).badge("12ab"),
        "another key": Pseudonymizer("hangar-3", "s1", OTHER_KEY, LOW).badge("12ab"),
        "another site": Pseudonymizer("hangar-4", "s1", KEY, LOW).badge("12ab"),
        "another kid": Pseudonymizer("hangar-3", "s2", KEY, LOW).badge("12ab"),
        "other parameters": Pseudonymizer(
            "hangar-3", "s1", KEY, Argon2Params(memory_kib=4096, iterations=2, lanes=1)
        ).badge("12ab"),
        "another badge": Pseudonymizer("hangar-3", "s1", KEY, LOW).badge("12ac"),
    }
    for what, other in others.items():
        assert other.split(".")[2] != tag, what


def test_p2_errors_and_repr_never_show_the_badge_or_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pseudo = Pseudonymizer("hangar-3", "s1", KEY, LOW)
    with pytest.raises(ValueError) as info:
        pseudo.badge(SECRET_BADGE + "!")
    text = str(info.value) + repr(info.value) + repr(pseudo) + caplog.text
    assert "C0FFEE" not in text.upper()
    assert KEY.hex() not in text
    assert base64.b64encode(KEY).decode() not in text
    assert KEY.hex() not in repr(SiteKey("s1", KEY, LOW))


# --- the site key file carries the scheme and its parameters ------------------------------------


def test_p2_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_site_key(path, "s2", KEY, P2_DEFAULT)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert 'scheme = "p2"' in text
    assert "[argon2id]\nmemory_kib = 7168\niterations = 6\nlanes = 1\n" in text
    site = load_site_key(path)
    assert site == SiteKey("s2", KEY, P2_DEFAULT)
    assert (site.scheme, site.prefix) == ("p2", "p2.s2")
    assert Pseudonymizer.from_key_file("hangar-3", path).badge("12ab").startswith("p2.s2.")


def test_a_site_key_written_with_the_former_default_keeps_its_parameters(tmp_path: Path) -> None:
    """Changing ``P2_DEFAULT`` (19 MiB t=2 -> 7 MiB t=6, issue 14) changes no site's pseudonyms:
    a key file states its parameters and the agent derives with those, so an upgraded cabinet
    keeps matching its allow-lists until the site chooses to make a new key."""
    former = Argon2Params(memory_kib=19456, iterations=2, lanes=1)
    assert former != P2_DEFAULT
    path = tmp_path / "site.key"
    write_site_key(path, "s1", KEY, former)
    assert "[argon2id]\nmemory_kib = 19456\niterations = 2\nlanes = 1\n" in path.read_text()
    site = load_site_key(path)
    assert site.argon2 == former
    pseudo = Pseudonymizer.from_key_file("hangar-3", path)
    assert pseudo.badge("12AB") == Pseudonymizer("hangar-3", "s1", KEY, former).badge("12AB")
    assert pseudo.badge("12AB") != Pseudonymizer("hangar-3", "s1", KEY, P2_DEFAULT).badge("12AB")


def test_a_key_file_without_scheme_is_p1(tmp_path: Path) -> None:
    """Key files written before p2 keep working (and keep deriving p1)."""
    path = tmp_path / "site.key"
    write_key_file(path, "site-key", "s1", KEY, secret=True)
    assert load_site_key(path) == SiteKey("s1", KEY, None)
    assert Pseudonymizer.from_key_file("hangar-3", path).badge("12ab") == Pseudonymizer(
        "hangar-3", "s1", KEY
    ).badge("12ab")


P2_HEAD = 'scheme = "p2"\n'


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (P2_HEAD + "[argon2id]\nmemory_kib = 19\niterations = 2\nlanes = 1\n", "argon2id.memory_kib"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 4194304\niterations = 2\nlanes = 1\n", "argon2id.memory_kib"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 19456\niterations = 0\nlanes = 1\n", "argon2id.iterations"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 19456\niterations = 2\nlanes = 99\n", "argon2id.lanes"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 19456\niterations = 2\nlanes = true\n", "argon2id.lanes"),
        (P2_HEAD + '[argon2id]\nmemory_kib = "19 MiB"\niterations = 2\nlanes = 1\n', "argon2id.memory_kib"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 19456\nlanes = 1\n", "argon2id.iterations is missing"),
        (P2_HEAD + "[argon2id]\nmemory_kib = 19456\niterations = 2\nlanes = 1\nthreads = 4\n", "argon2id.threads"),
        (P2_HEAD, "argon2id.memory_kib is missing"),
        (P2_HEAD + "argon2id = 3\n", "argon2id must be a table"),
        ('scheme = "p9"\n', "scheme"),
        ("[argon2id]\nmemory_kib = 19456\niterations = 2\nlanes = 1\n", "argon2id given"),
        (P2_HEAD + "[argon2]\nmemory_kib = 19456\n", "argon2 is not a site key field"),
    ],
)  # fmt: skip
def test_bad_p2_parameters_are_refused_naming_the_field(
    tmp_path: Path, extra: str, says: str
) -> None:
    path = tmp_path / "site.key"
    write_key_file(path, "site-key", "s1", KEY, secret=True, extra=extra)
    with pytest.raises(KeyFileError) as info:
        load_site_key(path)
    message = str(info.value)
    assert says in message
    assert str(path) in message
    assert "\n" not in message
    assert base64.b64encode(KEY).decode() not in message


async def test_the_daemon_refuses_bad_p2_parameters_with_one_line_and_exit_78(
    tmp_path: Path,
) -> None:
    creds = provision(tmp_path)
    site_key = creds / "site.key"
    site_key.unlink()
    write_key_file(
        site_key,
        "site-key",
        "s1",
        KEY,
        secret=True,
        extra=P2_HEAD + "[argon2id]\nmemory_kib = 19\niterations = 2\nlanes = 1\n",
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, 9))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _out, err = await proc.communicate()
    assert proc.returncode == EX_CONFIG, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines  # one line naming the file and the field, no traceback
    assert f"{site_key}: argon2id.memory_kib must be an integer from 4096" in lines[0]
    assert not (tmp_path / "state.db").exists(), "nothing may start on a bad key file"


# --- live keys: the current one and, during a rotation, the previous one -----------------------


async def _status(tmp: Path) -> dict[str, Any]:
    async with ControlClient(tmp / "control.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("status")
        return result


def _ring(previous: SiteKey | None = None) -> BadgePseudonyms:
    return BadgePseudonyms("hangar-3", SiteKey("s2", KEY, LOW), previous)


def test_a_read_is_derived_under_the_live_key_the_allow_list_uses() -> None:
    ring = _ring(SiteKey("s1", OTHER_KEY, None))  # rotating from a p1 key to a p2 key
    assert ring.prefixes == ("p2.s2", "p1.s1")
    old = Pseudonymizer("hangar-3", "s1", OTHER_KEY).badge("12ab")
    new = Pseudonymizer("hangar-3", "s2", KEY, LOW).badge("12ab")
    assert ring.badge_now("12ab", {"p1.s1"}) == old  # the list still names people by s1
    assert ring.badge_now("12ab", {"p1.s1", "p2.s2"}) == new  # both: the new key wins
    assert ring.badge_now("12ab", {"p2.s2"}) == new
    assert ring.badge_now("12ab", set()) == new  # no allow-list: the current key
    assert ring.badge_now("12ab", {"p2.s9"}) == new  # a key the cabinet lacks: current
    ring.replace(SiteKey("s2", KEY, LOW))  # the rotation is over
    assert ring.prefixes == ("p2.s2",)
    assert ring.badge_now("12ab", {"p1.s1"}) == new


def test_two_live_keys_of_one_id_and_scheme_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"p2\.s2"):
        _ring(SiteKey("s2", OTHER_KEY, LOW))
    write_site_key(tmp_path / "new.key", "s2", KEY, LOW)
    write_site_key(tmp_path / "old.key", "s2", OTHER_KEY, LOW)
    write_key_file(tmp_path / "hpke.pub", "x25519-hpke-public", "h1", bytes([9] + [0] * 31), secret=False)  # fmt: skip
    cfg = PrivacyConfig(
        site_key=tmp_path / "new.key",
        previous_site_key=tmp_path / "old.key",
        seal_public_key=tmp_path / "hpke.pub",
        signing_public_keys=[tmp_path / "hpke.pub"],
    )
    with pytest.raises(KeyFileError, match=r"privacy\.previous_site_key has the id and scheme"):
        load_cabinet_privacy(cfg, "hangar-3", "crib-07", environ={})


def test_previous_site_key_is_a_config_field() -> None:
    text = config_text(Path("/tmp/x"), 9).replace(
        'site_key = "/tmp/x/creds/site.key"',
        'site_key = "/tmp/x/creds/site.key"\nprevious_site_key = "/tmp/x/creds/old.key"',
    )
    cfg = parse_config(tomllib.loads(text))
    assert cfg.privacy.previous_site_key == Path("/tmp/x/creds/old.key")


class _Spy:
    """Which threads ran p2 derivations, and how many ran at once (at most)."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.inside = 0
        self.most = 0
        self._lock = threading.Lock()

    def wrap(self, badge):  # type: ignore[no-untyped-def]
        def spied(this: Pseudonymizer, raw_id: str) -> str:
            with self._lock:
                self.threads.add(threading.get_ident())
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                return str(badge(this, raw_id))
            finally:
                with self._lock:
                    self.inside -= 1

        return spied


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    s = _Spy()
    monkeypatch.setattr(Pseudonymizer, "badge", s.wrap(Pseudonymizer.badge))
    return s


async def test_reads_are_derived_off_the_event_loop_one_at_a_time(spy: _Spy) -> None:
    ring = _ring()
    expected = Pseudonymizer("hangar-3", "s2", KEY, LOW)
    spy.threads.clear()
    badges = [f"{n:010X}" for n in range(1, 5)]
    got = await asyncio.gather(*(ring.badge(b) for b in badges))
    assert threading.get_ident() not in spy.threads  # never on the loop's thread
    assert spy.most == 1  # bounded: one derivation (and its Argon2id memory) at a time
    assert got == [expected.badge(b) for b in badges]
    await asyncio.get_running_loop().shutdown_default_executor()


def test_backend_and_cabinet_agree_on_p2(tmp_path: Path) -> None:
    """The cabinet's pseudonyms from its key file equal what the backend lists."""
    from backend.keys import generate_backend_keys
    from backend.signing import badge_pseudonyms

    keys = generate_backend_keys(tmp_path / "backend")
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("backend-hpke.pub", "signing.pub", "site.key"):
        (creds / name).write_bytes((tmp_path / "backend" / name).read_bytes())
    os.chmod(creds / "site.key", 0o600)
    cab = load_cabinet_privacy(
        PrivacyConfig(
            site_key=creds / "site.key",
            seal_public_key=creds / "backend-hpke.pub",
            signing_public_keys=[creds / "signing.pub"],
        ),
        "hangar-3",
        "crib-07",
        environ={},
    )
    listed = badge_pseudonyms("hangar-3", keys.site, ["00000012AB"])
    assert cab.pseudonyms.prefixes == ("p2.s1",)
    assert cab.pseudonyms.badge_now("12ab") == listed["00000012AB"]


async def test_sighup_rereads_the_site_keys_and_keeps_them_if_a_file_is_bad(
    tmp_path: Path,
) -> None:
    """The reload path of a rotation: a bad key file is refused with its field named and the
    live keys stay; a good one goes live without a restart; other [privacy] changes still
    need one."""
    creds = provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    old = creds / "site-old.key"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as sim:
        base = config_text(tmp_path, sim.port)
        cfg.write_text(base)
        async with AgentProcess(cfg, tmp_path / "agent.log") as agent:
            await agent.wait_log(r"cabinet-agent \S+ ready")
            assert (await _status(tmp_path))["keys"]["pseudonym_keys"] == ["p2.s1"]

            with_old = base.replace(
                f'site_key = "{creds}/site.key"',
                f'site_key = "{creds}/site.key"\nprevious_site_key = "{old}"',
            )
            write_key_file(
                old, "site-key", "s0", OTHER_KEY, secret=True, extra=P2_HEAD + "argon2id = 3\n"
            )
            cfg.write_text(with_old)
            agent.signal(signal.SIGHUP)
            kept = await agent.wait_log(r"reload: site keys kept as they were: (.*)")
            assert f"{old}: argon2id must be a table" in kept.group(1)
            assert (await _status(tmp_path))["keys"]["pseudonym_keys"] == ["p2.s1"]

            old.unlink()
            write_site_key(old, "s0", OTHER_KEY)  # the legacy p1 key being retired
            agent.signal(signal.SIGHUP)
            await agent.wait_log(r"reload: site keys p2\.s1, p1\.s0")
            status = await _status(tmp_path)
            assert status["keys"]["pseudonym_keys"] == ["p2.s1", "p1.s0"]
            assert status["keys"]["pseudonym_kid"] == "s1"

            cfg.write_text(with_old.replace("[privacy]", "[privacy]\nmax_clock_skew_s = 60.0"))
            agent.signal(signal.SIGHUP)
            restart = await agent.wait_log(r"reload: changes to (.*) need a restart")
            assert restart.group(1) == "privacy"
            assert await agent.stop() == 0


def test_config_check_loads_the_previous_site_key_too(tmp_path: Path) -> None:
    """``cabinetctl config check`` refuses what the daemon would: a bad previous key names its
    field."""
    from agent.cli.common import preflight

    creds = provision(tmp_path)
    old = creds / "site-old.key"
    write_key_file(old, "site-key", "s0", OTHER_KEY, secret=True, extra='scheme = "p9"\n')
    text = config_text(tmp_path, 9).replace(
        f'site_key = "{creds}/site.key"',
        f'site_key = "{creds}/site.key"\nprevious_site_key = "{old}"',
    )
    problems, _ = preflight(parse_config(tomllib.loads(text)))
    assert problems == [f'privacy.previous_site_key: {old}: scheme must be "p1", "p2" or "p3"']
