"""``cabinetctl selftest``: every check, in the order a technician would fix them."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict, replace
from pathlib import Path

from agent.cli import common
from agent.cli.diag.check import Check, daemon_status, exit_code
from agent.cli.diag.clock import check_clock, check_ntp, check_trusted_clock
from agent.cli.diag.connections import (
    READER_TIMEOUT_S,
    check_broker,
    check_commands,
    check_readers,
)
from agent.cli.diag.state import (
    DEFAULT_MIN_FREE_PCT,
    check_allow_list,
    check_disk,
    check_keys,
    check_store,
    store_report,
)
from agent.config import AgentConfig, ConfigError, load_controller


async def run_selftest(
    config_path: Path,
    *,
    reader_timeout_s: float = READER_TIMEOUT_S,
    min_free_pct: float = DEFAULT_MIN_FREE_PCT,
) -> list[Check]:
    """Every check, in the order a technician would fix them; with several cabinets and none
    chosen (``cabinetctl --cabinet``), each cabinet's checks in turn, named ``<cabinet>/…``."""
    try:
        ctrl = load_controller(config_path)
        if ctrl.multi and common.selected_cabinet is None:
            checks: list[Check] = []
            for cfg in ctrl.cabinets:
                name = cfg.cabinet.cabinet_id
                for c in await _cabinet_selftest(config_path, cfg, reader_timeout_s, min_free_pct):
                    checks.append(replace(c, check=f"{name}/{c.check}"))
            return checks
        cfg = common.load_selected(config_path)
    except ConfigError as err:
        return [
            Check("FAIL", "config", f"{config_path}: {p}", config_problem=True)
            for p in err.problems
        ]
    return await _cabinet_selftest(config_path, cfg, reader_timeout_s, min_free_pct)


async def _cabinet_selftest(
    config_path: Path, cfg: AgentConfig, reader_timeout_s: float, min_free_pct: float
) -> list[Check]:
    checks = [Check("PASS", "config", f"{config_path} is valid ({len(cfg.readers)} reader(s))")]
    checks.append(check_keys(cfg))
    checks.append(check_clock())
    ntp = await asyncio.to_thread(check_ntp)
    checks.append(ntp)
    disk = check_disk(cfg, min_free_pct)
    checks.append(disk)
    status = await daemon_status(cfg)
    if status is None:
        checks.append(
            Check("WARN", "agent", f"not running (no answer on {cfg.control.socket_path})")
        )
    else:
        checks.append(Check("PASS", "agent", f"running, version {status.get('version')}"))
    trusted = check_trusted_clock(status, ntp)
    if trusted is not None:
        checks.append(trusted)
    checks.extend(await check_readers(cfg, status, reader_timeout_s))
    checks.append(await check_broker(cfg, status))
    commands = check_commands(status)
    if commands is not None:
        checks.append(commands)
    if disk.config_problem:
        checks.append(Check("WARN", "store", "not opened: [store] path is unusable (see disk)"))
    else:
        checks.append(check_store(await store_report(cfg, status)))
    checks.append(await check_allow_list(cfg, status))
    return checks


def cmd_selftest(args: argparse.Namespace) -> int:
    checks = asyncio.run(run_selftest(args.config, reader_timeout_s=args.timeout))
    rc = exit_code(checks)
    if args.json:
        print(json.dumps({"exit_code": rc, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(c.line())
    return rc
