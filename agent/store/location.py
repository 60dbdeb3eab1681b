"""Can the state store live where ``[store] path`` says? Checked before anything opens it.

A path that names a directory, sits under /proc or beneath a regular file, or a filesystem too
small for the store's own reserves is a deployment problem: the agent refuses it at start with
one line and exit 78 (systemd does not restart), and ``cabinetctl config check`` / ``selftest``
say the same beforehand. Without this, such a path failed deep inside the store (exit 70, a
restart loop) or -- a filesystem smaller than ``min_free_disk_bytes`` -- opened and then held
every write forever, calling a disk with 97 % free "full".

Nothing here writes: the checks look at the path, its nearest existing ancestor, the mount
table and the filesystem's size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from agent.store.config import MiB, StoreConfig
from agent.store.types import StoreError
from drivers.errors import PermanentError

# Room for the database itself, beyond what the store keeps free (min_free_disk_bytes, the WAL
# budget and the disk reserve): a backlog of about a thousand events.
WORKING_MIN_BYTES: Final = MiB
MIN_WAL_BYTES: Final = 128 * 1024  # as agent.store.db.wal_budget
# Kernel and pseudo filesystems: nothing written there survives, or can be written at all.
_VIRTUAL_FS: Final = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "pstore",
        "bpf",
        "efivarfs",
        "mqueue",
        "fusectl",
        "binfmt_misc",
        "autofs",
        "nsfs",
    }
)


class StoreLocationError(StoreError, PermanentError):
    """``[store] path`` cannot hold the state store (one line naming the problem and the fix)."""


def wal_budget_for(disk_bytes: int, cfg: StoreConfig) -> int:
    """The WAL budget on a filesystem of ``disk_bytes`` (agent.store.db.wal_budget)."""
    return max(MIN_WAL_BYTES, min(cfg.max_wal_bytes, disk_bytes // 8))


def needed_bytes(disk_bytes: int, cfg: StoreConfig) -> int:
    """The smallest filesystem the store can work on with this config."""
    wal = wal_budget_for(disk_bytes, cfg)
    return cfg.min_free_disk_bytes + wal + wal // 2 + WORKING_MIN_BYTES


def location_problems(cfg: StoreConfig) -> list[str]:
    """One line per problem with ``[store] path``; empty when the store can live there."""
    path = Path(cfg.path)
    if not path.is_absolute():
        # The config model refuses these too; kept for callers that build a config by hand.
        return [f"store.path: {path} is relative; give an absolute path"]
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        st = None  # the ancestors are looked at next
    except OSError as err:
        return [f"store.path: {path}: {err.strerror or err}"]
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return [
                f"store.path: {path} is a directory; name the database file in it, "
                f"e.g. {path / 'state.db'}"
            ]
        if not stat.S_ISREG(st.st_mode):
            return [f"store.path: {path} exists and is not a regular file"]
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        return [f"store.path: {anchor} (on the way to {path}) is not a directory"]
    fstype, mount = _filesystem(anchor)
    if fstype in _VIRTUAL_FS:
        return [
            f"store.path: {path} is on {mount} ({fstype}), a kernel filesystem that cannot "
            "keep the state database; use a directory on a real disk, e.g. "
            "/var/lib/cabinet-agent/state.db"
        ]
    try:
        vfs = os.statvfs(anchor)
    except OSError as err:
        return [f"store.path: {anchor}: {err.strerror or err}"]
    disk = vfs.f_blocks * vfs.f_frsize
    need = needed_bytes(disk, cfg)
    if disk and disk < need:
        wal = wal_budget_for(disk, cfg)
        room = disk - wal - wal // 2 - WORKING_MIN_BYTES
        fix = "put the state on a larger filesystem"
        if room > 0:
            fix = f"lower store.min_free_disk_bytes to at most {room} bytes, or {fix}"
        return [
            f"store.path: the filesystem of {anchor} holds {_mib(disk)}, less than the store "
            f"needs: store.min_free_disk_bytes ({_mib(cfg.min_free_disk_bytes)}) + the WAL "
            f"budget ({_mib(wal)}) + its reserve ({_mib(wal // 2)}) + "
            f"{_mib(WORKING_MIN_BYTES)} for the database = {_mib(need)}; {fix}"
        ]
    return []


def check_location(cfg: StoreConfig) -> None:
    """Raise StoreLocationError naming the first problem with ``[store] path``."""
    problems = location_problems(cfg)
    if problems:
        raise StoreLocationError(problems[0])


def _filesystem(path: Path) -> tuple[str, str]:
    """(type, mount point) of the filesystem holding ``path``; ("", "") if unknown."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return "", ""
    target = os.path.realpath(path)
    best = ("", "")
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
            mount = _unescape(fields[4])
            fstype = fields[sep + 1]
        except (ValueError, IndexError):
            continue
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (fstype, mount)
    return best


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"
