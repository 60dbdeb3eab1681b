"""The sequence sidecar: what a consumer may already have seen, kept beside the database.

``<db>.seq`` outlives the database file: it remembers the database's *epoch* (a random id of
its incarnation), a floor the database's sequence counter must have reached (``sent_floor``)
and the highest seq that may have left the cabinet (``reserved``). The store rewrites it before
it hands out a row above ``reserved``, one small write per ``seq_reserve_block`` events. At open,
a database that is missing, empty, of another epoch or behind ``sent_floor`` is detected, and the
sequence continues above ``reserved`` under a new epoch: a seq is never silently reused.

Layout (docs/store.md): two 512-byte slots, each ``magic | generation | epoch | sent_floor |
reserved | crc32``; a write goes to the slot of the older generation and is fdatasync'ed, so a
torn write leaves the other slot valid, and an overwrite needs no new disk blocks (it works on
a full disk, when the store needs it most).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.store.types import StoreError

EPOCH_LEN: Final = 8
SLOT: Final = 512
_MAGIC: Final = b"CABSEQ\x00\x01"
_BODY: Final = struct.Struct(">8sQ8sQQ")  # magic, generation, epoch, sent_floor, reserved
_CRC: Final = struct.Struct(">I")
_U63: Final = (1 << 63) - 1


class SeqFileError(StoreError):
    """The sidecar exists but no slot of it can be read."""


@dataclass(frozen=True, slots=True)
class SeqState:
    """What the sidecar remembers."""

    epoch: bytes
    sent_floor: int  # the database's last committed seq must be at least this
    reserved: int  # every seq that may have left the cabinet is <= this

    def __post_init__(self) -> None:
        if len(self.epoch) != EPOCH_LEN:
            raise ValueError(f"epoch must be {EPOCH_LEN} bytes")
        if not 0 <= self.sent_floor <= self.reserved <= _U63:
            raise ValueError("need 0 <= sent_floor <= reserved < 2**63")


def new_epoch() -> bytes:
    return secrets.token_bytes(EPOCH_LEN)


def seq_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".seq")


def fsync_dir(directory: Path) -> None:
    """Make renames, creations and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SeqFile:
    """The sidecar of one database; only the store's worker thread uses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._generation = 0

    def read(self) -> SeqState | None:
        """The newest valid slot; None if there is no file; SeqFileError if none is valid."""
        try:
            with self.path.open("rb") as f:
                data = f.read(2 * SLOT + 1)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SeqFileError(f"{self.path.name}: {err.strerror or err}") from None
        best: tuple[int, SeqState] | None = None
        for i in range(2):
            parsed = _parse(data[i * SLOT : (i + 1) * SLOT])
            if parsed is not None and (best is None or parsed[0] > best[0]):
                best = parsed
        if best is None:
            raise SeqFileError(f"{self.path.name}: no readable record ({len(data)} bytes)")
        self._generation = best[0]
        return best[1]

    def create(self, state: SeqState) -> None:
        """Write a new file atomically (temp, fsync, rename, fsync directory)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        self._generation += 1
        slot = _encode(self._generation, state)
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, slot + slot)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(self.path.parent)

    def write(self, state: SeqState) -> None:
        """Overwrite the older slot in place and make it durable (no new blocks needed)."""
        if not self.path.exists():
            self.create(state)
            return
        self._generation += 1
        slot = _encode(self._generation, state)
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, slot, (self._generation % 2) * SLOT) != SLOT:
                raise OSError("short write")
            os.fdatasync(fd)
        finally:
            os.close(fd)


def _encode(generation: int, state: SeqState) -> bytes:
    body = _BODY.pack(_MAGIC, generation, state.epoch, state.sent_floor, state.reserved)
    record = body + _CRC.pack(zlib.crc32(body))
    return record + bytes(SLOT - len(record))


def _parse(slot: bytes) -> tuple[int, SeqState] | None:
    if len(slot) != SLOT:
        return None
    body = slot[: _BODY.size]
    (crc,) = _CRC.unpack_from(slot, _BODY.size)
    if zlib.crc32(body) != crc:
        return None
    magic, generation, epoch, floor, reserved = _BODY.unpack(body)
    if magic != _MAGIC:
        return None
    try:
        return int(generation), SeqState(bytes(epoch), int(floor), int(reserved))
    except ValueError:
        return None
