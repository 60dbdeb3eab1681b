"""systemd notification protocol (sd_notify) and a progress-gated watchdog.

Our own few lines rather than the PyPI ``sdnotify`` package: that one swallows every error and
ignores WATCHDOG_USEC / WATCHDOG_PID. Here errors are logged once per kind (never silent, never
fatal: a daemon must not die because systemd is not listening), and the watchdog is only fed while
every registered loop shows progress, so a wedged reader or publisher gets the service restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

_MAX_STATUS_CHARS = 200  # systemctl status shows one line; keep datagrams small


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; a no-op when not run by systemd."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
    ) -> None:
        self._address = _decode_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._logged_errors: set[str] = set()
        self.last_status: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (``os.environ`` by default).

        ``unset=True`` removes the variables from ``os.environ`` so child processes can't inherit
        them (they are for this process only).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                watchdog_usec = int(raw_usec)
            except ValueError:
                logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw_usec)
        raw_pid = env.get("WATCHDOG_PID")
        if watchdog_usec is not None and raw_pid:
            # The variables may have been inherited from a parent the watchdog really is for.
            try:
                meant_for_us = int(raw_pid) == os.getpid()
            except ValueError:
                meant_for_us = False
            if not meant_for_us:
                logger.info("watchdog is for pid %s, not this process: not sending it", raw_pid)
                watchdog_usec = None
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    def watchdog_timeout(self) -> float | None:
        """The watchdog timeout systemd enforces (seconds), or None when no watchdog is set."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        timeout = self.watchdog_timeout()
        return None if timeout is None else timeout / 2

    def ready(self, status: str | None = None) -> bool:
        """Start-up checks passed: the service is up."""
        return self._send(["READY=1"], status)

    def status(self, text: str) -> bool:
        """One-line state shown by ``systemctl status``."""
        return self._send([], text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self._send(["STOPPING=1"], status)

    def reloading(self, status: str | None = None) -> bool:
        """Config reload has begun; send ready() when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}"], status)

    def watchdog(self) -> bool:
        """Feed the watchdog (only call while the daemon is known to make progress)."""
        return self._send(["WATCHDOG=1"])

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (EXTEND_TIMEOUT_USEC)."""
        return self._send([f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}"])

    def notify(self, *fields: str) -> bool:
        """Send raw ``KEY=value`` fields in one datagram; True if it was handed to the socket."""
        return self._send(list(fields))

    def close(self) -> None:
        """Release the socket (it is re-created on the next send)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- private -------------------------------------------------------------------------------

    def _send(self, fields: list[str], status: str | None = None) -> bool:
        if status is not None:
            # One field per line: a newline in the text would forge another field.
            text = " ".join(status.split())[:_MAX_STATUS_CHARS]
            self.last_status = text
            fields = [*fields, f"STATUS={text}"]
        if self._address is None or not fields:
            return False
        payload = ("\n".join(fields) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never stall the event loop: a full receive queue drops this one datagram.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as err:
            self._log_once(err)
            return False
        return True

    def _log_once(self, err: OSError) -> None:
        key = f"{type(err).__name__}:{err.errno}"
        if key in self._logged_errors:
            logger.debug("sd_notify still failing: %s", err)
            return
        self._logged_errors.add(key)
        logger.warning(
            "sd_notify to %r failed (further errors of this kind at debug): %s",
            self._display_address(),
            err,
        )

    def _display_address(self) -> str:
        if isinstance(self._address, bytes):
            return "@" + self._address[1:].decode("utf-8", "replace")
        return str(self._address)


def _decode_address(address: str) -> str | bytes:
    # A leading '@' names a Linux abstract socket: the name starts with a NUL byte instead.
    if address.startswith("@"):
        return b"\0" + address[1:].encode("utf-8")
    return address


ProgressKind = Literal["counter", "time"]


@dataclass
class _Source:
    name: str
    probe: Callable[[], float]
    kind: ProgressKind
    last_value: float
    last_change: float


class Heartbeat:
    """A progress counter a loop bumps once per iteration (even idle ones)."""

    def __init__(self) -> None:
        self.count = 0

    def beat(self) -> None:
        """Record one iteration of progress."""
        self.count += 1

    def __call__(self) -> float:
        return self.count


class WatchdogGate:
    """Says whether every registered loop has made progress within ``window_s`` seconds."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._clock = clock
        self._sources: dict[str, _Source] = {}

    def register(
        self, name: str, probe: Callable[[], float], kind: ProgressKind = "counter"
    ) -> None:
        """Watch ``probe``: a counter that grows on progress, or (``kind="time"``) the last time
        of progress on this gate's clock. A new source gets one full window of grace."""
        if name in self._sources:
            raise ValueError(f"progress source {name!r} already registered")
        now = self._clock()
        self._sources[name] = _Source(name, probe, kind, probe(), now)

    def unregister(self, name: str) -> None:
        """Stop watching a source (e.g. a reader removed on reload)."""
        self._sources.pop(name, None)

    @property
    def names(self) -> list[str]:
        """Registered source names."""
        return list(self._sources)

    def stalled(self) -> list[str]:
        """Names of the sources without progress in the window (empty: all healthy)."""
        now = self._clock()
        out: list[str] = []
        for src in self._sources.values():
            try:
                value = float(src.probe())
            except Exception:  # a broken probe means we cannot vouch for that loop
                logger.exception("watchdog probe %s failed", src.name)
                out.append(src.name)
                continue
            if src.kind == "time":
                last = value
            else:
                if value != src.last_value:
                    src.last_value = value
                    src.last_change = now
                last = src.last_change
            if now - last > self.window_s:
                out.append(src.name)
        return out


async def run_watchdog(
    notifier: Notifier,
    gate: WatchdogGate,
    stop_event: asyncio.Event,
    *,
    interval_s: float | None = None,
) -> None:
    """Feed the systemd watchdog every interval while the gate is open, until ``stop_event``.

    Returns at once (after waiting for ``stop_event``) when systemd set no watchdog.
    """
    period = interval_s if interval_s is not None else notifier.watchdog_interval()
    if period is None:
        await stop_event.wait()
        return
    stalled_before: list[str] = []
    status_before: str | None = None
    while not stop_event.is_set():
        stalled = gate.stalled()
        if not stalled:
            if stalled_before:
                logger.warning("watchdog resumed: %s no longer stalled", ", ".join(stalled_before))
                if status_before is not None:
                    notifier.status(status_before)
            notifier.watchdog()
        elif stalled != stalled_before:
            if not stalled_before:
                status_before = notifier.last_status
            logger.error(
                "watchdog withheld: no progress from %s in %.0f s; systemd will restart us",
                ", ".join(stalled),
                gate.window_s,
            )
            notifier.status(f"stalled: {', '.join(stalled)}")
        stalled_before = stalled
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period):
                await stop_event.wait()
