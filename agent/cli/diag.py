"""``cabinetctl selftest`` and ``cabinetctl bundle``: is this cabinet fit to run, and what to send
support when it is not.

The self-test never competes with a running agent: readers allow one LLRP session and the state
database one writer, so when the daemon answers on its control socket the reader and store checks
ask it instead of connecting themselves. The bundle holds no key material, no key path, no secret
and no raw badge id (those never reach logs or the store in the first place; the config is
redacted field by field).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from agent import __version__
from agent.cli.common import DEFAULT_CONFIG
from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config
from agent.domain.config import CabinetDomainConfig
from agent.trusted_time import BUILD_FLOOR
from drivers.errors import CabinetError

EX_OK = 0
EX_UNAVAILABLE = 69  # sysexits.h: a service (reader, broker, disk, clock) is unavailable

Status = Literal["PASS", "WARN", "FAIL"]

# The clock may not be older than this build (no RTC boots at 1970) nor absurdly far ahead.
BUILD_DATE = BUILD_FLOOR
MAX_CLOCK_AHEAD = timedelta(days=20 * 365)
DEFAULT_MIN_FREE_PCT = 10.0
READER_TIMEOUT_S = 10.0
DAEMON_TIMEOUT_S = 5.0
LOG_LINES = 2000
_COMMAND_TIMEOUT_S = 10.0
_REDACTED = "<redacted>"
# Config keys whose values are never put in a bundle: key locations, secrets, credentials.
_SECRET_KEY_RE = re.compile(r"(key|secret|password|passwd|token|credential|_file$)", re.I)
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


@dataclass(frozen=True)
class Check:
    """One self-test line."""

    status: Status
    check: str
    reason: str
    config_problem: bool = False  # a FAIL that is the operator's configuration (exit 78)

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.reason}"


def exit_code(checks: Sequence[Check]) -> int:
    """0 unless something failed: 78 for a configuration problem, else 69."""
    failed = [c for c in checks if c.status == "FAIL"]
    if not failed:
        return EX_OK
    return EX_CONFIG if any(c.config_problem for c in failed) else EX_UNAVAILABLE


# -- the daemon, if it runs ------------------------------------------------------------------


async def daemon_call(cfg: AgentConfig, cmd: str) -> Any:
    """One control-socket command; raises ControlClientError (not running, unknown command...)."""
    from agent.control.client import ControlClient

    async with ControlClient(cfg.control.socket_path, timeout_s=DAEMON_TIMEOUT_S) as client:
        return await client.call(cmd, timeout_s=DAEMON_TIMEOUT_S)


async def daemon_status(cfg: AgentConfig) -> dict[str, Any] | None:
    """The running daemon's status, or None when it does not answer."""
    from agent.control.client import ControlClientError

    if not cfg.control.enabled:
        return None
    try:
        result = await daemon_call(cfg, "status")
    except (ControlClientError, OSError):
        return None
    return result if isinstance(result, dict) else None


# -- checks ------------------------------------------------------------------------------------


def check_keys(cfg: AgentConfig) -> Check:
    """The three key files load (format, permissions)."""
    from agent.privacy.config import load_cabinet_privacy

    try:
        privacy = load_cabinet_privacy(cfg.privacy, cfg.cabinet.site_id, cfg.cabinet.cabinet_id)
    except CabinetError as err:
        return Check("FAIL", "keys", str(err), config_problem=True)
    return Check(
        "PASS",
        "keys",
        f"site key, seal key {privacy.seal_key_id} and {len(privacy.signing_kids)} signing "
        "key(s) load with safe permissions",
    )


async def check_readers(
    cfg: AgentConfig, status: Mapping[str, Any] | None, timeout_s: float
) -> list[Check]:
    """Each reader connects and accepts its configuration (or: the running daemon says so)."""
    if status is not None:
        states = {r.get("id"): r for r in status.get("readers", [])}
        out = []
        for rc in cfg.readers:
            r = states.get(rc.id)
            if r is None:
                out.append(Check("FAIL", f"reader {rc.id}", "the running agent does not know it"))
            elif r.get("state") in ("online", "inventorying"):
                out.append(Check("PASS", f"reader {rc.id}", f"{r['state']} in the running agent"))
            else:
                out.append(
                    Check(
                        "FAIL",
                        f"reader {rc.id}",
                        f"{r.get('state')} in the running agent ({r.get('detail') or 'no detail'}); "
                        "check power, cable and address",
                    )
                )
        return out
    return await _ping_readers(cfg, timeout_s)


class _HealthSink:
    """Collects reader health; tag reads and GPI edges are not needed here."""

    def __init__(self) -> None:
        from drivers.types import ReaderHealth

        self.health: dict[str, list[ReaderHealth]] = {}
        self.changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[object]) -> None:
        return None

    async def reader_health(self, health: Any) -> None:
        self.health.setdefault(health.reader_id, []).append(health)
        self.changed.set()

    async def gpi_edge(self, edge: object) -> None:
        return None


async def _ping_readers(cfg: AgentConfig, timeout_s: float) -> list[Check]:
    from drivers.registry import make_reader
    from drivers.types import ReaderState, SystemClock

    sink = _HealthSink()
    drivers = [make_reader(rc, sink, SystemClock()) for rc in cfg.readers]
    verdicts: dict[str, Check] = {}
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(), name=f"selftest:{d.reader_id}") for d in drivers]
        try:
            deadline = started + timeout_s
            while len(verdicts) < len(drivers) and (left := deadline - time.monotonic()) > 0:
                for d in drivers:
                    if d.reader_id in verdicts:
                        continue
                    for h in sink.health.get(d.reader_id, []):
                        if h.healthy:
                            verdicts[d.reader_id] = Check(
                                "PASS",
                                f"reader {d.reader_id}",
                                f"connected and configured in {time.monotonic() - started:.1f}s",
                            )
                            break
                        if h.state == ReaderState.OFFLINE and h.session >= 1:
                            verdicts[d.reader_id] = Check(
                                "FAIL",
                                f"reader {d.reader_id}",
                                f"{h.detail or 'offline'}; check power, cable and address",
                            )
                            break
                sink.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.2)):
                        await sink.changed.wait()
        finally:
            for t in tasks:
                t.cancel()
    return [
        verdicts.get(
            d.reader_id,
            Check(
                "FAIL",
                f"reader {d.reader_id}",
                f"no answer within {timeout_s:g}s; check power, cable and address",
            ),
        )
        for d in drivers
    ]


async def check_broker(cfg: AgentConfig, status: Mapping[str, Any] | None = None) -> Check:
    """TCP + TLS (as configured) + MQTT CONNACK, with a throw-away client id and session; with
    the daemon running, its own view (unreachable since when, events waiting) comes first."""
    if cfg.mqtt is None:
        return Check("WARN", "broker", "no [mqtt] section: events stay in the outbox")
    own = await _try_broker(cfg)
    daemon_view = status.get("broker") if status is not None else None
    if not isinstance(daemon_view, Mapping):
        return own
    from agent.cli.control_cmd import broker_line

    assert status is not None
    outbox = status.get("outbox")
    agent_says = broker_line(dict(daemon_view), outbox if isinstance(outbox, dict) else None)
    state = daemon_view.get("state")
    if state == "unreachable":
        return Check("FAIL", "broker", f"agent: broker {agent_says}; from here: {own.reason}")
    if state == "not_acknowledging":
        return Check(
            "FAIL",
            "broker",
            f"agent: broker {agent_says}; from here: {own.reason}; check the broker's log, its "
            "queue and in-flight limits, and that its ACL lets this cabinet publish its events",
        )
    if state == "taken_over":
        return Check(
            "FAIL",
            "broker",
            f"agent: broker {agent_says}; find and stop the other client with client id "
            f"{daemon_view.get('client_id')} (a cloned SD card, a second agent), or give each "
            "cabinet its own site_id/cabinet_id",
        )
    return Check(own.status, "broker", f"{own.reason}; agent: {agent_says}", own.config_problem)


def check_commands(status: Mapping[str, Any] | None) -> Check | None:
    """The running agent's subscription to its cmd topics (None without a daemon or broker):
    a cabinet the broker refuses them can never receive an allow-list."""
    broker = status.get("broker") if status is not None else None
    commands = broker.get("commands") if isinstance(broker, Mapping) else None
    if not isinstance(commands, Mapping):
        return None
    from agent.cli.control_cmd import commands_line

    line = commands_line(dict(commands))
    state = commands.get("state")
    if state == "refused":
        return Check("FAIL", "commands", line)
    if state == "subscribed":
        return Check("PASS", "commands", line)
    return Check("WARN", "commands", line)


async def _try_broker(cfg: AgentConfig) -> Check:
    assert cfg.mqtt is not None
    from agent.mqtt.session import MqttSession, build_tls_context

    # A clean, separate session: never take over (or leave state in) the agent's own.
    mqtt_cfg = cfg.mqtt.model_copy(update={"persistent_session": False})
    where = f"{mqtt_cfg.host}:{mqtt_cfg.effective_port}"
    try:
        tls = build_tls_context(mqtt_cfg.tls) if mqtt_cfg.tls is not None else None
    except (OSError, ValueError) as err:
        return Check("FAIL", "broker", f"TLS files unusable: {err}", config_problem=True)
    client_id = f"cabinet-{cfg.cabinet.site_id}-{cfg.cabinet.cabinet_id}-selftest-{os.getpid()}"
    session = MqttSession(mqtt_cfg, client_id, will=None, tls_context=tls)
    try:
        async with asyncio.timeout(mqtt_cfg.connect_timeout_s + 5.0):
            info = await session.connect()
    except CabinetError as err:
        session.abort("selftest")
        return Check("FAIL", "broker", f"{where}: {err}")
    except TimeoutError:
        session.abort("selftest")
        return Check("FAIL", "broker", f"{where}: no CONNACK in time")
    await session.disconnect()
    secure = "TLS" if tls is not None else "plain TCP"
    window = f", receive maximum {info.receive_maximum}" if info.receive_maximum else ""
    return Check("PASS", "broker", f"{where} accepted an MQTT connection ({secure}{window})")


def check_clock(now: datetime | None = None) -> Check:
    """Not before this build, not absurdly far ahead (signed documents and events carry times)."""
    now = now or datetime.now(UTC)
    if now < BUILD_DATE:
        return Check(
            "FAIL",
            "clock",
            f"{now.isoformat(timespec='seconds')} is before this build "
            f"({BUILD_DATE.date()}): no RTC or time sync yet; fix NTP before starting",
        )
    if now > BUILD_DATE + MAX_CLOCK_AHEAD:
        return Check("FAIL", "clock", f"{now.isoformat(timespec='seconds')} is absurdly far ahead")
    return Check("PASS", "clock", f"{now.isoformat(timespec='seconds')} is plausible")


def check_trusted_clock(status: Mapping[str, Any] | None, ntp: Check | None = None) -> Check | None:
    """The running agent's view: does the wall clock agree with the agent's own time?

    The advice depends on which of the two is likely wrong: a wall clock before this build is
    (no RTC, no NTP yet); one that NTP says is synchronised while it disagrees with the agent's
    time points at the agent's time instead (set from a wrong clock at an earlier start, or
    from a signed document issued ahead) — a fresh signed document corrects that.
    """
    clock = (status or {}).get("clock")
    if not isinstance(clock, Mapping):
        return None
    signer_ahead = (
        "signed documents are issued ahead of the cabinet's clock: the backend's (signer's) "
        "clock may run ahead — check its NTP; the cabinet refuses them as not yet valid and "
        "installs them when their time comes"
    )
    if clock.get("trusted"):
        if _refused_not_yet_valid(status):
            return Check("WARN", "trusted time", f"the wall clock is trusted, but {signer_ahead}")
        return Check(
            "PASS", "trusted time", f"the agent trusts the wall clock ({clock.get('time')})"
        )
    if clock.get("provisional"):
        return Check(
            "WARN",
            "trusted time",
            f"wall clock {clock.get('wall')} taken at start on faith (time source "
            f"{clock.get('sync_source')} not synchronised): events say clock=untrusted, nothing "
            f"is pruned by age, expiry is judged by the proven time {clock.get('proven')}; "
            "enable time sync (systemd-timesyncd or chrony) or publish a fresh signed allow-list",
        )
    try:
        wall = datetime.fromisoformat(str(clock.get("wall")))
        agent = datetime.fromisoformat(str(clock.get("time")))
    except ValueError:
        return Check("WARN", "trusted time", f"the agent does not trust the wall clock: {clock}")
    gap = (wall - agent).total_seconds()
    head = (
        f"wall clock {wall.isoformat(timespec='seconds')} is {_span(abs(gap))} "
        f"{'ahead of' if gap > 0 else 'behind'} the agent's time "
        f"{agent.isoformat(timespec='seconds')} (untrusted since {clock.get('since')}); events "
        "say clock=untrusted"
    )
    fresh_document = (
        "publish a fresh signed allow-list: its issue time confirms the wall clock and the "
        "agent trusts it again"
    )
    if wall < BUILD_DATE:
        advice = "no RTC and no time sync yet: fix NTP/RTC"
    elif clock.get("synced") or (ntp is not None and ntp.status == "PASS"):
        advice = (
            "NTP reports the clock synchronised, so the agent's time may be the wrong one "
            "(moved by a signed document issued ahead: the backend's (signer's) clock may run "
            "ahead — check its NTP): check the wall clock against a reference; if it is right, "
            f"{fresh_document} from a backend whose clock is right"
        )
    elif gap > 0:
        advice = (
            "the wall clock stepped forward (a bad NTP/GPS source?) or was set after the agent "
            f"started: check the time source; if the wall clock is right, {fresh_document}"
        )
    else:
        advice = (
            "the wall clock stepped back or was not set: check NTP/RTC; it is trusted again "
            "when it agrees with the agent's time"
        )
    return Check("WARN", "trusted time", f"{head}: {advice}")


def _refused_not_yet_valid(status: Mapping[str, Any] | None) -> bool:
    documents = (status or {}).get("documents")
    if not isinstance(documents, Mapping):
        return False
    return any(
        isinstance(doc, Mapping)
        and isinstance(doc.get("refused"), Mapping)
        and doc["refused"].get("reason") == "not-yet-valid"
        for doc in documents.values()
    )


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"


def allow_list_verdict(
    doc: Mapping[str, Any] | None, now: datetime, domain: CabinetDomainConfig
) -> Check:
    """The allow-list's health: none, expired (grace?), expiring soon, or fine."""
    if doc is None or doc.get("state") == "none":
        refused = (doc or {}).get("refused")
        why = f"; the last one was refused: {refused['reason']}" if refused else ""
        return Check(
            "WARN",
            "allow-list",
            f"none installed: every badge is denied until the backend sends one{why}",
        )
    expires = datetime.fromisoformat(str(doc["expires_at"]))
    version = doc.get("version")
    refused = doc.get("refused")
    also = (
        f"; a newer one was refused: {refused['reason']} — {refused['detail']}" if refused else ""
    )
    if now >= expires:
        grace_until = expires + timedelta(hours=domain.expired_allow_list_grace_h)
        if now < grace_until:
            roles = "/".join(domain.expired_allow_list_grace_roles)
            return Check(
                "WARN",
                "allow-list",
                f"v{version} EXPIRED at {expires.isoformat()}; grace policy lets {roles} open "
                f"until {grace_until.isoformat()} (every grant reported){also}",
            )
        return Check(
            "FAIL",
            "allow-list",
            f"v{version} EXPIRED at {expires.isoformat()}: every badge is denied until the "
            f"backend publishes a new one{also}",
        )
    left = expires - now
    if left <= timedelta(days=domain.allow_list_expiry_warning_days):
        days = left.total_seconds() / 86_400
        return Check(
            "WARN",
            "allow-list",
            f"v{version} expires in {days:.1f} days (at {expires.isoformat()}): the backend "
            f"must publish a new one before then{also}",
        )
    status: Status = "WARN" if refused else "PASS"
    return Check(status, "allow-list", f"v{version} valid until {expires.isoformat()}{also}")


async def check_allow_list(cfg: AgentConfig, status: Mapping[str, Any] | None) -> Check:
    """From the running agent, else from the store file (re-authenticated, never trusted)."""
    if status is not None and isinstance(status.get("documents"), Mapping):
        clock = status.get("clock") or {}
        now = datetime.fromisoformat(str(clock.get("time") or datetime.now(UTC).isoformat()))
        return allow_list_verdict(status["documents"].get("allow-list"), now, cfg.domain)
    path = cfg.store.path
    if not path.exists():
        return Check("WARN", "allow-list", f"none: {path} does not exist (never started?)")
    from agent.documents import doc_key
    from agent.privacy.config import load_cabinet_privacy
    from agent.privacy.signed import DocumentError
    from agent.store.store import Store
    from agent.trusted_time import KV_KEY, decode_floor

    try:
        privacy = load_cabinet_privacy(cfg.privacy, cfg.cabinet.site_id, cfg.cabinet.cabinet_id)
        store = await Store.open(cfg.store, age_clock=_no_age_pruning)
    except (CabinetError, OSError) as err:
        return Check("WARN", "allow-list", f"cannot read it: {err}")
    try:
        raw = await store.kv_get(doc_key("allow-list"))
        floor_raw = await store.kv_get(KV_KEY)
    finally:
        await store.close()
    now = datetime.now(UTC)
    if floor_raw is not None:
        with contextlib.suppress(ValueError):
            now = max(now, decode_floor(floor_raw).floor)
    if raw is None:
        return allow_list_verdict(None, now, cfg.domain)
    try:
        doc = privacy.verifier.authenticate(raw, "allow-list")
    except DocumentError as err:
        return Check("FAIL", "allow-list", f"the stored one does not verify: {err}")
    return allow_list_verdict(
        {"version": doc.version, "expires_at": doc.expires_at.isoformat(), "state": "valid"},
        now,
        cfg.domain,
    )


def _no_age_pruning() -> None:
    """A diagnostic opens the store to read it: no trusted time, so no pruning by age (the
    wall clock it would judge by may be the very problem being diagnosed)."""


def check_ntp(run: Any = subprocess.run) -> Check:
    """NTP synchronisation as systemd-timesyncd/chrony report it through timedatectl."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return Check("WARN", "ntp", "skipped: timedatectl not available on this system")
    try:
        proc = run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check("WARN", "ntp", f"skipped: timedatectl failed: {err}")
    value = proc.stdout.strip()
    if proc.returncode != 0 or value not in ("yes", "no"):
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return Check(
            "WARN",
            "ntp",
            f"skipped: timedatectl gave no answer ({detail[0] if detail else 'empty'})",
        )
    if value == "yes":
        return Check("PASS", "ntp", "clock synchronised")
    return Check("WARN", "ntp", "clock not synchronised; check the NTP server is reachable")


def check_disk(cfg: AgentConfig, min_free_pct: float) -> Check:
    """Free space (and write access) where the state database lives."""
    from agent.store.location import location_problems

    problems = location_problems(cfg.store)
    if problems:
        return Check("FAIL", "disk", problems[0], config_problem=True)
    directory = cfg.store.path.parent
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as err:
        return Check("FAIL", "disk", f"{directory}: {err.strerror or err}")
    pct = 100.0 * usage.free / usage.total if usage.total else 0.0
    text = f"{directory}: {usage.free / 2**20:.0f} MiB free ({pct:.1f}%)"
    if not directory.exists():
        return Check("WARN", "disk", f"{text}; directory does not exist yet")
    if not os.access(directory, os.W_OK | os.X_OK):
        return Check("FAIL", "disk", f"{text}; not writable by uid {os.getuid()}")
    if usage.free < cfg.store.min_free_disk_bytes:
        return Check(
            "FAIL",
            "disk",
            f"{text}; below store.min_free_disk_bytes ({cfg.store.min_free_disk_bytes} bytes)",
        )
    if pct < min_free_pct:
        return Check("WARN", "disk", f"{text}; below {min_free_pct:g}%")
    return Check("PASS", "disk", text)


async def store_report(cfg: AgentConfig, status: Mapping[str, Any] | None) -> dict[str, Any]:
    """Outbox stats and the audit chain's verdict: from the daemon when it runs, else the file."""
    if status is not None:
        report: dict[str, Any] = {"source": "daemon", "outbox": status.get("outbox")}
        from agent.control.client import ControlClientError

        try:
            report["queue"] = await daemon_call(cfg, "queue.stats")
        except (ControlClientError, OSError) as err:
            report["queue"] = f"unavailable: {err}"
        return report
    path = cfg.store.path
    if not path.exists():
        return {"source": "file", "error": f"{path} does not exist (never started?)"}
    from agent.store.store import Store

    try:
        store = await Store.open(cfg.store, age_clock=_no_age_pruning)
    except (CabinetError, OSError) as err:
        return {"source": "file", "error": str(err)}
    try:
        st = await store.stats()
        audit = await store.audit_verify()
        diag = await store.diagnostics()
    finally:
        await store.close()
    return {
        "source": "file",
        "outbox": {
            "depth": st.depth,
            "bytes": st.bytes,
            "oldest_age_s": st.oldest_age_s,
            "dead": st.dead,
            "next_seq": st.next_seq,
            "dropped": {str(k): v for k, v in st.dropped.items()},
        },
        "audit": {
            "ok": audit.ok,
            "checked": audit.checked,
            "first_seq": audit.first_seq,
            "last_seq": audit.last_seq,
            "problems": list(audit.problems),
        },
        "diagnostics": diag,
    }


def check_store(report: Mapping[str, Any]) -> Check:
    """The store opens and its audit chain verifies (daemon running: it has it open)."""
    if report.get("source") == "daemon":
        outbox = report.get("outbox") or {}
        return Check(
            "PASS", "store", f"held by the running agent; outbox depth {outbox.get('depth')}"
        )
    if "error" in report:
        exists = "does not exist" in str(report["error"])
        return Check("WARN" if exists else "FAIL", "store", str(report["error"]))
    audit = report["audit"]
    if not audit["ok"]:
        return Check("FAIL", "store", "audit chain broken: " + "; ".join(audit["problems"][:3]))
    return Check(
        "PASS",
        "store",
        f"opens; outbox depth {report['outbox']['depth']}; audit chain of "
        f"{audit['checked']} record(s) verified",
    )


async def run_selftest(
    config_path: Path,
    *,
    reader_timeout_s: float = READER_TIMEOUT_S,
    min_free_pct: float = DEFAULT_MIN_FREE_PCT,
) -> list[Check]:
    """Every check, in the order a technician would fix them."""
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        return [
            Check("FAIL", "config", f"{config_path}: {p}", config_problem=True)
            for p in err.problems
        ]
    checks = [Check("PASS", "config", f"{config_path} is valid ({len(cfg.readers)} reader(s))")]
    checks.append(check_keys(cfg))
    checks.append(check_clock())
    ntp = await asyncio.to_thread(check_ntp)
    checks.append(ntp)
    disk = check_disk(cfg, min_free_pct)
    checks.append(disk)
    status = await daemon_status(cfg)
    if status is None:
        checks.append(
            Check("WARN", "agent", f"not running (no answer on {cfg.control.socket_path})")
        )
    else:
        checks.append(Check("PASS", "agent", f"running, version {status.get('version')}"))
    trusted = check_trusted_clock(status, ntp)
    if trusted is not None:
        checks.append(trusted)
    checks.extend(await check_readers(cfg, status, reader_timeout_s))
    checks.append(await check_broker(cfg, status))
    commands = check_commands(status)
    if commands is not None:
        checks.append(commands)
    if disk.config_problem:
        checks.append(Check("WARN", "store", "not opened: [store] path is unusable (see disk)"))
    else:
        checks.append(check_store(await store_report(cfg, status)))
    checks.append(await check_allow_list(cfg, status))
    return checks


# -- the bundle --------------------------------------------------------------------------------


def redact(value: Any, key: str = "") -> Any:
    """A copy of a parsed config with key paths, secrets and URL credentials replaced."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY_RE.search(key):
        return _REDACTED
    if isinstance(value, str):
        return _URL_CREDENTIALS_RE.sub(lambda m: m.group("scheme") + _REDACTED + "@", value)
    return value


def redacted_config(path: Path) -> dict[str, Any]:
    """The config file as data, redacted; a file that does not parse yields only its error."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return {"error": f"{path}: {err}"}
    result: dict[str, Any] = redact(data)
    return result


def versions() -> dict[str, str]:
    """The agent and what it runs on."""
    out = {"cabinet-agent": __version__, "python": sys.version.split()[0]}
    for dist in ("sllurp", "paho-mqtt", "cryptography", "pydantic", "prometheus-client"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["os"] = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                out["distribution"] = line.split("=", 1)[1].strip('"')
    return out


def recent_logs(log_file: Path | None, lines: int = LOG_LINES) -> tuple[str, str]:
    """(source, text): the journal of cabinet-agent when there is one, else ``log_file``'s tail."""
    exe = shutil.which("journalctl")
    if exe is not None:
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [exe, "-u", "cabinet-agent", "-n", str(lines), "--no-pager", "-o", "short-iso"],
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
                check=False,
            )
            if (
                proc.returncode == 0
                and proc.stdout.strip()
                and "-- No entries --" not in (proc.stdout)
            ):
                return "journalctl -u cabinet-agent", proc.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    if log_file is not None:
        try:
            with log_file.open("rb") as f:
                tail = _tail(f, lines)
        except OSError as err:
            return str(log_file), f"(cannot read {log_file}: {err.strerror})\n"
        return str(log_file), tail
    return "none", "(no journal and no --log FILE given)\n"


def _tail(f: io.BufferedReader, lines: int) -> str:
    # Bounded: a runaway log file is read from its last 16 MiB only.
    limit = 16 * 2**20
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    text = f.read().decode("utf-8", "replace")
    return "".join(text.splitlines(keepends=True)[-lines:])


async def build_bundle(
    config_path: Path,
    out: Path,
    *,
    log_file: Path | None = None,
    reader_timeout_s: float = READER_TIMEOUT_S,
) -> list[str]:
    """Write the diagnostics archive (mode 0600); returns the member names."""
    members: dict[str, bytes] = {}
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    members["config.redacted.json"] = _json(redacted_config(config_path))
    members["versions.json"] = _json({**versions(), "generated_at": generated})
    checks = await run_selftest(config_path, reader_timeout_s=reader_timeout_s)
    members["selftest.txt"] = "".join(c.line() + "\n" for c in checks).encode()
    try:
        cfg: AgentConfig | None = load_config(config_path)
    except ConfigError:
        cfg = None
    if cfg is not None:
        status = await daemon_status(cfg)
        if status is not None:
            status.pop("keys", None)  # key ids only, but not needed by support either
            members["status.json"] = _json(status)
        members["store.json"] = _json(await store_report(cfg, status))
    source, logs = await asyncio.to_thread(recent_logs, log_file)
    members["logs.txt"] = f"# source: {source}\n{logs}".encode()
    await asyncio.to_thread(_write_tar, out, members)
    return sorted(members)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def _write_tar(out: Path, members: Mapping[str, bytes]) -> None:
    root = out.name.removesuffix(".tar.gz")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        now = time.time()
        for name, data in members.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))


# -- command line --------------------------------------------------------------------------------


def _cmd_selftest(args: argparse.Namespace) -> int:
    checks = asyncio.run(run_selftest(args.config, reader_timeout_s=args.timeout))
    rc = exit_code(checks)
    if args.json:
        print(json.dumps({"exit_code": rc, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(c.line())
    return rc


def _cmd_bundle(args: argparse.Namespace) -> int:
    out: Path = args.output or Path(
        f"cabinet-bundle-{socket.gethostname()}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.tar.gz"
    )
    names = asyncio.run(
        build_bundle(args.config, out, log_file=args.log, reader_timeout_s=args.timeout)
    )
    print(f"{out}: {', '.join(names)}")
    return EX_OK


def register(subparsers: Any) -> None:
    """Add ``selftest`` and ``bundle`` to cabinetctl."""
    selftest = subparsers.add_parser(
        "selftest", help="check readers, broker, clock, disk, keys and config (exit 0/69/78)"
    )
    selftest.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    selftest.add_argument("--json", action="store_true", help="machine-readable output")
    selftest.add_argument(
        "--timeout", type=float, default=READER_TIMEOUT_S, help="per-reader connect limit (s)"
    )
    selftest.set_defaults(func=_cmd_selftest)

    bundle = subparsers.add_parser(
        "bundle", help="write a diagnostics tar.gz for support (no keys, secrets or badge ids)"
    )
    bundle.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    bundle.add_argument("-o", "--output", type=Path, help="archive path (default: ./cabinet-…)")
    bundle.add_argument("--log", type=Path, help="log file to include when there is no journal")
    bundle.add_argument(
        "--timeout", type=float, default=READER_TIMEOUT_S, help="per-reader connect limit (s)"
    )
    bundle.set_defaults(func=_cmd_bundle)
