"""Fault switches of the LLRP simulator, armed for the current connection or the next one."""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from simulators.llrp.codec import HEADER, ConnectionAttemptStatus, epc_hex

if TYPE_CHECKING:
    from simulators.llrp.server import ReaderServer

Target = Literal["current", "next"]
GarbageKind = Literal["bad_version", "absurd_length", "random"]


@dataclass
class FaultState:
    """The faults one connection suffers."""

    silent: bool = False
    drop_mid_frame: bool = False
    garbage: GarbageKind | None = None
    trickle_s: float | None = None
    straddle: bool = False
    busy_status: int | None = None


def garbage_frame(kind: GarbageKind, rng: random.Random) -> bytes:
    """Bytes that no LLRP client should accept."""
    if kind == "bad_version":
        # Version 7 KEEPALIVE: well framed, but not LLRP 1.0.1.
        return HEADER.pack((7 << 10) | 62, 10, 1)
    if kind == "absurd_length":
        # A header announcing ~4 GiB.
        return HEADER.pack((1 << 10) | 61, 0xFFFFFFF0, 1) + bytes(16)
    return bytes(rng.getrandbits(8) for _ in range(64)) + struct.pack("!I", 0xDEADBEEF)


class Faults:
    """Fault switches. ``target="current"`` hits the connected client (or, if none, the next one);
    ``target="next"`` waits for the next accepted connection."""

    def __init__(self, server: ReaderServer) -> None:
        self._server = server
        self.pending = FaultState()
        self.flap_up_s: float | None = (
            None  # flap mode: every session ends this long after it began
        )
        # Slow start: while set and not released, a START/ENABLE_ROSPEC waits (unanswered).
        self.start_gate: asyncio.Event | None = None
        # Slow stop: while set and not released, a STOP/DISABLE_ROSPEC waits (unanswered).
        self.stop_gate: asyncio.Event | None = None

    def hold_starts(self) -> None:
        """A reader slow to start reading: every START_ROSPEC / ENABLE_ROSPEC is received (and
        counted) at once but acted on and answered only after ``release_starts()``; the rest
        of the reader (keepalives, events) goes on meanwhile."""
        self.start_gate = asyncio.Event()

    def release_starts(self) -> None:
        """Act on the held starts (and on later ones at once)."""
        gate, self.start_gate = self.start_gate, None
        if gate is not None:
            gate.set()

    def hold_stops(self) -> None:
        """A reader slow to stop reading: every STOP_ROSPEC / DISABLE_ROSPEC is received (and
        counted) at once but acted on and answered only after ``release_stops()``; the reader
        reads on meanwhile (keepalives, events and reports go on)."""
        self.stop_gate = asyncio.Event()

    def release_stops(self) -> None:
        """Act on the held stops (and on later ones at once)."""
        gate, self.stop_gate = self.stop_gate, None
        if gate is not None:
            gate.set()

    def hold_reports(self) -> None:
        """Reports lag the reader's events: every RO_ACCESS_REPORT (a ROSpec's end-of-spec one
        too) waits, in order, until ``release_reports()``, while GPI and other events go out at
        once (a door opened and closed within one report period)."""
        if self._server.reader.reports_held is None:
            self._server.reader.reports_held = []

    def holds_report_of(self, epc: str) -> bool:
        """A report held by ``hold_reports()`` carries this tag (EPC in hex)."""
        return any(
            epc_hex(t) == epc
            for report in self._server.reader.reports_held or ()
            for t in report["TagReportData"]
        )

    def release_reports(self) -> None:
        """Send the held reports, in order (and later ones at once)."""
        self._server.reader.release_reports()

    def _state(self, target: Target) -> FaultState:
        conn = self._server.current
        if target == "current" and conn is not None and not conn.closing:
            return conn.faults
        return self.pending

    def silence(self, *, target: Target = "current") -> None:
        """Stop sending anything (responses, reports, keepalives); keep the socket open."""
        self._state(target).silent = True

    def drop_mid_frame(self, *, target: Target = "current") -> None:
        """Send half of the next outgoing frame, then close the connection."""
        self._state(target).drop_mid_frame = True

    def garbage(self, kind: GarbageKind = "random", *, target: Target = "current") -> None:
        """Send one frame of garbage (bad version, absurd length or random bytes)."""
        state = self._state(target)
        state.garbage = kind
        if state is not self.pending:
            self._server.inject_garbage()

    def trickle(self, delay_s: float = 0.01, *, target: Target = "current") -> None:
        """Send every byte on its own, ``delay_s`` apart."""
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self._state(target).trickle_s = delay_s

    def straddle(self, on: bool = True, *, target: Target = "current") -> None:
        """Write every frame's first half together with the previous frame's second half, so
        that every write (and so every read of a prompt client) ends mid-frame — a busy report
        stream over a real network, where TCP segments do not follow LLRP frames. Off: the held
        half goes out with the next frame."""
        self._state(target).straddle = on

    def busy_next_connect(
        self,
        status: int = ConnectionAttemptStatus.Failed_Client_Initiated_Connection_Already_Exists,
    ) -> None:
        """Answer the next connection with a failed ConnectionAttemptEvent, then close it."""
        if status == ConnectionAttemptStatus.Success:
            raise ValueError("busy needs a failure status")
        self.pending.busy_status = int(status)

    def flap(self, up_s: float = 0.5) -> None:
        """Flap mode, until cleared: every session (the current one too) is closed by the reader
        ``up_s`` after it was established — long enough for a client to configure, never long
        enough to be stable. ``connections.established_at`` shows how fast the client returns."""
        if not 0 < up_s <= 3600:
            raise ValueError("up_s must be within (0, 3600]")
        self.flap_up_s = up_s
        conn = self._server.current
        if conn is not None and not conn.closing:
            self._server.spawn(self._server.flap(conn, up_s), f"llrp-sim-flap-{conn.conn_id}")

    def reboot(self, down_s: float = 1.0) -> None:
        """Close every connection, refuse connections for ``down_s``, forget ROSpecs and config."""
        self._server.start_reboot(down_s)

    def clear(self) -> None:
        """Disarm everything (pending, on the current connection, flap mode)."""
        self.pending = FaultState()
        self.flap_up_s = None
        self.release_starts()
        self.release_stops()
        self.release_reports()
        conn = self._server.current
        if conn is not None:
            conn.faults = FaultState()
