"""The power-loss filesystem itself: what a cut keeps and what it throws away.

These tests pin down the fixture's model (simulators/powerfs/__init__.py) so that the agent tests
built on it mean something: unsynced data and metadata vanish, synced data stays, reads see
pending writes, and SQLite behaves under it as SQLite documents for a power loss (FULL keeps
every commit; NORMAL may lose recent ones).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simulators.powerfs import PowerLossFs, is_mounted
from tests.powerfs.fixture import require_powerfs

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, data: bytes, *, offset: int = 0, sync: bool, create: bool = True) -> None:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _synced_file(fs: PowerLossFs, name: str, data: bytes) -> Path:
    """A file whose creation and content are durable."""
    path = fs.path / name
    _write(path, data, sync=True)
    return path


# ---------------------------------------------------------------- data


def test_unsynced_write_is_discarded_by_a_cut(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"durable|")
    _write(path, b"volatile", offset=8, sync=False, create=False)
    assert path.read_bytes() == b"durable|volatile", "reads see the pending write"
    assert path.stat().st_size == 16
    report = powerfs.cut()
    assert path.read_bytes() == b"durable|"
    assert report.discarded_files == 1
    assert report.discarded_bytes > 0


def test_fsynced_write_survives_a_cut(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"a" * 10_000)
    _write(path, b"b" * 5000, offset=2500, sync=True, create=False)
    powerfs.cut()
    assert path.read_bytes() == b"a" * 2500 + b"b" * 5000 + b"a" * 2500
    # The backing file holds exactly the synced bytes.
    assert (powerfs.backing / "f").read_bytes() == path.read_bytes()


def test_fdatasync_of_another_descriptor_persists_the_file(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"")
    writer = os.open(path, os.O_WRONLY)
    syncer = os.open(path, os.O_RDONLY)
    try:
        os.write(writer, b"written through one fd")
        os.fdatasync(syncer)
    finally:
        os.close(writer)
        os.close(syncer)
    powerfs.cut()
    assert path.read_bytes() == b"written through one fd"


def test_fsync_of_one_file_does_not_persist_another(powerfs: PowerLossFs) -> None:
    a = _synced_file(powerfs, "a", b"")
    b = _synced_file(powerfs, "b", b"")
    _write(b, b"b data", sync=False, create=False)
    _write(a, b"a data", sync=True, create=False)
    powerfs.cut()
    assert a.read_bytes() == b"a data"
    assert b.read_bytes() == b""


def test_close_is_not_a_sync(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"old")
    path.write_bytes(b"new content")  # open(O_TRUNC), write, close
    assert path.read_bytes() == b"new content"
    powerfs.cut()
    assert path.read_bytes() == b"old"


def test_truncate_is_pending_until_fsync(powerfs: PowerLossFs) -> None:
    old = bytes(range(256)) * 40  # 10 KiB of non-zero data
    path = _synced_file(powerfs, "f", old)
    os.truncate(path, 100)
    assert path.stat().st_size == 100
    # Growing it again must show zeros, never the old bytes behind the truncation.
    _write(path, b"tail", offset=8000, sync=False, create=False)
    data = path.read_bytes()
    assert data[:100] == old[:100]
    assert data[100:8000] == bytes(7900)
    assert data[8000:] == b"tail"
    powerfs.cut()
    assert path.read_bytes() == old, "an unsynced truncate is undone"

    os.truncate(path, 100)
    _write(path, b"tail", offset=8000, sync=True, create=False)
    powerfs.cut()
    assert path.read_bytes() == old[:100] + bytes(7900) + b"tail"


def test_truncate_inside_a_page_zeroes_its_tail(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"x" * 4096)
    _write(path, b"y" * 4096, sync=False, create=False)  # the page is now pending
    os.truncate(path, 10)
    os.truncate(path, 4096)
    assert path.read_bytes() == b"y" * 10 + bytes(4086)
    _fsync(path)
    powerfs.cut()
    assert path.read_bytes() == b"y" * 10 + bytes(4086)


def test_sparse_write_past_the_end(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"head")
    _write(path, b"far", offset=3 * 1024 * 1024 + 7, sync=False, create=False)
    assert path.stat().st_size == 3 * 1024 * 1024 + 10
    data = path.read_bytes()
    assert data[:4] == b"head"
    assert data[4:-3] == bytes(len(data) - 7)
    _fsync(path)
    powerfs.cut()
    assert path.read_bytes() == data


def test_large_file_written_by_many_threads(powerfs: PowerLossFs) -> None:
    """8 MiB in odd-sized chunks from 8 threads on separate descriptors, read back exactly."""
    path = _synced_file(powerfs, "big", b"")
    rng = random.Random(7)
    expected = bytearray(rng.randbytes(8 * 1024 * 1024))
    chunks = []
    pos = 0
    while pos < len(expected):
        n = rng.randint(1, 70_000)
        chunks.append((pos, min(n, len(expected) - pos)))
        pos += n
    rng.shuffle(chunks)
    errors: list[BaseException] = []

    def worker(part: list[tuple[int, int]]) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for off, n in part:
                os.pwrite(fd, expected[off : off + n], off)
        except BaseException as err:
            errors.append(err)
        finally:
            os.close(fd)

    threads = [
        threading.Thread(target=worker, args=(chunks[i::8],), name=f"powerfs-writer-{i}")
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert path.read_bytes() == expected
    assert powerfs.stats()["dirty_bytes"] >= len(expected)
    _fsync(path)
    assert powerfs.stats()["dirty_bytes"] == 0
    powerfs.cut()
    assert path.read_bytes() == expected
    assert (powerfs.backing / "big").read_bytes() == expected


# ---------------------------------------------------------------- metadata


def test_a_file_created_and_never_synced_vanishes(powerfs: PowerLossFs) -> None:
    (powerfs.path / "new").write_bytes(b"never synced")
    (powerfs.path / "dir").mkdir()
    assert (powerfs.path / "new").exists()
    report = powerfs.cut()
    assert not (powerfs.path / "new").exists()
    assert not (powerfs.path / "dir").exists()
    assert report.undone_metadata == 2


def test_any_fsync_commits_the_namespace_not_the_data(powerfs: PowerLossFs) -> None:
    """Like an ext4 journal commit: earlier creates survive, their unsynced data does not."""
    (powerfs.path / "created").write_bytes(b"data never synced")
    _synced_file(powerfs, "other", b"x")
    powerfs.cut()
    assert (powerfs.path / "created").read_bytes() == b""


def test_directory_fsync_commits_the_namespace(powerfs: PowerLossFs) -> None:
    path = powerfs.path / "f"
    _write(path, b"content", sync=False)
    fd = os.open(powerfs.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    powerfs.cut()
    assert path.exists()
    assert path.read_bytes() == b""


def test_unsynced_unlink_and_rename_are_undone(powerfs: PowerLossFs) -> None:
    a = _synced_file(powerfs, "a", b"A")
    b = _synced_file(powerfs, "b", b"B")
    c = _synced_file(powerfs, "c", b"C")
    replaced = os.open(b, os.O_RDONLY)
    try:
        os.rename(a, b)  # replaces b
        assert os.fstat(replaced).st_nlink == 0
    finally:
        os.close(replaced)
    assert b.stat().st_nlink == 1
    c.unlink()
    (powerfs.path / "d").mkdir()
    os.rename(powerfs.path / "d", powerfs.path / "e")
    assert sorted(os.listdir(powerfs.path)) == ["b", "e"]
    assert b.read_bytes() == b"A"
    powerfs.cut()
    assert sorted(os.listdir(powerfs.path)) == ["a", "b", "c"]
    assert (a.read_bytes(), b.read_bytes(), c.read_bytes()) == (b"A", b"B", b"C")


def test_synced_unlink_and_rename_stay(powerfs: PowerLossFs) -> None:
    a = _synced_file(powerfs, "a", b"A")
    b = _synced_file(powerfs, "b", b"B")
    c = _synced_file(powerfs, "c", b"C")
    os.rename(a, b)
    c.unlink()
    _fsync(b)
    powerfs.cut()
    assert sorted(os.listdir(powerfs.path)) == ["b"]
    assert b.read_bytes() == b"A"
    assert os.listdir(powerfs.graveyard) == [], "replaced and unlinked files are purged"


def test_unlinked_open_file_keeps_its_pending_data(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"")
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, b"still readable")
        path.unlink()
        assert os.pread(fd, 100, 0) == b"still readable"
        assert os.fstat(fd).st_nlink == 0, "SQLite checks this to notice a deleted database"
    finally:
        os.close(fd)
    powerfs.cut()
    assert path.read_bytes() == b"", "the unlink is undone, the unsynced data is not"


def test_a_committed_unlink_of_an_open_file_leaves_no_orphan(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        assert os.listdir(powerfs.path) == []
        _synced_file(powerfs, "other", b"")  # commits the unlink
        powerfs.cut()
    finally:
        with contextlib.suppress(OSError):  # the old mount is gone
            os.close(fd)
    assert os.listdir(powerfs.path) == ["other"]
    assert os.listdir(powerfs.backing) == ["other"], "cleaned up like an ext4 orphan"


# ---------------------------------------------------------------- the cut itself


def test_a_cut_kills_the_writers_first(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_WRONLY | os.O_APPEND)\n"
            "print('open', flush=True)\n"
            "while True:\n"
            "    os.write(fd, b'x' * 100)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"open\n"
        deadline = time.monotonic() + 30
        while path.stat().st_size < 100_000:
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.01)
        powerfs.cut(writer.pid)
        assert writer.wait(10) == -9
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    assert path.read_bytes() == b""
    assert powerfs.cuts == 1


def test_a_process_that_outlives_the_cut_sees_errors_not_old_state(powerfs: PowerLossFs) -> None:
    path = _synced_file(powerfs, "f", b"synced")
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, b"unsynced")
        powerfs.cut()
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 0)
        assert info.value.errno in (errno.EIO, errno.ENOTCONN)
    finally:
        with contextlib.suppress(OSError):  # close flushes through the dead mount: ENOTCONN
            os.close(fd)
    assert path.read_bytes() == b"synced"


def test_unmount_is_a_clean_shutdown(tmp_path: Path) -> None:
    require_powerfs()
    fs = PowerLossFs(tmp_path / "fs")
    with fs:
        (fs.path / "f").write_bytes(b"written back at unmount")
        assert is_mounted(fs.mountpoint)
    assert not is_mounted(fs.mountpoint)
    assert (fs.backing / "f").read_bytes() == b"written back at unmount"


def test_free_space_counts_pending_writes(tmp_path: Path) -> None:
    """On a 2 MiB backing disk the third MiB is refused at write time, as with ext4 delalloc."""
    require_powerfs()
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        fs = PowerLossFs(disk)
        with fs:
            before = os.statvfs(fs.path)
            _write(fs.path / "f", bytes(1024 * 1024), sync=False)
            after = os.statvfs(fs.path)
            freed = (before.f_bavail - after.f_bavail) * after.f_frsize
            assert freed >= 1024 * 1024
            with pytest.raises(OSError) as info:
                _write(fs.path / "f", bytes(1024 * 1024), offset=1024 * 1024, sync=False)
            assert info.value.errno == errno.ENOSPC
            _fsync(fs.path / "f")
            assert (fs.backing / "f").stat().st_size >= 1024 * 1024
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# ---------------------------------------------------------------- SQLite under power cuts


class _Committer:
    """tests/powerfs/sqlite_child.py (a test helper) as a child; collects the numbers it reported durable."""

    def __init__(self, db: Path, synchronous: str, count: int | None = None) -> None:
        args = [sys.executable, "-m", "tests.powerfs.sqlite_child", str(db), synchronous]
        if count is not None:
            args.append(str(count))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, cwd=ROOT)
        self.committed: list[int] = []
        self.start = -1
        self.done = False
        self._buf = b""

    def pump(self, until: float) -> None:
        """Read reports until the monotonic deadline, EOF or ``done``."""
        assert self.proc.stdout is not None
        while not self.done:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                if line.startswith(b"start "):
                    self.start = int(line.split()[1])
                elif line == b"done":
                    self.done = True
                else:
                    self.committed.append(int(line))

    def wait_started(self) -> None:
        deadline = time.monotonic() + 30
        while self.start < 0:
            assert time.monotonic() < deadline, "child did not start"
            assert self.proc.poll() is None, f"child exited {self.proc.returncode}"
            self.pump(time.monotonic() + 0.05)

    def finish(self) -> None:
        """After the child was killed: collect what it printed before dying."""
        self.proc.wait(10)
        self.pump(time.monotonic() + 10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def _rows(db: Path) -> list[int]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in con.execute("SELECT n FROM t ORDER BY n")]
    finally:
        con.close()


def test_sqlite_wal_full_keeps_every_commit_across_cuts(powerfs: PowerLossFs) -> None:
    db = powerfs.path / "state.db"
    rng = random.Random()
    reported: set[int] = set()
    for _cut in range(6):
        child = _Committer(db, "FULL")
        try:
            child.wait_started()
            child.pump(time.monotonic() + rng.uniform(0.05, 0.8))
            report = powerfs.cut(child.proc.pid)
        finally:
            child.kill()
        assert child.committed, "the child committed nothing before the cut"
        reported.update(child.committed)
        rows = _rows(db)
        assert not reported - set(rows), f"commits lost: {sorted(reported - set(rows))[:10]}"
        assert rows == list(range(1, len(rows) + 1)), "rows are contiguous"
        assert report.discarded_bytes >= 0
    assert len(reported) > 50


def test_sqlite_wal_normal_loses_recent_commits_in_a_cut(powerfs: PowerLossFs) -> None:
    """What docs/store.md warns about: the fixture really drops what NORMAL never synced."""
    db = powerfs.path / "state.db"
    child = _Committer(db, "NORMAL", count=200)
    try:
        child.wait_started()
        child.pump(time.monotonic() + 60)
        assert child.done
        report = powerfs.cut(child.proc.pid)
    finally:
        child.kill()
    assert child.committed == list(range(1, 201))
    assert report.discarded_bytes > 0
    # The database still opens (SQLite's recovery), but commits it reported are gone.
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        have = con.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall()
        rows = [r[0] for r in con.execute("SELECT n FROM t")] if have else []
    finally:
        con.close()
    assert len(rows) < 200, "NORMAL lost nothing: the fixture did not bite"
