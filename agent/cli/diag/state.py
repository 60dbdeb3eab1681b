"""The cabinet's own state: its key files, the disk under the state database, the store (opens,
audit chain verifies) and the signed allow-list it holds."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from agent.cli.diag.check import Check, Status, daemon_call
from agent.config import AgentConfig
from agent.domain.config import CabinetDomainConfig
from agent.domain.localtime import site_time, warning_start
from drivers.errors import CabinetError

DEFAULT_MIN_FREE_PCT = 10.0


def check_keys(cfg: AgentConfig) -> Check:
    """The three key files load (format, permissions)."""
    from agent.privacy.config import load_cabinet_privacy

    try:
        privacy = load_cabinet_privacy(cfg.privacy, cfg.cabinet.site_id, cfg.cabinet.cabinet_id)
    except CabinetError as err:
        return Check("FAIL", "keys", str(err), config_problem=True)
    privacy.close()  # a site key held in a TPM loaded there: that was the check
    return Check(
        "PASS",
        "keys",
        f"site key, seal key {privacy.seal_key_id} and {len(privacy.signing_kids)} signing "
        "key(s) load with safe permissions",
    )


def allow_list_verdict(
    doc: Mapping[str, Any] | None,
    now: datetime,
    domain: CabinetDomainConfig,
    tz: tzinfo = UTC,
) -> Check:
    """The allow-list's health: none, expired (grace?), expiring soon (from the start of that
    day at the site, ``tz``), or fine."""
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
    if now >= warning_start(expires, domain.allow_list_expiry_warning_days, tz):
        days = left.total_seconds() / 86_400
        local = site_time(expires, tz)
        return Check(
            "WARN",
            "allow-list",
            f"v{version} expires in {days:.1f} days (at {expires.isoformat()}"
            f"{f', {local} site time' if local else ''}): the backend "
            f"must publish a new one before then{also}",
        )
    status: Status = "WARN" if refused else "PASS"
    return Check(status, "allow-list", f"v{version} valid until {expires.isoformat()}{also}")


async def check_allow_list(cfg: AgentConfig, status: Mapping[str, Any] | None) -> Check:
    """From the running agent, else from the store file (re-authenticated, never trusted)."""
    if status is not None and isinstance(status.get("documents"), Mapping):
        clock = status.get("clock") or {}
        now = datetime.fromisoformat(str(clock.get("time") or datetime.now(UTC).isoformat()))
        return allow_list_verdict(
            status["documents"].get("allow-list"), now, cfg.domain, cfg.cabinet.zone()
        )
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
        return allow_list_verdict(None, now, cfg.domain, cfg.cabinet.zone())
    try:
        doc = privacy.verifier.authenticate(raw, "allow-list")
    except DocumentError as err:
        return Check("FAIL", "allow-list", f"the stored one does not verify: {err}")
    return allow_list_verdict(
        {"version": doc.version, "expires_at": doc.expires_at.isoformat(), "state": "valid"},
        now,
        cfg.domain,
        cfg.cabinet.zone(),
    )


def _no_age_pruning() -> None:
    """A diagnostic opens the store to read it: no trusted time, so no pruning by age (the
    wall clock it would judge by may be the very problem being diagnosed)."""


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
