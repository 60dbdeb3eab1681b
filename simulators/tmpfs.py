"""A real, small tmpfs for tests and benchmarks: a disk that fills (root only, as CI runs)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` (mode 0700) at ``path``; lazily unmounted at exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603 -- fixed argv
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],  # noqa: S607
        check=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)  # noqa: S603, S607
