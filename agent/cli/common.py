"""Helpers shared by the command-line tools."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config

DEFAULT_CONFIG = Path("/etc/cabinet-agent/agent.toml")


def load_or_exit(path: Path) -> AgentConfig:
    """Load the config; on any problem print one line each to stderr and exit 78."""
    try:
        return load_config(path)
    except ConfigError as err:
        for line in err.problems:
            print(f"{err.path}: {line}", file=sys.stderr)
        print(f"{err.path}: {len(err.problems)} problem(s); nothing started", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
