"""Reader outages as events: debounced ``reader.offline``/``reader.online``, one alert per
flapping episode (``reader.flapping``), short outages counted rather than published.

Scans never wait for these: they read reader health directly, so a debounced outage still makes
every pass it touched incomplete (docs/domain.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.domain import events as ev
from agent.domain.config import CabinetDomainConfig
from agent.domain.now import Now
from agent.domain.stamp import Stamper
from drivers.types import ReaderHealth, ReaderState

_OFFLINE_STATES = (ReaderState.OFFLINE, ReaderState.STOPPED, ReaderState.FAILED)


@dataclass
class ReaderWatch:
    """What the engine tracks to report a reader's outages without flooding the outbox."""

    down_since: float | None = None  # monotonic start of the current outage; None: not down
    detail: str = ""  # the latest reason of the current outage
    connection: int = 0
    outages: deque[float] = field(default_factory=deque)  # outage starts within the flap window
    short: int = 0  # outages shorter than the debounce, not reported yet
    healthy_since: float | None = None
    flapping_since: float | None = None  # monotonic; None: not flapping
    flap_outages: int = 0  # outages since the episode began


class ReaderOutages:
    """Every reader's outage bookkeeping; ``changed`` when its persisted part changed."""

    def __init__(self, config: CabinetDomainConfig, stamp: Stamper) -> None:
        self.config = config
        self._stamp = stamp
        self._watch: dict[str, ReaderWatch] = {}
        self._offline: set[str] = set()  # readers whose reader.offline was published
        self.changed = False

    def health(self, health: ReaderHealth, now: Now, events: list[ev.Event]) -> None:
        """A reader's health changed."""
        rid = health.reader_id
        w = self._watch.setdefault(rid, ReaderWatch())
        cfg = self.config
        if health.state in _OFFLINE_STATES:
            w.detail = health.detail[:200]
            w.connection = max(0, health.session)
            if w.down_since is not None:
                return
            w.down_since = now.mono
            w.healthy_since = None
            self.changed = True
            w.outages.append(now.mono)
            while w.outages and now.mono - w.outages[0] > cfg.reader_flap_window_s:
                w.outages.popleft()
            if w.flapping_since is not None:
                w.flap_outages += 1
            elif len(w.outages) >= cfg.reader_flap_count:
                w.flapping_since = now.mono
                w.flap_outages = len(w.outages)
                w.short = 0  # the alert's count covers them
                self.changed = True
                events.append(
                    ev.ReaderFlapping(
                        **self._stamp(now),
                        reader_id=rid,
                        state="flapping",
                        outages=len(w.outages),
                        window_s=cfg.reader_flap_window_s,
                        detail=w.detail,
                        connection=w.connection,
                    )
                )
            self.timers(now, events)
        elif health.healthy:
            if w.healthy_since is None:
                w.healthy_since = now.mono
            down_s = None if w.down_since is None else now.mono - w.down_since
            if rid in self._offline:
                self._offline.discard(rid)
                self.changed = True
                ants = health.antennas_connected
                events.append(
                    ev.ReaderOnline(
                        **self._stamp(now),
                        reader_id=rid,
                        detail=health.detail[:200],
                        connection=max(0, health.session),
                        antennas_connected=sorted(ants) if ants is not None else None,
                        down_s=None if down_s is None else round(down_s, 3),
                        short_outages=w.short,
                    )
                )
                w.short = 0
            elif down_s is not None and w.flapping_since is None:
                w.short += 1  # back within the debounce: counted, not published
            if w.down_since is not None:
                w.down_since = None
                self.changed = True

    def next_deadline(self) -> float | None:
        """Monotonic time of the next outage debounce or flapping episode end (``timers``)."""
        cfg = self.config
        due: list[float] = []
        for rid, w in self._watch.items():
            if w.down_since is not None and rid not in self._offline:
                debounce = cfg.reader_offline_debounce_s
                if w.flapping_since is not None:
                    debounce = max(debounce, cfg.reader_flap_window_s)
                due.append(w.down_since + debounce)
            if w.flapping_since is not None and w.healthy_since is not None:
                due.append(w.healthy_since + cfg.reader_flap_window_s)
        return min(due, default=None)

    def timers(self, now: Now, events: list[ev.Event]) -> None:
        """Publish outages that outlasted the debounce; end flapping episodes that calmed down."""
        cfg = self.config
        for rid in sorted(self._watch):
            w = self._watch[rid]
            if w.down_since is not None and rid not in self._offline:
                # While flapping, single outages are part of the episode; one that lasts a
                # whole window is a reader gone, and reported as such.
                debounce = cfg.reader_offline_debounce_s
                if w.flapping_since is not None:
                    debounce = max(debounce, cfg.reader_flap_window_s)
                down_s = now.mono - w.down_since
                if down_s >= debounce:
                    self._offline.add(rid)
                    self.changed = True
                    events.append(
                        ev.ReaderOffline(
                            **self._stamp(now),
                            reader_id=rid,
                            detail=w.detail,
                            connection=w.connection,
                            down_s=round(down_s, 3),
                            short_outages=w.short,
                        )
                    )
                    w.short = 0
            if (
                w.flapping_since is not None
                and w.healthy_since is not None
                and now.mono - w.healthy_since >= cfg.reader_flap_window_s
            ):
                events.append(
                    ev.ReaderFlapping(
                        **self._stamp(now),
                        reader_id=rid,
                        state="stable",
                        outages=w.flap_outages,
                        window_s=cfg.reader_flap_window_s,
                        duration_s=round(now.mono - w.flapping_since, 3),
                        detail=w.detail,
                        connection=w.connection,
                    )
                )
                w.flapping_since = None
                w.flap_outages = 0
                self.changed = True

    def snapshot(self, at: float) -> dict[str, Any]:
        """The persisted part (``offline``, ``readers``), times relative to ``at``."""
        return {
            "offline": sorted(self._offline),
            "readers": {
                r: {
                    "down_s": None if w.down_since is None else max(0.0, at - w.down_since),
                    "short": w.short,
                    "flapping": None if w.flapping_since is None else w.flap_outages,
                }
                for r, w in sorted(self._watch.items())
                if w.down_since is not None or w.short or w.flapping_since is not None
            },
        }

    def restore(self, state: Mapping[str, Any], base: float) -> None:
        """Inverse of ``snapshot``, re-based on monotonic ``base``."""
        self._offline = {str(r) for r in state["offline"]}
        # Outages and flapping episodes outlive a restart (their events are still owed);
        # a window of calm starts over. Optional: states written before it lack the key.
        for rid, r in dict(state.get("readers") or {}).items():
            down, flaps = r["down_s"], r["flapping"]
            self._watch[str(rid)] = ReaderWatch(
                down_since=None if down is None else base - float(down),
                short=int(r["short"]),
                flapping_since=None if flaps is None else base,
                flap_outages=0 if flaps is None else int(flaps),
            )
