"""A power-loss filesystem for tests and benchmarks: what was not fsynced is gone after ``cut()``.

``PowerLossFs(root)`` mounts ``powerfs`` (``powerfs.c`` beside this file, a FUSE passthrough
built with gcc against libfuse3 on first use and cached under ``$XDG_CACHE_HOME/cabinet-sim/``,
keyed by the source's hash) at
``root/mnt`` over ``root/backing``. It behaves like a disk behind a volatile page cache, in
the spirit of Jepsen's LazyFS:

* **Data.** Every write, truncate and size change of a file is held in memory until an
  ``fsync``/``fdatasync`` of any descriptor of that file writes it through to the backing
  file. Reads see the pending writes (as a page cache would). ``fsync`` of one file persists
  nothing of another.
* **Metadata** (create, mkdir, mknod, symlink, link, unlink, rmdir, rename) takes effect at
  once for every process but is journalled: the whole journal becomes durable at the next
  ``fsync``/``fdatasync`` of any file or directory on the mount, like an ext4 journal commit.
  ext4 also commits every 5 s on its own; powerfs does not, so it is harsher than ext4, never
  kinder: a file created and written but never synced is gone after a cut, a rename or an
  unlink that no sync followed is undone. ``chmod``/``chown``/``utimens`` are durable at once.
  A file unlinked while open stays usable through its descriptors (``st_nlink`` 0); if the
  unlink was committed, nothing of it is left after a cut (ext4's orphan cleanup).
* **A write** that needs new blocks fails with ENOSPC when the backing filesystem could not
  hold it together with everything already pending (ext4's delayed allocation reserves space
  at write time too); ``statfs`` reports the space left after the pending writes.
* **A cut** (``cut(pid, …)``): SIGKILL the given processes and wait until they are gone (their
  descriptors closed), discard every unsynced write and undo every uncommitted metadata
  operation in one step under the filesystem's lock, then unmount and mount again (so no
  kernel cache of the old state survives either). A process that still had the mount open
  sees EIO, then ENOTCONN; nobody can observe a half-discarded state.
* **Unmount** (``unmount()``, the end of a ``with`` block) is a clean shutdown: everything is
  written back first, as the kernel's writeback would. ``sync()`` does the same without
  unmounting.

Not modelled: torn writes inside one fsync (a sync either happened or did not), reordering of
data writes of one file before its fsync (they are all lost together), the 5 s journal
commit and the 30 s page-cache writeback of a real kernel.

The root user, ``/dev/fuse``, ``fusermount3`` (Debian: fuse3), ``gcc``, ``pkg-config`` and the
libfuse3 headers (libfuse3-dev) are needed; ``unavailable_reason()`` says which is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "CutReport",
    "PowerFsError",
    "PowerLossFs",
    "build",
    "is_mounted",
    "kill_and_wait",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("powerfs.c")
BUILD_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cabinet-sim" / "powerfs"
)
START_TIMEOUT_S = 15.0
COMMAND_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_FALLBACK_FLAGS = ["-I/usr/include/fuse3", "-lfuse3", "-lpthread"]


class PowerFsError(RuntimeError):
    """The power-loss filesystem cannot be built, mounted, controlled or unmounted."""


@dataclass(frozen=True)
class CutReport:
    """What one power cut threw away."""

    discarded_files: int
    discarded_bytes: int
    undone_metadata: int


def unavailable_reason() -> str | None:
    """Why powerfs cannot run here (with the Debian package to install), or None."""
    if os.geteuid() != 0:
        return "powerfs needs root (FUSE mount with allow_other)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (load the fuse module or give the container the device)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found: apt-get install fuse3"
    if shutil.which("gcc") is None:
        return "gcc not found: apt-get install gcc libc6-dev"
    if not Path("/usr/include/fuse3/fuse.h").exists():
        return "libfuse3 headers not found: apt-get install libfuse3-dev pkg-config"
    return None


def build() -> Path:
    """Compile powerfs.c once per source version; the path of the binary."""
    flags = _fuse_flags()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + "\0".join(flags).encode()).hexdigest()[:16]
    binary = BUILD_DIR / f"powerfs-{digest}"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PowerFsError(f"cannot build powerfs ({' '.join(cmd)}):\n{done.stderr}")
    os.replace(tmp, binary)  # atomic: a concurrent build of the same source is harmless
    return binary


def is_mounted(path: Path) -> bool:
    """Is ``path`` a mount point (also when its FUSE daemon is dead and stat fails)?"""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == target:
                return True
    return False


def kill_and_wait(pids: tuple[int, ...] | list[int], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGKILL each process and wait until it is dead (a zombie has closed its files)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while not _dead(pid):
            if time.monotonic() > deadline:
                raise PowerFsError(f"process {pid} survived SIGKILL for {timeout_s} s")
            time.sleep(0.005)


class PowerLossFs:
    """One powerfs mount at ``root/mnt`` over ``root/backing`` (see the module docstring)."""

    def __init__(self, root: Path, binary: Path | None = None) -> None:
        self.root = root
        self.backing = root / "backing"
        self.graveyard = root / "graveyard"  # unlinked files wait here until a commit
        self.mountpoint = root / "mnt"
        self.log = root / "powerfs.log"
        self.cuts = 0
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    @property
    def path(self) -> Path:
        """The mounted directory: put the files under test here."""
        return self.mountpoint

    @property
    def mounted(self) -> bool:
        return self._proc is not None

    def mount(self) -> None:
        """Start the filesystem and wait until it serves requests."""
        if self._proc is not None:
            raise PowerFsError("already mounted")
        if self._binary is None:
            self._binary = build()
        for d in (self.backing, self.graveyard, self.mountpoint):
            d.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise PowerFsError(f"{self.mountpoint} is already a mount point")
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self._binary), str(self.backing), str(self.graveyard), str(self.mountpoint)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,
            )
        self._buf = b""
        try:
            hello = self._answer(START_TIMEOUT_S)
            if not hello.get("ready"):
                raise PowerFsError(f"unexpected greeting {hello!r}")
            deadline = time.monotonic() + START_TIMEOUT_S
            while not is_mounted(self.mountpoint):
                if time.monotonic() > deadline:
                    raise PowerFsError("mount did not appear")
                time.sleep(0.01)
        except BaseException:
            self._stop()
            raise

    def unmount(self) -> None:
        """Clean shutdown (pending writes written back), unmount; never leaves a mount."""
        self._stop()

    def cut(self, *pids: int) -> CutReport:
        """Power cut: kill ``pids``, drop everything unsynced, remount; what was dropped."""
        if self._proc is None:
            raise PowerFsError("not mounted")
        kill_and_wait(pids)
        answer = self._command("cut")
        self._stop()
        self.cuts += 1
        self.mount()
        return CutReport(
            discarded_files=int(answer["discarded_files"]),
            discarded_bytes=int(answer["discarded_bytes"]),
            undone_metadata=int(answer["undone"]),
        )

    def sync(self) -> None:
        """Write everything pending back to the backing files (a `sync` of the whole disk)."""
        self._command("sync")

    def stats(self) -> dict[str, Any]:
        """Counters (writes, fsyncs, commits, flushed_bytes) and pending state (dirty_*)."""
        return self._command("stats")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> PowerLossFs:
        self.mount()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmount()

    # ---------------------------------------------------------------- private

    def _command(self, cmd: str) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise PowerFsError("not mounted")
        try:
            proc.stdin.write(cmd.encode() + b"\n")
        except BrokenPipeError:
            raise PowerFsError(f"powerfs died:\n{self.log_tail()}") from None
        answer = self._answer(COMMAND_TIMEOUT_S)
        if not answer.get("ok"):
            raise PowerFsError(f"{cmd}: {answer}\n{self.log_tail()}")
        return answer

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PowerFsError(f"no answer from powerfs in {timeout_s} s\n{self.log_tail()}")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise PowerFsError(f"powerfs exited ({proc.poll()}):\n{self.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # EOF: write back, unmount, exit
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
            if proc.stdout is not None:
                proc.stdout.close()
        if is_mounted(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
                check=False,
            )
        if is_mounted(self.mountpoint):
            raise PowerFsError(f"{self.mountpoint} is still mounted")


def _fuse_flags() -> list[str]:
    try:
        done = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "fuse3"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return _FALLBACK_FLAGS
    return [*done.stdout.split(), "-lpthread"]


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rindex(")") + 2] in "ZX"
