"""``cabinetctl status``: one snapshot of the running agent. Metadata only: no event contents,
never a raw badge id (pseudonym key ids and document versions are not personal data)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo

from agent import __version__
from agent.alerts import AlertLines
from agent.documents import Documents
from agent.domain.config import CabinetDomainConfig
from agent.domain.holdings import Holding
from agent.domain.localtime import site_time
from agent.engine_runner import EngineRunner
from agent.privacy.config import CabinetPrivacy
from agent.privacy.signed import format_time
from agent.store.store import Store
from agent.trusted_time import TrustedClock
from drivers.door import Door
from drivers.types import BadgeReaderDriver, ReaderDriver

ALERTS_SHOWN = 10


class StatusView:
    """Reads the parts; owns nothing but the time the agent started."""

    def __init__(
        self,
        *,
        site_id: str,
        cabinet_id: str,
        clock: TrustedClock,
        domain: CabinetDomainConfig,
        privacy: CabinetPrivacy,
        readers: Sequence[ReaderDriver],
        badge_readers: Sequence[BadgeReaderDriver],
        door: Door | None,
        docs: Documents,
        lines: AlertLines,
        runner: EngineRunner,
        timezone: tzinfo = UTC,
    ) -> None:
        self.site_id = site_id
        self.timezone = timezone
        self.cabinet_id = cabinet_id
        self.clock = clock
        self.domain = domain  # until the engine runs: then its own (reloadable) config
        self.privacy = privacy
        self.readers = readers
        self.badge_readers = badge_readers
        self.door = door
        self.docs = docs
        self.lines = lines
        self.runner = runner
        self.started_at = clock.now()  # the agent's time once restored (set at start)

    def store(self) -> dict[str, object] | None:
        """Writes held in memory (a full disk): since when, why, how many."""
        return store_status(self.runner.store)

    def snapshot(self) -> dict[str, object]:
        engine = self.runner.engine
        clock = self.clock.snapshot()
        # Expiry as the engine judges it: by the proven time while the wall clock is provisional.
        now = datetime.fromisoformat(clock["proven"])
        domain = engine.config if engine is not None else self.domain
        documents = self.docs.status(now, domain.allow_list_expiry_warning_days, self.timezone)
        alerts = self.lines.recent(ALERTS_SHOWN)
        alerts += [w for d in documents.values() if isinstance(w := d.get("warning"), str)]
        if engine is not None:
            # The cabinet's own alert, for the technician at a crib whose backend is away.
            alerts += overdue_lines(engine.overdue(), self.timezone)
        if not clock["trusted"]:
            alerts.append(
                f"clock untrusted since {clock['since']} ({clock['reason']}), wall clock reads "
                f"{clock['wall']}, agent time {clock['time']}"
            )
        last = self.runner.stats.last_event
        return {
            "version": __version__,
            "site_id": self.site_id,
            "cabinet_id": self.cabinet_id,
            "started_at": self.started_at.isoformat(),
            "clock": clock,
            "readers": [
                {
                    "id": r.reader_id,
                    "state": str(r.health.state),
                    "detail": r.health.detail,
                    "session": r.health.session,
                }
                for r in self.readers
            ],
            "badge_readers": [
                {"id": b.reader_id, "state": str(b.health.state), "detail": b.health.detail}
                for b in self.badge_readers
            ],
            "door": None
            if self.door is None
            else {
                "state": None if self.door.state is None else str(self.door.state),
                "locked": self.door.locked,
                "fault": self.door.lock_fault,
            },
            "engine": None
            if engine is None
            else {
                "phase": str(engine.phase),
                # A technician session in progress (who: a local uid or a pseudonym).
                "technician": None
                if engine.technician is None
                else {"technician": engine.technician.who, "via": engine.technician.via},
            },
            "store": self.store(),
            "last_event": None
            if last is None
            else {"seq": last.seq, "type": last.type, "time": last.time.isoformat()},
            "keys": {
                "seal_key_id": self.privacy.seal_key_id,
                "pseudonym_kid": self.privacy.pseudonyms.kid,
                "pseudonym_keys": list(self.privacy.pseudonyms.prefixes),
                # A TPM-held key whose TPM did not answer the latest read: why (else empty).
                "site_key_problems": self.privacy.pseudonyms.device_problems,
                "signing_kids": list(self.privacy.signing_kids),
            },
            "documents": documents,
            "alerts": alerts,
        }


def store_status(store: Store | None) -> dict[str, object] | None:
    """Writes held in memory (a full disk): since when, why, how many."""
    if store is None:
        return None
    hold = store.hold
    return {
        "held_since": None if hold is None else hold.since.isoformat(),
        "held_reason": None if hold is None else hold.reason,
        "held_detail": None if hold is None else hold.detail,
        "held_writes": store.pending_writes if hold is not None else 0,
    }


OVERDUE_SHOWN = 10


def overdue_lines(late: Sequence[tuple[str, Holding]], tz: tzinfo) -> list[str]:
    """One status line per item out past its limit (no pseudonym: who holds it is in the
    event), at most ``OVERDUE_SHOWN`` and a count of the rest."""
    lines = []
    for epc, h in late[:OVERDUE_SHOWN]:
        local = site_time(h.checked_out_at, tz)
        since = format_time(h.checked_out_at) + (f", {local} site time" if local else "")
        lines.append(
            f"item overdue: {h.asset_id or epc} out since {since} (limit {_duration(h.limit_s)})"
        )
    if len(late) > OVERDUE_SHOWN:
        lines.append(f"item overdue: {len(late) - OVERDUE_SHOWN} more")
    return lines


def _duration(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 120:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
