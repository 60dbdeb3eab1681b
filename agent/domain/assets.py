"""Asset registry (optional): EPC → asset id, name, home drawer, calibration due date, how long
it may stay out, and whether the tag marks a consumable (one unit or pack of a SKU: used up,
never expected back), and the TID that pins an item to its tag."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from agent.domain.events import unprintable

_EPC_RE = re.compile(r"(?:[0-9a-f]{2}){1,64}")
_DRAWER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A pinned TID: lower-case hex, 2..32 whole 16-bit words (drivers/tid.py reads up to 32).
_TID_RE = re.compile(r"(?:[0-9a-f]{4}){2,32}")
MAX_ASSETS = 200_000
MAX_OVERDUE_AFTER_S = 366 * 86_400
MAX_NAME = 200


class AssetRegistryError(ValueError):
    """The asset-registry body is malformed."""


@dataclass(frozen=True, slots=True)
class Asset:
    epc: str
    asset_id: str
    name: str = ""
    home_drawer: str | None = None
    calibration_due: date | None = None
    # Seconds this item may stay out before item.overdue (0: never); None: the [domain] default.
    overdue_after_s: float | None = None
    consumable: bool = False
    sku: str | None = None  # set for every consumable
    tid: str | None = None  # pinned: the TID of the one tag that may carry this EPC

    def tid_verdict(self, tids: Iterable[str]) -> TidVerdict:
        """Judge the TIDs read with this asset's EPC against its pin (docs/domain.md, "TIDs").

        A read TID is the pinned tag's when it starts with the pin (a reader may read more
        words than were pinned); one that differs within their common length is another tag's.
        A read shorter than the pin that agrees with it proves nothing either way."""
        pin = self.tid
        own: str | None = None
        foreign: list[str] = []
        if pin is not None:
            for tid in sorted(set(tids)):
                n = min(len(tid), len(pin))
                if tid[:n] != pin[:n]:
                    foreign.append(tid)
                elif len(tid) >= len(pin) and own is None:
                    own = tid
        return TidVerdict(own, tuple(foreign))

    def calibration_overdue(self, today: date) -> bool:
        """Overdue once the due date has passed (the due day itself is still fine)."""
        return self.calibration_due is not None and today > self.calibration_due

    def misplaced_in(self, drawer: str) -> bool:
        """True if the asset has a home drawer and ``drawer`` is not it."""
        return self.home_drawer is not None and drawer != self.home_drawer


@dataclass(frozen=True, slots=True)
class TidVerdict:
    """What the TIDs read with a pinned asset's EPC say: the pinned tag answered, and the TIDs
    of other tags that carry its EPC (clones)."""

    own: str | None  # the TID read that is the pinned tag's (None: it did not answer)
    foreign: tuple[str, ...]

    @property
    def genuine(self) -> bool:
        return self.own is not None


class AssetRegistry:
    """Lookup by EPC. Built from the body of a verified asset-registry document."""

    def __init__(self, assets: Iterable[Asset] = ()) -> None:
        self._by_epc: dict[str, Asset] = {}
        pinned: set[str] = set()
        for asset in assets:
            if asset.epc in self._by_epc:
                raise AssetRegistryError(f"epc {asset.epc} appears twice")
            if asset.tid is not None:
                # A TID is one chip's: two assets pinned to it cannot both be right.
                if asset.tid in pinned:
                    raise AssetRegistryError(f"tid {asset.tid} is pinned twice")
                pinned.add(asset.tid)
            self._by_epc[asset.epc] = asset

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> AssetRegistry:
        """Interpret ``{"assets": [{epc, asset_id, name?, home_drawer?, calibration_due?,
        overdue_after_s?, consumable?, sku?, tid?}]}`` (a consumable needs its ``sku``)."""
        raw = body.get("assets") if isinstance(body, Mapping) else None
        if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
            raise AssetRegistryError("asset registry body needs an 'assets' list")
        if len(raw) > MAX_ASSETS:
            raise AssetRegistryError(f"asset registry has more than {MAX_ASSETS} assets")
        return cls(_asset(i, item) for i, item in enumerate(raw))

    def get(self, epc: str) -> Asset | None:
        """The asset carrying ``epc``, if registered."""
        return self._by_epc.get(epc)

    def __contains__(self, epc: object) -> bool:
        return epc in self._by_epc

    def pinned(self) -> int:
        """How many assets are pinned to a TID."""
        return sum(1 for a in self._by_epc.values() if a.tid is not None)

    def __len__(self) -> int:
        return len(self._by_epc)


def _asset(i: int, item: object) -> Asset:
    if not isinstance(item, Mapping):
        raise AssetRegistryError(f"asset [{i}] must be an object")
    epc = item.get("epc")
    if not isinstance(epc, str) or not _EPC_RE.fullmatch(epc):
        raise AssetRegistryError(f"asset [{i}] needs an 'epc' of lower-case hex")
    asset_id = item.get("asset_id")
    # Shown as is by cabinetctl (status: overdue items) and in events: printable text only.
    if not isinstance(asset_id, str) or not 1 <= len(asset_id) <= 128 or unprintable(asset_id):
        raise AssetRegistryError(
            f"asset [{i}] needs an 'asset_id' of 1-128 characters without control characters"
        )
    name = item.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME or unprintable(name):
        raise AssetRegistryError(
            f"asset [{i}] 'name' must be a string of at most {MAX_NAME} characters without "
            "control characters"
        )
    home = item.get("home_drawer")
    if home is not None and (not isinstance(home, str) or not _DRAWER_RE.fullmatch(home)):
        raise AssetRegistryError(f"asset [{i}] 'home_drawer' is not a drawer name")
    due_raw = item.get("calibration_due")
    due: date | None = None
    if due_raw is not None:
        if not isinstance(due_raw, str):
            raise AssetRegistryError(f"asset [{i}] 'calibration_due' must be YYYY-MM-DD")
        try:
            due = date.fromisoformat(due_raw)
        except ValueError:
            raise AssetRegistryError(f"asset [{i}] 'calibration_due' must be YYYY-MM-DD") from None
    limit_raw = item.get("overdue_after_s")
    limit: float | None = None
    if limit_raw is not None:
        # Whole seconds: signed documents carry no floats (canonical JSON).
        if (
            isinstance(limit_raw, bool)
            or not isinstance(limit_raw, int)
            or not 0 <= limit_raw <= MAX_OVERDUE_AFTER_S
        ):
            raise AssetRegistryError(
                f"asset [{i}] 'overdue_after_s' must be whole seconds within "
                f"0..{MAX_OVERDUE_AFTER_S}"
            )
        limit = float(limit_raw)
    consumable = item.get("consumable", False)
    if not isinstance(consumable, bool):
        raise AssetRegistryError(f"asset [{i}] 'consumable' must be true or false")
    sku = item.get("sku")
    if sku is not None and (not isinstance(sku, str) or not _DRAWER_RE.fullmatch(sku)):
        raise AssetRegistryError(f"asset [{i}] 'sku' must be 1-64 of [A-Za-z0-9_.-]")
    if consumable and sku is None:
        raise AssetRegistryError(f"asset [{i}] is consumable: it needs its 'sku'")
    tid = item.get("tid")
    if tid is not None and (not isinstance(tid, str) or not _TID_RE.fullmatch(tid)):
        raise AssetRegistryError(
            f"asset [{i}] 'tid' must be lower-case hex of 2-32 whole 16-bit words"
        )
    return Asset(
        epc,
        asset_id,
        name,
        home,
        due,
        overdue_after_s=limit,
        consumable=consumable,
        sku=sku,
        tid=tid,
    )
