"""Time sources (``[time] sync_source``): whether the wall clock is synchronised to a time
server, the proof that lets the agent take a wall clock it has no proof against."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path
from typing import Any, Final, Protocol

logger = logging.getLogger(__name__)

# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC mean unsynchronised.
_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x40


class SyncSource(Protocol):
    """Whether the wall clock is synchronised to a time server (``[time] sync_source``)."""

    name: str

    def synchronised(self) -> bool:
        """Never raises: unknown or unavailable reads as not synchronised."""
        ...


class NoSync:
    """``none``: no time source; only the consistency rules and signed documents prove time."""

    name = "none"

    def synchronised(self) -> bool:
        return False


class FileSync:
    """``file:<path>``: synchronised while the file exists (a site's own time daemon, tests)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def synchronised(self) -> bool:
        try:
            return self.path.is_file()
        except OSError:
            return False


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h): the fields up to ``tai``, then room for the reserved tail.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("reserved", ctypes.c_int * 16),
    ]


class KernelSync:
    """``kernel``: Linux ``adjtimex(2)`` read-only (modes 0, unprivileged). systemd-timesyncd,
    chrony and ntpd clear STA_UNSYNC once they have synchronised the clock."""

    name = "kernel"

    def __init__(self) -> None:
        self._adjtimex: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._adjtimex = libc.adjtimex
        except (OSError, AttributeError):
            logger.info("time sync: adjtimex is not available; the clock counts as unsynchronised")

    def synchronised(self) -> bool:
        if self._adjtimex is None:
            return False
        timex = _Timex()  # modes 0: read only
        try:
            state = self._adjtimex(ctypes.byref(timex))
        except OSError:
            return False
        return bool(0 <= state < _TIME_ERROR and not timex.status & _STA_UNSYNC)


def sync_source(spec: str) -> SyncSource:
    """The ``[time] sync_source`` setting: ``kernel``, ``none`` or ``file:<path>``."""
    if spec == "kernel":
        return KernelSync()
    if spec == "none":
        return NoSync()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileSync(Path(spec[len("file:") :]))
    raise ValueError(f"unknown time sync source {spec!r}")
