"""Read undelivered outbox rows out of a damaged database, page by page, without SQLite.

SQLite refuses a file whose header or first page is damaged, and stops a query at the first bad
page. The rows themselves usually survive on other pages, so salvage reads the file the way
SQLite lays it out (https://www.sqlite.org/fileformat2.html) and keeps going past damage:

1. the page images: the database file, overlaid with the frames of its ``-wal`` that a
   recovery would apply (valid salts and checksum chain, up to the last commit frame);
2. the free pages (from the header's freelist, when page 1 is readable), which are skipped:
   they may still hold rows deleted long ago;
3. every table-leaf b-tree page: each cell decoded (overflow chains followed) as a record.

A record is taken as an outbox row only if it has the outbox's exact shape *and* its envelope's
public header (``agent.privacy.envelope.parse_header``) names the same seq and event id: a
damaged page cannot produce a row that was never sealed. ``meta('next_seq')`` is read too.
Read-only: the damaged files are never written.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.privacy.envelope import EnvelopeError, parse_header

logger = logging.getLogger(__name__)

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_WAL_HEADER: Final = 32
_WAL_FRAME_HEADER: Final = 24
_WAL_VERSION: Final = 3007000
_LEAF_TABLE: Final = 0x0D
_DEFAULT_PAGE_SIZE: Final = 4096
_MIN_USABLE: Final = 480  # SQLite's own lower bound for page size minus reserved bytes
_OUTBOX_COLUMNS: Final = 10  # seq (rowid alias, NULL), event_id .. dead (schema.py)


@dataclass(frozen=True, slots=True)
class SalvagedRow:
    """One outbox row as it was stored (the envelope checked against seq and event id)."""

    seq: int
    event_id: uuid.UUID
    priority: int
    kind: str
    created_us: int
    envelope: bytes
    attempts: int
    dead: bool


@dataclass
class Salvage:
    """What could be read."""

    rows: dict[int, SalvagedRow] = field(default_factory=dict)
    next_seq: int | None = None  # meta('next_seq'), if a copy of it was readable
    pages: int = 0
    wal_frames: int = 0
    freelist_known: bool = False

    @property
    def max_seq(self) -> int:
        return max(self.rows, default=0)

    def missing_within(self) -> int:
        """Seqs between the lowest and highest salvaged row that were not found."""
        if not self.rows:
            return 0
        return self.max_seq - min(self.rows) + 1 - len(self.rows)


def wal_header_valid(wal: Path) -> bool | None:
    """None: no WAL content; True: a WAL header SQLite would accept; False: garbage."""
    try:
        with wal.open("rb") as f:
            head = f.read(_WAL_HEADER)
    except FileNotFoundError:
        return None
    if not head:
        return None
    return _parse_wal_header(head) is not None


def salvage(db: Path | None, wal: Path | None) -> Salvage:
    """Every readable outbox row of a database file and/or its WAL (either may be missing).

    WAL frames count up to the last commit SQLite would recover and, past a damaged frame,
    every later transaction whose frames still verify (their rows are real committed rows)."""
    out = Salvage()
    db_fd = _open(db)
    wal_fd = _open(wal)
    try:
        header = _pread(db_fd, 0, 100) if db_fd is not None else b""
        db_header_ok = len(header) == 100 and header.startswith(_SQLITE_MAGIC)
        wal_info = _wal_header(wal_fd)
        page_size = _page_size(header if db_header_ok else b"", wal_info)
        frames, wal_pages = _wal_frames(wal_fd, wal_info, page_size, past_damage=True)
        out.wal_frames = len(frames)

        def page(pno: int) -> bytes | None:
            off = frames.get(pno)
            if off is not None and wal_fd is not None:
                data = _pread(wal_fd, off, page_size)
            elif db_fd is not None:
                data = _pread(db_fd, (pno - 1) * page_size, page_size)
            else:
                return None
            return data if len(data) == page_size else None

        first = page(1)
        reserved = 0
        free: set[int] = set()
        db_pages = (os.fstat(db_fd).st_size // page_size) if db_fd is not None else 0
        n_pages = max(db_pages, wal_pages, max(frames, default=0))
        if first is not None and first.startswith(_SQLITE_MAGIC):
            reserved = first[20] if page_size - first[20] >= _MIN_USABLE else 0
            free = _freelist(first, page, n_pages)
            out.freelist_known = True
        usable = page_size - reserved
        out.pages = n_pages
        for pno in range(1, n_pages + 1):
            if pno in free:
                continue
            data = page(pno)
            if data is None:
                continue
            for rowid, payload in _table_leaf_cells(data, 100 if pno == 1 else 0, usable, page):
                values = _record(payload)
                if values is None:
                    continue
                _take(out, rowid, values)
    finally:
        for fd in (db_fd, wal_fd):
            if fd is not None:
                os.close(fd)
    return out


# -- rows ------------------------------------------------------------------------------------


def _take(out: Salvage, rowid: int, values: list[object]) -> None:
    if len(values) == 2 and values[0] == "next_seq" and isinstance(values[1], int):
        if 1 <= values[1] < 2**62:
            out.next_seq = max(out.next_seq or 0, values[1])
        return
    row = _outbox_row(rowid, values)
    if row is not None:
        out.rows.setdefault(row.seq, row)


def _outbox_row(rowid: int, v: list[object]) -> SalvagedRow | None:
    if len(v) != _OUTBOX_COLUMNS or v[0] is not None or rowid < 1:
        return None
    eid, prio, kind, created, size, env, attempts, last_error, dead = v[1:]
    if not (
        isinstance(eid, bytes)
        and len(eid) == 16
        and isinstance(prio, int)
        and 0 <= prio <= 9
        and isinstance(kind, str)
        and 1 <= len(kind) <= 64
        and isinstance(created, int)
        and isinstance(env, bytes)
        and size == len(env)
        and isinstance(attempts, int)
        and attempts >= 0
        and (last_error is None or isinstance(last_error, str))
        and dead in (0, 1)
    ):
        return None
    try:
        header = parse_header(env)
    except EnvelopeError:
        return None
    if header.seq != rowid or header.event_id.bytes != eid:
        return None
    return SalvagedRow(rowid, header.event_id, prio, kind, created, env, attempts, dead == 1)


# -- pages -----------------------------------------------------------------------------------


def _open(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _pread(fd: int, offset: int, n: int) -> bytes:
    try:
        return os.pread(fd, n, offset)
    except OSError as err:  # a bad sector must not stop the salvage of the rest
        logger.warning("salvage: read of %d bytes at %d failed: %s", n, offset, err)
        return b""


def _page_size(db_header: bytes, wal_info: tuple[str, int, bytes, tuple[int, int]] | None) -> int:
    if db_header:
        raw = struct.unpack_from(">H", db_header, 16)[0]
        size = 65536 if raw == 1 else raw
        if _valid_page_size(size):
            return size
    if wal_info is not None:
        return wal_info[1]
    return _DEFAULT_PAGE_SIZE


def _valid_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def _freelist(first: bytes, page: Callable[[int], bytes | None], n_pages: int) -> set[int]:
    free: set[int] = set()
    trunk = struct.unpack_from(">I", first, 32)[0]
    seen: set[int] = set()
    while 0 < trunk <= n_pages and trunk not in seen:
        seen.add(trunk)
        free.add(trunk)
        data = page(trunk)
        if data is None:
            break
        nxt, count = struct.unpack_from(">II", data, 0)
        count = min(count, (len(data) - 8) // 4)
        free.update(p for p in struct.unpack_from(f">{count}I", data, 8) if 0 < p <= n_pages)
        trunk = nxt
    return free


def _table_leaf_cells(
    data: bytes, hdr: int, usable: int, page: Callable[[int], bytes | None]
) -> Iterator[tuple[int, bytes]]:
    if len(data) < hdr + 8 or data[hdr] != _LEAF_TABLE:
        return
    ncells = struct.unpack_from(">H", data, hdr + 3)[0]
    array_end = hdr + 8 + 2 * ncells
    if array_end > usable:
        return
    for i in range(ncells):
        ptr = struct.unpack_from(">H", data, hdr + 8 + 2 * i)[0]
        if not array_end <= ptr < usable:
            continue
        try:
            size, n = _varint(data, ptr)
            rowid, m = _varint(data, ptr + n)
        except IndexError:
            continue
        if rowid >= 1 << 63:
            rowid -= 1 << 64
        payload = _payload(data, ptr + n + m, size, usable, page)
        if payload is not None:
            yield rowid, payload


def _payload(
    data: bytes, pos: int, size: int, usable: int, page: Callable[[int], bytes | None]
) -> bytes | None:
    max_local = usable - 35
    if size <= max_local:
        chunk = data[pos : pos + size]
        return chunk if len(chunk) == size and pos + size <= usable else None
    min_local = ((usable - 12) * 32 // 255) - 23
    local = min_local + ((size - min_local) % (usable - 4))
    if local > max_local:
        local = min_local
    if pos + local + 4 > usable:
        return None
    parts = [data[pos : pos + local]]
    have = local
    nxt = struct.unpack_from(">I", data, pos + local)[0]
    hops = 0
    while have < size:
        hops += 1
        if nxt == 0 or hops > size // (usable - 4) + 2:
            return None
        over = page(nxt)
        if over is None:
            return None
        nxt = struct.unpack_from(">I", over, 0)[0]
        piece = over[4:usable][: size - have]
        parts.append(piece)
        have += len(piece)
    return b"".join(parts)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + 1
    return (value << 8) | data[pos + 8], 9


_INT_SIZES: Final = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _record(payload: bytes) -> list[object] | None:
    try:
        header_size, pos = _varint(payload, 0)
        if not pos <= header_size <= len(payload):
            return None
        types = []
        while pos < header_size:
            t, n = _varint(payload, pos)
            pos += n
            types.append(t)
        if pos != header_size:
            return None
    except IndexError:
        return None
    values: list[object] = []
    pos = header_size
    for t in types:
        if t == 0:
            values.append(None)
        elif t in _INT_SIZES:
            n = _INT_SIZES[t]
            raw = payload[pos : pos + n]
            if len(raw) != n:
                return None
            values.append(int.from_bytes(raw, "big", signed=True))
            pos += n
        elif t == 7:
            raw = payload[pos : pos + 8]
            if len(raw) != 8:
                return None
            values.append(struct.unpack(">d", raw)[0])
            pos += 8
        elif t in (8, 9):
            values.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = payload[pos : pos + n]
            if len(raw) != n:
                return None
            pos += n
            if t % 2 == 0:
                values.append(bytes(raw))
            else:
                try:
                    values.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    return None
        else:
            return None
    return values


# -- WAL -------------------------------------------------------------------------------------


def _parse_wal_header(head: bytes) -> tuple[str, int, bytes, tuple[int, int]] | None:
    """(checksum byte order, page size, salts, header checksum) of a valid WAL header."""
    if len(head) < _WAL_HEADER:
        return None
    magic, version, page_size = struct.unpack_from(">III", head, 0)
    if magic not in (0x377F0682, 0x377F0683) or version != _WAL_VERSION:
        return None
    if not _valid_page_size(page_size):
        return None
    order = ">" if magic & 1 else "<"
    stored = struct.unpack_from(">II", head, 24)
    if _checksum(order, head[:24], (0, 0)) != stored:
        return None
    return order, page_size, head[16:24], stored


def _wal_header(fd: int | None) -> tuple[str, int, bytes, tuple[int, int]] | None:
    return None if fd is None else _parse_wal_header(_pread(fd, 0, _WAL_HEADER))


@dataclass
class WalScan:
    """What a WAL holds, frame by frame, as SQLite's recovery would read it -- and beyond."""

    frames: int = 0  # frames of the valid chain (salts and checksums), the last commit included
    valid_bytes: int = _WAL_HEADER  # the header and every frame up to the chain's last commit
    commits: int = 0  # commits in the valid chain
    bad_frame: int | None = None  # the first frame (0-based) that breaks the chain
    later_commits: int = 0  # commits after the one the bad frame cut short: SQLite drops them
    total_frames: int = 0  # whole frames in the file, whatever they hold

    @property
    def damaged(self) -> bool:
        """Mid-file damage: commits of this WAL follow the frame that breaks the chain. (A torn
        tail -- the last transaction cut short -- breaks the chain with at most its own commit
        frame after the break: normal after a crash, nothing committed is lost.)"""
        return self.later_commits > 0


def check_wal(wal: Path) -> WalScan | None:
    """Scan a WAL the way recovery would, and past the first bad frame (None: no valid WAL)."""
    fd = _open(wal)
    if fd is None:
        return None
    try:
        info = _wal_header(fd)
        if info is None:
            return None
        _, scan = _scan_wal(fd, info, info[1], past_damage=False)
        return scan
    finally:
        os.close(fd)


def _wal_frames(
    fd: int | None,
    info: tuple[str, int, bytes, tuple[int, int]] | None,
    page_size: int,
    *,
    past_damage: bool = False,
) -> tuple[dict[int, int], int]:
    """{page number: offset of its newest committed image}, and the db size in pages."""
    if fd is None or info is None or info[1] != page_size:
        return {}, 0
    (frames, pages), _ = _scan_wal(fd, info, page_size, past_damage=past_damage)
    return frames, pages


def _scan_wal(
    fd: int,
    info: tuple[str, int, bytes, tuple[int, int]],
    page_size: int,
    *,
    past_damage: bool,
) -> tuple[tuple[dict[int, int], int], WalScan]:
    """Walk every frame. The valid chain (salts, cumulative checksums) is what SQLite
    recovers, up to its last commit. Past the first bad frame SQLite stops; so does this scan
    for salvage unless ``past_damage``: then each later transaction whose frames all verify
    against their predecessor's stored checksum counts too (their pages are real committed
    images). Commit frames of this WAL (its salts) after the transaction the bad frame cut
    short are counted as ``later_commits`` either way (headers only)."""
    order, _, salts, cksum = info
    scan = WalScan()
    committed: dict[int, int] = {}
    pending: dict[int, int] = {}
    db_pages = 0
    offset = _WAL_HEADER
    frame_len = _WAL_FRAME_HEADER + page_size
    broken = False
    cut_ended = False  # past the break: the transaction it cut short has ended
    local_ok = False  # past the break: every frame of the current transaction verified
    prev: tuple[int, int] = cksum  # past the break: the previous frame's stored checksum
    try:
        size = os.fstat(fd).st_size
    except OSError:
        size = 0
    while offset + frame_len <= size:
        # Past the break only the headers matter, unless the pages are salvaged too.
        need = frame_len if (not broken or past_damage) else _WAL_FRAME_HEADER
        frame = _pread(fd, offset, need)
        if len(frame) != need:
            break
        scan.total_frames += 1
        pno, size_after = struct.unpack_from(">II", frame, 0)
        stored: tuple[int, int] = struct.unpack_from(">II", frame, 16)
        salt_ok = frame[8:16] == salts
        if not broken:
            c = _checksum(order, frame[:8], cksum)
            c = _checksum(order, frame[_WAL_FRAME_HEADER:], c)
            if salt_ok and c == stored:
                cksum = c
                pending[pno] = offset + _WAL_FRAME_HEADER
                scan.frames += 1
                if size_after:
                    committed.update(pending)
                    pending.clear()
                    db_pages = size_after
                    scan.commits += 1
                    scan.valid_bytes = offset + frame_len
                offset += frame_len
                continue
            broken = True
            scan.bad_frame = scan.total_frames - 1
            pending.clear()
            cut_ended = salt_ok and size_after != 0  # the bad frame was that commit itself
            local_ok = cut_ended  # a transaction starts right after it
            prev = stored
            offset += frame_len
            continue
        if not salt_ok:
            local_ok = False  # garbage or a stale frame: this transaction cannot be trusted
        elif past_damage:
            c = _checksum(order, frame[:8], prev)
            c = _checksum(order, frame[_WAL_FRAME_HEADER:], c)
            if c == stored and local_ok:
                pending[pno] = offset + _WAL_FRAME_HEADER
            else:
                local_ok = False
        if salt_ok and size_after:
            if cut_ended:
                scan.later_commits += 1
                if past_damage and local_ok:
                    committed.update(pending)
                    db_pages = max(db_pages, size_after)
            cut_ended = True
            pending.clear()
            local_ok = True  # the next transaction starts afresh
        prev = stored
        offset += frame_len
    return (committed, db_pages), scan


def _checksum(order: str, data: bytes, start: tuple[int, int]) -> tuple[int, int]:
    s1, s2 = start
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2
