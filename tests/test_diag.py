"""``cabinetctl selftest`` and ``cabinetctl bundle`` against real readers, brokers and daemons."""

from __future__ import annotations

import base64
import json
import re
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.cli.control_cmd import clock_line
from agent.cli.diag import Check, check_clock, check_trusted_clock, redact
from agent.config import EX_CONFIG
from agent.store import Store, StoreConfig
from simulators.badge import BadgeSimulator
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, config_text, ctl, provision
from tests.mqtt_fixtures import (
    BrokerTls,
    Mosquitto,
    Pki,
    free_port,
    spki_sha256,
)
from tests.pii import assert_no_raw_ids
from tests.store_helpers import next_rows

CARDS = ["0A1B2C3D4E", "8000123456"]
LINE_RE = re.compile(r"^(PASS|WARN|FAIL) [^:]+: .+$")


async def _selftest(cfg: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    rc, out, err = await ctl("selftest", "--config", str(cfg), "--json", "--timeout", "5")
    report = json.loads(out)
    assert report["exit_code"] == rc, err
    return rc, {c["check"]: c for c in report["checks"]}


def _mqtt(port: int) -> str:
    return f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nconnect_timeout_s = 5\n'


async def test_selftest_passes_with_reader_and_broker_up(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
        cfg.write_text(config_text(tmp_path, sim.port, extra=_mqtt(mosquitto.port)))
        rc, checks = await _selftest(cfg)
        assert sim.connections.total == 1, "the reader check really connected"
    for name in ("config", "keys", "clock", "disk", "reader dock-1", "broker"):
        assert checks[name]["status"] == "PASS", checks
    assert "accepted an MQTT connection" in checks["broker"]["reason"]
    assert checks["agent"]["status"] == "WARN"  # no daemon running
    assert checks["ntp"]["status"] in ("PASS", "WARN")
    assert not [c for c in checks.values() if c["status"] == "FAIL"]
    assert rc == 0


async def test_selftest_names_unreachable_reader_and_broker_exit_69(tmp_path: Path) -> None:
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, free_port(), extra=_mqtt(free_port())))
    rc, out, _err = await ctl("selftest", "--config", str(cfg), "--timeout", "5")
    lines = out.splitlines()
    assert lines
    assert all(LINE_RE.match(line) for line in lines), out
    assert any(line.startswith("FAIL reader dock-1: ") and "refused" in line for line in lines)
    assert any(line.startswith("FAIL broker: ") for line in lines), out
    assert any(line.startswith("PASS keys: ") for line in lines), out
    assert rc == 69


async def test_selftest_config_problems_exit_78(tmp_path: Path) -> None:
    creds = provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, free_port()))
    (creds / "site.key").chmod(0o644)
    rc, checks = await _selftest(cfg)
    assert checks["keys"]["status"] == "FAIL"
    assert "chmod" in checks["keys"]["reason"]
    assert rc == EX_CONFIG

    cfg.write_text(config_text(tmp_path, free_port()) + "\n[bogus]\nx = 1\n")
    rc, out, _err = await ctl("selftest", "--config", str(cfg))
    assert rc == EX_CONFIG
    assert out.startswith("FAIL config: ")
    assert "bogus" in out


def test_clock_check_refuses_times_before_the_build_and_far_ahead() -> None:
    from datetime import UTC, datetime

    assert check_clock(datetime(1970, 1, 1, tzinfo=UTC)).status == "FAIL"
    assert check_clock(datetime(2090, 1, 1, tzinfo=UTC)).status == "FAIL"
    assert check_clock(datetime(2027, 6, 1, tzinfo=UTC)).status == "PASS"


def test_redact_replaces_key_paths_secrets_and_url_credentials() -> None:
    data = {
        "privacy": {"site_key": "/etc/k", "signing_public_keys": ["/a", "/b"]},
        "mqtt": {
            "host": "broker",
            "password": "hunter2",
            "tls": {"ca_file": "/ca.pem", "spki_pins": ["ab" * 32]},
        },
        "badge_readers": [{"url": "socket://tech:hunter2@10.0.0.9:4001"}],
        "readers": [{"id": "dock-1", "keepalive_s": 1.0}],
    }
    text = json.dumps(redact(data))
    for secret in ("/etc/k", '"/a"', '"/b"', "hunter2", "/ca.pem", "tech:"):
        assert secret not in text
    assert "socket://<redacted>@10.0.0.9:4001" in text
    assert '"keepalive_s": 1.0' in text
    assert '"host": "broker"' in text


def _key_material(creds: Path) -> list[bytes]:
    """Every form a key file's secret could take in an archive: file, value, raw, hex."""
    out: list[bytes] = []
    for key_file in creds.iterdir():
        data = key_file.read_bytes()
        out.append(data)
        for m in re.finditer(rb'key = "([^"]+)"', data):
            value = m.group(1)
            raw = base64.b64decode(value)
            out += [value, value[:16], raw, raw.hex().encode(), base64.b64encode(raw)[:16]]
    assert out
    return out


def _extract(archive: Path, into: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    return {Path(n).name: (into / n).read_bytes() for n in names}


def _assert_clean(files: dict[str, bytes], extracted: Path, creds: Path) -> None:
    blob = b"\n".join(files.values())
    for secret in _key_material(creds):
        assert secret not in blob, "key material in the bundle"
    assert str(creds).encode() not in blob, "key path in the bundle"
    assert_no_raw_ids([extracted], CARDS)


async def test_bundle_from_a_daemon_that_saw_badges_holds_no_keys_or_raw_ids(
    tmp_path: Path,
) -> None:
    creds = provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    log = tmp_path / "agent.log"
    badge_conf = """
[[badge_readers]]
id = "badge-1"
url = "{url}"
repeat_interval_s = 0
"""
    async with (
        LlrpSimulator(personality="impinj", antennas=4, port=0, seed=6) as sim,
        BadgeSimulator(transport="tcp") as badge,
    ):
        cfg.write_text(
            config_text(tmp_path, sim.port, level="DEBUG", extra=badge_conf.format(url=badge.url))
        )
        async with AgentProcess(cfg, log) as agent:
            await agent.wait_log(r"reader dock-1: \S+ -> online")
            await badge.wait_for_client(30.0)
            for n, card in enumerate(CARDS, start=1):
                await badge.present(card)
                await agent.wait_log(rf"(?s)(event access\.denied seq=\d+ committed.*){{{n}}}")
            connections = sim.connections.total

            # While the daemon runs: readers and store come from it; the reader is left alone.
            rc, checks = await _selftest(cfg)
            assert rc == 0, checks
            assert checks["agent"]["status"] == "PASS"
            assert "running agent" in checks["reader dock-1"]["reason"]
            assert checks["store"]["status"] == "PASS"
            live = tmp_path / "live.tar.gz"
            rc, _out, err = await ctl(
                "bundle", "--config", str(cfg), "-o", str(live), "--log", str(log)
            )
            assert rc == 0, err
            assert sim.connections.total == connections, "bundle took over the reader session"
            assert live.stat().st_mode & 0o077 == 0
            assert await agent.stop() == 0

        files = _extract(live, tmp_path / "live")
        assert {"config.redacted.json", "versions.json", "selftest.txt", "logs.txt"} <= set(files)
        assert b"badge presented at badge-1" in files["logs.txt"], "the logs are in the bundle"
        store = json.loads(files["store.json"])
        assert store["source"] == "daemon"
        assert store["outbox"]["depth"] >= len(CARDS)
        assert json.loads(files["versions.json"])["cabinet-agent"]
        _assert_clean(files, tmp_path / "live", creds)

        # Daemon stopped: the bundle opens the store itself and verifies the audit chain.
        offline = tmp_path / "offline.tar.gz"
        rc, _out, err = await ctl(
            "bundle", "--config", str(cfg), "-o", str(offline), "--log", str(log)
        )
        assert rc == 0, err
    files = _extract(offline, tmp_path / "offline")
    store = json.loads(files["store.json"])
    assert store["source"] == "file", store
    assert store["audit"]["ok"] is True
    assert store["outbox"]["depth"] >= len(CARDS)
    assert "status.json" not in files
    _assert_clean(files, tmp_path / "offline", creds)


async def test_selftest_broker_check_uses_the_configured_tls(tmp_path: Path) -> None:
    provision(tmp_path)
    pki = Pki(tmp_path / "pki")
    server_crt, server_key, server_cert = pki.issue("broker", server=True)
    client_crt, client_key, _ = pki.issue("cabinet-good", server=False)
    broker = Mosquitto(
        tmp_path / "broker",
        tls=BrokerTls(pki.ca_file, server_crt, server_key, require_certificate=True),
    )
    broker.start()
    try:
        cfg = tmp_path / "agent.toml"

        def write(pin: str) -> None:
            tls = (
                f'[mqtt.tls]\nca_file = "{pki.ca_file}"\ncert_file = "{client_crt}"\n'
                f'key_file = "{client_key}"\nspki_pins = ["{pin}"]\n'
            )
            cfg.write_text(config_text(tmp_path, free_port(), extra=_mqtt(broker.port) + tls))

        write(spki_sha256(server_cert))
        _rc, checks = await _selftest(cfg)
        assert checks["broker"]["status"] == "PASS", checks["broker"]
        assert "(TLS" in checks["broker"]["reason"]

        write("00" * 32)  # a pin the broker's key does not match
        rc, checks = await _selftest(cfg)
        assert checks["broker"]["status"] == "FAIL"
        assert "pin" in checks["broker"]["reason"].lower(), checks["broker"]
        assert rc == 69
    finally:
        broker.stop()


async def test_selftest_names_unusable_tls_files_as_a_config_problem(tmp_path: Path) -> None:
    """A missing or unloadable [mqtt.tls] file is what `run` refuses at start: one FAIL line
    naming the field, exit 78 — never a traceback."""
    provision(tmp_path)
    pki = Pki(tmp_path / "pki")
    client_crt, client_key, _ = pki.issue("cabinet-good", server=False)
    cfg = tmp_path / "agent.toml"

    def write(ca_file: Path) -> None:
        tls = (
            f'[mqtt.tls]\nca_file = "{ca_file}"\ncert_file = "{client_crt}"\n'
            f'key_file = "{client_key}"\n'
        )
        cfg.write_text(config_text(tmp_path, free_port(), extra=_mqtt(free_port()) + tls))

    missing = tmp_path / "pki" / "no-such-ca.pem"
    write(missing)
    rc, checks = await _selftest(cfg)
    assert checks["broker"]["status"] == "FAIL", checks["broker"]
    assert "mqtt.tls" in checks["broker"]["reason"]
    assert str(missing) in checks["broker"]["reason"]
    assert checks["broker"]["config_problem"] is True
    assert rc == EX_CONFIG

    garbage = tmp_path / "pki" / "garbage-ca.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"
    )
    write(garbage)
    rc, out, err = await ctl("selftest", "--config", str(cfg), "--timeout", "5")
    assert "Traceback" not in err, err
    assert any(line.startswith("FAIL broker: mqtt.tls") for line in out.splitlines()), out
    assert rc == EX_CONFIG


def test_allow_list_verdict_warns_before_expiry_and_fails_after() -> None:
    """Issue 9 item 11: status and selftest warn days before the allow-list expires."""
    from datetime import UTC, datetime, timedelta

    from agent.cli.diag import allow_list_verdict
    from agent.domain.config import CabinetDomainConfig

    now = datetime(2026, 12, 1, tzinfo=UTC)
    domain = CabinetDomainConfig(allow_list_expiry_warning_days=7)

    def doc(expires_in: timedelta, **extra: object) -> dict[str, object]:
        return {
            "version": 3,
            "state": "valid",
            "expires_at": (now + expires_in).isoformat(),
            **extra,
        }

    assert allow_list_verdict(doc(timedelta(days=30)), now, domain).status == "PASS"
    soon = allow_list_verdict(doc(timedelta(days=2)), now, domain)
    assert soon.status == "WARN"
    assert "expires in 2.0 days" in soon.reason
    gone = allow_list_verdict(doc(-timedelta(hours=1)), now, domain)
    assert gone.status == "FAIL"
    assert "every badge is denied" in gone.reason
    graced = CabinetDomainConfig(expired_allow_list_grace_h=4)
    grace = allow_list_verdict(doc(-timedelta(hours=1)), now, graced)
    assert grace.status == "WARN"
    assert "supervisor" in grace.reason
    assert allow_list_verdict(None, now, domain).status == "WARN"
    refused = {"reason": "invalid-body", "detail": "asset [0] needs an 'asset_id'"}
    flagged = allow_list_verdict(doc(timedelta(days=30), refused=refused), now, domain)
    assert flagged.status == "WARN"
    assert "invalid-body" in flagged.reason


def test_trusted_time_advice_blames_the_clock_that_is_likely_wrong() -> None:
    def clock(wall: str, time: str, trusted: bool = False) -> dict[str, Any]:
        return {
            "clock": {
                "time": time,
                "wall": wall,
                "trusted": trusted,
                "since": "2026-12-01T10:00:00+00:00",
                "basis": "clock",
            }
        }

    agent_time = "2026-12-01T10:05:00+00:00"
    ok = check_trusted_clock(clock(agent_time, agent_time, trusted=True))
    assert ok is not None
    assert ok.status == "PASS"
    boot = check_trusted_clock(clock("1970-01-01T00:05:00+00:00", agent_time))
    assert boot is not None
    assert boot.status == "WARN"
    assert "behind the agent's time" in boot.reason
    assert "no RTC and no time sync yet: fix NTP/RTC" in boot.reason
    synced = Check("PASS", "ntp", "clock synchronised")
    # NTP is synchronised and the wall clock is behind: the agent's time is the suspect.
    behind = check_trusted_clock(clock("2026-11-30T10:05:00+00:00", agent_time), synced)
    assert behind is not None
    assert "24.0 hours behind" in behind.reason
    assert "the agent's time may be the wrong one" in behind.reason
    assert "fix NTP" not in behind.reason
    ahead = check_trusted_clock(clock("2028-12-01T10:05:00+00:00", agent_time))
    assert ahead is not None
    assert "ahead of the agent's time" in ahead.reason
    assert "stepped forward" in ahead.reason
    assert "publish a fresh signed allow-list" in ahead.reason


def test_selftest_advice_for_a_provisional_clock_and_a_signer_ahead() -> None:
    """Hostile report 2, F3/F7: advice that can end the state, and the backend's clock named."""
    agent_time = "2026-12-01T10:05:00+00:00"
    provisional = check_trusted_clock(
        {
            "clock": {
                "time": "2028-06-01T12:00:00+00:00",
                "wall": "2028-06-01T12:00:00+00:00",
                "proven": agent_time,
                "trusted": False,
                "provisional": True,
                "sync_source": "kernel",
                "since": agent_time,
                "basis": "provisional",
            }
        }
    )
    assert provisional is not None
    assert provisional.status == "WARN"
    assert "taken at start on faith" in provisional.reason
    assert f"judged by the proven time {agent_time}" in provisional.reason
    assert "enable time sync" in provisional.reason
    refused = {"refused": {"reason": "not-yet-valid", "detail": "x", "at": agent_time, "count": 1}}
    ahead = check_trusted_clock(
        {
            "clock": {"time": agent_time, "wall": agent_time, "trusted": True},
            "documents": {"allow-list": {"state": "valid", **refused}},
        }
    )
    assert ahead is not None
    assert ahead.status == "WARN"
    assert "the backend's (signer's) clock may run ahead" in ahead.reason
    synced_behind = check_trusted_clock(
        {
            "clock": {
                "time": agent_time,
                "wall": "2026-12-01T09:05:00+00:00",
                "trusted": False,
                "synced": True,
                "since": agent_time,
                "basis": "clock",
            }
        }
    )
    assert synced_behind is not None
    assert "backend's (signer's) clock may run ahead" in synced_behind.reason


def test_status_clock_line_says_since_when_what_the_wall_clock_reads_and_the_agent_time() -> None:
    base = {"time": "2026-12-01T10:05:00+00:00", "wall": "2028-01-10T10:00:00+00:00"}
    assert clock_line({**base, "trusted": True}) == "2026-12-01T10:05:00+00:00 (wall clock trusted)"
    line = clock_line(
        {
            **base,
            "trusted": False,
            "since": "2026-12-01T10:00:00+00:00",
            "for_s": 200,
            "basis": "clock",
        }
    )
    assert line.startswith(
        "UNTRUSTED for 3 min 20 s (since agent time 2026-12-01T10:00:00+00:00): wall clock reads"
    ), line
    assert "agent time 2026-12-01T10:05:00+00:00" in line
    floor = clock_line({**base, "trusted": False, "since": "x", "basis": "floor"})
    assert "downtime not counted" in floor
    why = clock_line(
        {**base, "trusted": False, "since": "x", "basis": "floor", "reason": "no time source yet"}
    )
    assert why.startswith(
        "UNTRUSTED (since agent time x) (no time source yet): wall clock reads 2028"
    ), why
    provisional = clock_line(
        {
            **base,
            "trusted": False,
            "provisional": True,
            "since": "x",
            "proven": "2026-12-01T10:00:00+00:00",
            "sync_source": "kernel",
        }
    )
    assert provisional.startswith("PROVISIONAL (since agent time x): wall clock reads"), provisional
    assert "expiry judged by the proven time 2026-12-01T10:00:00+00:00" in provisional


async def test_an_offline_selftest_never_prunes_the_outbox_by_age(tmp_path: Path) -> None:
    """It opens the store to read it; pruning by the wall clock it is diagnosing lost events."""
    provision(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(tmp_path, free_port()))
    old = datetime.now(UTC) - timedelta(days=40)  # older than max_age_days (30)
    store = await Store.open(StoreConfig(path=tmp_path / "state.db"), age_clock=lambda: None)
    try:
        await store.append_events(next_rows(store, 3, priority=2, created_at=old))
    finally:
        await store.close()
    _rc, checks = await _selftest(cfg)
    assert checks["store"]["status"] == "PASS", checks["store"]
    assert "outbox depth 3" in checks["store"]["reason"]
    store = await Store.open(StoreConfig(path=tmp_path / "state.db"), age_clock=lambda: None)
    try:
        assert (await store.stats()).depth == 3
    finally:
        await store.close()


def test_allow_list_verdict_warns_from_the_start_of_the_sites_day() -> None:
    from datetime import UTC, datetime

    from agent.cli.diag import allow_list_verdict
    from agent.domain.config import CabinetDomainConfig
    from agent.domain.localtime import zone

    tokyo = zone("Asia/Tokyo")
    domain = CabinetDomainConfig(allow_list_expiry_warning_days=1)
    doc = {"version": 3, "state": "valid", "expires_at": "2026-12-02T12:00:00+00:00"}
    # One day ahead is 1 December 12:00 UTC = 21:00 JST: in Tokyo the warning starts with
    # that day, at 00:00 JST (30 November, 15:00 UTC).
    early = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)  # 05:00 JST on the 1st
    assert allow_list_verdict(doc, early, domain).status == "PASS"  # UTC: from 1 Dec 00:00 UTC
    verdict = allow_list_verdict(doc, early, domain, tokyo)
    assert verdict.status == "WARN"
    assert "2026-12-02 21:00 JST site time" in verdict.reason
    before = datetime(2026, 11, 30, 14, 59, tzinfo=UTC)  # 23:59 JST on the 30th
    assert allow_list_verdict(doc, before, domain, tokyo).status == "PASS"
