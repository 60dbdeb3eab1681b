"""One scan pass at a time: when it may start counting, and when it is over.

A pass counts only once the scan's StartScan has been carried out (the runner says so:
``started``) and every reader (and each of its antennas the engine uses) is healthy and says it
is inventorying: its timers run on the agent's clock, so they may only run while the readers
read for this cabinet. Time before that (a StartScan still behind a slow commit, a starved loop,
a reader slow to start its ROSpec) is not "no new EPC": counted, it let a pass end empty, before
the reader had read a thing. Both conditions are needed: a reader shared with another cabinet
inventories for that cabinet's scan, yet reads for this one flow only once this cabinet's start
was carried out; a reader of our own reads only once it has acted on the start, after. It ends when no new EPC has shown up for ``stable_ms`` (between ``scan_min_ms``
and ``scan_max_ms``), and only after every reader that reports liveness was heard from since: a
reader whose socket stays open but which sends nothing makes the pass incomplete, not empty
(docs/domain.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.domain.config import Antenna, CabinetDomainConfig
from agent.domain.inventory import ScanAccumulator, ScanResult
from drivers.types import ReaderHealth, ReaderState, TagRead


class ScanPass:
    """The pass in progress, if any, and what its end waits for."""

    def __init__(
        self,
        config: CabinetDomainConfig,
        antennas: Mapping[Antenna, str],
        health: Mapping[str, ReaderHealth],
    ) -> None:
        self.config = config
        self._antennas = antennas
        self._health = health  # the engine's, kept current by it
        ports: dict[str, set[int]] = {}
        for reader, port in antennas:
            ports.setdefault(reader, set()).add(port)
        self._ports = {r: frozenset(p) for r, p in sorted(ports.items())}
        self._scan: ScanAccumulator | None = None
        # The scan's StartScan was carried out (kept across the passes of one scan).
        self._started = False
        # The pass waits for its start, and every reader healthy and inventorying, to count.
        self._waiting = False
        self._alive: dict[str, float] = {}  # reader → monotonic time it was last heard from
        self._end_candidate: float | None = None  # when the pass first met its end conditions
        # When the pass must be over: scan_max_ms from the moment it first counted. A reader
        # that stops reading mid-pass makes it count again from the start, but not for longer:
        # one that flapped between reading and not made the pass (and the door cycle) endless.
        self._deadline: float | None = None
        self._stopped: set[str] = set()  # readers that stopped reading during this pass

    @property
    def running(self) -> bool:
        return self._scan is not None

    def ready(self) -> bool:
        """Every reader healthy, with every antenna the cabinet uses connected (where it says)."""
        for reader, ports in self._ports.items():
            h = self._health.get(reader)
            if h is None or not h.healthy:
                return False
            if h.antennas_connected is not None and not ports <= h.antennas_connected:
                return False
        return True

    def inventorying(self) -> bool:
        """Every reader ready and reading tags (not merely online: a paused reader, or one
        whose start has not taken effect yet, reads nothing, and its silence means nothing)."""
        return self.ready() and all(
            (h := self._health.get(r)) is not None and h.state is ReaderState.INVENTORYING
            for r in self._ports
        )

    def start(self, now: float, *, new_scan: bool) -> None:
        """A new pass (replacing any running one); ``new_scan``: of a scan whose StartScan is
        still to be carried out (the passes after a scan's first one keep its start)."""
        if new_scan:
            self._started = False
        self._scan = ScanAccumulator(self.config, self._antennas, self._health, now)
        self._waiting = not (self._started and self.inventorying())
        self._end_candidate = None
        self._stopped.clear()
        self._deadline = None if self._waiting else now + self.config.scan_max_ms / 1000

    def stop(self) -> None:
        self._scan = None
        self._started = False
        self._deadline = None
        self._stopped.clear()

    def started(self, now: float) -> None:
        """The scan's StartScan was carried out at ``now``: reads for this cabinet flow from
        the readers that inventory (a shared one may have been inventorying all along)."""
        if self._scan is None:
            return
        self._started = True
        self._count_if_ready(now)

    def alive(self, reader_id: str, heard: float) -> None:
        """The reader was heard from at monotonic ``heard``."""
        if heard > self._alive.get(reader_id, float("-inf")):
            self._alive[reader_id] = heard

    def tags(self, reads: Sequence[TagRead], now: float) -> None:
        if self._scan is not None:
            self._scan.add(reads, now)

    def health(self, health: ReaderHealth, now: float) -> None:
        """A reader's health changed (the engine's health map has it already)."""
        if self._scan is None:
            return
        self._scan.health(health)
        if self._waiting:
            self._count_if_ready(now)
        elif (
            not self._waiting
            and health.reader_id in self._ports
            and health.healthy
            and health.state is not ReaderState.INVENTORYING
            and self._scan.complete
        ):
            # A reader stopped reading (a stop that reached it after this pass's start): the
            # pass counts again, from the start, once every reader reads (within its deadline).
            self._waiting = True
            self._stopped.add(health.reader_id)

    def _count_if_ready(self, now: float) -> None:
        """Start counting now if the pass waits and may: a pass begun with a reader down could
        never be complete, and one begun before the readers read would time their silence."""
        if self._waiting and self._started and self.inventorying():
            self._waiting = False
            self._end_candidate = None
            self._scan = ScanAccumulator(self.config, self._antennas, self._health, now)
            if self._deadline is None:
                self._deadline = now + self.config.scan_max_ms / 1000

    def finished(self, now: float) -> ScanResult | None:
        """The result of the running pass once it is over at ``now`` (the pass then ends)."""
        scan = self._scan
        assert scan is not None
        cfg = self.config
        elapsed_ms = (now - scan.started) * 1000
        quiet_ms = (now - scan.last_new) * 1000
        deadline = self._deadline
        if deadline is None:  # never counted: scan_max_ms waiting for the readers to read
            deadline = scan.started + cfg.scan_max_ms / 1000
        over = now >= deadline
        if not over and (self._waiting or elapsed_ms < cfg.scan_min_ms or quiet_ms < cfg.stable_ms):
            return None
        ended_by_limit = self._end_candidate is None and over
        if self._end_candidate is None:
            self._end_candidate = now
        # Only readers that look healthy are waited for: an unhealthy one already made the
        # pass incomplete; a healthy one that has not been heard from may be silently dead.
        silent = [
            r
            for r in self._ports
            if not self._waiting
            and r in self._alive
            and self._alive[r] < self._end_candidate
            and (h := self._health.get(r)) is not None
            and h.healthy
        ]
        if silent and not over:
            return None  # wait for word from every reader that it is still alive
        for reader in silent:
            if ended_by_limit and now - self._alive[reader] < cfg.stable_ms / 1000:
                # The pass met no end of its own before scan_max_ms, so no reader could be heard
                # after its end; one heard within the last stable_ms is not silent.
                scan.fail(f"{reader} not heard after the pass ended at scan_max_ms")
            else:
                scan.fail(f"{reader} silent")
        if self._waiting:
            # scan_max_ms without every reader reading: nothing this pass saw can be trusted.
            if not self._started:
                scan.fail("scan not started")
            for reader in self._ports:
                h = self._health.get(reader)
                if h is not None and h.healthy and h.state is not ReaderState.INVENTORYING:
                    scan.fail(f"{reader} not inventorying")
        elif self._stopped and (elapsed_ms < cfg.scan_min_ms or quiet_ms < cfg.stable_ms):
            # Cut short: it counted again after a reader stopped reading, and the deadline came
            # before this count could end on its own terms (what it saw is not a whole pass).
            for reader in sorted(self._stopped):
                scan.fail(f"{reader} stopped reading")
        self._end_candidate = None
        self._waiting = False
        self._deadline = None
        self._stopped.clear()
        result = scan.result(now)
        self._scan = None
        return result
