"""Trusted time: the agent's own estimate of the time, and whether the wall clock agrees with it.

DESIGN §7b. Cabinet controllers often have no RTC: the wall clock reads 1970 until NTP steps
it, and a bad NTP server or GPS receiver may step it anywhere later. Nothing here trusts a
wall-clock *step*:

- The agent keeps an **estimate** ``E`` of the true time on the monotonic clock: an anchor
  time carried on by the monotonic time elapsed since. While the wall clock ``W`` agrees with
  ``E`` (within ``STEP_TOLERANCE_S``) it is *trusted* and ``E`` follows it, at most
  ``SLEW_PPM`` fast (NTP's slewing is followed; a run of small steps is not: it soon disagrees).
  A small step (up to ``SLEW_LIMIT_S``) is absorbed at that rate, untrusted until absorbed.
- A **step** — ``W`` moving away from ``E``, forward or backward, beyond the tolerance — is
  reported once (:class:`ClockStep`) and makes the wall clock *untrusted*: ``E`` runs on,
  events carry ``E`` with ``clock: "untrusted"``. Trust comes back when ``W`` agrees with ``E``
  again, or when a fresh signed document corroborates ``W`` (:meth:`TrustedTime.corroborate`:
  the backend signed it just now, by its own clock).
- At start, ``E`` comes from the persisted **floor** (the agent's proven time when last saved,
  and the newest verified ``issued_at`` minus the skew allowance). When the previous run saved
  it in this same boot, the monotonic clock still runs from then, so ``E`` continues exactly
  (basis ``clock``). After a reboot the downtime is unknown: the floor is only a lower bound
  (basis ``floor``). A wall clock at or after it is plausible but unproven: it is taken
  *provisionally* (basis ``provisional``): it stamps events, untrusted, while the proven time
  ``P`` (the floor carried on) judges validity windows and is what gets persisted; nothing
  destructive (age-based drop, audit pruning) runs on it. One behind the floor (no RTC: 1970)
  is not taken at all, and ``E`` runs on from the floor.
- A time is **proven** by time sync (``SyncSource``: the kernel's NTP state by default), a
  fresh signed document (``corroborate``), or agreeing with a proven ``E``. A synchronised
  wall clock is taken as proven whenever ``E`` is not, and when sync is just acquired; a step
  of a proven ``E`` is not excused by it.
- The floor is raised by ``E`` and by verified documents, never by an unproven reading, and
  never past ``LATEST_TIME``: no reading, document or stored record can overflow a datetime.

The package: ``estimate`` is the pure state machine (``TrustedTime``, fed ``(wall, mono)``
readings, and the rules' constants); ``sync`` the time sources; ``floor`` the persisted record;
``clock`` the ``TrustedClock`` that wraps a real :class:`~drivers.types.Clock` with the state
machine (thread-safe: the store's thread reads it too) and loads/saves the floor.
"""

from agent.trusted_time.clock import (
    PERSIST_EVERY_S,
    SYNC_POLL_S,
    UNREADABLE_WALL,
    TrustedClock,
)
from agent.trusted_time.estimate import (
    BOOT_JUMP_REPORT_S,
    BUILD_FLOOR,
    FIRST_SYNC_STEP_S,
    LATEST_TIME,
    SLEW_LIMIT_S,
    SLEW_PPM,
    STEP_TOLERANCE_S,
    Basis,
    ClockStep,
    ClockView,
    StepCause,
    TrustedTime,
    plus,
)
from agent.trusted_time.floor import (
    BOOT_ID_PATH,
    KV_KEY,
    FloorRecord,
    FloorStore,
    decode_floor,
    encode_floor,
    read_boot_id,
)
from agent.trusted_time.sync import (
    FileSync,
    KernelSync,
    NoSync,
    SyncSource,
    sync_source,
)

__all__ = [
    "BOOT_ID_PATH",
    "BOOT_JUMP_REPORT_S",
    "BUILD_FLOOR",
    "FIRST_SYNC_STEP_S",
    "KV_KEY",
    "LATEST_TIME",
    "PERSIST_EVERY_S",
    "SLEW_LIMIT_S",
    "SLEW_PPM",
    "STEP_TOLERANCE_S",
    "SYNC_POLL_S",
    "UNREADABLE_WALL",
    "Basis",
    "ClockStep",
    "ClockView",
    "FileSync",
    "FloorRecord",
    "FloorStore",
    "KernelSync",
    "NoSync",
    "StepCause",
    "SyncSource",
    "TrustedClock",
    "TrustedTime",
    "decode_floor",
    "encode_floor",
    "plus",
    "read_boot_id",
    "sync_source",
]
