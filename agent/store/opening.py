"""Opening the state database: what is found on disk, what is moved aside, and where the
epoch and the sequence go on from (docs/store.md, "Recovery" and "Epochs and the sequence
sidecar"). Runs once, on the store's worker thread, before it serves anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.store import db as dbmod
from agent.store.dbfile import DatabaseFile
from agent.store.location import StoreLocationError
from agent.store.salvage import Salvage, SalvagedRow, WalScan, check_wal, salvage, wal_header_valid
from agent.store.seqfile import SeqFile, SeqFileError, SeqState, new_epoch
from agent.store.types import AlertKind, StoreAlert

if TYPE_CHECKING:
    from agent.store.quarantine import SalvagedState

logger = logging.getLogger(__name__)

_LOCATION_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


@dataclass
class WalDamage:
    """A WAL damaged in the middle, set aside at open."""

    scan: WalScan
    moved: Path  # where the damaged WAL now is
    found: Salvage  # rows read from the database file and every readable transaction
    kept: bool  # the valid prefix was put back for SQLite to recover


@dataclass
class Opening:
    """What the open found, for deciding the epoch."""

    path: Path
    remembered: SeqState | None = None
    sidecar_problem: str | None = None
    existed: bool = True
    corrupt: tuple[str, Path] | None = None
    salvage: Salvage | None = None
    sql_counter: int | None = None
    state: SalvagedState | None = None  # baseline and kv read from a quarantined file
    orphan: Salvage | None = None
    wal_damage: WalDamage | None = None
    stale: bool = False  # the database opens as of an earlier commit (its WAL was lost)
    alerts: list[StoreAlert] = field(default_factory=list)


@dataclass(frozen=True)
class Settled:
    """Where the sequence goes on from, decided and durable."""

    epoch: bytes
    seq_state: SeqState  # what the sidecar holds (or will, once it can be written)
    baseline_proven: bool


def open_files(file: DatabaseFile, seqfile: SeqFile) -> Opening:
    """Lock the store, look at what is on disk (moving aside what SQLite must not see), and
    open the database into ``file`` (a fresh one if the old is corrupt)."""
    path = file.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        file.lock()
    except OSError as err:
        if err.errno in _LOCATION_ERRNOS:
            # Where the store lives is a deployment problem, not a crash: one line, exit 78.
            raise StoreLocationError(
                f"store.path: cannot use {path}: {err.strerror or err}"
            ) from None
        raise
    if path.is_dir():
        raise StoreLocationError(f"store.path: {path} is a directory; name a file in it")
    opening = Opening(path)
    try:
        opening.remembered = seqfile.read()
    except SeqFileError as err:
        opening.sidecar_problem = str(err)
    present = path.exists()
    existed = dbmod.file_size(path) > 0
    wal = dbmod.wal_path(path)
    sound = _header_sound(path)
    if sound and wal_header_valid(wal) is False:
        # SQLite would silently ignore (and later overwrite) a WAL whose header it cannot
        # read, and with it every commit that lived there: keep it and say so.
        from agent.store.quarantine import quarantine_wal  # only a damaged store needs it

        moved = quarantine_wal(path)
        opening.stale = True
        opening.alerts.append(
            StoreAlert(
                AlertKind.WAL_QUARANTINED,
                f"the database's write-ahead log is not a WAL (bad header); moved to "
                f"{moved.name}; commits that were only in it are lost",
            )
        )
    elif sound and (scan := check_wal(wal)) is not None and scan.damaged:
        # A damaged frame in the middle: SQLite's recovery stops there and silently drops
        # every later commit (events that may have left, the counter that numbered them).
        # Keep the WAL, salvage its readable rows, let SQLite recover the valid prefix.
        from agent.store.quarantine import put_back_prefix, quarantine_wal

        found = salvage(path, wal)
        moved = quarantine_wal(path)
        kept = put_back_prefix(moved, wal, scan.valid_bytes)
        opening.wal_damage = WalDamage(scan, moved, found, kept)
    if not existed and (wal.exists() or path.with_name(path.name + "-shm").exists()):
        # The database file is gone or empty but its WAL is not: never let SQLite replay
        # an orphan WAL onto a new file. Move it aside and read what rows it holds.
        from agent.store.quarantine import quarantine

        moved = quarantine(path)
        opening.orphan = salvage(None, moved.with_name(moved.name + "-wal"))
    try:
        db = dbmod.open_database(path, file.cfg)
    except (sqlite3.DatabaseError, dbmod.CorruptDatabaseError) as err:
        if not isinstance(err, dbmod.CorruptDatabaseError) and dbmod.sqlite_code(err) not in (
            dbmod.SQLITE_CORRUPT,
            dbmod.SQLITE_NOTADB,
        ):
            raise
        from agent.store.quarantine import quarantine, salvage_next_seq, salvage_state

        moved = quarantine(path)
        opening.corrupt = (str(err), moved)
        opening.salvage = salvage(moved, moved.with_name(moved.name + "-wal"))
        opening.sql_counter = salvage_next_seq(moved)
        opening.state = salvage_state(moved)
        db = dbmod.open_database(path, file.cfg)
    file.adopt(db)
    opening.existed = present
    return opening


def settle_epoch(
    file: DatabaseFile, o: Opening, seqfile: SeqFile, block: int, now_us: int
) -> Settled:
    """Decide the epoch and where the sequence continues; make it durable before use."""
    db = file.db
    assert db is not None
    remembered = o.remembered
    next_seq = db.outbox.next_seq()
    db_epoch = db.epoch()
    epoch = db_epoch
    jump_to = next_seq
    recovery = False
    rescued = o.salvage or o.orphan
    rows: list[SalvagedRow] = sorted(
        (rescued.rows.values() if rescued is not None else ()), key=lambda r: r.seq
    )
    # Whether the baseline (and door session) are what the agent last committed: not when
    # the database opens as of an earlier commit, was lost, or was replaced from damage.
    proven = not o.stale
    if o.wal_damage is not None:
        recovery = True
        proven = False
        found = o.wal_damage.found
        jump_to = max(next_seq, *_counters(found, None, remembered))
        # Rows the recovered prefix knew (below its counter) and lacks were acknowledged.
        rows = sorted((r for r in found.rows.values() if r.seq >= next_seq), key=lambda r: r.seq)
        o.alerts.append(_wal_damage_alert(o.wal_damage, jump_to, rows))
    elif o.corrupt is not None:
        recovery = True
        proven = _baseline_current(o.state, o.salvage, remembered)
        jump_to = max(next_seq, *_counters(o.salvage, o.sql_counter, remembered))
        o.alerts.append(_corrupt_alert(o.corrupt, jump_to, o.salvage, o.state, proven))
    elif db.found_version == 0:
        if remembered is not None or o.sidecar_problem or o.orphan is not None:
            recovery = True
            proven = False
            jump_to = max(next_seq, *_counters(o.orphan, None, remembered))
            if remembered is None and o.sidecar_problem:
                jump_to = max(jump_to, next_seq + block)
            o.alerts.append(_lost_alert(o.existed, jump_to, o.orphan))
    elif o.sidecar_problem:
        recovery = True
        jump_to = next_seq + block
        o.alerts.append(
            StoreAlert(
                AlertKind.SEQ_STATE_LOST,
                f"the sequence file is unreadable ({o.sidecar_problem}); the sequence "
                f"continues at {jump_to}",
            )
        )
    elif remembered is None:
        if db_epoch is not None:
            logger.warning("sequence file %s was missing; recreated", seqfile.path)
    elif db_epoch != remembered.epoch:
        recovery = True
        proven = False
        jump_to = max(next_seq, remembered.reserved + 1)
        o.alerts.append(
            StoreAlert(
                AlertKind.SEQ_ROLLBACK,
                "the database is not the one the sequence file remembers (another epoch: "
                f"a restored copy?); the sequence continues at {jump_to}",
            )
        )
    elif next_seq - 1 < remembered.sent_floor:
        recovery = True
        proven = False
        jump_to = remembered.reserved + 1
        o.alerts.append(
            StoreAlert(
                AlertKind.SEQ_ROLLBACK,
                f"the database's sequence counter went back to {next_seq - 1}, below "
                f"{remembered.sent_floor} that may have been sent (a restored backup or "
                f"lost writes); the sequence continues at {jump_to}",
            )
        )
    if recovery or epoch is None:
        epoch = new_epoch()
    state = SeqState(epoch, jump_to - 1, jump_to - 1)
    if recovery:
        # The sidecar first: if we die before the database commit below, the next start
        # sees another epoch there and moves on again, never back.
        seqfile.write(state)
        logger.error("state store: new epoch %s, sequence continues at %d", epoch.hex(), jump_to)
    restore = o.state if o.corrupt is not None else None
    if epoch != db_epoch or jump_to != next_seq or rows or restore is not None:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            if restore is not None:
                # Time floor, documents and their version floors, baseline: what the old
                # file still tells, in the same commit as the new epoch.
                db.restore_state(restore)
            if epoch != db_epoch:
                db.set_epoch(epoch, now_us)
            if jump_to != next_seq:
                db.outbox.set_next_seq(jump_to)
            if rows:
                db.outbox.insert_salvaged(rows)
            db.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
            raise
    file.sync_all(db)
    if not recovery and remembered is None:
        try:
            seqfile.write(state)
        except OSError as err:
            # Not fatal: until it can be written, delivery holds back every row above
            # ``reserved`` (deliverable() retries the write), so nothing leaves unrecorded.
            logger.error("cannot write the sequence file %s: %s", seqfile.path, err)
    return Settled(epoch, state if recovery or remembered is None else remembered, proven)


def _header_sound(path: Path) -> bool:
    try:
        dbmod.check_header(path)
    except dbmod.CorruptDatabaseError:
        return False  # the whole set goes to quarantine, WAL included
    return True


def _counters(found: Salvage | None, sql_counter: int | None, seq: SeqState | None) -> list[int]:
    """Every lower bound known for the next seq of a database being replaced."""
    out = [1]
    if found is not None:
        out.append(found.max_seq + 1)
        if found.next_seq is not None:
            out.append(found.next_seq)
    if sql_counter is not None:
        out.append(sql_counter)
    if seq is not None:
        out.append(seq.reserved + 1)
    return out


def _wal_damage_alert(damage: WalDamage, jump_to: int, rows: list[SalvagedRow]) -> StoreAlert:
    scan = damage.scan
    kept = (
        f"the database keeps the {scan.commits} commit(s) before the damage"
        if damage.kept
        else "the database opens as of its last checkpoint (no room to keep the commits before "
        "the damage)"
    )
    if rows:
        live = sum(1 for r in rows if not r.dead)
        saved = (
            f"salvaged {live} undelivered event(s) written after it, seqs "
            f"{rows[0].seq}..{rows[-1].seq}, which will be delivered"
        )
    else:
        saved = "no event written after it could be salvaged"
    return StoreAlert(
        AlertKind.WAL_QUARANTINED,
        f"write-ahead log damaged at frame {scan.bad_frame} of {scan.total_frames} "
        f"({scan.later_commits} later commits SQLite would drop silently): {saved}; new epoch, "
        f"sequence continues at {jump_to}; {kept}; moved to {damage.moved.name}",
        seqs=tuple(r.seq for r in rows)[:1000],
    )


def _rescued(found: Salvage | None) -> str:
    if found is None or not found.rows:
        return "no undelivered event could be salvaged"
    live = sum(1 for r in found.rows.values() if not r.dead)
    if found.freelist_known:
        text = (
            f"salvaged {live} undelivered event(s), seqs {min(found.rows)}..{found.max_seq}, "
            "which will be delivered"
        )
        missing = found.missing_within()
        if missing:
            text += f"; {missing} seq(s) in that range could not be read"
        return text
    # Page 1 unreadable: which pages were free is unknown, so rows already delivered (their
    # pages freed, not yet reused) come back with the undelivered ones, and a seq not found
    # may as well have been delivered long ago. Say so rather than count losses.
    return (
        f"salvaged {live} event(s), seqs {min(found.rows)}..{found.max_seq}, which will be "
        "(re)delivered: the free-page list was unreadable, so some may have been delivered "
        "before (the backend drops those duplicates by event id) and seqs not found in that "
        "range may be delivered ones rather than lost"
    )


def _baseline_current(
    state: SalvagedState | None, found: Salvage | None, remembered: SeqState | None
) -> bool:
    """Is the baseline read from a quarantined file the one last committed? Each door cycle
    commits its baseline with its events: it is, when the snapshot it came from numbers every
    seq there is evidence of (rows found on its pages, the sidecar's floor of what was handed
    out) and is of the epoch the sidecar remembers."""
    if state is None or state.baseline is None or state.next_seq is None or remembered is None:
        return False
    if state.epoch != remembered.epoch:
        return False
    highest = max(remembered.sent_floor, found.max_seq if found is not None else 0)
    return state.next_seq - 1 >= highest


def _corrupt_alert(
    corrupt: tuple[str, Path],
    jump_to: int,
    found: Salvage | None,
    state: SalvagedState | None,
    proven: bool,
) -> StoreAlert:
    reason, moved = corrupt
    if state is None or (state.baseline is None and not state.kv):
        kept = "baseline and state unreadable"
    else:
        kept = f"{len(state.kv)} state entries (documents, floors) and " + (
            "no baseline recovered"
            if state.baseline is None
            else f"the baseline ({len(state.baseline)} tags, "
            + ("current" if proven else "maybe stale")
            + ") recovered"
        )
    return StoreAlert(
        AlertKind.CORRUPT_QUARANTINED,
        f"corrupt database ({reason}) moved to {moved.name}; started a fresh one; "
        + (
            f"sequence continues at {jump_to}"
            if jump_to > 1
            else "sequence counter could not be recovered and restarts at 1"
        )
        + f"; {_rescued(found)}; {kept}",
        seqs=tuple(sorted(found.rows))[:1000] if found is not None else (),
    )


def _lost_alert(existed: bool, jump_to: int, found: Salvage | None) -> StoreAlert:
    state = "empty" if existed else "missing"
    return StoreAlert(
        AlertKind.DATABASE_LOST,
        f"the state database that existed is {state}: started a new one (allow-list, asset "
        f"registry, baseline and audit chain come back only when re-sent); the sequence "
        f"continues at {jump_to}"
        + ("" if found is None else f"; from its orphan write-ahead log: {_rescued(found)}"),
        seqs=tuple(sorted(found.rows))[:1000] if found is not None else (),
    )
