"""The kernel's word that the wall clock was set, so that nothing polls for it.

A ``timerfd`` on ``CLOCK_REALTIME`` armed with ``TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET``
is cancelled whenever the clock is set (``settimeofday``, ``clock_settime``, an NTP step through
``adjtimex``, and a resume from suspend, which the kernel treats as one): its ``read()`` then
fails with ``ECANCELED``. The event loop watches the fd (``add_reader``), so an idle agent does
not wake for the clock at all. Python 3.11 has no ``os.timerfd_*``: the three libc calls go
through ctypes. Where they are missing (not Linux, a seccomp filter, a libc without them)
``ClockSetSignal.open()`` says why and the caller polls instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Any, Final

logger = logging.getLogger(__name__)

_CLOCK_REALTIME: Final = 0
_TFD_NONBLOCK: Final = os.O_NONBLOCK
_TFD_CLOEXEC: Final = os.O_CLOEXEC
_TFD_TIMER_ABSTIME: Final = 1
_TFD_TIMER_CANCEL_ON_SET: Final = 2
# Armed this far ahead it never expires by itself; the largest a 32-bit time_t holds (2038), so
# one mark serves every board. A clock set past it expires the timer instead: see consume().
_FAR_SEC: Final = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class ClockSetError(OSError):
    """The kernel cannot tell this process when the wall clock is set (the reason says why)."""


class ClockSetSignal:
    """A non-blocking fd that becomes readable when the wall clock is set."""

    def __init__(self, libc: Any, fd: int) -> None:
        self._libc = libc
        self._fd = fd

    @classmethod
    def open(cls) -> ClockSetSignal:
        """Create and arm the timer; raises ClockSetError where the kernel or libc cannot."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            create, settime = libc.timerfd_create, libc.timerfd_settime
        except (OSError, AttributeError) as err:
            raise ClockSetError(f"no timerfd in the C library: {err}") from err
        create.argtypes = [ctypes.c_int, ctypes.c_int]
        create.restype = ctypes.c_int
        settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        ]
        settime.restype = ctypes.c_int
        fd = create(_CLOCK_REALTIME, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise ClockSetError(code, f"timerfd_create: {os.strerror(code)}")
        signal = cls(libc, fd)
        try:
            signal.arm()
        except ClockSetError:
            os.close(fd)
            raise
        return signal

    def fileno(self) -> int:
        return self._fd

    def arm(self) -> None:
        """(Re-)arm: needed after each cancellation, before the clock is read again."""
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(_FAR_SEC, 0))
        flags = _TFD_TIMER_ABSTIME | _TFD_TIMER_CANCEL_ON_SET
        if self._libc.timerfd_settime(self._fd, flags, ctypes.byref(spec), None) != 0:
            code = ctypes.get_errno()
            raise ClockSetError(code, f"timerfd_settime: {os.strerror(code)}")

    def consume(self) -> bool:
        """Read the fd when it is readable: True when the clock was set (re-armed already).

        Raises ClockSetError when the timer expired instead: the clock was set past the
        far-off mark, which a 32-bit ``time_t`` cannot exceed; the caller polls from then on.
        """
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno != errno.ECANCELED:
                raise ClockSetError(err.errno, f"timerfd read: {err.strerror}") from err
            self.arm()
            return True
        raise ClockSetError("the wall clock was set past 2038: timerfd can no longer watch it")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
