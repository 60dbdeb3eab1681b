"""The clock: plausible for this build, synchronised (NTP), and agreeing with the running
agent's own time — with advice that blames the clock that is likely wrong."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.cli.diag.check import COMMAND_TIMEOUT_S, Check
from agent.trusted_time import BUILD_FLOOR

# The clock may not be older than this build (no RTC boots at 1970) nor absurdly far ahead.
BUILD_DATE = BUILD_FLOOR
MAX_CLOCK_AHEAD = timedelta(days=20 * 365)


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


def check_ntp(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> Check:
    """NTP synchronisation as systemd-timesyncd/chrony report it through timedatectl."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return Check("WARN", "ntp", "skipped: timedatectl not available on this system")
    try:
        proc = run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
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
