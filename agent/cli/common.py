"""Helpers shared by the command-line tools."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config, load_controller
from agent.controller_config import ControllerConfig
from drivers.errors import CabinetError

DEFAULT_CONFIG = Path("/etc/cabinet-agent/agent.toml")


# ``cabinetctl --cabinet NAME``: which cabinet of a multi-cabinet config the command is about.
selected_cabinet: str | None = None


def load_selected(path: Path) -> AgentConfig:
    """The config of the cabinet ``--cabinet`` names (any cabinet of a one-cabinet file)."""
    return load_config(path, selected_cabinet)


def load_or_exit(path: Path) -> AgentConfig:
    """Load the config; on any problem print one line each to stderr and exit 78."""
    try:
        return load_selected(path)
    except ConfigError as err:
        _exit_config(err)


def load_controller_or_exit(path: Path) -> ControllerConfig:
    """Load the whole file (every cabinet); on any problem one line each, exit 78."""
    try:
        return load_controller(path)
    except ConfigError as err:
        _exit_config(err)


def _exit_config(err: ConfigError) -> NoReturn:
    for line in err.problems:
        print(f"{err.path}: {line}", file=sys.stderr)
    print(f"{err.path}: {len(err.problems)} problem(s); nothing started", file=sys.stderr)
    raise SystemExit(EX_CONFIG) from None


def preflight(
    cfg: AgentConfig, environ: Mapping[str, str] = os.environ
) -> tuple[list[str], list[str]]:
    """What ``cabinet-agent run`` would refuse at start beyond the file itself: (problems, notes).

    Key files (format, permissions, weak keys), the MQTT TLS files and the control socket's
    place. Key names relative to ``$CREDENTIALS_DIRECTORY`` (systemd credentials) cannot be read
    outside the service: they are noted, not failed.
    """
    from agent.mqtt.config import check_tls_files
    from agent.privacy.config import CREDENTIALS_ENV, open_site_key
    from agent.privacy.keys import load_hpke_public, load_signing_public
    from agent.privacy.pseudonym import Pseudonymizer

    def load_site_key(path: Path) -> None:
        # A key held in a TPM: the TPM must load it (this TPM, this site); then let it go.
        key = open_site_key(path, cfg.privacy.tpm_tcti, cfg.cabinet.site_id)
        if isinstance(key, Pseudonymizer) and key.device is not None:
            key.device.close()

    problems: list[str] = []
    notes: list[str] = []
    creds = environ.get(CREDENTIALS_ENV)
    keys: list[tuple[str, Path, Callable[[Path], object]]] = [
        ("privacy.site_key", cfg.privacy.site_key, load_site_key),
        *(
            [("privacy.previous_site_key", cfg.privacy.previous_site_key, load_site_key)]
            if cfg.privacy.previous_site_key is not None
            else []
        ),
        ("privacy.seal_public_key", cfg.privacy.seal_public_key, load_hpke_public),
        *(
            (f"privacy.signing_public_keys[{i}]", path, load_signing_public)
            for i, path in enumerate(cfg.privacy.signing_public_keys)
        ),
    ]
    for field, path, load in keys:
        if not path.is_absolute():
            if creds is None:
                notes.append(f"{field}: systemd credential {path!s} (checked by the service)")
                continue
            path = Path(creds) / path
        try:
            load(path)
        except CabinetError as err:
            problems.append(f"{field}: {err}")
    if cfg.mqtt is not None and cfg.mqtt.tls is not None:
        try:
            check_tls_files(cfg.mqtt.tls)
        except CabinetError as err:
            problems.append(f"mqtt.tls: {err}")
    if cfg.control.enabled:
        sock = cfg.control.socket_path
        try:
            mode = sock.lstat().st_mode
        except FileNotFoundError:
            mode = None
        except OSError as err:
            problems.append(f"control.socket_path: {sock}: {err.strerror}")
            mode = None
        if mode is not None and not stat.S_ISSOCK(mode):
            problems.append(f"control.socket_path: {sock} exists and is not a socket")
    return problems, notes
