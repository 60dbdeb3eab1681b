"""A real mosquitto broker on a free loopback port, for tests, benchmarks and soaks.

``Mosquitto(dir).start()`` writes a conf (persistence, optional ACL, TLS/mTLS, CRL), starts
``/usr/sbin/mosquitto`` and waits until it accepts connections; ``kill()`` is SIGKILL (no final
save), ``start()`` again restarts it on the same port, ``stop()`` is a clean shutdown. It never
touches a system broker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"  # Debian's path is often not on PATH
START_TIMEOUT_S = 15.0


# Ports handed out for servers that stop and start again on the same port (a broker restarted
# in a test) come from below the kernel's ephemeral range (32768+ on Linux): a port the kernel
# picks for bind(0) or for an outgoing connection's source can never be one of them. Parallel
# test workers (pytest-xdist's gwN) each draw from their own slice (other processes from slice
# 0); a process starts at a pid-dependent place in its slice and walks on, so two processes of
# one slice rarely meet; each port is probed with bind() before it is handed out.
_PORT_LOW = 20000
_SLICE = 1000
_SLICES = 12
_next_port: list[int] = []


def _slice_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    digits = worker.removeprefix("gw")
    slot = 1 + int(digits) % (_SLICES - 1) if worker.startswith("gw") and digits.isdigit() else 0
    return _PORT_LOW + slot * _SLICE


def free_port() -> int:
    """A loopback TCP port free now, not reused soon by this process nor by the kernel."""
    start = _slice_start()
    if not _next_port:
        _next_port.append(start + (os.getpid() * 97) % _SLICE)
    for _ in range(_SLICE):
        port = _next_port[0]
        _next_port[0] = start + (port + 1 - start) % _SLICE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the whole slice busy: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False
    crl_file: Path | None = None


@dataclass
class Mosquitto:
    """One mosquitto process on 127.0.0.1:<port>; ``kill()`` is SIGKILL, ``start()`` restarts."""

    dir: Path
    port: int = 0
    acl: str | None = None
    tls: BrokerTls | None = None
    persistence: bool = True
    # Users for the ACL file: with mTLS the certificate CN is the user name.
    extra_conf: str = ""
    binary: str = MOSQUITTO
    # Its own process group (a terminal's Ctrl-C reaches only its parent, which can then stop
    # its clients first) and SIGTERM when the parent dies, even by SIGKILL (Linux): the demo.
    detached: bool = False
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def conf_file(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    def write_conf(self) -> None:
        lines = [
            "user root" if os.geteuid() == 0 else "",
            "per_listener_settings false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            # Save often so a kill -9 loses as little broker state as possible.
            "autosave_interval 1",
            "max_inflight_messages 20",
            "max_queued_messages 100000",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "connection_messages true",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
        ]
        if self.acl is not None:
            acl_file = self.dir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                "tls_version tlsv1.3",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
            if self.tls.require_certificate:
                lines.append("use_identity_as_username true")
            if self.tls.crl_file is not None:
                lines.append(f"crlfile {self.tls.crl_file}")
        self.conf_file.write_text("\n".join(lines) + "\n" + self.extra_conf)

    def start(self) -> None:
        """Start (or restart on the same port) and wait until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        fixed_port = bool(self.port)
        for _attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port()
            self.write_conf()
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0 if self.detached else None,
                preexec_fn=_die_with_parent if self.detached else None,  # before any thread
            )
            self.starts += 1
            if self._wait_accepting():
                return
            # Port taken by someone else between free_port() and bind: try another one.
            self.stop()
        raise RuntimeError(f"mosquitto did not start; log:\n{self.log_tail()}")

    def _wait_accepting(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0),
            ):
                return True
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: re-read the conf (ACL, CRL) without dropping the process."""
        assert self.proc is not None
        self.write_conf()
        self.proc.send_signal(signal.SIGHUP)

    def wait_saved(self, timeout_s: float = 10.0) -> None:
        """Block until mosquitto writes its persistence file again (state before now is saved)."""
        marker = "Saving in-memory database"
        before = self.log_file.read_text(errors="replace").count(marker)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_file.read_text(errors="replace").count(marker) >= before + 2:
                return
            time.sleep(0.05)
        raise AssertionError("mosquitto did not autosave in time")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
