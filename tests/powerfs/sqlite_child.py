"""Child process for the powerfs SQLite tests: numbered commits, each reported once durable.

Usage: ``python -m tests.powerfs.sqlite_child DB SYNCHRONOUS [COUNT]``. Opens DB in WAL mode
with the given ``synchronous`` setting, prints ``start <last n>``, then commits rows
``n = last+1, last+2, …`` one transaction each and prints ``n`` after each COMMIT returned.
With COUNT it stops after COUNT commits, prints ``done`` and waits to be killed.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time


def main(path: str, synchronous: str, count: int | None) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad BLOB NOT NULL)")
    n = int(db.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0])
    print(f"start {n}", flush=True)
    end = None if count is None else n + count
    while end is None or n < end:
        n += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (n, os.urandom(300)))
        db.execute("COMMIT")
        print(n, flush=True)
    print("done", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
