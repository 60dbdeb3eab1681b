"""A software TPM 2.0 (swtpm) for the tests: its own state directory, its own loopback ports.

Never the machine's TPM, never a system service. The agent reaches it with the TCTI string
``tcti`` (``swtpm:host=127.0.0.1,port=N``; swtpm listens on N for commands, N+1 for control).
Each ``SwTpm`` is one chip: a second one (another state directory) has another owner seed,
so a key wrapped for one is useless on the other — the "disk copied to another controller" of
the tests. ``stop()`` and ``start()`` again on the same state directory is a power cycle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

SWTPM = shutil.which("swtpm") or "/usr/bin/swtpm"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _free_port_pair() -> int:
    """A port N with N+1 free too (swtpm's control channel), as far as can be told now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports for swtpm")


class SwTpm:
    """``swtpm socket --tpm2`` on a free pair of loopback ports, state in ``state_dir``."""

    def __init__(self, state_dir: Path, log: Path | None = None) -> None:
        self.state_dir = state_dir
        self.log = log or state_dir.with_name(state_dir.name + ".log")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self, port: int | None = None) -> None:
        """Start (the same port again after ``stop()``: the agent's TCTI string stays valid)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5 if port is None else 1):
            self.port = port or _free_port_pair()
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [
                        SWTPM,
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={self.state_dir}",
                        "--server",
                        f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                        "--ctrl",
                        f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                        # Powered on and TPM2_Startup(CLEAR) done, as firmware leaves a real one.
                        "--flags",
                        "not-need-init,startup-clear",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_listening():
                return
            self.stop()  # lost a race for the ports: another pair
        raise AssertionError(f"swtpm did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after the timeout): the TPM's power goes off."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def transient_objects(self) -> int:
        """How many transient objects the TPM holds: whatever a program loaded and left.

        Without a resource manager nothing flushes them but their owner, and a TPM has only a
        few slots: a program that leaks one per start stops working after a few restarts.
        """
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        import tpm2_pytss as t

        with t.ESAPI(self.tcti) as esapi:
            _, data = esapi.get_capability(t.TPM2_CAP.HANDLES, t.TPM2_HT.TRANSIENT << 24, 64)
            return len(data.data.handles)

    def __enter__(self) -> SwTpm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port + 1), timeout=1.0),
            ):
                return True
            time.sleep(0.02)
        return False
