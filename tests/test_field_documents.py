"""Issue 9, item 3: validly signed documents whose body the cabinet cannot use never kill it.

Hypothesis makes allow-list and asset-registry bodies, valid and invalid by construction; each is
signed with the backend's real key and published *retained* to a real mosquitto, against a real
``cabinet-agent run``. The agent installs the valid ones, refuses the others with a reason that
``cabinetctl status`` shows, never dies, and restarts cleanly with a bad document retained.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.client import ControlClient
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import format_time
from backend.keys import BackendKeys, load_backend_keys
from backend.signing import sign_document
from simulators.cabinet import publish_retained
from tests.daemon_rig import ROOT, config_text, provision
from tests.mqtt_fixtures import Mosquitto, free_port

SITE, CABINET = "hangar-3", "crib-07"  # tests/daemon_rig.config_text
WAIT_S = 30.0
TOPIC = f"cabinets/v1/{SITE}/{CABINET}/cmd"

# ---- bodies, valid or invalid by construction ---------------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
# What a registry may show people (agent.domain.events.unprintable refuses the rest).
_PRINTABLE = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), max_size=12
)
_HEX = "0123456789abcdef"
_EPC = st.integers(1, 64).flatmap(lambda n: st.text(_HEX, min_size=2 * n, max_size=2 * n))
_DRAWER = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)
_DATE = st.dates(min_value=datetime(2000, 1, 1).date(), max_value=datetime(2099, 12, 31).date())
_INT = st.integers(-(2**53) + 1, 2**53 - 1)  # the JSON subset signed documents allow
_ROLES = st.lists(st.sampled_from(["user", "supervisor", "auditor", "future-role"]), max_size=3)


def _asset(epc: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"epc": st.just(epc), "asset_id": st.text(_HEX + "ABC-", min_size=1, max_size=20)},
        optional={
            "name": _PRINTABLE,
            "home_drawer": _DRAWER,
            "calibration_due": _DATE.map(lambda d: d.isoformat()),
            "serial": _TEXT,  # fields the cabinet does not know are carried along unread
        },
    )


def _valid_registry() -> st.SearchStrategy[dict[str, Any]]:
    epcs = st.lists(_EPC, max_size=5, unique=True)
    return epcs.flatmap(lambda es: st.tuples(*[_asset(e) for e in es])).map(
        lambda assets: {"assets": list(assets)}
    )


_BAD_ASSET_EDITS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("no asset_id", lambda a: a.pop("asset_id")),
    ("empty asset_id", lambda a: a.update(asset_id="")),
    ("long asset_id", lambda a: a.update(asset_id="x" * 129)),
    ("numeric asset_id", lambda a: a.update(asset_id=42)),
    ("odd epc", lambda a: a.update(epc=a["epc"] + "a")),
    ("upper-case epc", lambda a: a.update(epc=a["epc"].upper() + "AB")),
    ("no epc", lambda a: a.pop("epc")),
    ("impossible date", lambda a: a.update(calibration_due="2026-02-30")),
    ("numeric date", lambda a: a.update(calibration_due=20260101)),
    ("drawer with a space", lambda a: a.update(home_drawer="top drawer")),
    ("name not text", lambda a: a.update(name=["x"])),
    ("terminal control in name", lambda a: a.update(name="x\x1b[2J")),
    ("bidi override in asset_id", lambda a: a.update(asset_id="TW-\u202e1000")),
]


@st.composite
def _invalid_registry(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.sampled_from(["edit", "duplicate", "not a list", "not an object", "no key"]))
    if shape == "not a list":
        return {"assets": draw(st.one_of(st.none(), _TEXT, _INT, st.just({})))}
    if shape == "no key":
        return {"items": []}
    body = draw(_valid_registry())
    assets = body["assets"] or [draw(_asset(draw(_EPC)))]
    if shape == "not an object":
        assets.insert(draw(st.integers(0, len(assets))), draw(st.one_of(_TEXT, _INT)))
    elif shape == "duplicate":
        assets.append({**assets[0], "asset_id": "DUP"})
    else:
        _name, edit = draw(st.sampled_from(_BAD_ASSET_EDITS))
        edit(assets[draw(st.integers(0, len(assets) - 1))])
    return {"assets": assets}


@dataclass
class People:
    pseudonymizer: Pseudonymizer

    def valid(self) -> st.SearchStrategy[dict[str, Any]]:
        badges = st.lists(st.text(_HEX, min_size=4, max_size=10), max_size=5, unique=True)
        return badges.flatmap(
            lambda bs: st.tuples(*[_ROLES for _ in bs]).map(
                lambda roles: {
                    "entries": {
                        self.pseudonymizer.badge("1" + b): sorted(set(r))
                        for b, r in zip(bs, roles, strict=True)
                    }
                }
            )
        )

    def invalid(self) -> st.SearchStrategy[dict[str, Any]]:
        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            shape = draw(st.sampled_from(["raw id key", "text key", "roles", "role", "entries"]))
            body = draw(self.valid())
            entries = body["entries"]
            if shape == "raw id key":
                entries["04" + draw(st.text(_HEX.upper(), min_size=8, max_size=8))] = ["user"]
            elif shape == "text key":
                ascii_text = st.text(
                    st.characters(min_codepoint=32, max_codepoint=126), max_size=12
                )
                entries[draw(ascii_text.filter(lambda t: not t.startswith("p1.")))] = ["user"]
            elif shape == "roles":
                entries[self.pseudonymizer.badge("ab12")] = draw(
                    st.one_of(_TEXT, _INT, st.none(), st.just({"r": 1}))
                )
            elif shape == "role":
                bad = draw(st.one_of(_INT, st.none(), st.just(["user"])))
                entries[self.pseudonymizer.badge("cd34")] = ["user", bad]
            else:
                return {"entries": draw(st.one_of(st.lists(_TEXT, max_size=2), _TEXT, st.none()))}
            return body

        return build()


# ---- the agent ------------------------------------------------------------------------------------


class Agent:
    """A real ``cabinet-agent run`` (synchronous helpers: hypothesis drives this test)."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.cfg, self.log = cfg, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config", str(self.cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, what: Callable[[str], bool], why: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            text = self.text()
            if what(text):
                return text
            assert self.alive(), f"the agent died waiting for {why}:\n{text[-4000:]}"
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {why}:\n{self.text()[-4000:]}")

    def status(self, sock: Path) -> dict[str, Any]:
        async def call() -> dict[str, Any]:
            async with ControlClient(sock, timeout_s=20.0) as client:
                result: dict[str, Any] = await client.call("status")
                return result

        return asyncio.run(call())

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("the agent ignored SIGTERM") from None
        return self.proc.returncode


def _signed(keys: BackendKeys, kind: str, version: int, body: dict[str, Any]) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    doc = {
        "kind": kind,
        "site_id": SITE,
        "cabinet_id": CABINET,
        "version": version,
        "issued_at": format_time(now - timedelta(minutes=1)),
        "expires_at": format_time(now + timedelta(days=30)),
        "body": body,
    }
    # sign_document checks the signed fields, not the body: the backend *can* sign this.
    return sign_document(keys.signing_private, keys.signing_kid, doc)


def test_signed_documents_with_any_body_are_installed_or_refused_never_fatal(
    tmp_path: Path,
) -> None:
    provision(tmp_path)
    keys = load_backend_keys(tmp_path / "backend")
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    mqtt = (
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nkeepalive_s = 5\n'
        "poll_interval_s = 0.2\nbackoff = { initial_s = 0.05, max_s = 0.5 }\n"
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, free_port(), extra=mqtt))  # no reader: not needed here
    agent = Agent(cfg, tmp_path / "agent.log")
    sock = tmp_path / "control.sock"
    people = People(Pseudonymizer.from_site_key(SITE, keys.site))
    versions = {"allow-list": 0, "asset-registry": 0}
    installed: dict[str, int] = {}
    outcomes: dict[tuple[str, bool], int] = {}

    def outcome(kind: str) -> tuple[int | None, tuple[Any, ...] | None]:
        """(installed version, the last refusal) from the agent's status: the refusal *log
        line* is rate-limited, the status is not."""
        entry = agent.status(sock)["documents"][kind]
        refused = entry.get("refused")
        last = None if refused is None else tuple(refused[k] for k in ("reason", "at", "count"))
        return entry.get("version"), last

    def offer(kind: str, body: dict[str, Any], valid: bool) -> None:
        versions[kind] += 1
        version = versions[kind]
        _, refused_before = outcome(kind)
        publish_retained(broker.port, f"{TOPIC}/{kind}", _signed(keys, kind, version, body))
        deadline = time.monotonic() + WAIT_S
        while True:
            now_version, refused = outcome(kind)
            if now_version == version or refused != refused_before:
                break
            assert agent.alive(), f"the agent died on {kind} v{version}:\n{agent.text()[-4000:]}"
            assert time.monotonic() < deadline, (kind, version, body, agent.text()[-3000:])
            time.sleep(0.05)
        if valid:
            assert now_version == version, (body, refused, agent.text()[-3000:])
            installed[kind] = version
        else:
            assert now_version != version, body
            assert refused is not None
            assert refused[0] == "invalid-body", (refused, body)
        outcomes[(kind, valid)] = outcomes.get((kind, valid), 0) + 1
        assert agent.alive()

    examples = settings(
        max_examples=12,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @examples
    @given(body=_valid_registry())
    def valid_registries(body: dict[str, Any]) -> None:
        offer("asset-registry", body, True)

    @examples
    @given(body=_invalid_registry())
    def invalid_registries(body: dict[str, Any]) -> None:
        offer("asset-registry", body, False)

    @examples
    @given(body=people.valid())
    def valid_allow_lists(body: dict[str, Any]) -> None:
        offer("allow-list", body, True)

    @examples
    @given(body=people.invalid())
    def invalid_allow_lists(body: dict[str, Any]) -> None:
        offer("allow-list", body, False)

    try:
        agent.start()
        agent.wait_for(lambda t: "MQTT connected" in t, "the broker connection")
        for run in (valid_registries, invalid_registries, valid_allow_lists, invalid_allow_lists):
            run()
        assert len(outcomes) == 4, outcomes
        assert min(outcomes.values()) >= 5, outcomes

        # The exact body `cabinet-consumer sign-registry` used to sign: an asset without an id.
        offer("asset-registry", {"assets": [{"epc": "e2801160", "name": "wrench"}]}, False)
        status = agent.status(sock)
        registry = status["documents"]["asset-registry"]
        assert registry["version"] == installed["asset-registry"], "runs on with what it had"
        assert registry["refused"]["reason"] == "invalid-body"
        assert "asset_id" in registry["refused"]["detail"]
        assert any(a == "asset-registry refused: invalid-body" for a in status["alerts"])
        assert status["documents"]["allow-list"]["version"] == installed["allow-list"]
        shown = subprocess.run(
            [sys.executable, "-m", "agent.cli.ctl", "status", "--socket", str(sock)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        line = next(x for x in shown.stdout.splitlines() if "document  asset-registry" in x)
        assert f"v{installed['asset-registry']} valid" in line
        assert "REFUSED" in line
        assert "invalid-body" in line
        raw_id = "04A1B2C3D4"
        offer("allow-list", {"entries": {raw_id: ["user"]}}, False)
        assert raw_id not in agent.text(), "a refused key may be a raw badge id: never logged"
        assert agent.stop() == 0

        # Both bad documents stay retained: every start meets them again.
        before = {k: agent.text().count(f"refused {k} document: invalid-body") for k in versions}
        agent.start()
        text = agent.wait_for(
            lambda t: all(
                t.count(f"refused {k} document: invalid-body") > n for k, n in before.items()
            ),
            "the retained bad documents refused again",
        )
        assert re.search(r"cabinet-agent \S+ ready", text.rsplit("stopped in", 1)[-1])
        status = agent.status(sock)
        assert status["documents"]["asset-registry"]["version"] == installed["asset-registry"]
        assert status["documents"]["allow-list"]["version"] == installed["allow-list"]
        assert status["documents"]["asset-registry"]["refused"]["reason"] == "invalid-body"
        assert agent.alive()
        assert agent.stop() == 0
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)
        broker.stop()
