"""The simulated tag field: EPCs placed at antennas, each read with a probability per cycle."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


@dataclass(frozen=True)
class SimTag:
    """One tag. ``antenna`` is where it couples best; ``also_at`` maps further antennas that also
    see it (overlapping fields) to the RSSI mean there. RSSI is gaussian around the mean (dBm).

    ``duty`` < 1 makes it *intermittent*: it can answer only in that share of the inventory
    rounds, in runs of ``burst_rounds`` rounds on average (a tag drifting in and out of a fade,
    as a neighbour cabinet's tag read through the wall does); within such a run it answers with
    ``read_probability``."""

    epc: str
    antenna: int = 1
    rssi_mean: float = -55.0
    rssi_spread: float = 2.0
    read_probability: float = 1.0
    also_at: Mapping[int, float] = field(default_factory=dict)
    duty: float = 1.0
    burst_rounds: float = 1.0
    # The TID bank (hex, whole 16-bit words). None: a TID derived from the EPC (every Gen2 chip
    # has one); a clone is a tag with the same EPC and another TID.
    tid: str | None = None

    def __post_init__(self) -> None:
        epc = self.epc.lower()
        try:
            raw = bytes.fromhex(epc)
        except ValueError as err:
            raise ValueError(f"EPC must be hex: {self.epc!r}") from err
        if not raw or len(raw) % 2 or len(raw) > 62:
            raise ValueError(f"EPC must be 1..31 whole 16-bit words: {self.epc!r}")
        if not 0.0 <= self.read_probability <= 1.0:
            raise ValueError("read_probability must be within [0, 1]")
        if self.rssi_spread < 0:
            raise ValueError("rssi_spread must be >= 0")
        if not 0.0 < self.duty <= 1.0:
            raise ValueError("duty must be within (0, 1]")
        if self.burst_rounds < 1.0:
            raise ValueError("burst_rounds must be >= 1")
        object.__setattr__(self, "epc", epc)
        object.__setattr__(self, "also_at", MappingProxyType(dict(self.also_at)))
        if self.tid is not None:
            tid = self.tid.lower()
            try:
                raw_tid = bytes.fromhex(tid)
            except ValueError as err:
                raise ValueError(f"TID must be hex: {self.tid!r}") from err
            if not raw_tid or len(raw_tid) % 2 or len(raw_tid) > 64:
                raise ValueError(f"TID must be 1..32 whole 16-bit words: {self.tid!r}")
            object.__setattr__(self, "tid", tid)

    @property
    def tid_bytes(self) -> bytes:
        """The tag's TID bank: its own, or one derived from its EPC."""
        return bytes.fromhex(self.tid) if self.tid is not None else default_tid(self.epc)

    @property
    def epc_bytes(self) -> bytes:
        return bytes.fromhex(self.epc)

    def next_reachable(self, reachable: bool, rng: random.Random) -> bool:
        """Whether an intermittent tag can answer this round, given whether it could last round
        (a two-state Markov chain: mean run ``burst_rounds`` on, and ``duty`` of rounds on)."""
        if self.duty >= 1.0:
            return True
        leave_on = 1.0 / self.burst_rounds
        # Mean off-run so that on / (on + off) == duty.
        leave_off = min(1.0, self.duty / ((1.0 - self.duty) * self.burst_rounds))
        return rng.random() >= leave_on if reachable else rng.random() < leave_off

    def views(self) -> Iterator[tuple[int, float]]:
        """(antenna, rssi mean) for every antenna that can read this tag."""
        yield self.antenna, self.rssi_mean
        for ant, mean in self.also_at.items():
            if ant != self.antenna:
                yield ant, mean


@dataclass(frozen=True)
class Observation:
    """One singulation of a tag during an inventory cycle."""

    epc: str
    antenna: int
    rssi: int
    channel: int
    utc_us: int
    tag: SimTag | None = None  # the tag that answered (a clone shares its EPC, not its TID)


class TagPopulation:
    """The tags in the field; safe to change between cycles (the loop is single-threaded)."""

    def __init__(self) -> None:
        self._tags: dict[str, SimTag] = {}
        self._clones: dict[str, SimTag] = {}  # EPC → a second tag carrying it (other TID)
        self._reachable: dict[str, bool] = {}  # intermittent tags: can answer this round

    def __len__(self) -> int:
        return len(self._tags)

    def __contains__(self, epc: object) -> bool:
        return isinstance(epc, str) and epc.lower() in self._tags

    def __iter__(self) -> Iterator[SimTag]:
        return iter(list(self._tags.values()))

    def get(self, epc: str) -> SimTag | None:
        return self._tags.get(epc.lower())

    def add(self, tag: SimTag) -> None:
        self._tags[tag.epc] = tag

    def remove(self, epc: str) -> SimTag:
        self._reachable.pop(epc.lower(), None)
        try:
            return self._tags.pop(epc.lower())
        except KeyError:
            raise KeyError(f"no tag {epc}") from None

    def move(self, epc: str, antenna: int, also_at: Mapping[int, float] | None = None) -> SimTag:
        tag = self._tags.get(epc.lower())
        if tag is None:
            raise KeyError(f"no tag {epc}")
        moved = replace(tag, antenna=antenna, also_at=also_at if also_at is not None else {})
        self._tags[moved.epc] = moved
        return moved

    def clear(self) -> None:
        self._tags.clear()
        self._clones.clear()
        self._reachable.clear()

    def add_clone(self, tag: SimTag) -> None:
        """A second tag with an EPC already in use (or not), answering with its own TID."""
        if tag.tid is None:
            raise ValueError("a clone needs its own TID")
        self._clones[tag.epc] = tag

    def remove_clone(self, epc: str) -> SimTag:
        try:
            return self._clones.pop(epc.lower())
        except KeyError:
            raise KeyError(f"no clone of {epc}") from None

    def clones(self) -> list[SimTag]:
        return list(self._clones.values())

    def cycle(
        self,
        rng: random.Random,
        antennas: Iterable[int],
        *,
        channels: int,
        utc_us: int,
        power_offset: Mapping[int, float] | None = None,
        floor_dbm: float = -128.0,
    ) -> list[Observation]:
        """One inventory round over ``antennas``: each visible tag answers with its probability.

        ``power_offset`` lowers an antenna's RSSI by the dB its transmitter runs below full power
        (the tag's reply weakens with the field that powers it); replies under ``floor_dbm`` are
        not heard."""
        wanted = set(antennas)
        offsets = power_offset or {}
        seen: list[Observation] = []
        tags = [(t, False) for t in self._tags.values()]
        tags += [(t, True) for t in self._clones.values()]
        for tag, clone in tags:
            if tag.duty < 1.0 and not clone:  # clones answer every round (no fade model)
                was = self._reachable.get(tag.epc, rng.random() < tag.duty)
                now_on = self._reachable[tag.epc] = tag.next_reachable(was, rng)
                if not now_on:
                    continue
            for ant, mean in tag.views():
                if ant not in wanted or rng.random() >= tag.read_probability:
                    continue
                level = mean + offsets.get(ant, 0.0)
                exact = rng.gauss(level, tag.rssi_spread) if tag.rssi_spread else level
                if exact < floor_dbm:
                    continue
                rssi = round(exact)
                seen.append(
                    Observation(
                        tag.epc,
                        ant,
                        max(-128, min(127, rssi)),
                        rng.randint(1, channels),
                        utc_us,
                        tag,
                    )
                )
        return seen


def neighbour_tag(
    epc: str,
    antenna: int,
    *,
    rssi_mean: float = -79.0,
    rssi_spread: float = 2.0,
    duty: float = 0.3,
    burst_rounds: float = 6.0,
) -> SimTag:
    """A tag of the cabinet next door, read through the wall: weak (near or under a typical
    -80 dBm floor) and intermittent (answers in ~30 % of the rounds, in short runs)."""
    return SimTag(
        epc=epc,
        antenna=antenna,
        rssi_mean=rssi_mean,
        rssi_spread=rssi_spread,
        duty=duty,
        burst_rounds=burst_rounds,
    )


def default_tid(epc: str) -> bytes:
    """A 96-bit TID for a tag that was given none: class E2, a made-up maker and model, and a
    48-bit serial derived from the EPC (stable from run to run)."""
    return bytes.fromhex("e2801100") + hashlib.sha256(bytes.fromhex(epc)).digest()[:8]


def random_epc96(rng: random.Random) -> str:
    """An SGTIN-96-looking EPC (header 0x30) with random content."""
    return "30" + "".join(f"{rng.getrandbits(8):02x}" for _ in range(11))
