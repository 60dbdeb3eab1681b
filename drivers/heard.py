"""When a reader may be called "heard at T": every byte it sent before T has been delivered.

The engine's liveness barrier ends a scan pass only once every reader was heard from after the
pass met its end conditions, and takes "heard at T" to mean "every read received before T is
delivered" (docs/domain.md, "Scan pass"). A read of the stream is a *mark* when it took all the
stream held at that moment: it was short (the stream's buffer emptied) and the kernel held
nothing more for the socket. A mark's time becomes the reader's stamp once every byte up to the
mark's end has gone out as complete frames, so a frame split across reads (a TCP segment ending
mid-frame, which on a real network is most reads of a busy report stream; a serial line read
as its bytes arrive) only delays the stamp by that frame instead of withholding it for as long
as reads keep ending mid-frame. Used by the LLRP and the Mercury drivers.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections import deque
from typing import Final, Protocol

# Marks waiting for their frame to complete. A frame trickling in one byte per read would add
# a mark per byte; beyond this many the newest mark is replaced by the next one, which can only
# stamp later than it could have, never earlier than it may.
MAX_MARKS: Final = 64


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def kernel_pending(sock: HasFileno | None) -> int:
    """Bytes the kernel holds for the socket, not yet read by the transport (1 if unknown)."""
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 1  # cannot tell: not a mark (the stamp waits for a read that can)
    return int(struct.unpack("i", raw)[0])


class HeardMarks:
    """The stream position of each read that took everything, and when it was taken."""

    def __init__(self) -> None:
        self._read = 0  # bytes read from the stream so far
        self._marks: deque[tuple[int, float]] = deque()

    def read(self, size: int, at: float, *, took_all: bool) -> None:
        """``size`` bytes were read at ``at``; ``took_all``: nothing else had arrived."""
        self._read += size
        if not took_all:
            return
        if len(self._marks) >= MAX_MARKS:
            self._marks[-1] = (self._read, at)
        else:
            self._marks.append((self._read, at))

    def delivered(self, unframed: int) -> float | None:
        """Every byte read but ``unframed`` went out as frames: the latest mark now covered."""
        done = self._read - unframed
        stamp: float | None = None
        while self._marks and self._marks[0][0] <= done:
            stamp = self._marks.popleft()[1]
        return stamp
