"""A real PostgreSQL server for tests: Debian's binaries, a temp data dir, a free loopback port.

Never the system service: ``initdb`` and ``postgres`` from /usr/lib/postgresql/<v>/bin run on a
private data directory and unix-socket directory. PostgreSQL refuses to run as root, so as root
(CI) they run as the ``postgres`` user the Debian package creates (``setpriv``, which execs: the
pid we hold is the server's). One server per pytest worker (session fixture); each test gets
its own database (``pg_dsn``). Durability settings are off: these tests are about concurrency
and SQL, not about PostgreSQL's own crash safety.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from simulators.broker import free_port

__all__ = ["PostgresServer", "pg_bin"]

START_TIMEOUT_S = 30.0
_names = itertools.count(1)


def pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's binary ``name`` (apt-get install postgresql)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} not found under /usr/lib/postgresql/*/bin: "
            "apt-get install postgresql"
        )
    return found[-1]


class PostgresServer:
    """One ``postgres`` process on 127.0.0.1:<port> with its own data directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cabinet-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = [
                "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
            ]  # fmt: skip

    def start(self) -> None:
        """Start (a restart keeps the data and the port)."""
        if not self.data.exists():
            subprocess.run(
                [
                    *self._as_user, pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                    "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )  # fmt: skip
        self.port = self.port or free_port()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *self._as_user, pg_bin("postgres"), "-D", str(self.data),
                    "-p", str(self.port), "-k", str(self.dir),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off", "-c", "max_connections=200",
                    "-c", "shared_buffers=32MB",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(remove=True)
                    raise RuntimeError(
                        "PostgreSQL did not start:\n" + self.log.read_text(errors="replace")
                    ) from None
                time.sleep(0.1)

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self, hint: str = "t") -> str:
        """A fresh database; its DSN."""
        name = f"{''.join(c for c in hint.lower() if c.isalnum())[:40]}_{next(_names)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown; ``remove=False`` keeps the data for a restart."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="pg_dsn")
def pg_dsn_fixture(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A DSN to an empty database of its own on the worker's PostgreSQL server."""
    return postgres_server.create_database(request.node.name)
