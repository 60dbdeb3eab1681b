"""Disk space for the store: the WAL budget, the disk reserve, and the hold while commits fail.

When a commit fails because the disk (or one of the store's own limits) is full, the writes are
held in memory and retried with jittered backoff; ``hold`` says why and since when. The reserve
(``<db>.reserve``) is given back to a full filesystem so acknowledged rows can still be deleted,
and made again once there is room (docs/store.md, "Disk space"). Only the store's worker thread
uses a ``Space``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from agent.store import db as dbmod
from agent.store.config import StoreConfig
from agent.store.handoff import Mailbox
from agent.store.seqfile import fsync_dir
from agent.store.types import AlertKind, Hold, StoreAlert
from drivers.types import Clock

logger = logging.getLogger(__name__)


class Space:
    """The reserve, the retry schedule and the hold of one store."""

    def __init__(
        self,
        cfg: StoreConfig,
        clock: Clock,
        mailbox: Mailbox,
        alert_sink: Callable[[StoreAlert], None],
        hold_sink: Callable[[Hold | None], None] | None,
    ) -> None:
        self.cfg = cfg
        self._dir = Path(cfg.path).parent
        self._clock = clock
        self._mailbox = mailbox
        self._alert_sink = alert_sink
        self._hold_sink = hold_sink
        # Accepted writes are held in memory (disk full, space limit, failing writes): why, since.
        self.hold: Hold | None = None
        self.disk_full = False
        # The reserve was released to a full disk: new rows wait (acks do not) until it is back.
        self.reserve_spent = False
        self.retry_at = 0.0
        self._retry_delay = cfg.retry_initial_s

    def maintain(self, db: dbmod.Database) -> None:
        """After start, housekeeping and a full disk: WAL back under budget, reserve in place."""
        if db.scrub_pending:
            db.scrub()
        elif db.wal_bytes() > db.wal_budget // 2:
            try:
                db.checkpoint("TRUNCATE")
            except sqlite3.Error as err:
                logger.warning("checkpoint to reclaim the WAL failed: %s", err)
        reserve = db.reserve
        if not reserve.wanted:
            self.reserve_spent = False
            return
        if reserve.present():
            return
        free = dbmod.free_bytes(self._dir)
        # Room for the reserve and as much again for new rows, or new rows would only eat
        # the reserve's place again.
        room = None if free is None else free - self.cfg.min_free_disk_bytes
        if room is not None and room >= 2 * reserve.size and reserve.create():
            fsync_dir(self._dir)
            self.reserve_spent = False
            with contextlib.suppress(sqlite3.Error):
                db.apply_page_limit()

    def spend_reserve_for_stop(self, db: dbmod.Database) -> None:
        """Stopping with writes held: the reserve's room may take them now."""
        db.reserve.wanted = False
        self.reserve_spent = False
        self._release_reserve(db, "stopping with writes held")
        with contextlib.suppress(sqlite3.Error):
            db.apply_page_limit()

    def failing(self, db: dbmod.Database, err: sqlite3.Error, *, holding: bool) -> None:
        """A commit failed and will be retried (``holding``: writes were held already)."""
        full = dbmod.sqlite_code(err) == dbmod.SQLITE_FULL
        free = dbmod.free_bytes(self._dir) if full else None
        fs_full = free is not None and free < db.reserve.size
        if full and fs_full and db.reserve.present():
            # The filesystem itself is full (not our page cap): something else filled it.
            self._release_reserve(db, "to checkpoint and delete acknowledged rows")
        if not holding and not self.disk_full:
            self._retry_delay = self.cfg.retry_initial_s
            if full:
                self.disk_full = True
            reason, detail = self._full_reason(db, free) if full else ("writes failing", str(err))
            self._set_hold(Hold(reason, detail, self._clock.now()))
            self._alert(
                StoreAlert(
                    AlertKind.DISK_FULL if full else AlertKind.WRITE_RETRYING,
                    f"{detail}: new events are held in memory (in order, up to "
                    f"{self.cfg.max_pending_writes} writes / {self.cfg.max_pending_bytes} bytes) "
                    "and committed when it clears; a power loss before then loses them",
                )
            )
            self.schedule_retry(backoff=False)
        else:
            self.schedule_retry()
        if full:
            # Free space may have changed: move the page cap with it.
            with contextlib.suppress(sqlite3.Error):
                db.apply_page_limit()

    def schedule_retry(self, *, backoff: bool = True) -> None:
        if backoff:
            self._retry_delay = min(self._retry_delay * 2, self.cfg.retry_max_s)
        # Full jitter keeps many cabinets sharing one disk problem from retrying in step.
        self.retry_at = time.monotonic() + random.uniform(self._retry_delay / 2, self._retry_delay)

    def cleared(self, db: dbmod.Database) -> None:
        """Every held write is durable again."""
        was_full = self.disk_full
        self.disk_full = False
        self._set_hold(None)
        self._retry_delay = self.cfg.retry_initial_s
        spent = not db.reserve.wanted
        why = " (on the disk reserve, while stopping)" if spent else " (disk space is back)"
        self._alert(
            StoreAlert(
                AlertKind.DISK_FULL_CLEARED,
                "pending writes are durable again" + (why if was_full else ""),
            )
        )
        self.maintain(db)

    def _release_reserve(self, db: dbmod.Database, why: str) -> bool:
        if not db.reserve.release():
            return False
        self.reserve_spent = db.reserve.wanted
        with contextlib.suppress(OSError):
            fsync_dir(self._dir)
        logger.warning("disk full: released the store's %d-byte reserve (%s)", db.reserve.size, why)
        # Let the WAL be folded into the file now, so the next writes reuse its space.
        with contextlib.suppress(sqlite3.Error):
            db.checkpoint("PASSIVE")
        return True

    def _full_reason(self, db: dbmod.Database, free: int | None) -> tuple[str, str]:
        """What SQLITE_FULL means here, short and in one line: the filesystem is full, or one
        of the store's own limits (the page cap that keeps min_free_disk_bytes and the WAL
        budget free, or max_db_bytes) stopped the database from growing while the disk still
        has room -- never called "full" then."""
        path = Path(self.cfg.path)
        # ``free`` was measured before the reserve was given back, if it was.
        if free is None or free < db.reserve.size:
            where = path.parent
            return "disk full", f"disk full: the filesystem of {where} has no space left"
        if dbmod.file_size(path) + 64 * 1024 >= self.cfg.max_db_bytes:
            return "database size limit", (
                f"the database reached its size limit, [store] max_db_bytes = "
                f"{_mib(self.cfg.max_db_bytes)} (the disk is not full: {_mib(free)} free)"
            )
        return "store space limit", (
            f"the store's space limit is reached, the disk is not full: {_mib(free)} free, "
            f"and the store keeps [store] min_free_disk_bytes ({_mib(self.cfg.min_free_disk_bytes)}) "
            f"plus its WAL budget ({_mib(db.wal_budget)}) free"
        )

    def _set_hold(self, hold: Hold | None) -> None:
        self.hold = hold
        if self._hold_sink is not None:
            self._mailbox.post(functools.partial(self._hold_sink, hold))

    def _alert(self, alert: StoreAlert) -> None:
        self._mailbox.post(functools.partial(self._alert_sink, alert))


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
