"""What the cabinet holds (the baseline), and how far a complete scan pass may change it.

The inventory trust rules (docs/domain.md): with an asset registry only registered tags are
inventory; a tag new to the cabinet joins only if it was steady in every pass; a drawer that
held tags and reads nothing at all is held as blind rather than emptied; an item pinned to its
tag's TID is not a tag whose TID contradicts the pin (a clone: ``item.counterfeit``).
``Contents`` judges a pass by them, reports what it finds (check-outs, returns, missing,
unknown, misplaced, counterfeit items) and carries what they remember from one cycle to the
next: the drawers held as blind, the unregistered tags and the clones already reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any
from uuid import UUID

from agent.domain import events as ev
from agent.domain.assets import AssetRegistry
from agent.domain.config import Antenna, CabinetDomainConfig
from agent.domain.inventory import Baseline, Diff, ScanResult, diff
from agent.domain.localtime import local_date
from agent.domain.now import Now
from agent.domain.stamp import Stamper
from drivers.types import ReaderHealth

_EPC_RE = re.compile(r"(?:[0-9a-f]{2}){1,64}")
_TID_RE = re.compile(r"(?:[0-9a-f]{4}){2,32}")
MAX_UNKNOWN_TRACKED = 1000
MAX_COUNTERFEIT_TRACKED = 1000


@dataclass(frozen=True)
class Verdict:
    """What a complete pass (or merged passes) says the cabinet holds, under the trust rules."""

    base: Mapping[str, str]  # the baseline the pass is compared with (registered tags only)
    inventory: dict[str, str]  # what the cabinet holds: the next baseline
    unknown: dict[str, str]  # steady unregistered tags not reported yet (item.unknown)
    arrivals: bool  # steady tags new to the cabinet: confirm before trusting them
    suspect: dict[str, list[str]]  # blind drawers → the tags held there
    vanished: dict[str, str]  # held tags gone once their drawer reads again → item.missing
    # Clones not reported yet: (EPC, TID) → drawer, for TIDs that contradict the pinned one.
    counterfeit: dict[tuple[str, str], str] = field(default_factory=dict)


class Contents:
    """The baseline, the asset registry and the trust rules' memory; ``changed`` when the
    persisted part of that memory changed (the baseline is committed with the cycle)."""

    timezone: tzinfo = UTC  # the site's (the engine sets it): calibration dates are judged in it

    def __init__(
        self,
        config: CabinetDomainConfig,
        antennas: Mapping[Antenna, str],
        health: Mapping[str, ReaderHealth],
        stamp: Stamper,
        baseline: Baseline,
        assets: AssetRegistry | None,
    ) -> None:
        self.config = config
        self._antennas = antennas
        self._health = health  # the engine's, kept current by it
        self._stamp = stamp
        self.baseline = baseline
        self.assets = assets
        self._unknown: dict[str, str] = {}  # unregistered tags reported and still present
        self._held: dict[str, list[str]] = {}  # blind drawers → tags held there (not judged)
        self._clones: dict[str, list[str]] = {}  # EPC → clone TIDs reported and still present
        self.changed = False
        # Consumables taken and put in by the last close_session (for session.closed).
        self.consumed = 0
        self.restocked = 0

    def needs_confirmation(self, result: ScanResult) -> bool:
        """A first pass that found items gone, tags new to the cabinet or a blind drawer is
        confirmed by a second one before anything is reported or joins the baseline."""
        verdict = self._assess(result)
        if verdict.suspect:
            return True  # a blind drawer is always confirmed, whatever confirm_pass says
        if not self.config.confirm_pass:
            return False
        return verdict.arrivals or bool(diff(verdict.base, verdict.inventory).missing)

    def close_session(
        self,
        result: ScanResult,
        session_id: UUID,
        actors: list[str],
        now: Now,
        events: list[ev.Event],
    ) -> tuple[int, int]:
        """The complete pass that closes a door session, against a trusted baseline: what left
        is checked out and what arrived is returned, by the session's actors (consumables:
        consumed and restocked, counted in ``consumed``/``restocked``); the pass becomes the
        baseline. Returns (checked out, returned)."""
        checked_out = returned = 0
        self.consumed = self.restocked = 0
        verdict = self._assess(result)
        d = diff(verdict.base, verdict.inventory)
        # A due date is a validity window (proven time), and a date at the site: due "on the
        # 10th" lasts until midnight where the cabinet stands, not in Greenwich.
        today = local_date(now.judged, self.timezone)
        self._blind_drawers(verdict, "session", session_id, now, events)
        for epc, drawer in d.missing.items():
            if epc in verdict.vanished:
                continue  # reported as missing above: who took it cannot be known
            asset = self.assets.get(epc) if self.assets is not None else None
            if asset is not None and asset.consumable:
                self.consumed += 1
                events.append(self._consumed(epc, drawer, session_id, actors, now))
                continue
            checked_out += 1
            events.append(
                ev.ItemCheckedOut(
                    **self._stamp(now),
                    session_id=session_id,
                    actors=actors,
                    epc=epc,
                    asset_id=asset.asset_id if asset else None,
                    drawer=drawer,
                )
            )
            if asset is not None and asset.calibration_overdue(today):
                assert asset.calibration_due is not None
                events.append(
                    ev.ItemCalibrationOverdue(
                        **self._stamp(now),
                        session_id=session_id,
                        actors=actors,
                        epc=epc,
                        asset_id=asset.asset_id,
                        calibration_due=asset.calibration_due,
                    )
                )
        for epc, drawer in d.new.items():
            if epc in self._unknown:
                continue  # inside all along, registered since: not returned by anyone
            asset = self.assets.get(epc) if self.assets is not None else None
            if asset is not None and asset.consumable:
                self.restocked += 1
                events.append(self._restocked(epc, drawer, session_id, None, actors, now))
                continue
            returned += 1
            events.append(
                ev.ItemReturned(
                    **self._stamp(now),
                    session_id=session_id,
                    actors=actors,
                    epc=epc,
                    asset_id=asset.asset_id if asset else None,
                    drawer=drawer,
                )
            )
        self._adopt(result, verdict, d, session_id, actors, now, events)
        return checked_out, returned

    def reestablish(
        self, result: ScanResult, session_id: UUID | None, now: Now, events: list[ev.Event]
    ) -> None:
        """A complete pass nobody is accountable for (background, or a session while the
        baseline is stale): what is gone is ``item.missing``, what arrived is placed, and the
        pass becomes the baseline, published as ``inventory.snapshot``."""
        verdict = self._assess(result)
        d = diff(verdict.base, verdict.inventory)
        self._blind_drawers(
            verdict, "session" if session_id else "background", session_id, now, events
        )
        for epc, drawer in d.missing.items():
            if epc in verdict.vanished:
                continue  # reported above
            asset = self.assets.get(epc) if self.assets is not None else None
            if asset is not None and asset.consumable:
                # Used up: never missing, whoever took it.
                events.append(self._consumed(epc, drawer, session_id, [], now))
                continue
            events.append(self._item_missing(epc, drawer, now))
        self._adopt(result, verdict, d, session_id, None, now, events)
        events.append(self.inventory_snapshot(now))

    def close_technician(
        self,
        result: ScanResult,
        session_id: UUID,
        technician: str,
        actors: list[str],
        now: Now,
        events: list[ev.Event],
    ) -> tuple[int, int]:
        """The complete pass that closes a technician session: what left is ``item.removed``,
        what arrived is ``item.restocked`` (by the technician); nobody checks anything out. The
        pass becomes the baseline. Returns (restocked, removed)."""
        verdict = self._assess(result)
        d = diff(verdict.base, verdict.inventory)
        self._blind_drawers(verdict, "session", session_id, now, events)
        removed = restocked = 0
        for epc, drawer in d.missing.items():
            if epc in verdict.vanished:
                continue
            asset = self.assets.get(epc) if self.assets is not None else None
            removed += 1
            events.append(
                ev.ItemRemoved(
                    **self._stamp(now),
                    session_id=session_id,
                    technician=technician,
                    epc=epc,
                    asset_id=asset.asset_id if asset else None,
                    sku=asset.sku if asset else None,
                    drawer=drawer,
                )
            )
        for epc, drawer in d.new.items():
            if epc in self._unknown:
                continue
            restocked += 1
            events.append(self._restocked(epc, drawer, session_id, technician, actors, now))
        # A clone is no restock: reported as anywhere else (no badge holder put it in).
        self._adopt(result, verdict, d, session_id, None, now, events)
        return restocked, removed

    def rebaseline(
        self, result: ScanResult, technician: str, reason: str, now: Now, events: list[ev.Event]
    ) -> None:
        """A technician's re-baseline: the complete pass *is* the cabinet's contents; what
        differs is counted in ``inventory.rebaselined``, not reported item by item (neither
        checked out nor missing). Unregistered and misplaced tags are reported as usual."""
        verdict = self._assess(result)
        d = diff(verdict.base, verdict.inventory)
        self._blind_drawers(verdict, "background", None, now, events)
        self._adopt(result, verdict, d, None, None, now, events)
        events.append(
            ev.InventoryRebaselined(
                **self._stamp(now),
                technician=technician,
                reason=reason,
                added=len(d.new),
                removed=len([e for e in d.missing if e not in verdict.vanished]),
                tags=len(self.baseline),
            )
        )
        events.append(self.inventory_snapshot(now))

    def inventory_snapshot(self, now: Now) -> ev.InventorySnapshot:
        """``inventory.snapshot`` of the baseline, with the consumables counted per SKU."""
        skus: dict[str, int] = {}
        registry = self.assets
        if registry is not None:
            for epc in self.baseline:
                asset = registry.get(epc)
                if asset is not None and asset.consumable and asset.sku is not None:
                    skus[asset.sku] = skus.get(asset.sku, 0) + 1
        return ev.InventorySnapshot(
            **self._stamp(now),
            tags=len(self.baseline),
            by_drawer=self.baseline.by_drawer(),
            items=self.baseline.to_dict(),
            skus=dict(sorted(skus.items())),
        )

    def snapshot(self) -> dict[str, Any]:
        """The persisted part: ``baseline``, ``unknown``, ``held`` and ``clones``."""
        return {
            "baseline": self.baseline.to_dict(),
            "unknown": dict(sorted(self._unknown.items())),
            "held": dict(sorted(self._held.items())),
            "clones": dict(sorted(self._clones.items())),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``snapshot`` for ``unknown`` and ``held`` (the baseline comes first, to
        the constructor). Optional keys: states written before them lack them."""
        self._unknown = dict(Baseline.from_dict(state.get("unknown") or {}))
        held = Baseline.from_dict(
            {str(e): str(d) for d, es in dict(state.get("held") or {}).items() for e in es}
        )
        for epc, drawer in held.items():
            self._held.setdefault(drawer, []).append(epc)
        self._clones = _clones_from(state.get("clones") or {})

    # ---- the trust rules --------------------------------------------------------------------

    def _assess(self, result: ScanResult) -> Verdict:
        """What a complete pass (or merged passes) says the cabinet holds, under the trust rules.

        - With an asset registry, only registered tags are inventory: an unregistered tag never
          joins the baseline nor leaves it (a steady one is worth ``item.unknown``, once).
        - A tag already in the baseline stays while it is present at all (``min_reads`` above
          the floor); a tag new to the cabinet joins only if it was *steady* (read in enough of
          the rounds, clearly above the floor) in every pass — so a neighbour cabinet's tag,
          read weakly and now and then, never becomes inventory, and so can never be "taken".
        """
        registry = self.assets
        if registry is None:
            base: Mapping[str, str] = self.baseline
        else:
            base = {e: d for e, d in self.baseline.items() if e in registry}
        inventory: dict[str, str] = {}
        unknown: dict[str, str] = {}
        counterfeit: dict[tuple[str, str], str] = {}
        new = False
        for epc, drawer in result.present.items():
            tids = result.tids.get(epc) if registry is not None else None
            if tids:
                # A registered item pinned to a TID (docs/domain.md, "TIDs"): a TID read with
                # its EPC that contradicts the pin is another tag, a clone, reported once while
                # it stays; unless the pinned tag answered too, the EPC is not the item here.
                assert registry is not None
                asset = registry.get(epc)
                verdict = asset.tid_verdict(tids) if asset is not None else None
                if verdict is not None and verdict.foreign:
                    reported = self._clones.get(epc, ())
                    if epc in result.steady:
                        for tid in verdict.foreign:
                            if tid not in reported:
                                counterfeit[(epc, tid)] = tids[tid]  # where the clone is
                    if verdict.own is None:
                        continue
                    drawer = tids[verdict.own]  # the item is where its own tag is
            if registry is not None and epc not in registry:
                # Reported when it arrives; one the baseline already held (from before the
                # registry knew better) did not arrive.
                if epc in result.steady and epc not in self._unknown and epc not in self.baseline:
                    unknown[epc] = drawer
            elif epc in base:
                inventory[epc] = drawer
            elif epc in result.steady:
                inventory[epc] = drawer
                new = True
        # A drawer that held tags and reads nothing at all, not even a neighbour's tag under the
        # floor, is more likely blind (an unplugged antenna its reader cannot report) than
        # emptied at once: its tags are held, never checked out. A held drawer stays held until
        # it reads again; then what is gone from it is missing, charged to nobody.
        by_drawer: dict[str, list[str]] = {}
        for epc, drawer in base.items():
            by_drawer.setdefault(drawer, []).append(epc)
        least = self.config.suspect_min_tags
        # Only where the readers cannot tell: one that reports its antennas has made a pass
        # with an unplugged one incomplete already.
        undetected = {
            drawer
            for (reader, _port), drawer in self._antennas.items()
            if (h := self._health.get(reader)) is None or h.antennas_connected is None
        }
        suspect: dict[str, list[str]] = {}
        for drawer, epcs in sorted(by_drawer.items()):
            if drawer in result.heard:
                continue
            if (least and len(epcs) >= least and drawer in undetected) or drawer in self._held:
                suspect[drawer] = sorted(epcs)
                for epc in epcs:
                    inventory[epc] = drawer
        vanished = {
            e: drawer
            for drawer, epcs in sorted(self._held.items())
            if drawer not in suspect
            for e in epcs
            if e in base and e not in inventory
        }
        return Verdict(
            base,
            inventory,
            unknown,
            new or bool(unknown) or bool(counterfeit),
            suspect,
            vanished,
            counterfeit,
        )

    def _blind_drawers(
        self,
        verdict: Verdict,
        purpose: ev.ScanPurpose,
        session_id: UUID | None,
        now: Now,
        events: list[ev.Event],
    ) -> None:
        """inventory.suspect per blind drawer, item.missing for what left a drawer while it was
        blind; the holds carried to the next cycle."""
        for drawer, epcs in verdict.suspect.items():
            events.append(
                ev.InventorySuspect(
                    **self._stamp(now),
                    purpose=purpose,
                    drawer=drawer,
                    held=len(epcs),
                    first=drawer not in self._held,
                    detail="no read from its antennas in two passes: unplugged antenna?",
                    session_id=session_id,
                )
            )
        for epc, drawer in sorted(verdict.vanished.items()):
            events.append(self._item_missing(epc, drawer, now))
        if verdict.suspect != self._held:
            self._held = dict(verdict.suspect)
            self.changed = True

    def _note_unknown(self, result: ScanResult, reported: Mapping[str, str]) -> None:
        """Remember the unregistered tags reported as item.unknown while they stay present (so
        each is reported once per stay, not at every scan)."""
        registry = self.assets
        if registry is None:
            return
        kept: dict[str, str] = {}
        # Also the unregistered tags the baseline held: they did not arrive, they were here.
        for epc, drawer in (*self._unknown.items(), *self.baseline.items(), *reported.items()):
            if epc in result.present and epc not in registry and len(kept) < MAX_UNKNOWN_TRACKED:
                kept[epc] = drawer
        if kept != self._unknown:
            self._unknown = kept
            self.changed = True

    def _adopt(
        self,
        result: ScanResult,
        verdict: Verdict,
        d: Diff,
        session_id: UUID | None,
        actors: list[str] | None,
        now: Now,
        events: list[ev.Event],
    ) -> None:
        """The end of every complete pass: placements and clones reported, unknown tags and
        clones remembered, and the pass becomes the baseline."""
        self._placement_events(d.new, d.moved, verdict.unknown, session_id, now, events)
        self._counterfeit_events(verdict, session_id, actors, now, events)
        self._note_unknown(result, verdict.unknown)
        self._note_clones(result, verdict)
        self.baseline = Baseline(verdict.inventory)

    def _note_clones(self, result: ScanResult, verdict: Verdict) -> None:
        """Remember the clones reported as item.counterfeit while they stay: their EPC present
        and their TID still among those read with it (or no TID read at all this time)."""
        kept: dict[str, list[str]] = {}
        count = 0
        pairs = [(e, t) for e, ts in self._clones.items() for t in ts]
        for epc, tid in sorted({*pairs, *verdict.counterfeit}):
            read = result.tids.get(epc)
            # Forgotten once its EPC is gone, or read with TIDs that no longer include it.
            if (
                epc in result.present
                and (not read or tid in read)
                and count < MAX_COUNTERFEIT_TRACKED
            ):
                kept.setdefault(epc, []).append(tid)
                count += 1
        if kept != self._clones:
            self._clones = kept
            self.changed = True

    # ---- reports --------------------------------------------------------------------------

    def _consumed(
        self, epc: str, drawer: str, session_id: UUID | None, actors: list[str], now: Now
    ) -> ev.ItemConsumed:
        asset = self.assets.get(epc) if self.assets is not None else None
        return ev.ItemConsumed(
            **self._stamp(now),
            session_id=session_id,
            actors=list(actors),
            epc=epc,
            asset_id=asset.asset_id if asset else None,
            sku=asset.sku if asset else None,
            drawer=drawer,
        )

    def _restocked(
        self,
        epc: str,
        drawer: str,
        session_id: UUID | None,
        technician: str | None,
        actors: list[str],
        now: Now,
    ) -> ev.ItemRestocked:
        asset = self.assets.get(epc) if self.assets is not None else None
        return ev.ItemRestocked(
            **self._stamp(now),
            session_id=session_id,
            technician=technician,
            actors=list(actors),
            epc=epc,
            asset_id=asset.asset_id if asset else None,
            sku=asset.sku if asset else None,
            drawer=drawer,
        )

    def _item_missing(self, epc: str, drawer: str, now: Now) -> ev.ItemMissing:
        """``item.missing``: gone, and nobody can be named for it."""
        asset = self.assets.get(epc) if self.assets is not None else None
        return ev.ItemMissing(
            **self._stamp(now), epc=epc, asset_id=asset.asset_id if asset else None, drawer=drawer
        )

    def _counterfeit_events(
        self,
        verdict: Verdict,
        session_id: UUID | None,
        actors: list[str] | None,
        now: Now,
        events: list[ev.Event],
    ) -> None:
        """item.counterfeit per clone found (by EPC, then TID)."""
        registry = self.assets
        if registry is None:
            return
        for (epc, tid), drawer in sorted(verdict.counterfeit.items()):
            asset = registry.get(epc)
            assert asset is not None
            events.append(
                ev.ItemCounterfeit(
                    **self._stamp(now),
                    epc=epc,
                    asset_id=asset.asset_id,
                    tid=tid,
                    drawer=drawer,
                    session_id=session_id,
                    actors=None if actors is None else list(actors),
                )
            )

    def _placement_events(
        self,
        new: Mapping[str, str],
        moved: Mapping[str, tuple[str, str]],
        unknown: Mapping[str, str],
        session_id: UUID | None,
        now: Now,
        events: list[ev.Event],
    ) -> None:
        """item.unknown / item.misplaced for tags that arrived somewhere (not for those that stayed)."""
        registry = self.assets
        if registry is None:
            return
        arrived: Iterable[tuple[str, str]] = [
            *new.items(),
            *((e, d[1]) for e, d in moved.items()),
            *unknown.items(),
        ]
        for epc, drawer in sorted(arrived):
            asset = registry.get(epc)
            if asset is None:
                events.append(
                    ev.ItemUnknown(
                        **self._stamp(now), epc=epc, drawer=drawer, session_id=session_id
                    )
                )
            elif asset.misplaced_in(drawer):
                assert asset.home_drawer is not None
                events.append(
                    ev.ItemMisplaced(
                        **self._stamp(now),
                        epc=epc,
                        asset_id=asset.asset_id,
                        drawer=drawer,
                        home_drawer=asset.home_drawer,
                        session_id=session_id,
                    )
                )


def _clones_from(data: object) -> dict[str, list[str]]:
    """Validate the persisted clone memory (EPC → TIDs): untrusted like any stored state."""
    if not isinstance(data, Mapping):
        raise ValueError("clones must be an object of EPC → TIDs")
    out: dict[str, list[str]] = {}
    for epc, tids in data.items():
        if not isinstance(epc, str) or not _EPC_RE.fullmatch(epc):
            raise ValueError(f"clone EPC {epc!r} is not lower-case hex")
        if not isinstance(tids, list) or not all(
            isinstance(t, str) and _TID_RE.fullmatch(t) for t in tids
        ):
            raise ValueError(f"clones of {epc} must be a list of TIDs")
        out[str(epc)] = [str(t) for t in tids]
    return out
