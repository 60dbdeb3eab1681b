"""The file under the open database: its lock, the descriptor held beside the connection, its
identity by name, fsyncs, and the rewrite when its name no longer points at it.

Only the store's worker thread uses a ``DatabaseFile``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.store import db as dbmod
from agent.store.config import StoreConfig
from agent.store.seqfile import fsync_dir
from agent.store.types import StoreError, StoreLockedError

logger = logging.getLogger(__name__)

_HEAL_BACKUP_S = 10.0  # the most a rewrite's copy may take (it runs on the store's thread)


class DatabaseFile:
    """The open database (``db``), the descriptors held for it and what its name pointed at."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.db: dbmod.Database | None = None
        # A descriptor on the database file, held as long as the connection is open: fsyncs
        # go through it. Closing *any* descriptor of the file drops every POSIX lock the
        # process holds on it, SQLite's too -- and then another process (an operator's sqlite3
        # session) that closes the database deletes our WAL by name under our feet.
        self._db_fd: int | None = None
        self._lock_fd: int | None = None
        # (st_dev, st_ino) of the open database file and of its WAL, by path.
        self._identity: tuple[int, int] | None = None
        self._wal_identity: tuple[int, int] | None = None

    # -- the lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """One agent per database: the seq protocol assumes a single writer."""
        path = self.path
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{path} is in use by another process or store (lock {lock_path.name})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _relock(self) -> None:
        """The lock file may have gone with the database: take the lock on its name again."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        if self._lock_fd is not None and file_id(lock_path) == fd_id(self._lock_fd):
            return
        old = self._lock_fd
        self._lock_fd = None
        try:
            self.lock()  # StoreLockedError: another process has taken the store meanwhile
        except BaseException:
            self._lock_fd = old
            raise
        if old is not None:
            os.close(old)

    # -- the connection and its descriptor ----------------------------------------------------

    def adopt(self, db: dbmod.Database) -> None:
        """``db`` is the open database now; hold a descriptor on its file beside it."""
        self.db = db
        self._db_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the connection, then the descriptor held beside it (never the other way)."""
        db, fd = self.db, self._db_fd
        self.db = None
        self._db_fd = None
        try:
            if db is not None:
                db.conn.close()
        finally:
            if fd is not None:
                os.close(fd)

    # -- fsyncs ---------------------------------------------------------------------------------

    def sync_wal(self) -> None:
        """Fsync the WAL, which makes every commit written to it so far durable (raises
        FileNotFoundError when there is none: everything was checkpointed into the file)."""
        fsync_file(dbmod.wal_path(self.path))  # SQLite holds no lock on the WAL file itself

    def sync_file(self) -> None:
        if self._db_fd is not None:
            fsync_file(self.path, self._db_fd)

    def sync_all(self, db: dbmod.Database) -> None:
        """Schema, epoch and counter reach the database file itself before first use."""
        try:
            db.checkpoint("TRUNCATE")
        except sqlite3.Error as err:  # a full disk: the WAL fsync below still makes it durable
            logger.warning("start-up checkpoint failed: %s", err)
        with contextlib.suppress(FileNotFoundError):
            self.sync_wal()
        self.sync_file()
        fsync_dir(self.path.parent)

    # -- identity by name ---------------------------------------------------------------------

    def remember_identity(self) -> None:
        self._identity = fd_id(self._db_fd) if self._db_fd is not None else None
        self._wal_identity = file_id(dbmod.wal_path(self.path))

    def moved(self) -> str | None:
        """How ``[store] path`` stopped naming the open database (None: it still does)."""
        if self.db is None or self._identity is None:
            return None
        path = self.path
        now = file_id(path)
        if now != self._identity:
            return "deleted" if now is None else "replaced by another file"
        if self._wal_identity is not None and file_id(dbmod.wal_path(path)) != self._wal_identity:
            # Commits would go on into an unlinked WAL, lost at the next crash.
            return "left without its write-ahead log (deleted or replaced)"
        return None

    def rewrite(self, what: str) -> None:
        """Write the open database back under its name: the store's lock taken again by name
        first (if another process holds it, the files under our names are its own: touch
        none), whatever else sits under our names moved aside, a consistent copy through the
        open connection (sqlite3 backup) fsynced, the old connection closed (its -wal/-shm go
        with it, by name), the copy renamed into place, the directory fsynced, the copy
        reopened. Same epoch, same counter, nothing lost. If it cannot be done, raises Fatal:
        the store fails (the agent exits and its restart salvages the WAL) rather than run on
        an unlinked file.
        """
        db = self.db
        assert db is not None
        path = self.path
        wal = dbmod.wal_path(path)
        logger.critical("the state database %s was %s while in use: rewriting it", path, what)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        tmp = path.with_name(path.name + ".heal")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._relock()
            # Not ours (a copy put there by hand, a leftover): keep it, out of the way, and
            # never let our connection's close delete someone else's WAL by name.
            if file_id(path) not in (None, self._identity):
                path.rename(path.with_name(f"{path.name}.replaced-{stamp}"))
            if file_id(wal) not in (None, self._wal_identity):
                wal.rename(wal.with_name(f"{wal.name}.replaced-{stamp}"))
            tmp.unlink(missing_ok=True)
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                # sqlite3's backup retries a busy or locked database without end: bounded here
                # (the callback runs after every step, busy ones too; raising aborts it).
                give_up = time.monotonic() + _HEAL_BACKUP_S

                def bounded(_status: int, _remaining: int, _total: int) -> None:
                    if time.monotonic() > give_up:
                        raise sqlite3.OperationalError(
                            f"the copy did not complete within {_HEAL_BACKUP_S:g} s (busy)"
                        )

                db.conn.backup(copy, pages=256, progress=bounded, sleep=0.05)
            finally:
                copy.close()
            fsync_file(tmp)
        except (OSError, sqlite3.Error, StoreError) as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._abandon()
            raise dbmod.Fatal(
                f"the state database was {what} while in use and could not be rewritten "
                f"({err}); restarting to salvage what is left"
            ) from err
        try:
            self.close()  # checkpoints into the old file and removes our -wal/-shm by name
            os.replace(tmp, path)
            fsync_dir(path.parent)
            self.adopt(dbmod.open_database(path, self.cfg))
        except (OSError, sqlite3.Error, StoreError) as err:
            if tmp.exists():
                logger.critical("a complete copy of the state database is left in %s", tmp)
            raise dbmod.Fatal(
                f"the state database could not be reopened after a rewrite: {err}"
            ) from err

    def _abandon(self) -> None:
        """The rewrite failed: close the connection without letting SQLite delete the -wal/-shm
        by name (ours: the restart finds the WAL beside a missing database and salvages it;
        another process's: not ours to delete). They are moved aside for the close only."""
        path = self.path
        aside: list[tuple[Path, Path]] = []
        for name in (dbmod.wal_path(path), path.with_name(path.name + "-shm")):
            kept = name.with_name(name.name + ".kept")
            with contextlib.suppress(OSError):
                name.rename(kept)
                aside.append((kept, name))
        with contextlib.suppress(sqlite3.Error, OSError):
            self.close()
        for kept, name in aside:
            with contextlib.suppress(OSError):
                kept.rename(name)


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def fd_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def fsync_file(path: Path, held: int | None = None) -> None:
    """Fsync ``path`` through ``held`` (a descriptor kept open on it), else through a new one."""
    if held is not None:
        os.fsync(held)
        return
    # On Linux fsync flushes the file's dirty pages whichever descriptor wrote them.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
