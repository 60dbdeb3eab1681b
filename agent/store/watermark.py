"""Durability before delivery: the durable watermark and the sequence sidecar's floor.

Rows up to ``durable`` are on disk for sure; with ``synchronous=NORMAL`` the commits above it
wait for the coalesced WAL fsync due at ``sync_at``. Before a row is handed out for delivery the
sidecar records its seq (docs/store.md, "Durability before delivery" and "Epochs and the
sequence sidecar"). Only the store's worker thread uses a ``Watermark``.
"""

from __future__ import annotations

import logging
import time

from agent.store.config import StoreConfig
from agent.store.seqfile import SeqFile, SeqState
from agent.store.types import OutboxRow

logger = logging.getLogger(__name__)


class Watermark:
    """What is committed, what is durable, and what the sidecar has recorded as handed out."""

    def __init__(self, cfg: StoreConfig, seqfile: SeqFile) -> None:
        self.cfg = cfg
        self.seqfile = seqfile
        self.state = SeqState(bytes(8), 0, 0)
        self._write_failed = False
        # Delivery reads that held rows back (ever): the publisher retries while it grows.
        self.held_reads = 0
        self.committed = 0
        self.durable = 0
        self.sync_at: float | None = None
        self.wal_fsyncs = 0

    def start(self, state: SeqState, committed: int) -> None:
        """At open: what the sidecar holds, and the counter, durable at this point."""
        self.state = state
        self.committed = self.durable = committed

    @property
    def behind(self) -> bool:
        """Some commits are not durable yet."""
        return self.committed > self.durable

    def advance(self, committed: int) -> None:
        """Rows up to ``committed`` are committed (FULL: and durable, COMMIT fsynced the WAL)."""
        self.committed = committed
        if self.cfg.synchronous == "FULL":
            self.durable = committed
        elif self.committed > self.durable and self.sync_at is None:
            self.sync_at = time.monotonic() + self.cfg.durability_delay_ms / 1000.0

    def all_durable(self) -> None:
        """Everything committed is durable now (the file was fsynced whole)."""
        self.durable = self.committed
        self.sync_at = None

    def hand_out(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Of these durable rows, the ones the sidecar records (and so may be delivered).

        Before rows above its ``sent_floor`` are handed out, the floor is raised to the highest
        of them (one small in-place write per delivery read that hands out new rows), and
        ``reserved`` moves a block ahead when it is reached. So a database found behind the
        floor at the next start -- a lost or damaged WAL, a restored copy -- is always detected.
        If the write fails, rows above ``reserved`` are held back until it works (each such read
        counts in ``held_reads``; the next delivery read tries the write again); below it they
        go (the floor is then only as fine as the block).
        """
        top = max((r.seq for r in rows), default=0)
        state = self.state
        if top <= state.sent_floor:
            return rows
        reserved = state.reserved
        if top > reserved:
            reserved = top + self.cfg.seq_reserve_block
        grown = SeqState(state.epoch, top, reserved)
        try:
            self.seqfile.write(grown)
        except OSError as err:
            if not self._write_failed:
                logger.error(
                    "cannot update the sequence file %s (%s): holding back rows above "
                    "seq %d until it works",
                    self.seqfile.path.name,
                    err,
                    state.reserved,
                )
            self._write_failed = True
            allowed = [r for r in rows if r.seq <= state.reserved]
            if len(allowed) < len(rows):
                self.held_reads += 1
            return allowed
        self._write_failed = False
        self.state = grown
        return rows

    def raise_floor(self) -> None:
        """At a clean stop: the sidecar's floor up to every durable row (raises OSError)."""
        state = self.state
        if self.durable > state.sent_floor:
            floor = self.durable
            self.seqfile.write(SeqState(state.epoch, floor, max(state.reserved, floor)))

    def keep_sidecar(self) -> None:
        """The sidecar may have gone with a deleted database: write it again if it did."""
        if not self.seqfile.path.exists():
            self.seqfile.write(self.state)
