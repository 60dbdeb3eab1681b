"""``cabinetctl bundle``: a diagnostics archive for support — the redacted config, versions, the
self-test, the agent's status and store report, recent logs. It holds no key material, no key
path, no secret and no raw badge id (those never reach logs or the store in the first place; the
config is redacted field by field)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli.common import load_selected
from agent.cli.diag.check import COMMAND_TIMEOUT_S, EX_OK, daemon_status
from agent.cli.diag.connections import READER_TIMEOUT_S
from agent.cli.diag.selftest import run_selftest
from agent.cli.diag.state import store_report
from agent.config import AgentConfig, ConfigError

LOG_LINES = 2000
_REDACTED = "<redacted>"
# Config keys whose values are never put in a bundle: key locations, secrets, credentials.
_SECRET_KEY_RE = re.compile(r"(key|secret|password|passwd|token|credential|_file$)", re.I)
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(value: object, key: str = "") -> object:
    """A copy of a parsed config with key paths, secrets and URL credentials replaced."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY_RE.search(key):
        return _REDACTED
    if isinstance(value, str):
        return _URL_CREDENTIALS_RE.sub(lambda m: m.group("scheme") + _REDACTED + "@", value)
    return value


def redacted_config(path: Path) -> dict[str, Any]:
    """The config file as data, redacted; a file that does not parse yields only its error."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return {"error": f"{path}: {err}"}
    result = redact(data)
    assert isinstance(result, dict)  # a table stays a table
    return result


def versions() -> dict[str, str]:
    """The agent and what it runs on."""
    out = {"cabinet-agent": __version__, "python": sys.version.split()[0]}
    for dist in ("sllurp", "paho-mqtt", "cryptography", "pydantic", "prometheus-client"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["os"] = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                out["distribution"] = line.split("=", 1)[1].strip('"')
    return out


def recent_logs(log_file: Path | None, lines: int = LOG_LINES) -> tuple[str, str]:
    """(source, text): the journal of cabinet-agent when there is one, else ``log_file``'s tail."""
    exe = shutil.which("journalctl")
    if exe is not None:
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [exe, "-u", "cabinet-agent", "-n", str(lines), "--no-pager", "-o", "short-iso"],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            if (
                proc.returncode == 0
                and proc.stdout.strip()
                and "-- No entries --" not in (proc.stdout)
            ):
                return "journalctl -u cabinet-agent", proc.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    if log_file is not None:
        try:
            with log_file.open("rb") as f:
                tail = _tail(f, lines)
        except OSError as err:
            return str(log_file), f"(cannot read {log_file}: {err.strerror})\n"
        return str(log_file), tail
    return "none", "(no journal and no --log FILE given)\n"


def _tail(f: io.BufferedReader, lines: int) -> str:
    # Bounded: a runaway log file is read from its last 16 MiB only.
    limit = 16 * 2**20
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    text = f.read().decode("utf-8", "replace")
    return "".join(text.splitlines(keepends=True)[-lines:])


async def build_bundle(
    config_path: Path,
    out: Path,
    *,
    log_file: Path | None = None,
    reader_timeout_s: float = READER_TIMEOUT_S,
) -> list[str]:
    """Write the diagnostics archive (mode 0600); returns the member names."""
    members: dict[str, bytes] = {}
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    members["config.redacted.json"] = _json(redacted_config(config_path))
    members["versions.json"] = _json({**versions(), "generated_at": generated})
    checks = await run_selftest(config_path, reader_timeout_s=reader_timeout_s)
    members["selftest.txt"] = "".join(c.line() + "\n" for c in checks).encode()
    try:
        cfg: AgentConfig | None = load_selected(config_path)
    except ConfigError:
        cfg = None
    if cfg is not None:
        status = await daemon_status(cfg)
        if status is not None:
            status.pop("keys", None)  # key ids only, but not needed by support either
            members["status.json"] = _json(status)
        members["store.json"] = _json(await store_report(cfg, status))
    source, logs = await asyncio.to_thread(recent_logs, log_file)
    members["logs.txt"] = f"# source: {source}\n{logs}".encode()
    await asyncio.to_thread(_write_tar, out, members)
    return sorted(members)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def _write_tar(out: Path, members: Mapping[str, bytes]) -> None:
    root = out.name.removesuffix(".tar.gz")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        now = time.time()
        for name, data in members.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))


def cmd_bundle(args: argparse.Namespace) -> int:
    out: Path = args.output or Path(
        f"cabinet-bundle-{socket.gethostname()}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.tar.gz"
    )
    names = asyncio.run(
        build_bundle(args.config, out, log_file=args.log, reader_timeout_s=args.timeout)
    )
    print(f"{out}: {', '.join(names)}")
    return EX_OK
